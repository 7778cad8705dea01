"""`gemma-mlx distill` (gemma_mlx/distill.py): a drafter trained for a tiny Gemma 4 target (the oracle's conditioned
"plain-calm") and a tiny Gemma 3 target is a Hugging Face gemma4_assistant checkpoint that our converter converts,
`gemma_mlx.load` pairs with its target and transformers' Gemma4AssistantForCausalLM runs with the same logits
(spec §2.2–2.5); its centroid head is a balanced permutation (§2.5); training raises held-out acceptance and greedy
output stays token-identical; the training forward is the runtime drafter's computation (§2.4, §2.6); a run
resumes from its checkpoint; bad input is one line and exit code 1."""

import json
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from typer.testing import CliRunner

import gemma_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from gemma_mlx import distill as D
from gemma_mlx.models.gemma4_assistant import DrafterConfig

S, F = "sliding_attention", "full_attention"
K = 3
TINY = dict(layers=2, hidden_size=32, num_centroids=16, draft_steps=K, samples=32, max_new_tokens=20, seed=0,
            eval_tokens=24, learning_rate=3e-3)


def run(target, out, **kw) -> dict:
    return D.distill(D.Options(target=str(target), out=str(out), **{**TINY, **kw}))


@pytest.fixture(scope="module")
def gemma4(mlx_dir, tmp_path_factory):
    """(target dir, distilled drafter dir, result) for the oracle's plain-calm Gemma 4 target."""
    target = mlx_dir("plain-calm")
    out = tmp_path_factory.mktemp("distill") / "drafter"
    return target, out, run(target, out, steps=40)


def tiny_gemma3(out):
    """A tiny Gemma 3 target as an MLX dir (config, weights, the oracle's tokenizer), conditioned like a trained
    net: the blocks' output norms at 0.1 (Gemma 3 scales by 1 + w)."""
    import torch
    from mlx.utils import tree_flatten
    from oracle import save_tokenizer
    from test_gemma3 import BASE, perturb
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from gemma_mlx.models.gemma3_text import Gemma3Target
    from gemma_mlx.models.gemma3_text import config_of as gemma3_config_of

    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(Gemma3TextConfig(**BASE, layer_types=[S, S, F, S, S, F])).eval()
    perturb(hf, 301)
    target = Gemma3Target(gemma3_config_of(hf.config.to_dict()))
    weights = {k: mx.array(v.detach().numpy()) for k, v in hf.state_dict().items()}
    for k in weights:
        if k.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
            weights[k] = mx.full(weights[k].shape, -0.9)
    target.load_weights(list(target.sanitize(weights).items()), strict=True)
    out.mkdir(parents=True)
    cfg = target.config.to_dict()
    cfg["eos_token_id"] = [1, 106]
    (out / "config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(target.parameters())),
                        metadata={"format": "mlx"})
    save_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    root = tmp_path_factory.mktemp("g3distill")
    target = tiny_gemma3(root / "target")
    return target, root / "drafter", run(target, root / "drafter", steps=40)


def converted(drafter_dir, tmp_path, **kw):
    from gemma_mlx.convert import convert

    return convert(str(drafter_dir), tmp_path / "mlx-drafter", dtype="fp32", progress=False, **kw)


