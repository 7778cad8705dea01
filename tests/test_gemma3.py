"""The Gemma 3 target (gemma_mlx/models/gemma3_text.py) against transformers 5.23.0's Gemma3ForCausalLM: config resolution
against Gemma3TextConfig's defaults, logits within 1e-4 in fp32 with identical argmax, final-norm hiddens, one-shot
and chunked prefill across the sliding window, decode with rollbacks of the ring caches, the engine's greedy loop,
and loading in mlx-lm's gemma3_text."""

import json
import math
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import gemma_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from gemma_mlx.models.base import ConfigError
from gemma_mlx.models.gemma3_text import Gemma3Config, Gemma3Target
from gemma_mlx.models.gemma3_text import config_of as gemma3_config_of

S, F = "sliding_attention", "full_attention"
W = 8
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=W,
            max_position_embeddings=512, bos_token_id=2, eos_token_id=1, pad_token_id=0)
VARIANTS = {
    "plain": dict(layer_types=[S, S, F, S, S, F]),
    # one KV head; last layer sliding (Gemma 3 does not force it full); linear RoPE scaling and bases of its own
    # on the full layers; query_pre_attn_scalar != head_dim; an untied head with a final softcap
    "mqa": dict(num_key_value_heads=1, layer_types=[S, F, S, S, F, S],
                rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=50_000.0, rope_local_base_freq=1_000.0,
                query_pre_attn_scalar=24, tie_word_embeddings=False, final_logit_softcapping=30.0),
}
rng = np.random.default_rng(1)
SHORT = [2] + rng.integers(3, 500, 4).tolist()  # < W
LONG = [2] + rng.integers(3, 500, 3 * W + 5).tolist()  # > W


