"""The MTP engine against the transformers oracle: lossless greedy (spec §2.6), drafter parity (§2.3-2.5, §7.3),
exact sampling (§2.7), no drafter KV memory (§4), stops, prompt-cache reuse, auto draft length."""

import time

import mlx.core as mx
import numpy as np
import pytest
from oracle import hf_drafter_call, hf_embed_scaled, hf_forward, hf_greedy, hf_shared_kv

import gemma_mlx  # noqa: F401
from bench.controlled import ControlledDrafter
from gemma_mlx.cache import LinearCache
from gemma_mlx.models.base import FULL, SLIDING
from gemma_mlx.models.gemma4_assistant import PairError, check_pair
from gemma_mlx.sampling import SamplingParams, processed_logits
from gemma_mlx.draft_length import DraftLength
from gemma_mlx.decode import generate_tokens
from gemma_mlx.prefix_cache import PrefixCache

W = 8  # sliding window of the oracle models
VARIANTS = ["plain", "nosoftcap", "kvshared", "ple", "moe", "keqv", "e2blike", "mm", "unified"]
PROMPTS = {"short": [2, 17, 301, 44, 9], "long": [2] + list(np.random.default_rng(3).integers(3, 500, 19))}
NEW = 3 * W + 2


def run(target, drafter, ids, k, max_tokens=NEW, chunk=8, **kw):
    """(tokens, stats, the prefix cache the finished sequence left its cache in)."""
    kept = PrefixCache(2**30)
    out, stats = [], None
    draft = DraftLength(fixed=k) if k != "auto" else DraftLength()
    for new, stats in generate_tokens(target, drafter, [int(i) for i in ids], max_tokens=max_tokens, draft=draft,
                                      chunk=chunk, prefix_cache=kept, **kw):
        out += new
    return out, stats, kept


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ordered", [False, True], ids=["dense", "centroid"])
def test_speculative_greedy_is_token_identical_to_plain_greedy(variant, ordered, pair, hf_dir):
    target, drafter = pair(variant, ordered)
    outcomes = set()
    for name, ids in PROMPTS.items():
        expected = hf_greedy(hf_dir(variant), [int(i) for i in ids], NEW)
        plain, _, _ = run(target, None, ids, 0)
        assert plain == expected, f"plain greedy differs from transformers ({name})"
        reference = [list(map(int, ids)) + expected]
        for k in (1, 2, 4, 7, "auto"):
            controlled = ControlledDrafter(drafter, reference, alpha=0.7, seed=hash((variant, name, str(k))) % 2**31)
            out, stats, _ = run(target, controlled, ids, k)
            assert out == expected, f"K={k} prompt={name}: speculative output differs from greedy"
            for k_used, n in zip(stats.k_history, stats.accepted_history):
                if k_used:
                    outcomes.add("full" if n == k_used else "zero" if n == 0 else "partial")
    assert outcomes == {"full", "partial", "zero"}


@pytest.mark.parametrize("variant", ["plain", "keqv", "e2blike"])
@pytest.mark.parametrize("ordered", [False, True], ids=["dense", "centroid"])
def test_drafter_matches_transformers_on_replayed_kv(variant, ordered, pair, hf_dir, hf_drafter_dir):
    """Feed HF's own inputs and shared K/V (§7.3 replay) to our drafter for three chained steps."""
    target, drafter = pair(variant, ordered)
    ids = [int(i) for i in PROMPTS["long"]]
    kv = hf_shared_kv(hf_dir(variant), ids[:-1])  # the cache holds positions 0..L-2
    _, hidden = hf_forward(hf_dir(variant), ids[:-1])
    u = np.concatenate([hf_embed_scaled(hf_dir(variant), ids[-1]), hidden[-1]])[None, None]
    cache = _replay_cache(kv)
    reads, masks = drafter.reads(cache), drafter.masks(cache)
    p = len(ids) - 1
    chain = []
    for step in range(3):
        ref_logits, ref_hidden = hf_drafter_call(hf_drafter_dir(variant, ordered), u, p, kv)
        h, g = drafter.forward(mx.array(u.astype(np.float32)), mx.array([p]), reads, masks)
        logits = np.array(drafter.full_logits(h))[0]
        assert np.abs(logits - ref_logits).max() < 1e-4
        assert logits.argmax() == ref_logits.argmax()
        assert np.abs(np.array(g)[0, 0] - ref_hidden).max() < 1e-4
        assert int(np.array(drafter.greedy(h))[0]) == int(ref_logits.argmax())
        nxt = int(ref_logits.argmax())
        chain.append(nxt)
        u = np.concatenate([hf_embed_scaled(hf_dir(variant), nxt), ref_hidden])[None, None]
    # the compiled K-step draft of a round gives HF's chain of greedy tokens
    drafts = drafter.draft(target, mx.array([[ids[-1]]]), mx.array(hidden[-1][None, None].astype(np.float32)), cache, 3)
    assert np.array(drafts)[0].tolist() == chain


