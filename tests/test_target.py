"""The Gemma 4 target against transformers 5.23.0 (spec §1): logits within 1e-4 in fp32 with identical argmax,
final-norm hiddens, one-shot and chunked prefill across the sliding window, decode with rollbacks (§4).

The reference is transformers run in float64, the exact result our fp32 is measured from: transformers' own fp32
logits move with the CPU's torch kernels ("ple" on one Xeon: 1.0e-4 from its fp64 result, ours 4e-5). "moe" stays
fp32: transformers' grouped expert matmul has no float64."""

import io
import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from oracle import hf_forward

import gemma_mlx  # noqa: F401

# "mm" (the multimodal wrapper reduced to text) is conditioned ("-calm", oracle.calm): at its seed the random net is
# chaotic enough that fp32 rounding alone exceeds 1e-4 (transformers fp32 itself is 1.3e-4 from its fp64 result at
# layer 3, ours 1.4e-4), which would test the rounding, not the port. Its text stack is e2blike's, which stays raw.
VARIANTS = ["plain", "nosoftcap", "kvshared", "ple", "moe", "keqv", "e2blike", "mm-calm", "unified"]
W = 8
rng = np.random.default_rng(1)  # ids 500-506 are the multimodal placeholders of the "mm" oracle
SHORT = [2] + rng.integers(3, 500, 4).tolist()  # < W
LONG = [2] + rng.integers(3, 500, 3 * W + 5).tolist()  # > W


def exact(variant):
    return torch.float32 if variant == "moe" else torch.float64


def close(ours, ref, what):
    ours = np.array(ours)
    assert ours.shape == ref.shape, what
    assert np.abs(ours - ref).max() < 1e-4, f"{what}: max |Δ| {np.abs(ours - ref).max():.2e}"


def argmax_equal(ours, ref, what):
    assert (np.array(ours).argmax(-1) == ref.argmax(-1)).all(), f"{what}: argmax differs"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ids", [SHORT, LONG], ids=["short", "long"])
def test_one_shot_prefill_matches_transformers(variant, ids, mlx_target, hf_dir):
    target = mlx_target(variant)
    ref_logits, ref_hidden = hf_forward(hf_dir(variant), ids, exact(variant))
    logits, hidden = target(mx.array([ids]), target.make_cache(chunk=64))
    close(logits[0], ref_logits, "logits")
    close(hidden[0], ref_hidden, "final-norm hidden")
    argmax_equal(logits[0], ref_logits, "logits")


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill_matches_transformers(variant, mlx_target, hf_dir):
    target = mlx_target(variant)
    ref_logits, _ = hf_forward(hf_dir(variant), LONG, exact(variant))
    cache = target.make_cache(chunk=5)
    got, s = [], 0
    for n in [5, 3, 1, 1, 4, 1, 5, 1, 2, 5, 2]:
        logits, _ = target(mx.array([LONG[s:s + n]]), cache)
        got.append(np.array(logits[0]))
        s += n
    got = np.concatenate(got)
    close(got, ref_logits[: len(got)], "chunked logits")
    argmax_equal(got, ref_logits[: len(got)], "chunked logits")
    # Target.prefill chunks a long prompt itself and returns the last position
    logits, hidden = target.prefill(mx.array([LONG]), target.make_cache(chunk=4))
    close(logits[0, -1], ref_logits[-1], "prefill last logits")


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_with_rollbacks_equals_never_having_decoded(variant, mlx_target, hf_dir):
    """3×W single-token steps; between steps, write up to K_max+1 junk tokens (rejected drafts) and roll back."""
    target = mlx_target(variant)
    seq = SHORT + np.random.default_rng(2).integers(3, 500, 3 * W).tolist()
    ref_logits, _ = hf_forward(hf_dir(variant), seq, exact(variant))
    chunk = 8
    cache = target.make_cache(chunk=chunk)
    target.prefill(mx.array([seq[: len(SHORT)]]), cache)
    junk = np.random.default_rng(3)
    for p in range(len(SHORT), len(seq)):
        r = int(junk.integers(0, chunk - 1))  # rolls back r + 1 ≤ chunk - 1: the most a ring can undo
        if r:
            target(mx.array([[seq[p]] + junk.integers(3, 500, r).tolist()]), cache)
            cache.rollback(r + 1)
        logits, _ = target(mx.array([[seq[p]]]), cache)
        close(logits[0, 0], ref_logits[p], f"decode step at position {p}")
        argmax_equal(logits[0], ref_logits[p][None], f"position {p}")
    assert cache.lengths.tolist() == [len(seq)]


