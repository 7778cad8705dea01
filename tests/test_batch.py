"""Batch mode (decode.py): every row of a batched run is token-identical to that prompt's own greedy run
(transformers' greedy, the oracle), with ragged acceptance, rows finishing at different rounds and rows joining
mid-run; padded and rejected cache slots are never attended; the MoE expert-union path computes what mlx-lm's
per-pair path does; the batch draft length maximises the rows' summed tokens per second; sampling in batch is
distributed like plain sampling (spec §2.6, §2.7, §4)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from oracle import hf_greedy

import gemma_mlx
from bench.controlled import ControlledDrafter
from gemma_mlx.decode import Decoder
from gemma_mlx.models.base import cache_for
from gemma_mlx.models.gemma4_text import TextConfig
from gemma_mlx.models.moe import Experts
from gemma_mlx.sampling import SamplingParams
from gemma_mlx.draft_length import DraftLength
from gemma_mlx.speculative import Stats

W = 8  # sliding window of the oracle models
LENGTHS = [3, 17, 6, 25, 9, 12, 30, 4]  # prompt lengths, some longer than the window


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(3, 500, LENGTHS[i % len(LENGTHS)] - 1).tolist() for i in range(n)]


def decoder_for(target, drafter, reference, k, alpha=0.7, seed=1, **kw):
    """A Decoder whose drafter is right with probability ≈ alpha (reference[row.id]: prompt + greedy
    continuation), or plain decoding when drafter is None."""
    decoder = Decoder(target, None, draft=DraftLength(fixed=0), **kw)
    if drafter is not None:
        decoder.drafter = ControlledDrafter(drafter, lambda: [reference[r.id] for r in decoder.rows], alpha, seed)
        decoder.draft = DraftLength() if k == "auto" else DraftLength(fixed=k)
    return decoder


def run_batch(target, drafter, reference, rows, k, join_at=None, eos_ids=frozenset(), chunk=8):
    """rows: [(prompt, max_tokens)]; the last row joins after `join_at` rounds when given."""
    decoder = decoder_for(target, drafter, reference, k, eos_ids=eos_ids, chunk=chunk)
    first = rows if join_at is None else rows[:-1]
    added = [decoder.add(p, m) for p, m in first]
    finished, rounds = [], 0
    while decoder.rows or decoder.finished or len(added) < len(rows):
        if rounds == join_at:
            added.append(decoder.add(*rows[-1]))
        finished += decoder.step()
        rounds += 1
    assert sorted(r.id for r in finished) == [r.id for r in added]  # every row is collected exactly once
    return added


def outcomes(rows):
    return {("full" if n == k else "zero" if n == 0 else "partial")
            for r in rows for k, n in zip(r.stats.k_history, r.stats.accepted_history) if k}


@pytest.mark.parametrize("variant", ["e2blike", "moe8"])  # dense (PLE, kv-shared) and MoE (8 experts, top 2)
@pytest.mark.parametrize("batch", [2, 4, 8])
def test_batched_rows_equal_their_own_greedy_runs(variant, batch, pair, hf_dir):
    target, drafter = pair(variant, batch % 4 == 0)
    ps = prompts(batch, seed=batch)
    new = [3 * W + 3 * (i % 3) for i in range(batch)]  # >= 3W tokens; rows finish at different rounds
    expected = [hf_greedy(hf_dir(variant), p, n) for p, n in zip(ps, new)]
    reference = {i: p + e for i, (p, e) in enumerate(zip(ps, expected))}
    seen = set()
    for k in (3, "auto"):
        rows = run_batch(target, drafter, reference, list(zip(ps, new)), k, join_at=4 if batch > 2 else None)
        for i, row in enumerate(rows):
            assert row.tokens == expected[i], f"row {i} (prompt length {len(ps[i])}) differs at K={k}"
            assert row.finish_reason == "length"
        seen |= outcomes(rows)
    assert seen == {"full", "partial", "zero"}


def test_rows_finishing_by_eos_or_at_once_leave_without_disturbing_the_others(pair, hf_dir):
    target, drafter = pair("plain", False)
    ps = prompts(5, seed=7)
    expected = [hf_greedy(hf_dir("plain"), p, 3 * W) for p in ps]
    eos = expected[1][5]  # row 1 stops by its 6th token (other rows too, where that token appears)
    reference = {i: p + e for i, (p, e) in enumerate(zip(ps, expected))}
    limits = [3 * W] * 4 + [1]  # the last row is done with its first token: it never enters the batch
    rows = run_batch(target, drafter, reference, list(zip(ps, limits)), 4, eos_ids=frozenset({eos}))
    for row, exp, limit in zip(rows, expected, limits):
        stop = exp.index(eos) + 1 if eos in exp[:limit] else limit
        assert row.tokens == exp[:stop]
        assert row.finish_reason == ("stop" if eos in exp[:limit] else "length")
    assert rows[1].finish_reason == "stop" and rows[4].tokens == expected[4][:1]


def test_batch_empties_and_refills_and_rows_can_be_removed(pair, hf_dir):
    """All rows leave (the cache keeps no row), then new ones join: the same cache serves them; a row removed
    between rounds (a cancelled request) leaves the others undisturbed."""
    target, drafter = pair("plain", False)
    ps = prompts(4, seed=11)
    expected = [hf_greedy(hf_dir("plain"), p, 12) for p in ps]
    reference = {i: p + e for i, (p, e) in enumerate(zip(ps, expected))}
    decoder = decoder_for(target, drafter, reference, 2, chunk=8)
    first = decoder.add(ps[0], 12)
    while decoder.rows:
        decoder.step()
    assert decoder.cache.lengths.shape == (0,)
    later = [decoder.add(p, 12) for p in ps[1:]]
    decoder.step()
    decoder.remove(later[1])
    assert later[1].finish_reason == "cancelled" and later[1] not in decoder.rows
    while decoder.rows:
        decoder.step()
    assert [r.tokens for r in [first] + later] == expected[:2] + [expected[2][:len(later[1].tokens)], expected[3]]


def test_plain_rounds_are_pipelined_at_any_batch_size_through_joins_and_leaves(pair, hf_dir):
    """One loop for one row and for B: the next plain round is started before the last one is read
    (Decoder.queued); rows that finish drop out of it, a row joining discards it (its position rolled back); every
    row is still its own greedy run."""
    target, _ = pair("plain", False)
    ps = prompts(4, seed=3)
    limits = [10, 4, 7, 9]
    expected = [hf_greedy(hf_dir("plain"), p, n) for p, n in zip(ps, limits)]
    alone = Decoder(target, None, chunk=8)
    row = alone.add(ps[0], limits[0])
    alone.step()
    assert alone.queued is not None and alone.queued.k == 0
    while alone.rows:
        alone.step()
    assert row.tokens == expected[0] and alone.queued is None
    decoder = Decoder(target, None, chunk=8)
    rows = [decoder.add(p, n) for p, n in zip(ps[:3], limits[:3])]
    queued, rounds = [], 0
    while decoder.rows:
        if rounds == 2:
            rows.append(decoder.add(ps[3], limits[3]))
            assert decoder.queued is None
        decoder.step()
        queued.append(None if decoder.queued is None else decoder.queued.hidden.shape[0])
        rounds += 1
    assert [r.tokens for r in rows] == expected
    # rows in the queued round after each step: 3; the 4th joins (the queued round is discarded) and row 1 finishes
    # in round 3, then rows 2, 0 and 3 finish; after the last round nothing is queued
    assert queued == [3, 3, 3, 3, 3, 2, 2, 2, 1, None]


def test_padded_and_rejected_slots_are_never_attended(pair, hf_dir):
    """Rows of different lengths share buffers: a linear buffer is padded to the longest row, the rings hold
    rejected drafts after partial acceptance. Poisoning every slot a row must not see changes nothing, bit for bit,
    in the next round (drafts, verify logits, hidden states)."""
    target, drafter = pair("plain", False)
    ps = [prompts(8)[i] for i in (0, 3, 6)]  # lengths 3, 25, 30: padding, wrapped rings
    expected = [hf_greedy(hf_dir("plain"), p, 20) for p in ps]
    reference = {i: p + e for i, (p, e) in enumerate(zip(ps, expected))}
    decoder = decoder_for(target, drafter, reference, 3, alpha=0.5, seed=3, chunk=8)
    for p in ps:
        decoder.add(p, 20)
    for _ in range(3):
        decoder.step()
    cache = decoder.cache
    assert len(set(cache.lengths.tolist())) == 3

    def next_round():
        drafts = drafter.draft(target, decoder.x, decoder.g, cache, 3)
        logits, hidden = target(mx.concatenate([decoder.x, drafts.astype(decoder.x.dtype)], axis=1), cache)
        mx.eval(drafts, logits, hidden)
        cache.rollback(4)
        return np.array(drafts), np.array(logits), np.array(hidden)

    before = next_round()
    poisoned = {"ring": 0, "linear": 0}
    for layer in cache.layers:
        pos = np.full((layer.batch, layer.keys.shape[2]), -1)
        pos[:, : layer.slots()] = layer.positions()
        # nothing older than the drafter's window (W+1 newest accepted positions) is needed by a ring row
        bad = (pos < 0) | (layer.is_ring & (pos < layer.lengths[:, None] - 1 - W))
        poisoned["ring" if layer.is_ring else "linear"] += int(bad[:, : layer.slots()].sum())
        m = mx.array(bad)[:, None, :, None]
        layer.keys = mx.where(m, mx.array(1e4, layer.keys.dtype), layer.keys)
        layer.values = mx.where(m, mx.array(-1e4, layer.values.dtype), layer.values)
    assert poisoned["ring"] > 0 and poisoned["linear"] > 0
    after = next_round()
    for a, b in zip(before, after):
        assert np.array_equal(a, b)


def test_cache_row_operations():
    cfg = TextConfig.from_dict(dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                    sliding_window=4, hidden_size_per_layer_input=0))
    cache, together = cache_for(cfg, batch=0, chunk=4), cache_for(cfg, batch=0, chunk=4)
    rows = []
    for n in (3, 300, 9):
        one = cache_for(cfg, batch=1, chunk=4)
        for layer in one.layers:
            for s in range(0, n, 4):
                t = min(4, n - s)
                layer.write(mx.full((1, 1, t, 2), float(n)), mx.full((1, 1, t, 2), float(-n)))
        cache.extend_rows([one])
        rows.append(one)
    together.extend_rows(rows[:1])
    together.extend_rows(rows[1:])  # rows joining a batch together: one copy, the same cache
    for a, b in zip(cache.layers, together.layers):
        assert (a.lengths == b.lengths).all() and mx.array_equal(a.keys, b.keys) and mx.array_equal(a.values, b.values)
    ring, full = cache.layers
    assert cache.lengths.tolist() == [3, 300, 9] and ring.keys.shape[2] == 8 and full.keys.shape[2] == 512
    assert (full.positions()[0, 3:] == -1).all() and (full.positions()[2] == np.r_[0:9, [-1] * 291]).all()
    cache.take_rows([2, 0])  # the long row leaves: the linear buffer shrinks to what the others use
    assert cache.lengths.tolist() == [9, 3] and full.keys.shape[2] == 256 and ring.keys.shape[2] == 8
    assert float(full.keys[0, 0, 8, 0]) == 9.0 and float(full.values[1, 0, 2, 0]) == -3.0
    cache.take_rows([])
    assert cache.lengths.shape == (0,) and full.keys.shape[0] == 0


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_expert_union_computes_what_the_per_pair_path_does(bits):
    """models/moe.py: grouping tokens by expert (buckets of power-of-two sizes) is only a different schedule: the grouped
    path (`_grouped`; what a multi-token step runs, except for quantized experts on the CPU) equals mlx-lm's
    per-pair SwitchGLU, fp32 and quantized."""
    from types import SimpleNamespace

    experts = Experts(SimpleNamespace(hidden_size=128, moe_intermediate_size=64, num_experts=16))
    if bits:
        nn.quantize(experts, group_size=64, bits=bits)
        assert "scales" in experts.switch_glu.up_proj
    rng = np.random.default_rng(0)
    for shape in [(1, 2), (2, 5), (8, 4), (3, 40)]:  # a verify step of B rows × K+1 tokens, and a prefill chunk
        n = int(np.prod(shape))
        p = np.exp(2 * rng.normal(size=16))  # uneven routing: some experts get many tokens, some one
        idx = np.stack([rng.choice(16, 4, replace=False, p=p / p.sum()) for _ in range(n)]).reshape(*shape, 4)
        x, w = mx.random.normal((*shape, 128)), mx.array(rng.random((*shape, 4)).astype(np.float32))
        idx = mx.array(idx.astype(np.int32))
        per_pair = (experts.switch_glu(x, idx) * w[..., None]).sum(-2)
        for matmul in (False, True) if not bits else (False,):
            grouped = experts._grouped(x, idx, w, matmul=matmul)
            assert np.allclose(np.array(grouped), np.array(per_pair), atol=1e-5, rtol=1e-5)
        assert np.allclose(np.array(experts(x, idx, w)), np.array(per_pair), atol=1e-5, rtol=1e-5)


def test_half_precision_experts_run_on_the_cpu():
    """MLX's CPU gather_mm is float32-only: bf16/fp16 experts (the default load dtype) take the grouped matmul path,
    for one token and for many."""
    from types import SimpleNamespace

    from mlx.utils import tree_map

    cfg = SimpleNamespace(hidden_size=128, moe_intermediate_size=64, num_experts=8)
    reference, rng = Experts(cfg), np.random.default_rng(1)
    for dtype in (mx.bfloat16, mx.float16):
        experts = Experts(cfg)
        experts.update(tree_map(lambda a: a.astype(dtype), reference.parameters()))
        for n in (1, 6):
            idx = mx.array(np.stack([rng.choice(8, 2, replace=False) for _ in range(n)]).astype(np.int32))
            x, w = mx.random.normal((n, 128)), mx.array(rng.random((n, 2)).astype(np.float32))
            out = experts(x.astype(dtype), idx, w.astype(dtype))
            assert out.dtype == dtype
            assert np.allclose(np.array(out.astype(mx.float32)), np.array(reference(x, idx, w)), atol=2e-2)


def test_expert_union_verify_matches_per_pair_in_the_target(pair):
    target, _ = pair("moe8", False)
    outs = []
    for union in (True, False):
        for layer in target.model.layers:
            layer.experts.union = union
        cache = target.make_cache(batch=4, chunk=8)
        target(mx.array(np.random.default_rng(0).integers(3, 500, (4, 6))), cache)
        outs.append(np.array(target(mx.array(np.random.default_rng(1).integers(3, 500, (4, 5))), cache)[0]))
    for layer in target.model.layers:
        layer.experts.union = True
    assert np.allclose(*outs, atol=1e-4)


def test_generate_batch_api_with_stop_strings(mlx_dir):
    """generate_batch gives each prompt what generate gives it alone: text, tokens, finish reason."""
    engine = gemma_mlx.load(str(mlx_dir("plain")), drafter=str(mlx_dir("plain", ordered=False)), progress=False)
    ps = ["the quick brown fox", [2, 17, 301, 44, 9], "why is the sky blue"]
    kw = dict(max_tokens=20, draft_tokens=2)
    alone = [gemma_mlx.generate(engine, p, reuse_cache=False, **kw) for p in ps]
    stop = alone[1].text[len(alone[1].text) // 2:][:3]
    kw["stop"] = [stop]
    alone = [gemma_mlx.generate(engine, p, reuse_cache=False, **kw) for p in ps]
    batched = gemma_mlx.generate_batch(engine, ps, **kw)
    assert alone[1].finish_reason == "stop"
    for a, b in zip(alone, batched):
        assert (b.text, b.finish_reason) == (a.text, a.finish_reason)
        n = min(len(a.tokens), len(b.tokens))  # both stop in the round that completes the stop string
        assert b.tokens[:n] == a.tokens[:n]
        assert b.stats.generated_tokens == len(b.tokens) and b.stats.rounds > 0
    with pytest.raises(ValueError, match="no drafter"):
        gemma_mlx.generate_batch(gemma_mlx.Engine(engine.target, engine.tokenizer), ps, draft_tokens=2)


def test_generate_batch_seeds_every_row_or_each_its_own(mlx_dir):
    """`seed=S`: every row samples as `generate(prompt, seed=S)` does alone; `seed=[...]`: one seed per prompt."""
    engine = gemma_mlx.load(str(mlx_dir("plain")), drafter=str(mlx_dir("plain", ordered=False)), progress=False)
    p = "the quick brown fox"
    kw = dict(max_tokens=16, temperature=1.0, draft_tokens=2)
    alone = [gemma_mlx.generate(engine, p, seed=s, reuse_cache=False, **kw).tokens for s in (5, 6)]
    assert alone[0] != alone[1]
    assert [r.tokens for r in gemma_mlx.generate_batch(engine, [p, p], seed=5, **kw)] == [alone[0]] * 2
    assert [r.tokens for r in gemma_mlx.generate_batch(engine, [p, p], seed=[5, 6], **kw)] == alone


# --- the batch draft length (DraftLength.choose(rows, room)) on simulated hardware -----------------------------


def simulate(alphas, cost, rounds=240, room=None, seed=0):
    """Drive DraftLength with rows of true acceptance `alphas` and round seconds cost(B, K); the chosen Ks."""
    rng = np.random.default_rng(seed)
    draft, stats, ks = DraftLength(), [Stats() for _ in alphas], []
    for _ in range(rounds):
        k = draft.choose(stats, room or [10**6] * len(alphas))
        n = [int(np.argmin(np.append(rng.random(k) < a, False))) for a in alphas]
        for s, m in zip(stats, n):
            s.record(k, m)
        draft.update(k, n, cost(len(alphas), k))
        ks.append(k)
    return ks


def gain(alphas, cost, k, room=None):
    """Σ_b E_b(K) / T(B, K) from the true acceptance: the expected tokens per second the rule maximises."""
    room = room or [10**6] * len(alphas)
    return sum(sum(a**j for j in range(min(k, r - 1) + 1)) for a, r in zip(alphas, room)) / cost(len(alphas), k)


def best_k(alphas, cost, room=None):
    return int(np.argmax([gain(alphas, cost, k, room) for k in range(8)]))


def mode(ks):
    return max(set(ks), key=ks.count)


WEIGHTS_BOUND = lambda b, k: 1.0 + 0.05 * k + 0.01 * b * (k + 1)  # noqa: E731  reading weights dominates a round
COMPUTE_BOUND = lambda b, k: 0.2 + 0.1 * b * (k + 1)  # noqa: E731  every verified token costs
# a CPU BLAS (MKL here): 1-3 rows cost one, 4+ rows about two; and one (OpenBLAS) whose cost flattens out with K
BLAS_STEP = lambda b, k: 1.0 + 0.05 * k + (1.0 if b * (k + 1) > 3 else 0.0)  # noqa: E731
FLATTENING = lambda b, k: 1.0 + 0.03 * k + 0.4 * (1 - np.exp(-b * k / 2.5))  # noqa: E731


@pytest.mark.parametrize("alphas, cost", [([0.8] * 8, WEIGHTS_BOUND), ([0.7] * 8, COMPUTE_BOUND), ([0.7], COMPUTE_BOUND),
                                          ([0.95] * 4 + [0.05] * 4, WEIGHTS_BOUND), ([0.9, 0.9, 0.1, 0.1], WEIGHTS_BOUND),
                                          ([0.7], BLAS_STEP), ([0.8], BLAS_STEP), ([0.7] * 4, BLAS_STEP),
                                          ([0.7], FLATTENING), ([0.7] * 4, FLATTENING)])
def test_batch_draft_length_maximises_summed_tokens_per_second(alphas, cost):
    k = mode(simulate(alphas, cost)[-100:])
    assert gain(alphas, cost, k) >= 0.97 * gain(alphas, cost, best_k(alphas, cost)), (k, best_k(alphas, cost))
    assert (k == 0) == (best_k(alphas, cost) == 0)


def test_batch_draft_length_cases():
    # the same hardware: a lone row drafts, eight rows of the same acceptance do better without drafts
    assert best_k([0.7] * 8, COMPUTE_BOUND) == 0 and best_k([0.7], COMPUTE_BOUND) > 0
    # per-row acceptance, not the pooled rate: half the rows nearly always right, half nearly never
    assert best_k([0.95] * 4 + [0.05] * 4, WEIGHTS_BOUND) > best_k([0.5] * 8, WEIGHTS_BOUND)
    # rows that need one more token gain nothing from drafts
    room = [1, 1, 1, 50]
    assert best_k([0.9] * 4, COMPUTE_BOUND, room) == 0 < best_k([0.9] * 4, COMPUTE_BOUND)
    assert mode(simulate([0.9] * 4, COMPUTE_BOUND, room=room)[-50:]) == 0


# the demo pair on this repository's 2-core CPU: up to 8 verified rows cost little more than a plain row, 16 twice 8
SERVER_CPU = lambda b, k: 0.06 + 0.012 * b * (k + 1) if b * (k + 1) <= 8 else 0.33 * b * (k + 1) / 16  # noqa: E731


@pytest.mark.parametrize("sizes, alpha, cost", [((8, 4, 1), 0.7, COMPUTE_BOUND), ((1, 4, 8), 0.7, COMPUTE_BOUND),
                                                ((1, 4, 8), 0.57, SERVER_CPU)],
                         ids=["rows leave", "rows join", "clients arrive"])
def test_batch_draft_length_follows_the_batch_size(sizes, alpha, cost):
    """The rule refits at each batch size (a second K is tried there until it is timed) instead of applying the
    round times of another: rows leaving a full batch, and rows joining a lone one (a server's clients arriving,
    where drafting that paid for one row costs eight rows twice a plain round)."""
    rng = np.random.default_rng(0)
    draft, chosen = DraftLength(), {}
    for b in sizes:
        stats = [Stats() for _ in range(b)]
        for _ in range(150):
            k = draft.choose(stats, [10**6] * b)
            n = [int(np.argmin(np.append(rng.random(k) < alpha, False))) for _ in range(b)]
            for s, m in zip(stats, n):
                s.record(k, m)
            draft.update(k, n, cost(b, k))
            chosen.setdefault(b, []).append(k)
    alone = mode(chosen[1][-50:])
    assert best_k([alpha] * 8, cost) == 0 and mode(chosen[8][-50:]) == 0 and alone > 0
    assert gain([alpha], cost, alone) >= 0.97 * gain([alpha], cost, best_k([alpha], cost))


def test_fixed_draft_length_can_be_the_maximum():
    draft = DraftLength(fixed=8)
    draft.update(8, 5, 0.1)
    draft.update(8, [8, 0], 0.1)
    assert draft.choose() == 8


def test_a_seeded_row_samples_the_same_tokens_alone_and_in_any_batch(pair, hf_dir):
    """Each row draws from its own seed (sampling.py), so a seeded row is batch-invariant: alone, or with other
    rows (seeded or not) joining and leaving, with MTP or without, it emits the same tokens."""
    target, drafter = pair("plain", False)
    ps = prompts(4, seed=5)
    params = SamplingParams(temperature=0.9)

    def sampled(rows, k, join_at=None):
        decoder = Decoder(target, None, params=params, draft=DraftLength(fixed=0), chunk=8, seed=1)
        if k:
            decoder.drafter = ControlledDrafter(drafter, lambda: [reference[r.id] for r in decoder.rows], 0.6, 2)
            decoder.draft = DraftLength(fixed=k)
        added, rounds = [], 0
        for prompt, seed in rows[: len(rows) if join_at is None else -1]:
            added.append(decoder.add(prompt, 16, seed=seed))
        while decoder.rows or len(added) < len(rows):
            if rounds == join_at:
                added.append(decoder.add(rows[-1][0], 16, seed=rows[-1][1]))
            decoder.step()
            rounds += 1
        return [r.tokens for r in added]

    alone = [sampled([(p, 40 + i)], 0)[0] for i, p in enumerate(ps)]
    reference = {i: p + t for i, (p, t) in enumerate(zip(ps, alone))}
    assert len(set(map(tuple, alone))) == 4
    assert sampled([(p, 40 + i) for i, p in enumerate(ps)], 0) == alone
    assert sampled([(p, 40 + i) for i, p in enumerate(ps)], 3, join_at=2) == alone
    reference = {0: ps[2] + alone[2], 1: ps[0] + alone[0], 2: ps[1] + alone[1]}
    mixed = sampled([(ps[2], 42), (ps[0], None), (ps[1], None)], 2)
    assert mixed[0] == alone[2] and mixed[1] != alone[0]  # unseeded rows draw seeds of their own


def test_prefix_cache_resumes_finished_rows_exactly(pair, hf_dir):
    """A finished row's cache is kept (prefix_cache.py): a later prompt that extends its prompt and reply prefills
    only the new tokens and decodes what a cold start decodes (the prefix crosses the sliding window, W = 8); a
    prompt that diverges further back than the rings can go is prefilled cold; the limit evicts the oldest."""
    from gemma_mlx.prefix_cache import PrefixCache

    target, drafter = pair("plain", False)
    first, other = prompts(2, seed=9)[1], prompts(4, seed=9)[3]  # 17 and 25 tokens
    for chunk in (8, 64):
        kept = PrefixCache(limit_bytes=10**9)
        decoder = Decoder(target, None, chunk=chunk, prefix_cache=kept)
        a = decoder.add(first, 12)
        while decoder.rows:
            decoder.step()
        assert a.tokens == hf_greedy(hf_dir("plain"), first, 12) and len(kept.entries) == 1
        turn = first + a.tokens + [5, 6, 7]
        rows = [decoder.add(turn, 10), decoder.add(other, 10), decoder.add(first[:6] + [9, 9, 9], 10)]
        while decoder.rows:
            decoder.step()
        assert rows[0].stats.prefill_tokens == 4  # the 3 new tokens and the reply's last (never in the cache)
        # sharing BOS only, and the first 6 tokens only: the kept ends are 22+ positions further on, beyond the reach
        # of an 8-slot ring's spare slots (prefilled cold), within a 64-slot one's
        reach = chunk == 64
        assert rows[1].stats.prefill_tokens == len(other) - reach and rows[2].stats.prefill_tokens == 9 - 6 * reach
        for row, p in zip(rows, (turn, other, first[:6] + [9, 9, 9])):
            assert row.tokens == hf_greedy(hf_dir("plain"), p, 10)
    one = max(c.nbytes() for c in kept.entries.values())
    small = PrefixCache(limit_bytes=one + 1)
    decoder = Decoder(target, None, chunk=8, prefix_cache=small)
    for p in (first, other):
        decoder.add(p, 4)
        while decoder.rows:
            decoder.step()
    assert [len(t) for t in small.entries] == [len(other) + 3] and small.nbytes <= one + 1


def test_round_clock_charges_each_round_its_own_build():
    """On the CPU backend async_eval computes most of a round while it is built, so a plain round queued during
    another is charged to itself, not to the round it was built during (draft_length.RoundClock)."""
    from types import SimpleNamespace

    from gemma_mlx.draft_length import RoundClock

    now = [0.0]
    clock = RoundClock(lambda: now[0])
    first = SimpleNamespace(started=0.0, build_seconds=0.01)
    now[0] = 0.10  # the next round was built from 0.05 to 0.09, while the first one ran
    queued = SimpleNamespace(started=0.05, build_seconds=0.04)
    assert clock.lap(first, queued) == pytest.approx((0.10, 0.06))
    now[0] = 0.13
    assert clock.lap(queued) == pytest.approx((0.03, 0.07))  # started before the last lap: its build is its own
    clock.restart()  # a row joined: its prefill is no round's time
    now[0] = 0.30
    assert clock.lap(SimpleNamespace(started=0.2, build_seconds=0.05)) == pytest.approx((0.17, 0.17))


@pytest.mark.slow
def test_batched_sampling_matches_plain_sampling_per_row(pair, hf_dir):
    """Temperature > 0 in batch: each row's first sampled tokens after the prefill (decided by speculative rounds)
    are distributed as plain sampling's (chi-square)."""
    from test_speculative import _chi2_two_sample

    target, drafter = pair("plain", False)
    ps = prompts(2, seed=3)
    params = SamplingParams(temperature=0.7)
    expected = [hf_greedy(hf_dir("plain"), p, 6) for p in ps]
    reference = {i: p + e for i, (p, e) in enumerate(zip(ps, expected))}

    def sampled(k, seeds):
        out = {0: [], 1: []}
        for s in seeds:
            decoder = Decoder(target, None, params=params, draft=DraftLength(fixed=0), chunk=8, seed=s)
            if k:
                decoder.drafter = ControlledDrafter(drafter, lambda: [reference[r.id % 2] for r in decoder.rows],
                                                    0.8, seed=s)
                decoder.draft = DraftLength(fixed=k)
            rows = [decoder.add(ps[i % 2], 3) for i in range(100)]
            while decoder.rows:
                decoder.step()
            for r in rows:
                out[r.id % 2].append(r.tokens[1:3])
        return out

    plain, spec = sampled(0, range(30)), sampled(3, range(100, 130))
    for i in (0, 1):
        for j in (0, 1):  # the token of the first round and the one after it
            a, b = np.array(plain[i])[:, j], np.array(spec[i])[:, j]
            assert _chi2_two_sample(a, b) > 0.005, (i, j)