class _ReplayCache:
    """HF's shared K/V as a (linear) target cache, so the drafter reads them exactly as it reads ours."""

    def __init__(self, kv):
        self.by_type = {}
        for t, (k, v) in kv.items():
            c = LinearCache(batch=1)
            c.keys, c.values = mx.array(k), mx.array(v)
            c.lengths = np.array([k.shape[2]])
            self.by_type[t] = c
        self.lengths = self.by_type[FULL].lengths

    def producer(self, layer_type):
        return self.by_type[layer_type]


def _replay_cache(kv):
    assert set(kv) == {FULL, SLIDING}
    return _ReplayCache(kv)


def test_compiled_draft_follows_cache_growth_and_weight_updates(pair):
    """The K steps of a round are compiled (models/gemma4_assistant.py): they must stay equal to the same steps run eagerly when the
    full layers' linear buffer grows (a new shape: a new trace) and when the weights change after the first call."""
    target, drafter = pair("plain", False)
    ids = [2] + np.random.default_rng(7).integers(3, 500, 262).tolist()
    cache = None

    def drafts(n, k=3):
        """(compiled, eager) drafts for x = ids[n] once ids[:n] are cached."""
        nonlocal cache
        cache = target.make_cache(1, chunk=64)
        _, g = target.prefill(mx.array([ids[:n]]), cache)
        x = mx.array([[ids[n]]])
        eager = drafter._steps(k, target.model.embed, x, g, mx.array(cache.lengths, dtype=mx.int32), drafter.reads(cache),
                               drafter.masks(cache))
        return np.array(drafter.draft(target, x, g, cache, k)).tolist(), np.array(eager).tolist()

    sizes = set()
    for n in range(250, 259):  # the full layers' buffer grows past GROW_STEP = 256 cached positions
        compiled, eager = drafts(n)
        assert compiled == eager, n
        sizes.add(cache.producer(FULL).keys.shape[2])
    assert sizes == {256, 512}
    head = drafter.model.embed_tokens.weight
    try:
        drafter.model.embed_tokens.weight = -head  # argmax becomes argmin: the first draft changes
        flipped, eager = drafts(258)
        assert flipped == eager
        drafter.model.embed_tokens.weight = head
        assert drafts(258)[0][0][0] != flipped[0][0]
    finally:
        drafter.model.embed_tokens.weight = head


def test_drafter_allocates_no_kv_memory(pair):
    target, drafter = pair("e2blike", True)
    ids = PROMPTS["long"]
    _, _, with_drafter = run(target, ControlledDrafter(drafter, [list(ids) + [0] * 64], 0.5), ids, 4)
    _, _, without = run(target, None, ids, 0)
    assert with_drafter.nbytes == without.nbytes > 0
    assert not any("cache" in name for name, _ in _named_arrays(drafter))


def _named_arrays(module):
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_max_tokens_is_an_exact_cap(k, pair, hf_dir):
    target, drafter = pair("plain", False)
    ids = [int(i) for i in PROMPTS["short"]]
    expected = hf_greedy(hf_dir("plain"), ids, 13)
    for cap in (1, 2, 5, 13):
        out, stats, _ = run(target, ControlledDrafter(drafter, [ids + expected], 1.0), ids, k, max_tokens=cap)
        assert out == expected[:cap] and stats.generated_tokens == cap


def test_every_eos_id_stops_generation(pair, hf_dir):
    target, drafter = pair("plain", False)
    ids = [int(i) for i in PROMPTS["long"]]
    expected = hf_greedy(hf_dir("plain"), ids, NEW)
    eos = expected[9]
    first = expected.index(eos)
    for k in (0, 4):
        out, _, kept = run(target, ControlledDrafter(drafter, [ids + expected], 0.9), ids, k,
                           eos_ids=frozenset({12345, eos}))
        assert out == expected[: first + 1]
        (tokens, cache), = kept.entries.items()
        assert list(tokens) == ids + out[:-1]  # the cache holds what was emitted, nothing past the stop
        assert cache.lengths.tolist() == [len(tokens)]