def perturb(model, seed: int):
    """Random, non-degenerate weights: Gemma 3 norms scale by 1 + w, so w ~ N(0, 0.2²) (the Gemma 4 oracle's
    1 ± 0.2); embeddings N(0, 0.1²); linear layers N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            torch.manual_seed(0)
            model = Gemma3ForCausalLM(Gemma3TextConfig(**{**BASE, **VARIANTS[name]})).eval()
            perturb(model, 300 + sorted(VARIANTS).index(name))
            out = tmp_path_factory.mktemp("hf3") / name
            model.save_pretrained(out)
            made[name] = out
        return made[name]

    return get


def load_mlx(path: Path) -> Gemma3Target:
    """The HF checkpoint straight into our classes: HF names are ours, sanitize drops the tied head."""
    target = Gemma3Target(gemma3_config_of(json.loads((path / "config.json").read_text())))
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    target.load_weights(list(target.sanitize(weights).items()), strict=True)
    mx.eval(target.parameters())
    return target


@pytest.fixture(scope="session")
def mlx_target(hf_dir):
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_mlx(hf_dir(name))
        return loaded[name]

    return get


@lru_cache(maxsize=None)
def _hf(path: str):
    return Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def hf_forward(path, ids):
    """(logits [T, V], final-norm hidden [T, H]) of a full-sequence forward."""
    model = _hf(str(path))
    hidden = model.model(torch.tensor([ids])).last_hidden_state
    return model(torch.tensor([ids])).logits[0].numpy(), hidden[0].numpy()


def close(ours, ref, what):
    ours = np.array(ours)
    assert ours.shape == ref.shape, what
    assert np.abs(ours - ref).max() < 1e-4, f"{what}: max |Δ| {np.abs(ours - ref).max():.2e}"


def argmax_equal(ours, ref, what):
    assert (np.array(ours).argmax(-1) == ref.argmax(-1)).all(), f"{what}: argmax differs"


# --- config ---------------------------------------------------------------------------------------------------

CONFIGS = [
    {},
    dict(num_hidden_layers=7, sliding_window_pattern=3),
    dict(rope_theta=5e5, rope_local_base_freq=2e4, sliding_window=512),
    dict(rope_scaling={"rope_type": "linear", "factor": 8.0}),
    dict(rope_parameters={F: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                          S: {"rope_type": "default", "rope_theta": 1e4}}),
    dict(num_hidden_layers=4, layer_types=[S, F, S, S], query_pre_attn_scalar=168, final_logit_softcapping=30.0),
]


@pytest.mark.parametrize("raw", CONFIGS, ids=range(len(CONFIGS)))
def test_config_resolves_like_transformers(raw):
    ours, ref = Gemma3Config.from_dict(raw), Gemma3TextConfig(**raw)
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "sliding_window",
              "query_pre_attn_scalar", "final_logit_softcapping", "tie_word_embeddings", "layer_types"):
        assert getattr(ours, f) == getattr(ref, f), f
    assert ours.rope_parameters == ref.rope_parameters
    assert Gemma3Config.from_dict(ours.to_dict()) == ours  # the written config reads back to itself


@pytest.mark.parametrize("raw,message", [
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(num_hidden_layers=2, layer_types=[S]), "layer_types"),
    (dict(use_bidirectional_attention=True), "embedding model"),
])
def test_config_fails_loudly(raw, message):
    with pytest.raises(ConfigError, match=message):
        Gemma3Config.from_dict(raw)


def test_geometry_serves_cache_and_drafter():
    cfg = Gemma3Config.from_dict({**BASE, **VARIANTS["mqa"]})
    assert cfg.first_shared_layer == 6 and cfg.producer_for(F) == 4 and cfg.producer_for(S) == 5
    assert (cfg.layer_head_dim(1), cfg.layer_kv_heads(1)) == (16, 1)
    cache = Gemma3Target(cfg).make_cache(chunk=4)
    assert [c.ring_capacity for c in cache.layers] == [12, None, 12, 12, None, 12]
    wrapped = Gemma3Target(gemma3_config_of({"model_type": "gemma3", "text_config": {**BASE, **VARIANTS["mqa"]}}))
    assert wrapped.config == cfg  # the multimodal wrapper's text stack


def test_sanitize_accepts_hf_and_mlx_lm_layouts():
    target = Gemma3Target(Gemma3Config.from_dict(BASE))
    w = mx.zeros((1,))
    names = {"model.language_model.layers.0.mlp.up_proj.weight", "model.vision_tower.x.weight",
             "model.multi_modal_projector.mm_input_projection_weight", "lm_head.weight",
             "language_model.model.norm.weight", "vision_tower.y.weight", "model.embed_tokens.weight"}
    assert set(target.sanitize({k: w for k in names})) == {"model.layers.0.mlp.up_proj.weight", "model.norm.weight",
                                                             "model.embed_tokens.weight"}


# --- forward against transformers ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ids", [SHORT, LONG], ids=["short", "long"])
def test_one_shot_prefill_matches_transformers(variant, ids, mlx_target, hf_dir):
    target = mlx_target(variant)
    ref_logits, ref_hidden = hf_forward(hf_dir(variant), ids)
    logits, hidden = target(mx.array([ids]), target.make_cache(chunk=64))
    close(logits[0], ref_logits, "logits")
    close(hidden[0], ref_hidden, "final-norm hidden")
    argmax_equal(logits[0], ref_logits, "logits")


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill_matches_transformers(variant, mlx_target, hf_dir):
    target = mlx_target(variant)
    ref_logits, _ = hf_forward(hf_dir(variant), LONG)
    cache = target.make_cache(chunk=5)
    got, s = [], 0
    for n in [5, 3, 1, 1, 4, 1, 5, 1, 2, 5, 2]:
        logits, _ = target(mx.array([LONG[s:s + n]]), cache)
        got.append(np.array(logits[0]))
        s += n
    got = np.concatenate(got)
    close(got, ref_logits[: len(got)], "chunked logits")
    argmax_equal(got, ref_logits[: len(got)], "chunked logits")
    logits, _ = target.prefill(mx.array([LONG]), target.make_cache(chunk=4))
    close(logits[0, -1], ref_logits[-1], "prefill last logits")


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_with_rollbacks_equals_never_having_decoded(variant, mlx_target, hf_dir):
    """3×W single-token steps; between steps, write up to chunk−1 junk tokens (rejected drafts) and roll back."""
    target = mlx_target(variant)
    seq = SHORT + np.random.default_rng(2).integers(3, 500, 3 * W).tolist()
    ref_logits, _ = hf_forward(hf_dir(variant), seq)
    chunk = 8
    cache = target.make_cache(chunk=chunk)
    target.prefill(mx.array([seq[: len(SHORT)]]), cache)
    junk = np.random.default_rng(3)
    for p in range(len(SHORT), len(seq)):
        r = int(junk.integers(0, chunk - 1))
        if r:
            target(mx.array([[seq[p]] + junk.integers(3, 500, r).tolist()]), cache)
            cache.rollback(r + 1)
        logits, _ = target(mx.array([[seq[p]]]), cache)
        close(logits[0, 0], ref_logits[p], f"decode step at position {p}")
        argmax_equal(logits[0], ref_logits[p][None], f"position {p}")
    assert cache.lengths.tolist() == [len(seq)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_greedy_matches_transformers_generate(variant, mlx_target, hf_dir):
    """The speculative loop runs a Gemma 3 target unchanged (no drafter: plain pipelined rounds)."""
    from gemma_mlx.decode import generate_tokens

    target = mlx_target(variant)
    n = 2 * W
    with torch.no_grad():
        ref = _hf(str(hf_dir(variant))).generate(torch.tensor([SHORT]), max_new_tokens=n, min_new_tokens=n,
                                                 do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = [t for new, _ in generate_tokens(target, None, SHORT, max_tokens=n, chunk=8) for t in new]
    assert ours == ref[0, len(SHORT):].tolist()


def test_loads_in_mlx_lm_with_the_same_logits(mlx_target, tmp_path):
    """Our names and written config are mlx-lm's gemma3_text (√64 = 8 is exact in bf16, so mlx-lm's bf16-rounded
    embedding scale is HF's here)."""
    from mlx_lm.utils import load_model

    target = mlx_target("plain")
    (tmp_path / "config.json").write_text(json.dumps(target.config.to_dict()))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(target.parameters())),
                        metadata={"format": "mlx"})
    theirs, _ = load_model(tmp_path)
    ours, _ = target(mx.array([LONG]), target.make_cache(chunk=64))
    close(theirs(mx.array([LONG]))[0], np.array(ours[0]), "mlx-lm logits")