# --- the saved checkpoint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["gemma4", "gemma3"])
def test_saved_dir_is_a_hf_gemma4_assistant_checkpoint(which, request):
    """§2.1/§2.2: config with a text_config, HF tensor names and shapes, int64 token_ordering, num_assistant_tokens;
    no lm_head (tied), no K/V weights (every layer reads the target's)."""
    from gemma_mlx.convert.weights import drafter_layout

    _, out, result = request.getfixturevalue(which)
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "gemma4_assistant" and raw["text_config"]["model_type"] == "gemma4_text"
    assert raw["use_ordered_embeddings"] and raw["num_centroids"] == 16 and raw["tie_word_embeddings"]
    assert raw["text_config"]["num_kv_shared_layers"] == raw["text_config"]["num_hidden_layers"] == 2
    assert json.loads((out / "generation_config.json").read_text())["num_assistant_tokens"] == K
    layout = drafter_layout(DrafterConfig.from_dict(raw))
    weights = mx.load(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == layout.shapes
    assert weights["masked_embedding.token_ordering"].dtype == mx.int64
    assert json.loads((out / "acceptance.json").read_text()) == json.loads(json.dumps(result))
    assert not (out / "tokenizer.json").exists()  # a drafter uses its target's tokenizer


@pytest.mark.parametrize("which", ["gemma4", "gemma3"])
def test_token_ordering_is_a_permutation_in_equal_groups(which, request):
    _, out, _ = request.getfixturevalue(which)
    w = mx.load(str(out / "model.safetensors"))
    order = np.array(w["masked_embedding.token_ordering"])
    assert sorted(order.tolist()) == list(range(512))
    groups = order.reshape(16, 32)  # C groups of V/C: bucket c = token_ordering.reshape(C, V/C)[c] (§2.5)
    assert len({frozenset(g.tolist()) for g in groups}) == 16


def test_balanced_kmeans_fills_every_cluster_exactly():
    x = np.random.default_rng(0).normal(size=(600, 5)).astype(np.float32)
    x[:300] += 4.0  # lopsided: half the points crowd one region
    assign, centers = D.balanced_kmeans(x, 12, iters=4, seed=0)
    assert np.bincount(assign, minlength=12).tolist() == [50] * 12
    np.testing.assert_allclose(centers, np.stack([x[assign == c].mean(0) for c in range(12)]), atol=1e-5)


@pytest.mark.parametrize("which", ["gemma4", "gemma3"])
def test_converts_loads_and_greedy_output_is_unchanged(which, request, tmp_path):
    target, out, _ = request.getfixturevalue(which)
    engine = gemma_mlx.load(str(target), drafter=str(converted(out, tmp_path)))
    assert engine.drafter.config.use_ordered_embeddings
    for prompt in ["the old man and the sea", "why is the sky blue", "one two three"]:
        plain = gemma_mlx.generate(engine, prompt, max_tokens=24, draft_tokens=0, reuse_cache=False)
        spec = gemma_mlx.generate(engine, prompt, max_tokens=24, draft_tokens=K, reuse_cache=False)
        assert spec.tokens == plain.tokens
        assert spec.stats.drafted_tokens > 0


def test_quantized_conversion_loads(gemma4, tmp_path):
    target, out, _ = gemma4
    engine = gemma_mlx.load(str(target), drafter=str(converted(out, tmp_path, quantize=8, group_size=32)))
    plain = gemma_mlx.generate(engine, "one two three", max_tokens=16, draft_tokens=0)
    assert gemma_mlx.generate(engine, "one two three", max_tokens=16, draft_tokens=K, reuse_cache=False).tokens \
        == plain.tokens


def test_a_quantized_drafter_runs_dequantized_in_float32_on_the_cpu(gemma4, tmp_path):
    """MLX's CPU kernels for quantized matmuls at a drafter's sizes are ~3x slower than float32 ones: on the CPU
    backend a 4-bit drafter is loaded as the float32 weights its quantization stands for."""
    from mlx.utils import tree_flatten

    from gemma_mlx.loader import load_checkpoint

    target, out, _ = gemma4
    path = converted(out, tmp_path, quantize=4, group_size=32)
    engine = gemma_mlx.load(str(target), drafter=str(path))
    stored = load_checkpoint(path)
    assert isinstance(stored.pre_projection, nn.QuantizedLinear)
    ours = dict(tree_flatten(engine.drafter.parameters()))
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in engine.drafter.named_modules())
    assert {str(v.dtype) for k, v in ours.items() if "token_ordering" not in k} == {"mlx.core.float32"}
    q = stored.pre_projection
    assert np.array_equal(np.array(ours["pre_projection.weight"]),
                          np.array(mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits).astype(mx.float32)))
    plain = gemma_mlx.generate(engine, "one two three", max_tokens=16, draft_tokens=0)
    spec = gemma_mlx.generate(engine, "one two three", max_tokens=16, draft_tokens=K, reuse_cache=False)
    assert spec.tokens == plain.tokens and spec.stats.drafted_tokens > 0