@pytest.mark.parametrize("bits,agreement", [(8, 0.95), (4, 0.85)])
@pytest.mark.parametrize("variant", ["plain", "moe", "keqv", "e2blike"])
def test_quantized_conversions_agree_with_fp32(variant, bits, agreement, mlx_target):
    """On well-conditioned tiny models (oracle.calm); group size 64."""
    fp32, quant = mlx_target(variant + "-calm"), mlx_target(variant + "-calm", quantize=bits)
    ids = [2] + np.random.default_rng(4).integers(3, 500, 255).tolist()  # 256 positions: a stable estimate
    a, _ = fp32(mx.array([ids]), fp32.make_cache(chunk=256))
    b, _ = quant(mx.array([ids]), quant.make_cache(chunk=256))
    same = (np.array(a).argmax(-1) == np.array(b).argmax(-1)).mean()
    assert same >= agreement, f"{bits}-bit top-1 agreement {same:.2f}"


def _primitives(*arrays) -> list[str]:
    """The primitives of the graph that computes `arrays`, by name (a compiled kernel is one, "Compiled...")."""
    return re.findall(r'label ?= ?"([A-Za-z]+)', _dot(*arrays))


def _dot(*arrays) -> str:
    """The graph that computes `arrays`, in Graphviz's dot language."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *arrays)
    return dot.getvalue()


def test_a_decode_step_fuses_norms_and_rope_and_writes_the_cache_by_slices(mlx_target):
    """On the CPU backend mx.fast.rms_norm and mx.fast.rope run as graphs of small ops, each op a dispatch, and tanh
    and pow are libm calls per element: a decode step fuses the norms and RoPE (compiled), computes GELU and the
    softcap with the rational tanh, and a batch-1 step writes its K/V with slice updates, not scatters."""
    target = mlx_target("e2blike")
    cache = target.make_cache(chunk=8)
    target.prefill(mx.array([LONG]), cache)
    logits, hidden = target(mx.array([[5]]), cache)
    ops = _primitives(logits, hidden, *cache.state())
    assert "Rsqrt" not in ops, "an RMSNorm ran as separate ops"
    assert "Subtract" not in ops, "a RoPE rotation (x1·cos − x2·sin) ran as separate ops"
    assert not [o for o in ops if "Tanh" in o or "Power" in o], "GELU or the softcap called libm per element"
    assert not [o for o in ops if o.startswith("Scatter")], "a batch-1 step scattered into the cache"
    assert ops.count("SliceUpdate") == 2 * len(cache.layers)


def _weight_first_matmuls(*arrays) -> int:
    """How many Matmul results the graph transposes straight away: projections computed as (W @ x.T).T."""
    text = _dot(*arrays)
    label = dict(re.findall(r'\{ (\d+) \[label ="([A-Za-z]+)"', text))
    produced = dict((a, op) for op, a in re.findall(r'^(\d+) -> "([A-Z]+)"', text, re.M))
    consumers = re.findall(r'^"([A-Z]+)" -> (\d+)', text, re.M)
    return sum(label[produced[a]] == "Matmul" and label[op] == "Transpose" for a, op in consumers if a in produced)


@pytest.mark.parametrize("variant", ["plain", "ple"])
def test_each_projection_takes_the_form_calibration_found_faster(variant, mlx_target, tmp_path, monkeypatch):
    """A BLAS multiplies a few rows by a large weight faster as x @ W.T on some CPUs and as (W @ x.T).T on others
    (2.5-4x either way): `calibrate` times both per weight shape and row count, and every projection and the tied
    head then use the faster; its choice is stored per machine, so a second load measures nothing."""
    from gemma_mlx.models import matmul
    from gemma_mlx.models.base import Linear

    monkeypatch.setattr(matmul, "WEIGHT_FIRST", set())
    monkeypatch.setattr(matmul, "CALIBRATED", set())
    target = mlx_target(variant)
    weights = target.projection_weights()
    projections = sum(isinstance(m, Linear) for _, m in target.named_modules()) + 1  # + the tied head
    assert len(weights) == projections
    timed = []

    def timer(weight, rows, weight_first):  # weight-first wins at 4 rows only
        timed.append((weight.shape, rows))
        return 1.0 if weight_first == (rows == 4) else 2.0

    store = tmp_path / "matmul.json"
    matmul.calibrate(weights, 5, store, timer)
    assert {r for _, r in timed} == {2, 3, 4, 5} and len(timed) == 2 * 4 * len({(*w.shape, w.dtype) for w in weights})
    cache = target.make_cache(chunk=64)
    target.prefill(mx.array([LONG]), cache)
    for tokens, expected in (([5, 6, 7, 8], projections), ([5, 6, 7], 0), ([5, 6, 7, 8, 9], 0), ([5], 0)):
        logits, hidden = target(mx.array([tokens]), cache)
        assert _weight_first_matmuls(logits, hidden) == expected, tokens
        mx.eval(logits, hidden, cache.state())
        cache.rollback(len(tokens))
    monkeypatch.setattr(matmul, "WEIGHT_FIRST", set())
    monkeypatch.setattr(matmul, "CALIBRATED", set())
    matmul.calibrate(weights, 5, store, lambda *a: pytest.fail("measured again"))
    logits, hidden = target(mx.array([[5, 6, 7, 8]]), cache)
    assert _weight_first_matmuls(logits, hidden) == projections


def test_calibration_measures_both_forms_and_keeps_the_faster(tmp_path, monkeypatch):
    from gemma_mlx.models import matmul

    monkeypatch.setattr(matmul, "WEIGHT_FIRST", set())
    monkeypatch.setattr(matmul, "CALIBRATED", set())
    weight = mx.random.normal((512, 64))
    measured = {}

    def timer(w, rows, weight_first):
        measured[rows, weight_first] = matmul.seconds(w, rows, weight_first, repeats=1)
        return measured[rows, weight_first]

    matmul.calibrate([weight], 4, tmp_path / "m.json", timer)
    for rows in (2, 3, 4):
        assert ((512, 64, str(weight.dtype), rows) in matmul.WEIGHT_FIRST) == (measured[rows, True] < measured[rows, False])
        x = mx.random.normal((rows, 64))
        assert np.allclose(np.array(matmul.linear(x, weight)), np.array(x @ weight.T), atol=1e-4)


def test_rational_tanh_is_tanh_to_float32_rounding():
    from gemma_mlx.models.base import tanh

    x = np.concatenate([np.linspace(-12, 12, 200_001), [0.0, 1e-30, -1e-8, 3e-4, 7.9, 8.0, 40.0, -1e4]]).astype(np.float32)
    ours = np.array(tanh(mx.array(x)))
    assert np.abs(ours - np.tanh(x.astype(np.float64))).max() < 4e-7
    assert (np.sign(ours) == np.sign(x)).all() and np.abs(ours).max() <= 1.0
    small = np.float32([1e-8, 1e-5, -3e-4])
    assert np.allclose(np.array(tanh(mx.array(small))), small, rtol=3e-7, atol=0)
    assert tanh(mx.array(x).astype(mx.bfloat16)).dtype == mx.bfloat16