def test_follow_up_prompt_prefills_only_new_tokens(pair):
    target, drafter = pair("e2blike", False)
    ids = [int(i) for i in PROMPTS["long"]]
    kept = PrefixCache(2**30)
    first = [t for new, _ in generate_tokens(target, drafter, ids, max_tokens=12, draft=DraftLength(fixed=3), chunk=8,
                                             prefix_cache=kept) for t in new]
    follow = ids + first + [7, 8, 9, 10]
    second, stats = [], None
    for new, stats in generate_tokens(target, drafter, follow, max_tokens=12, draft=DraftLength(fixed=3), chunk=8,
                                      prefix_cache=kept):
        second += new
    assert stats.prefill_tokens == 5  # the last reply token was never in the cache, plus the 4 new ones
    fresh, _, _ = run(target, None, follow, 0, max_tokens=12)
    assert second == fresh
    # a prompt that diverges inside the cached text rolls back to the common prefix
    edited = ids[:-2] + [5, 6]
    third = [t for new, stats in generate_tokens(target, drafter, edited, max_tokens=6, draft=DraftLength(fixed=2),
                                                 chunk=8, prefix_cache=kept) for t in new]
    assert third == run(target, None, edited, 0, max_tokens=6)[0]


def test_auto_draft_length_stops_drafting_when_it_never_pays(pair):
    target, drafter = pair("plain", False)
    ids = PROMPTS["short"]
    never_right = ControlledDrafter(drafter, [[0] * 200], alpha=0.0)  # its own random drafts: ~never accepted
    _, stats, _ = run(target, never_right, ids, "auto", max_tokens=120)
    tail = stats.k_history[20:]
    assert sum(k == 0 for k in tail) >= 0.9 * len(tail)


def test_auto_draft_length_is_not_talked_into_drafting_by_noisy_timings():
    """A drafter that is never right, on a busy machine: round times ±30% and drafting nearly free, so a K = 1 round
    often measures cheaper than a plain step. Acceptance evidence decides: plain decoding (but for the probes)."""
    rng = np.random.default_rng(0)
    draft, ks = DraftLength(), []
    for _ in range(400):
        k = draft.choose()
        ks.append(k)
        draft.update(k, 0, 0.10 * rng.uniform(0.7, 1.3) + 0.002 * k)
    tail = ks[20:]
    assert sum(k == 0 for k in tail) >= 0.97 * len(tail)


def test_auto_draft_length_waits_for_the_plain_step_time():
    """The plain round that measures the plain step is pipelined: the next K is chosen before its time is in.
    Until then there is no cost fit, and a constant cost would make the deepest draft look best."""
    draft = DraftLength()
    for _ in range(2):  # the warm-up: K = 1, never accepted
        assert draft.choose() == 1
        draft.update(1, 0, 0.25)
    assert draft.choose() == 0 and draft.choose() == 0  # the second: its predecessor is still in flight
    draft.update(0, 0, 0.20)
    draft.update(0, 0, 0.20)
    assert draft.choose() == 0  # a_1 ≈ 0.2 does not pay for a K = 1 round costing 0.25 s vs 0.20 s


def test_auto_draft_length_probes_less_often_while_probes_fail():
    """A drafter that is never right gets one K = 1 probe in 32 rounds, then in 64, 128, 256, 256..."""
    draft, ks = DraftLength(), []
    for _ in range(1200):
        k = draft.choose()
        ks.append(k)
        draft.update(k, 0, 0.10 + 0.05 * k)
    probes = [i for i, k in enumerate(ks) if k and i > 8]
    assert np.diff(probes).tolist()[:5] == [64, 128, 256, 256, 256]
    for _ in range(600):  # the drafter turns right: probes see it, come every 32 rounds again, drafting comes back
        k = draft.choose()
        ks.append(k)
        draft.update(k, k, 0.10 + 0.05 * k)
    assert all(k > 0 for k in ks[-30:])


# round milliseconds at each K (a plain step, then K draft steps + a verify of K+1) measured on the 31b-like bench
# shape with OpenBLAS (bench/results/speed.json): past K = 3 a deeper draft costs little more than its draft steps
FLAT_DEEP = [90.6, 97.8, 107.9, 118.2, 122.5, 124.6, 128.1, 131.7]