@pytest.mark.parametrize("which", ["gemma4", "gemma3"])
def test_training_raises_held_out_acceptance(which, request):
    _, _, result = request.getfixturevalue(which)
    before, after = result["before"], result["after"]
    assert after["acceptance_by_position"][0] > before["acceptance_by_position"][0] + 0.3, result
    assert after["tokens_per_round"] > before["tokens_per_round"] + 0.5, result
    assert result["same_output_before_after"]  # both are lossless speculative runs of the same prompts


def test_init_fine_tunes_an_existing_drafter(gemma4, tmp_path):
    """--init starts from a trained drafter (the gemma4 fixture's, quantized to 8 bits as a shipped drafter may be):
    its architecture is kept without --layers / --hidden-size, the figure before training is that drafter's (not a
    new one's), and the fine-tuned drafter is saved, converts and drafts losslessly."""
    target, trained_dir, trained = gemma4
    start = converted(trained_dir, tmp_path, quantize=8, group_size=32)
    out = tmp_path / "tuned"
    result = D.distill(D.Options(target=str(target), out=str(out), init=str(start), steps=5,
                                 **{k: v for k, v in TINY.items() if k not in ("layers", "hidden_size", "num_centroids")}))
    assert result["before"]["tokens_per_round"] > trained["before"]["tokens_per_round"] + 0.5, result["before"]
    assert result["after"]["tokens_per_round"] > trained["before"]["tokens_per_round"] + 0.5, result["after"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["text_config"]["num_hidden_layers"] == TINY["layers"]
    assert config["text_config"]["hidden_size"] == TINY["hidden_size"]
    engine = gemma_mlx.load(str(target), drafter=str(converted(out, tmp_path / "c")))
    plain = gemma_mlx.generate(engine, "one two three", max_tokens=16, draft_tokens=0)
    spec = gemma_mlx.generate(engine, "one two three", max_tokens=16, draft_tokens=K, reuse_cache=False)
    assert spec.tokens == plain.tokens and spec.stats.drafted_tokens > 0


def test_transformers_runs_the_saved_checkpoint_with_our_logits(gemma4, hf_dir, tmp_path):
    """Gemma4AssistantForCausalLM (patched, tests/oracle.py) reads the saved dir; one drafter call on the target's
    shared K/V gives our converted drafter's logits (§2.3–2.5; unselected tokens = min(selected) − 1)."""
    from oracle import hf_drafter_call, hf_embed_scaled, hf_forward, hf_shared_kv

    from gemma_mlx.loader import load_checkpoint

    target_dir, out, _ = gemma4
    hf_target = hf_dir("plain-calm")
    target = load_checkpoint(target_dir)
    drafter = load_checkpoint(converted(out, tmp_path))
    ids = [2] + np.random.default_rng(4).integers(7, 500, 19).tolist()  # longer than W + 1 = 9
    L = len(ids)  # x = ids[L-1] is drafted from; the cache holds 0…L−2
    _, hidden = hf_forward(hf_target, ids[:-1])
    kv = hf_shared_kv(hf_target, ids[:-1])
    u = np.concatenate([hf_embed_scaled(hf_target, ids[-1]), hidden[-1]])
    ref_logits, ref_g = hf_drafter_call(out, u, L - 1, kv)
    cache = target.make_cache(1, chunk=32)
    target.prefill(mx.array([ids[:-1]]), cache)
    h, g = drafter.forward(mx.array(u)[None, None], mx.array(cache.lengths, dtype=mx.int32), drafter.reads(cache),
                           drafter.masks(cache))
    np.testing.assert_allclose(np.array(g[0, 0]), ref_g, atol=1e-4)
    ours = np.array(drafter.full_logits(h)[0])
    np.testing.assert_allclose(ours, ref_logits, atol=1e-4)
    assert ours.argmax() == ref_logits.argmax()


# --- the training forward is the runtime drafter --------------------------------------------------------------------


def test_training_forward_is_the_runtime_drafters_computation(mlx_target):
    """For start positions before and past the sliding window (W = 8): drafter_steps' hidden for step j from p equals
    Drafter.step fed the same inputs on a cache holding positions 0…p−1 (§2.6), and with the drafts themselves as
    the continuation, its greedy tokens are Drafter.draft's."""
    target = mlx_target("plain-calm")
    opts = D.Options(target="", out="", layers=4, hidden_size=32, draft_steps=K)
    drafter = D.new_drafter(target, D.drafter_config(target.config, opts, 16), 0, D.Reporter())
    seq = [2] + np.random.default_rng(5).integers(7, 500, 29).tolist()
    batch = D.teacher_force(target, [seq])
    steps = D.drafter_steps(drafter, target, batch, K)
    for p in (1, 4, 9, 13, 22):
        cache = target.make_cache(1, chunk=8)
        target.prefill(mx.array([seq[:p]]), cache)
        masks, offset = drafter.masks(cache), mx.array(cache.lengths, dtype=mx.int32)
        g = batch.hidden[:, p - 1 : p]
        for j in range(K):
            h, g = drafter.forward(mx.concatenate([target.model.embed(mx.array([[seq[p + j]]])), g], axis=-1), offset,
                                   drafter.reads(cache), masks)
            np.testing.assert_allclose(np.array(h[0]), np.array(steps[j][0, p - 1]), atol=1e-4,
                                       err_msg=f"start {p}, step {j + 1}")
        drafts = drafter.draft(target, mx.array([[seq[p]]]), batch.hidden[:, p - 1 : p], cache, K)[0].tolist()
        chained = D.drafter_steps(drafter, target, D.teacher_force(target, [seq[: p + 1] + drafts[:-1]]), K)
        assert [int(drafter.greedy(h[:, p - 1])[0]) for h in chained] == drafts, f"start {p}"


def test_teacher_forcing_takes_a_greedy_continuations_labels_from_its_tokens(mlx_target, monkeypatch):
    """A greedy continuation's tokens are the target's argmax, so teacher forcing reads its labels from them and runs
    the head only at the prompt's positions and the last: the same labels as the head everywhere."""
    from gemma_mlx.decode import generate_tokens

    target = mlx_target("plain-calm")
    prompts = [[2, 17, 301, 44, 9], [2, 88, 5, 123, 7, 64, 250, 11, 3]]
    seqs = [p + [t for new, _ in generate_tokens(target, None, p, max_tokens=14) for t in new] for p in prompts]
    everywhere = D.teacher_force(target, seqs)
    rows = []
    real = D.data.head_argmax
    monkeypatch.setattr(D.data, "head_argmax", lambda t, h, r: rows.append(len(r)) or real(t, h, r))
    greedy = D.teacher_force(target, seqs, greedy_from=[len(p) for p in prompts])
    for b, s in enumerate(seqs):
        assert np.array(greedy.labels[b, : len(s)]).tolist() == np.array(everywhere.labels[b, : len(s)]).tolist()
    assert rows == [sum(len(p) for p in prompts)]  # the prompt's positions but the last, and each sequence's last
    np.testing.assert_array_equal(np.array(greedy.hidden), np.array(everywhere.hidden))


def test_training_masks_are_the_runtime_masks():
    """Query p sees keys p−1−W … p−1 on sliding layers and 0 … p−1 on full ones (§2.4, clean view)."""
    from gemma_mlx.models.gemma4_assistant import Drafter

    raw = D.drafter_config(_FakeTarget(), D.Options(target="", out="", layers=2, hidden_size=16), 4)
    masks = D.training_masks(Drafter(DrafterConfig.from_dict(raw)), 20)
    sliding, full = np.array(masks[S])[0, 0], np.array(masks[F])[0, 0]
    for p in range(1, 20):
        assert np.nonzero(full[p - 1])[0].tolist() == list(range(p))
        assert np.nonzero(sliding[p - 1])[0].tolist() == list(range(max(0, p - 1 - 8), p))


class _FakeTarget:
    """Just the geometry drafter_config reads (a Gemma 4 text config with W = 8)."""

    def __new__(cls):
        from gemma_mlx.models.gemma4_text import TextConfig

        return TextConfig.from_dict(dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, layer_types=[S, F],
                                         head_dim=8, global_head_dim=16, sliding_window=8))


