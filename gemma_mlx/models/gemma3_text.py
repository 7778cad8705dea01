"""The Gemma 3 text target (`gemma3_text`, and the `gemma3` wrapper reduced to text).

Same interface as target.Target: `(logits, final-norm hidden) = target(tokens, cache)`, `model.embed`, `make_cache`
(a cache.TargetCache), `prefill`, `sanitize`, so the engine runs it unchanged. Parameter names are mlx-lm's
`gemma3_text.Model` tree (= the Hugging Face names), and norm weights are stored as HF stores them (w, applied as
1 + w), so converted checkpoints load in both.

What differs from Gemma 4 (transformers 5.23 `modeling_gemma3.py`):
- every RMSNorm (layer norms, q/k norms, final norm) scales by 1 + w, computed in fp32 as HF does; V is not normed;
- attention scale is query_pre_attn_scalar^-½ (not 1.0); one head_dim and one KV-head count for all layers;
- RoPE: sliding layers use the local base (10k), full layers the global base (1M) with optional linear scaling;
- no PLE, MoE, kv-sharing or k_eq_v; final-logit softcapping only if the config sets it (Gemma 3 does not).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import Span, TargetCache
from .base import (FULL, MLP, SLIDING, CausalLM, ConfigError, Embedding, FamilyConfig, Linear, RoPE, attend,
                   sandwich_norms, scaled_embedding)

DROPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.")


@dataclass
class Gemma3Config(FamilyConfig):
    """A Gemma 3 text stack; defaults are transformers 5.23.0's `Gemma3TextConfig` defaults.

    Provides the geometry TextConfig provides (layer_types, sliding_window, first_shared_layer, producer_for,
    kv_source, layer_head_dim, layer_kv_heads), so cache.py, gemma4_assistant.py and the CLI need no change; the Gemma 4
    features Gemma 3 lacks read as constants (properties, not written to config.json).
    """

    model_type: str = "gemma3_text"
    vocab_size: int = 262_208
    num_hidden_layers: int = 26
    rope_parameters: Optional[dict] = None
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    attn_logit_softcapping: Optional[float] = None
    use_bidirectional_attention: bool = False

    MODEL_TYPE = "gemma3_text"

    def _resolve(self, raw: dict):
        self._resolve_common(raw.get("sliding_window_pattern", 6), "Gemma 3")  # HF: every 6th layer full
        self.rope_parameters = _resolve_rope(self.rope_parameters, raw)
        if self.use_bidirectional_attention:
            raise ConfigError("use_bidirectional_attention=true is an embedding model, not a causal LM")
        if self.attn_logit_softcapping is not None:
            raise ConfigError("attn_logit_softcapping is not supported (a Gemma 2 feature; Gemma 3 sets none)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{self.num_attention_heads} heads do not share {self.num_key_value_heads} KV heads")

    # Geometry, as TextConfig (one head_dim and KV-head count for every layer; no kv-sharing).
    def layer_head_dim(self, i: int) -> int:
        return self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        return self.num_key_value_heads

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers

    def producer_for(self, layer_type: str) -> int:
        candidates = [i for i, t in enumerate(self.layer_types) if t == layer_type]
        if not candidates:
            raise ConfigError(f"no {layer_type} layer produces a KV cache")
        return candidates[-1]

    def kv_source(self, i: int) -> int:
        return i

    # Gemma 4 features, absent in Gemma 3 (read by the CLI's `info`).
    num_kv_shared_layers = property(lambda self: 0)
    global_head_dim = property(lambda self: self.head_dim)
    hidden_size_per_layer_input = property(lambda self: 0)
    enable_moe_block = property(lambda self: False)
    attention_k_eq_v = property(lambda self: False)

    def to_dict(self) -> dict:
        """The resolved config, plus the legacy keys mlx-lm's `gemma3_text` reads instead of rope_parameters /
        layer_types (its defaults differ from HF's: sliding_window 512, 1 KV head, ...)."""
        d = asdict(self)
        full, local = self.rope_parameters[FULL], self.rope_parameters[SLIDING]
        d["rope_theta"], d["rope_local_base_freq"] = full["rope_theta"], local["rope_theta"]
        d["rope_scaling"] = None if full["rope_type"] == "default" else {k: v for k, v in full.items()
                                                                           if k != "rope_theta"}
        pattern = self.layer_types.index(FULL) + 1 if FULL in self.layer_types else 0
        periodic = [SLIDING if (i + 1) % pattern else FULL for i in range(self.num_hidden_layers)] if pattern else None
        if self.layer_types == periodic:
            d["sliding_window_pattern"] = pattern
        return d


def _resolve_rope(params: Optional[dict], raw: dict) -> dict:
    """Per-layer-type RoPE as HF's `convert_rope_params_to_dict`: legacy `rope_scaling` applies to full layers,
    legacy `rope_theta` / `rope_local_base_freq` fill in the bases (defaults 1M / 10k)."""
    params = {t: dict(p) for t, p in (params or {}).items() if p is not None}
    if extra := set(params) - {SLIDING, FULL}:
        raise ConfigError(f"rope_parameters must be given per layer type, not {sorted(extra)[0]!r}")
    full = params.setdefault(FULL, {"rope_type": "default"})
    local = params.setdefault(SLIDING, {"rope_type": "default"})
    if raw.get("rope_scaling"):
        full.update(raw["rope_scaling"])
    full.setdefault("rope_theta", raw.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", raw.get("rope_local_base_freq", 10_000.0))
    for p in params.values():
        if "type" in p:  # pre-4.45 spelling of rope_type (HF 5.23 silently ignores it; mlx-lm honours it)
            p["rope_type"] = p.pop("type")
        p.setdefault("rope_type", "default")
        if p["rope_type"] not in ("default", "linear"):
            raise ConfigError(f"rope_type {p['rope_type']!r} is not supported (Gemma 3 uses default and linear)")
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial_rotary_factor is not supported for Gemma 3")
    return params


def gemma3_text_config_of(raw: dict) -> dict:
    """The text stack of a Gemma 3 config: the multimodal wrapper (`gemma3`) keeps it in text_config."""
    if raw.get("model_type") == "gemma3":
        return raw.get("text_config") or {}
    return raw


def hf_key(key: str, cfg: Gemma3Config) -> str | None:
    """Our name for a checkpoint tensor, or None to drop it. `Gemma3ForCausalLM` names are ours; the multimodal
    `Gemma3ForConditionalGeneration` keeps the text stack under `model.language_model.` (towers dropped), mlx-lm's
    `gemma3` wrapper under `language_model.model.`; a tied head is dropped."""
    key = key.removeprefix("language_model.").replace("model.language_model.", "model.", 1)
    if key.removeprefix("model.").startswith(DROPPED_PREFIXES) or key.endswith("rotary_emb.inv_freq"):
        return None
    if key == "lm_head.weight" and cfg.tie_word_embeddings:
        return None
    return key


class RMSNorm(nn.Module):
    """Gemma 3's norm: x / rms(x) · (1 + w), in fp32 and cast back once, as HF."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return _one_plus_w_norm(x, self.weight, self.eps)


@partial(mx.compile, shapeless=True)  # fused on the CPU backend, as target.rms_norm
def _one_plus_w_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x.astype(mx.float32), 1.0 + weight.astype(mx.float32), eps).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Gemma3Config, i: int):
        super().__init__()
        self.n_heads, self.n_kv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar**-0.5
        H = cfg.hidden_size
        self.q_proj = Linear(H, self.n_heads * D, bias=False)
        self.k_proj = Linear(H, self.n_kv * D, bias=False)
        self.v_proj = Linear(H, self.n_kv * D, bias=False)
        self.o_proj = Linear(self.n_heads * D, H, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.rope = RoPE(cfg.rope_parameters[cfg.layer_types[i]], D)

    def __call__(self, x: mx.array, offset: mx.array, cache, mask) -> mx.array:
        B, T, _ = x.shape
        q = self.rope(self.q_norm(self.q_proj(x).reshape(B, T, self.n_heads, -1)).transpose(0, 2, 1, 3), offset)
        k = self.rope(self.k_norm(self.k_proj(x).reshape(B, T, self.n_kv, -1)).transpose(0, 2, 1, 3), offset)
        cache.write(k, self.v_proj(x).reshape(B, T, self.n_kv, -1).transpose(0, 2, 1, 3))
        return self.o_proj(attend(q, cache, mask, self.scale))


class DecoderLayer(nn.Module):
    """Sandwich norms around attention and MLP, as Gemma 4 but without PLE, MoE or a layer scalar."""

    def __init__(self, cfg: Gemma3Config, i: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_type = cfg.layer_types[i]
        self.self_attn = Attention(cfg, i)
        self.mlp = MLP(H, cfg.intermediate_size)
        sandwich_norms(self, H, eps, RMSNorm)

    def __call__(self, h, offset, cache, mask):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), offset, cache, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3TextModel(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def embed(self, tokens: mx.array) -> mx.array:
        return scaled_embedding(self.embed_tokens, tokens, self.cfg.hidden_size)

    def __call__(self, tokens: mx.array, cache: TargetCache) -> mx.array:
        """Final-norm hidden states; under a pipeline split (pipeline.py) this rank's layers, and before the last
        rank what it sent on."""
        split = self.split
        B, T = tokens.shape
        start = cache.lengths.copy()
        offset = mx.array(start, dtype=mx.int32)
        reads = {t: cache.reads(t, start, T) for t in {self.cfg.layer_types[i] for i in split.layers}}
        h = self.embed(tokens) if split.first else split.receive((B, T, self.cfg.hidden_size))
        for i in split.layers:
            slots, mask = reads[self.layers[i].layer_type]
            h = self.layers[i](h, offset, Span(cache.layer(i), slots), mask)
        return self.norm(h) if split.last else split.pass_on(h)


class Gemma3Target(CausalLM):
    """`(logits, final-norm hidden) = target(tokens, cache)`, as target.Target."""

    def __init__(self, cfg: Gemma3Config):
        super().__init__(cfg, Gemma3TextModel(cfg))

    def sanitize(self, weights: dict) -> dict:
        """Accept the HF layouts too (see `hf_key`)."""
        return {name: v for k, v in weights.items() if (name := hf_key(k, self.config)) is not None}


Model = Gemma3Target


def config_of(raw: dict) -> Gemma3Config:
    return Gemma3Config.from_dict(gemma3_text_config_of(raw))