@pytest.mark.parametrize("alpha, share", [(0.6, 0.97), (0.7, 0.985)])
def test_auto_draft_length_keeps_deep_drafts_where_depth_is_cheap(alpha, share):
    """On that curve K = 6–7 pay best and K = 3–4 pay 5–10% less. Deep positions are reached in few rounds: the
    rates from a handful of them must not talk auto K out of them (with the deep estimates shrunk towards the
    previous position's with the weight of one round, auto K's choices got 0.963 / 0.975 of the best's gain)."""
    gain = [sum(alpha**j for j in range(k + 1)) / FLAT_DEEP[k] for k in range(8)]  # E(K) / T(K), true α
    chosen = []
    for seed in range(40):
        rng, draft = np.random.default_rng(seed), DraftLength()
        for r in range(180):
            k = draft.choose()
            n = int(np.argmin(np.append(rng.random(k) < alpha, False)))  # drafts accepted: leading successes
            draft.update(k, n, FLAT_DEEP[k] * (1 + 0.05 * rng.standard_normal()) / 1e3)
            if r >= 20:  # after the warm-up
                chosen.append(gain[k] / max(gain))
    assert np.mean(chosen) >= share


class Slow:
    """A model whose calls cost `seconds` more (host time, in the round's time): fixed costs of any size."""

    def __init__(self, model, seconds):
        self.wrapped, self.seconds = model, seconds

    def __call__(self, *args, **kw):
        time.sleep(self.seconds)
        return self.wrapped(*args, **kw)

    def draft(self, *args, **kw):
        time.sleep(self.seconds)
        return self.wrapped.draft(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.wrapped, name)


def test_auto_draft_length_drafts_when_drafts_are_right(pair, hf_dir):
    """On a target whose forward has a large fixed cost (as a big model's, where verifying K+1 tokens costs about
    one), a drafter that is nearly always right is drafted deep, every round after the warm-up."""
    target, drafter = pair("plain", False)
    ids = [int(i) for i in PROMPTS["short"]]
    expected = hf_greedy(hf_dir("plain"), ids, 80)
    slow = Slow(target, 0.03)
    out, stats, _ = run(slow, ControlledDrafter(drafter, [ids + expected], 0.95), ids, "auto", max_tokens=80)
    assert out == expected
    warm_up = stats.k_history[:5]  # K = 1, 1 (the first timed), then plain rounds until one is timed
    assert warm_up == [1, 1, 0, 0, 0]
    assert all(k >= 2 for k in stats.k_history[5:-1])  # the last round may be cut by max_tokens
    assert stats.mean_accepted_length > 3


def test_auto_draft_length_keeps_what_it_learned_across_calls(mlx_dir):
    """An agent's many short turns pay the warm-up once per engine, not once per call."""
    engine = gemma_mlx.load(str(mlx_dir("plain")), drafter=str(mlx_dir("plain", ordered=False)), progress=False)
    engine.drafter = Slow(ControlledDrafter(engine.drafter, [[0] * 400], alpha=0.0), 0.05)  # never right, slow
    first = gemma_mlx.generate(engine, [2, 17, 301, 44, 9], max_tokens=30, reuse_cache=False).stats.k_history
    second = gemma_mlx.generate(engine, [2, 17, 301, 44, 9], max_tokens=30, reuse_cache=False).stats.k_history
    assert first[:2] == [1, 1] and first[-5:] == [0] * 5  # the warm-up, then plain
    assert second[:5] == [0] * 5 and sum(second) <= 1  # no warm-up (at most the periodic K = 1 probe)
    fixed = gemma_mlx.generate(engine, [2, 17, 301, 44, 9], max_tokens=12, draft_tokens=2, reuse_cache=False)
    assert fixed.stats.k_history[:3] == [2, 2, 2]  # a fixed K is not the engine's auto


def test_mismatched_pair_is_refused_with_the_reason(pair):
    target, _ = pair("plain", False)
    _, other = pair("e2blike", False)
    other.config.backbone_hidden_size = 999
    with pytest.raises(PairError, match="backbone_hidden_size 999"):
        check_pair(target.config, other.config)
    other.config.backbone_hidden_size = target.config.hidden_size


# --- sampling exactness (§2.7) -----------------------------------------------------------------------------