# --- resume, time budget, bad input -------------------------------------------------------------------------------


class StopAt(D.Reporter):
    """Interrupts training at a step (as Ctrl-C would); records the step training started from."""

    def __init__(self, stop=None):
        self.phase_name, self.stop, self.started_at, self.step = None, stop, None, 0

    def phase(self, name, total=None):
        self.phase_name = name

    def advance(self, n=1, **info):
        if self.phase_name != "training":
            return
        if self.started_at is None:
            self.started_at = n
        self.step += n
        if self.step == self.stop:
            raise KeyboardInterrupt


class Clock:
    """time, but a perf_counter that advances 10 ms at each reading: deadlines in steps, not in machine speed."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 0.01
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def test_resume_continues_from_the_checkpoint(mlx_dir, tmp_path, monkeypatch):
    target, out = mlx_dir("plain-calm"), tmp_path / "drafter"
    opts = dict(TINY, samples=8, eval_tokens=8, checkpoint_every=0.0)
    with pytest.raises(KeyboardInterrupt):
        D.distill(D.Options(target=str(target), out=str(out), steps=30, **opts), StopAt(stop=12))
    assert not out.exists()  # nothing that looks finished
    state = json.loads((D.work_dir(out) / "state.json").read_text())
    assert state["step"] == 11 and state["data_done"]

    def no_generation(*a, **k):
        raise AssertionError("resume regenerated the data")

    monkeypatch.setattr(D.data, "generate_batch_sequences", no_generation)
    seen = StopAt()
    result = D.distill(D.Options(target=str(target), out=str(out), steps=30, resume=True,
                                 **{k: v for k, v in opts.items() if k not in D.Options.ARCH}), seen)
    assert seen.started_at == 11 and result["steps"] == 30 and (out / "config.json").exists()
    # a time budget ends training in time and still saves (resumed again: the data is there), on a clock that a
    # busy machine cannot slow down: every reading advances it by 10 ms
    clock = Clock()
    monkeypatch.setattr(D.run, "time", clock)
    monkeypatch.setattr(D.data, "time", clock)
    result = D.distill(D.Options(target=str(target), out=str(out), time_budget=0.1, resume=True,
                                 **{k: v for k, v in opts.items() if k not in D.Options.ARCH}))
    assert result["steps"] > 30 and json.loads((out / "acceptance.json").read_text())["steps"] == result["steps"]
    # a larger --samples on resume generates the difference, and only it
    monkeypatch.undo()
    tokens_before = result["training_tokens"]
    result = D.distill(D.Options(target=str(target), out=str(out), steps=result["steps"] + 2, resume=True,
                                 **{k: v for k, v in opts.items() if k not in D.Options.ARCH} | dict(samples=D.GENERATION_BATCH + 8)))
    state = json.loads((D.work_dir(out) / "state.json").read_text())
    assert state["gen_batches"] == 2 and result["training_tokens"] > tokens_before


def test_greedy_batches_cover_every_prompt_before_repeating_one():
    size, n = 32, len(D.TRAIN_PROMPTS)
    picks = [D.generation_picks(n, b, size, seed=0) for b in range(2 * n)]
    greedy = [i for idx, temp in picks if temp == 0.0 for i in idx][: size * (n // size)]
    assert {temp for _, temp in picks} == {0.0, 0.8} and picks[0][1] == 0.0
    assert len(greedy) == len(set(greedy)) == size * (n // size)


def one_line_error(result, pattern):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert pattern in lines[0], lines[0]


def test_bad_input_is_one_line(mlx_dir, tmp_path):
    from gemma_mlx.cli import app

    runner = CliRunner()
    target = str(mlx_dir("plain-calm"))
    base = ["distill", "--target", target, "--out", str(tmp_path / "d")]
    one_line_error(runner.invoke(app, ["distill", "--target", "/no/such", "--out", str(tmp_path / "d")]),
                   "no such model directory")
    one_line_error(runner.invoke(app, base + ["--num-centroids", "7"]), "does not divide the vocabulary size 512")
    one_line_error(runner.invoke(app, base + ["--draft-steps", "0"]), "--draft-steps must be between 1 and 8")
    one_line_error(runner.invoke(app, base + ["--time-budget", "-1"]), "--time-budget must be > 0")
    one_line_error(runner.invoke(app, base + ["--prompts", str(tmp_path / "none.txt")]), "no such prompts file")
    one_line_error(runner.invoke(app, base + ["--resume"]), "--resume: no checkpoint")
    one_line_error(runner.invoke(app, base + ["--init", str(tmp_path / "none")]), "--init: ")
    one_line_error(runner.invoke(app, base + ["--init", target, "--layers", "2"]), "--init keeps that drafter's")
    one_line_error(runner.invoke(app, base + ["--init", target]), "--init: ")
    one_line_error(runner.invoke(app, ["distill", "--target", target, "--out", str(tmp_path)]), "already exists")
    drafter = str(mlx_dir("plain", ordered=True))
    one_line_error(runner.invoke(app, ["distill", "--target", drafter, "--out", str(tmp_path / "e")]),
                   "is a drafter")
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


# --- real text: the corpus phase ------------------------------------------------------------------------------------

CORPUS = dict(TINY, samples=0, corpus_tokens=2000, eval_tokens=16)


@pytest.fixture(scope="module")
def text_dir(mlx_dir, tmp_path_factory):
    """A corpus in the domain the drafter will serve, as a user would bring one: the tiny target's greedy
    continuations of training prompts (not the held-out ones), decoded to text files, plus a fortune file."""
    root = tmp_path_factory.mktemp("corpus")
    engine = gemma_mlx.load(str(mlx_dir("plain-calm")), dtype="fp32", progress=False)
    texts = [p + r.text for p, r in zip(D.TRAIN_PROMPTS[:48], gemma_mlx.generate_batch(
        engine, D.TRAIN_PROMPTS[:48], max_tokens=40, draft_tokens=0))]
    for i in range(0, 40, 8):
        (root / f"doc{i}.txt").write_text("\n\n".join(texts[i : i + 8]))
    (root / "quotes").write_text("\n%\n".join(texts[40:]))
    return root


@pytest.fixture(scope="module")
def from_corpus(mlx_dir, text_dir, tmp_path_factory):
    target, out = mlx_dir("plain-calm"), tmp_path_factory.mktemp("cdistill") / "drafter"
    return target, out, run(target, out, steps=60, corpus=[str(text_dir)], **CORPUS)


def test_corpus_shards_hold_the_targets_own_argmax_hidden_and_kv(from_corpus, mlx_target):
    """Every shard is one teacher-forced pass: labels are the target's argmax next token at each position, hidden and
    K/V its own (float16 on disk), at least --corpus-tokens positions in all."""
    target_dir, out, result = from_corpus
    target = mlx_target("plain-calm")
    shards = sorted((D.work_dir(out) / "data").glob("batch-*.safetensors"))
    assert result["data"]["corpus"]["positions"] >= CORPUS["corpus_tokens"] and result["data"]["gen"]["positions"] == 0
    assert result["training_tokens"] == sum(int(mx.load(str(s))["lengths"].sum()) for s in shards)
    raw = mx.load(str(shards[0]))
    assert raw["hidden"].dtype == mx.float16 and raw["k.sliding_attention"].dtype == mx.float16
    batch = D.Batch.from_arrays(raw)
    for b, n in enumerate(np.array(batch.lengths).tolist()):
        tokens = batch.tokens[b : b + 1, :n]
        assert int(tokens[0, 0]) == 2  # every window starts with the BOS
        cache = target.make_cache(1, chunk=n)
        hidden = target.model(tokens, cache)
        assert np.array(mx.argmax(target.logits(hidden), axis=-1)[0]).tolist() == \
            np.array(batch.labels[b, :n]).tolist()
        np.testing.assert_allclose(np.array(batch.hidden[b, :n]), np.array(hidden[0]), atol=2e-2, rtol=2e-3)


def test_corpus_training_raises_acceptance_and_plots_its_history(from_corpus):
    _, out, result = from_corpus
    history = result["history"]
    assert history[0]["positions"] == 0 and len(history) >= 3  # before, after each epoch, (end)
    assert [h["positions"] for h in history] == sorted({h["positions"] for h in history})
    assert result["after"]["acceptance_by_position"][0] > result["before"]["acceptance_by_position"][0] + 0.3
    assert (out / "acceptance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["corpus"] and json.loads((out / "acceptance.json").read_text())["history"] == history


class StopInCorpus(D.Reporter):
    """Interrupts the corpus phase after n shards (as Ctrl-C or a killed process would)."""

    def __init__(self, n):
        self.n, self.in_corpus = n, False

    def phase(self, name, total=None):
        self.in_corpus = name.startswith("teacher-forcing the corpus")

    def advance(self, n=1, **info):
        if self.in_corpus and "tokens_per_s" in info:
            self.n -= 1
            if self.n == 0:
                raise KeyboardInterrupt


def test_an_interrupted_corpus_phase_resumes_where_it_stopped(mlx_dir, text_dir, tmp_path):
    """The resumed run's shards are the uninterrupted run's, each window teacher-forced once."""
    target = mlx_dir("plain-calm")
    opts = dict(CORPUS, corpus=[str(text_dir)], steps=2, checkpoint_every=0.0, batch_size=4)
    straight = tmp_path / "straight"
    D.distill(D.Options(target=str(target), out=str(straight), **opts))
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        D.distill(D.Options(target=str(target), out=str(out), **opts), StopInCorpus(2))
    assert json.loads((D.work_dir(out) / "state.json").read_text())["data_batches"] == 2
    D.distill(D.Options(target=str(target), out=str(out), resume=True,
                        **{k: v for k, v in opts.items() if k not in D.Options.ARCH}))

    def tokens(run_dir):
        return [np.array(mx.load(str(p))["tokens"]).tolist()
                for p in sorted((D.work_dir(run_dir) / "data").glob("batch-*.safetensors"))]

    assert tokens(out) == tokens(straight) and len(tokens(out)) > 2  # the resume made the rest


def test_a_missing_corpus_path_is_one_line(mlx_dir, tmp_path):
    from gemma_mlx.cli import app

    result = CliRunner().invoke(app, ["distill", "--target", str(mlx_dir("plain-calm")), "--out", str(tmp_path / "d"),
                                      "--corpus", str(tmp_path / "nothing")])
    one_line_error(result, "no such file or directory")


def test_generation_continues_corpus_openings_too(mlx_dir, text_dir, tmp_path, monkeypatch):
    """With a corpus, the target also continues openings of its windows (the first PREFIX tokens): as many varied
    prompts as sequences asked for, so greedy continuations do not repeat the few built-in prompts."""
    from gemma_mlx import corpus

    opts = D.Options(target=str(mlx_dir("plain-calm")), out=str(tmp_path / "d"), corpus=[str(text_dir)],
                     **dict(TINY, samples=10))
    prepared = D.prepare(opts)
    openings = D.corpus_prompts(prepared)
    text = "\n".join(corpus.documents([text_dir]))
    bos = prepared.engine.tokenizer.bos_token_id
    assert len(openings) == 10 and len({tuple(o) for o in openings}) == 10
    assert all(len(o) == D.PREFIX and o[0] == bos and prepared.engine.tokenizer.decode(o[1:]) in text
               for o in openings)
    seen = []
    monkeypatch.setattr(D.data, "generate_batch_sequences", lambda engine, ids, *a, **k: seen.append(ids) or [])
    (tmp_path / "w").mkdir()
    D.collect_generated(prepared, tmp_path / "w", dict(gen_batches=0, data_batches=0, data_positions=0), None,
                        D.Reporter())
    assert seen and all(o in seen[0] for o in openings)


def test_a_prompts_file_keeps_newlines_and_holds_out_a_tenth_up_to_sixteen(tmp_path):
    """`--prompts`: one prompt per line, `\\n` standing for a newline (code openings need them); the last tenth is
    held out, at most 16 (measured after every epoch)."""
    from gemma_mlx.distill.options import read_prompts

    path = tmp_path / "prompts.txt"
    lines = [f"def f{i}(x):\\n    return x + {i}" for i in range(300)]
    path.write_text("\n".join(lines) + "\n\n")
    train, held = read_prompts(D.Options(target="", out="", prompts=str(path)))
    assert len(held) == 16 and len(train) == 284
    assert train[0] == "def f0(x):\n    return x + 0" and held[-1] == "def f299(x):\n    return x + 299"
    path.write_text("one\ntwo\nthree\n")
    assert read_prompts(D.Options(target="", out="", prompts=str(path))) == (["one", "two"], ["three"])