def _first_tokens(target, drafter, ids, params, rows, k, seed, rule=None):
    """The first 3 sampled tokens of `rows` independent generations, run as one batch."""
    from gemma_mlx.speculative import speculative_round

    cache = target.make_cache(rows, chunk=8)
    prompt = mx.array([ids] * rows)
    for s in range(0, len(ids), 8):
        logits, hidden = target(prompt[:, s:s + 8], cache, last_only=True)
    from gemma_mlx.sampling import verify_choices

    seeds = [seed * rows + r for r in range(rows)]
    _, first = verify_choices(logits, mx.zeros((rows, 0), mx.int32), params, seeds, [[len(ids)]] * rows)
    x, g = first.astype(mx.int32), hidden
    out = [[int(t)] for t in np.array(first)[:, 0]]
    key = mx.random.key(seed)
    while min(len(o) for o in out) < 3:
        key, sub = mx.random.split(key)
        res, x, g = speculative_round(target, drafter, cache, x, g, k, params, seeds) if rule is None else \
            rule(target, drafter, cache, x, g, k, params, sub)
        for o, new in zip(out, res.tokens):
            o.extend(new)
    return np.array([o[:3] for o in out])


def _chi2_two_sample(a, b):
    """p-value of a chi-square test that two samples of categories come from one distribution."""
    import torch

    cats = np.union1d(a, b)
    ca = np.array([(a == c).sum() for c in cats], float)
    cb = np.array([(b == c).sum() for c in cats], float)
    keep = (ca + cb) >= 10  # pool rare categories
    ca = np.append(ca[keep], ca[~keep].sum())
    cb = np.append(cb[keep], cb[~keep].sum())
    table = np.stack([ca, cb])
    table = table[:, table.sum(0) > 0]
    exp = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = ((table - exp) ** 2 / exp).sum()
    dof = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _chi2_goodness_of_fit(sample, probs):
    """p-value of a chi-square test that `sample` was drawn from `probs` (rare categories pooled)."""
    import torch

    observed = np.bincount(sample, minlength=len(probs)).astype(float)
    expected = probs * len(sample)
    keep = expected >= 5
    observed = np.append(observed[keep], observed[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    observed, expected = observed[expected > 0], expected[expected > 0]
    stat = ((observed - expected) ** 2 / expected).sum()
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _hf_rule_round(target, drafter, cache, x, g, k, params, key):
    """transformers' rule (spec §2.7): accept with min(1, p/q), q = softmax(raw drafter logits). Inexact."""
    from gemma_mlx.sampling import processed_logits
    from gemma_mlx.speculative import RoundResult

    drafts = drafter.draft(target, x, g, cache, k)
    logits, hidden = target(mx.concatenate([x, drafts.astype(x.dtype)], axis=1), cache)
    p = mx.softmax(processed_logits(logits, params), axis=-1)
    q = mx.full(p[:, :k].shape, 1.0 / p.shape[-1])  # a random drafter's raw distribution is ~uniform
    pd = mx.take_along_axis(p[:, :k], drafts[..., None].astype(mx.int32), axis=-1)[..., 0]
    qd = mx.take_along_axis(q, drafts[..., None].astype(mx.int32), axis=-1)[..., 0]
    k1, k2 = mx.random.split(key)
    accept = mx.random.uniform(shape=pd.shape, key=k1) < mx.minimum(1.0, pd / qd)
    resid = mx.maximum(p[:, :k] - q, 0)
    fallback = mx.random.categorical(mx.log(mx.concatenate([resid, p[:, k:]], axis=1) + 1e-30), key=k2)
    mx.eval(drafts, accept, fallback, hidden)
    a, f, d = np.array(accept), np.array(fallback), np.array(drafts)
    n = np.argmin(np.concatenate([a, np.zeros((len(a), 1), bool)], axis=1), axis=1)
    cache.rollback(k - n)
    emitted = [d[b, :n[b]].tolist() + [int(f[b, n[b]])] for b in range(len(n))]
    nx = mx.array([[e[-1]] for e in emitted], dtype=x.dtype)
    ng = mx.take_along_axis(hidden, mx.array(n, dtype=mx.int32)[:, None, None], axis=1)
    return RoundResult(emitted, k), nx, ng


@pytest.mark.slow
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_p=0.9)],
                         ids=["t0.7", "top_p0.9"])
def test_speculative_sampling_is_distributed_like_plain_sampling(params, pair, hf_dir):
    target, drafter = pair("plain", False)
    ids = [int(i) for i in PROMPTS["short"]]
    greedy = hf_greedy(hf_dir("plain"), ids, 8)
    rows = 2500
    plain = np.concatenate([_first_tokens(target, None, ids, params, rows, 0, seed=s) for s in range(8)])
    controlled = ControlledDrafter(drafter, [ids + greedy] * rows, alpha=0.8)
    spec = np.concatenate([_first_tokens(target, controlled, ids, params, rows, 3, seed=100 + s) for s in range(8)])
    # token 1 (sampled after the prefill) against its exact distribution from transformers' logits
    exact = np.array(mx.softmax(processed_logits(mx.array(hf_forward(hf_dir("plain"), ids)[0][-1]), params)))
    assert _chi2_goodness_of_fit(spec[:, 0], exact) > 0.01, "token 1 distribution differs"
    for pos in (1, 2):  # tokens 2 and 3 come from speculative rounds: against plain sampling
        assert _chi2_two_sample(plain[:, pos], spec[:, pos]) > 0.01, f"token {pos + 1} distribution differs"
    hf_rule = np.concatenate([_first_tokens(target, controlled, ids, params, rows, 3, seed=200 + s,
                                            rule=_hf_rule_round) for s in range(8)])
    assert min(_chi2_two_sample(plain[:, pos], hf_rule[:, pos]) for pos in range(3)) < 0.01


def test_a_seed_gives_the_same_samples_with_mtp_at_any_k_as_without(pair):
    """The sampling noise is keyed by (seed, position), and a draft is accepted iff it is the sample: so with a seed,
    MTP at any K, with drafts often right or never right, emits the tokens plain sampling emits."""
    target, drafter = pair("plain", False)
    ids = [int(i) for i in PROMPTS["short"]]
    params = SamplingParams(temperature=1.0, top_p=0.95)
    plain = run(target, None, ids, 0, max_tokens=24, params=params, seed=11)[0]
    assert run(target, None, ids, 0, max_tokens=24, params=params, seed=12)[0] != plain
    reference = [ids + plain]
    for k, alpha in ((1, 0.9), (3, 0.9), (5, 0.5), (3, 0.0), ("auto", 0.8)):
        out, stats, _ = run(target, ControlledDrafter(drafter, reference, alpha=alpha, seed=k == 1), ids, k,
                            max_tokens=24, params=params, seed=11)
        assert out == plain, (k, alpha)
        if alpha >= 0.5 and k != "auto":
            assert stats.accepted_tokens > 0  # the right drafts were accepted, not all rejected


def test_sampling_with_a_seed_is_reproducible_and_stays_in_the_nucleus(pair):
    target, drafter = pair("plain", True)
    ids = [int(i) for i in PROMPTS["short"]]
    params = SamplingParams(temperature=0.8, top_k=5)
    runs = [run(target, drafter, ids, k, max_tokens=20, params=params, seed=3)[0] for k in (3, 3, 0)]
    assert runs[0] == runs[1] and len(runs[0]) == 20
    # every token is among the 5 most likely of the target at its position (top_k=5 is applied to the target)
    seq = ids + runs[0]
    logits, _ = target(mx.array([seq]), target.make_cache(chunk=64))
    top5 = np.argsort(-np.array(logits[0]), axis=-1)[:, :5]
    for i, tok in enumerate(runs[0]):
        assert tok in top5[len(ids) - 1 + i]


def test_sampling_noise_is_finite_over_a_full_vocabulary():
    """The noise's uniform must stay below 1.0 in float32: a token whose noise is +inf is drawn whatever its
    probability (at 24 bits that was about one position in 64 over Gemma's 262144 tokens)."""
    from gemma_mlx.sampling import position_noise

    vocab = mx.arange(262144)
    for start in range(0, 512, 64):
        noise = position_noise([5], [list(range(start, start + 64))], vocab)
        assert bool(mx.all(mx.isfinite(noise))), f"infinite noise at positions {start}..{start + 63}"


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_p=0.95, top_k=64),
                                    SamplingParams(temperature=1.0, top_p=0.5, top_k=1000, min_p=0.05),
                                    SamplingParams(temperature=0.7, top_k=40)], ids=["top_p", "min_p", "top_k"])
def test_top_k_sampling_draws_what_the_whole_vocabulary_would(params):
    """With a top-k, only its k candidates are filtered and given noise: the same draw as processing and noising all
    262144 tokens."""
    from gemma_mlx.sampling import position_noise, sample

    V, rows = 262144, 24
    logits = mx.random.normal((rows, 2, V), key=mx.random.key(1)) * 4
    seeds, positions = list(range(rows)), [[9, 10]] * rows
    whole = mx.argmax(processed_logits(logits, params) + position_noise(seeds, positions, mx.arange(V)), axis=-1)
    assert np.array_equal(np.array(sample(logits, params, seeds, positions)), np.array(whole))
