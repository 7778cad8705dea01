"""The Gemma 4 text target (`gemma4_text`, and the `gemma4` wrapper reduced to text).

`TextConfig` resolves a Hugging Face config against transformers' defaults (HF configs may omit fields, and
transformers 5.23 writes `per_layer_config` instead of `global_head_dim`) into an explicit dataclass; the converter
writes `to_dict()`, so a converted checkpoint never depends on anyone's defaults again (and loads in mlx-lm, whose
defaults differ).

Parameter names are mlx-lm's `gemma4_text.Model` tree, so converted checkpoints load in both. Unlike mlx-lm the
forward returns (logits, final-norm hidden states), the hidden state being the drafter's input, and it writes the
`TargetCache` of cache.py: rings with rollback for sliding layers, read in place by the drafter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.gemma4_text import Router

from ..cache import Span, TargetCache
from .base import (FULL, MLP, SLIDING, CausalLM, ConfigError, Embedding, FamilyConfig, Linear, RMSNorm, RoPE, attend,
                   geglu, rms_norm, sandwich_norms, scaled_embedding)
from .moe import Experts

WRAPPERS = ("gemma4", "gemma4_unified")  # multimodal wrappers: the text stack under text_config


def _default_rope():
    return {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }


@dataclass
class TextConfig(FamilyConfig):
    """A Gemma 4 text stack (`gemma4_text`); defaults are transformers 5.23.0's `Gemma4TextConfig` defaults."""

    model_type: str = "gemma4_text"
    vocab_size: int = 262_144
    num_hidden_layers: int = 30
    global_head_dim: int = 512
    num_global_key_value_heads: Optional[int] = None
    rope_parameters: dict = field(default_factory=_default_rope)
    sliding_window: int = 512
    use_bidirectional_attention: Optional[str] = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: Optional[int] = None
    top_k_experts: Optional[int] = None
    moe_intermediate_size: Optional[int] = None

    MODEL_TYPE = "gemma4_text"

    def _resolve(self, raw: dict):
        n = self.num_hidden_layers
        self._resolve_common(6, "Gemma 4")  # HF default pattern: 5 sliding : 1 full
        self.layer_types[-1] = FULL  # HF forces the last layer to full attention
        rope = _default_rope()
        rope.update(self.rope_parameters or {})
        self.rope_parameters = rope
        self._resolve_per_layer_config(raw.get("per_layer_config"))
        if self.use_bidirectional_attention == "all":
            raise ConfigError("use_bidirectional_attention='all' is an embedding model, not a causal LM")
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise ConfigError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
        if not 0 <= self.num_kv_shared_layers <= n:
            raise ConfigError(f"num_kv_shared_layers={self.num_kv_shared_layers} out of range for {n} layers")

    def _resolve_per_layer_config(self, per_layer: Optional[dict]):
        """transformers 5.23 stores `global_head_dim` / global KV heads as per-layer overrides."""
        if not per_layer:
            return
        full = {int(i) for i, t in enumerate(self.layer_types) if t == FULL}
        head_dims, kv_heads = set(), set()
        for idx, over in per_layer.items():
            if int(idx) not in full:
                raise ConfigError(f"per_layer_config overrides sliding layer {idx}: not supported")
            unknown = set(over) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ConfigError(f"per_layer_config field {sorted(unknown)[0]!r} is not supported")
            if "head_dim" in over:
                head_dims.add(over["head_dim"])
            if "num_key_value_heads" in over:
                kv_heads.add(over["num_key_value_heads"])
        if len(head_dims) > 1 or len(kv_heads) > 1:
            raise ConfigError("per_layer_config gives full-attention layers different shapes: not supported")
        if head_dims:
            self.global_head_dim = head_dims.pop()
        if kv_heads:
            self.num_global_key_value_heads = kv_heads.pop()
            if not self.attention_k_eq_v and self.num_global_key_value_heads != self.num_key_value_heads:
                raise ConfigError("full layers with their own KV-head count need attention_k_eq_v: not supported")

    # Derived geometry (one place, used by the model, the cache and the converter).
    def layer_head_dim(self, i: int) -> int:
        return self.global_head_dim if self.layer_types[i] == FULL else self.head_dim

    def layer_kv_heads(self, i: int) -> int:
        if self.layer_types[i] == FULL and self.attention_k_eq_v and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def producer_for(self, layer_type: str) -> int:
        """Index of the last non-shared layer of a type: KV source of consumers and of the drafter."""
        candidates = [i for i in range(self.first_shared_layer) if self.layer_types[i] == layer_type]
        if not candidates:
            raise ConfigError(f"no non-shared {layer_type} layer produces a KV cache")
        return candidates[-1]

    def kv_source(self, i: int) -> int:
        """The layer whose K/V layer i attends to (itself for producers)."""
        return i if i < self.first_shared_layer else self.producer_for(self.layer_types[i])

    def mlp_size(self, i: int) -> int:
        wide = self.use_double_wide_mlp and i >= self.first_shared_layer > 0
        return self.intermediate_size * (2 if wide else 1)

    def to_dict(self) -> dict:
        return asdict(self)


UNIFIED_DEFAULTS = {"sliding_window": 1024, "max_position_embeddings": 262_144}


def text_config_of(raw: dict) -> dict:
    """The text-stack part of a target config: the wrappers (`gemma4`, `gemma4_unified`) keep it in text_config.
    The 12B unified stack (`gemma4_unified_text`) is the Gemma 4 text stack without PLE or MoE (its decoder layer
    has neither) and with its own defaults."""
    mt = raw.get("model_type")
    text = raw
    if mt in WRAPPERS:
        if "text_config" not in raw:
            raise ConfigError(f"{mt} config has no text_config")
        text = raw["text_config"]
    if mt in ("gemma4_unified", "gemma4_unified_text") or text.get("model_type") == "gemma4_unified_text":
        text = {**UNIFIED_DEFAULTS, **text, "hidden_size_per_layer_input": 0, "enable_moe_block": False}
    return text



class Attention(nn.Module):
    """Scale 1.0 (q/k are RMS-normalised per head). Producer layers write K/V into their cache; consumer layers
    (kv-shared) attend to their producer's cache and own only q/o projections."""

    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        self.layer_type = cfg.layer_types[i]
        self.n_heads, self.head_dim, self.n_kv = cfg.num_attention_heads, cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
        self.is_producer = i < cfg.first_shared_layer
        self.k_eq_v = cfg.attention_k_eq_v and self.layer_type == FULL
        self.eps = cfg.rms_norm_eps
        H, D = cfg.hidden_size, self.head_dim
        self.q_proj = Linear(H, self.n_heads * D, bias=False)
        self.o_proj = Linear(self.n_heads * D, H, bias=False)
        self.q_norm = RMSNorm(D, eps=self.eps)
        if self.is_producer:
            self.k_proj = Linear(H, self.n_kv * D, bias=False)
            if not self.k_eq_v:
                self.v_proj = Linear(H, self.n_kv * D, bias=False)
            self.k_norm = RMSNorm(D, eps=self.eps)
        self.rope = RoPE(cfg.rope_parameters[self.layer_type], D)

    def __call__(self, x: mx.array, offset: mx.array, cache, mask) -> mx.array:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, T, self.n_heads, -1)).transpose(0, 2, 1, 3)
        q = self.rope(q, offset)
        if self.is_producer:
            k = self.k_proj(x).reshape(B, T, self.n_kv, -1)
            v = k if self.k_eq_v else self.v_proj(x).reshape(B, T, self.n_kv, -1)  # k_eq_v: V = raw k_proj output
            k = self.rope(self.k_norm(k).transpose(0, 2, 1, 3), offset)
            v = rms_norm(v, None, self.eps).transpose(0, 2, 1, 3)  # v_norm has no weight
            cache.write(k, v)
        return self.o_proj(attend(q, cache, mask, 1.0))


class DecoderLayer(nn.Module):
    """Attention, dense MLP (+ MoE beside it), PLE injection, then `layer_scalar` on the whole stream."""

    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_type = cfg.layer_types[i]
        self.self_attn = Attention(cfg, i)
        self.mlp = MLP(H, cfg.mlp_size(i))
        sandwich_norms(self, H, eps)
        self.enable_moe = cfg.enable_moe_block
        if self.enable_moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps=eps)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps=eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps=eps)
        self.has_ple = bool(cfg.hidden_size_per_layer_input)
        if self.has_ple:
            P = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = Linear(H, P, bias=False)
            self.per_layer_projection = Linear(P, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps=eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, h, offset, cache, mask, ple=None):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), offset, cache, mask))
        r = h
        f = self.mlp(self.pre_feedforward_layernorm(r))
        if self.enable_moe:  # router and experts read the residual stream r, not the MLP's normed input
            experts = self.experts(self.pre_feedforward_layernorm_2(r), *self.router(r))
            f = self.post_feedforward_layernorm_1(f) + self.post_feedforward_layernorm_2(experts)
        h = r + self.post_feedforward_layernorm(f)
        if self.has_ple:
            gate = geglu(self.per_layer_input_gate(h), ple)
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return h * self.layer_scalar


class Gemma4TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        P = cfg.hidden_size_per_layer_input
        if P:
            N = cfg.num_hidden_layers
            self.embed_tokens_per_layer = Embedding(cfg.vocab_size_per_layer_input, N * P)
            self.per_layer_model_projection = Linear(cfg.hidden_size, N * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, eps=cfg.rms_norm_eps)

    def embed(self, tokens: mx.array) -> mx.array:
        return scaled_embedding(self.embed_tokens, tokens, self.cfg.hidden_size)

    def per_layer_inputs(self, tokens: mx.array, e: mx.array) -> mx.array:
        """PLE: [B, T, N, P] = (norm(proj(e)·H^-½) + E_ple[x]·√P)·2^-½."""
        cfg = self.cfg
        N, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        t = self.embed_tokens_per_layer(tokens)
        t = (t * mx.array(math.sqrt(P), dtype=t.dtype)).reshape(*tokens.shape, N, P)
        c = self.per_layer_model_projection(e) * (cfg.hidden_size**-0.5)
        c = self.per_layer_projection_norm(c.reshape(*tokens.shape, N, P))
        return (c + t) * (2.0**-0.5)

    def __call__(self, tokens: mx.array, cache: TargetCache, images: Optional[tuple] = None) -> mx.array:
        """`images`: (where [B, T] bool numpy, features [n, H]): the image tokens of this forward and their soft
        tokens (row-major order), which replace the tokens' embeddings (design.md "Images"). Under a pipeline split
        (pipeline.py) the layers are this rank's, and what a rank before the last returns is what it sent on."""
        cfg, split = self.cfg, self.split
        B, T = tokens.shape
        start = cache.lengths.copy()
        offset = mx.array(start, dtype=mx.int32)
        blocks = image_blocks(images[0]) if images and cfg.use_bidirectional_attention == "vision" else None
        types = {cfg.layer_types[i] for i in split.layers}
        reads = {t: cache.reads(t, start, T, blocks if t == SLIDING else None) for t in types}
        h, ple = self.inputs(tokens, images) if split.first else self.received(B, T)
        for i in split.layers:
            layer = self.layers[i]
            slots, mask = reads[layer.layer_type]
            c = Span(cache.layer(cfg.kv_source(i)), slots)
            h = layer(h, offset, c, mask, None if ple is None else ple[:, :, i - split.layers.start, :])
        return self.norm(h) if split.last else self.pass_on(h, ple)

    def inputs(self, tokens: mx.array, images: Optional[tuple]) -> tuple[mx.array, Optional[mx.array]]:
        """The embeddings (soft tokens at image positions) and the per-layer inputs (PLE) of every layer."""
        cfg = self.cfg
        where = None if images is None else mx.array(images[0])
        if where is not None:  # image tokens are embedded as <pad> (their own ids may be outside the table)
            tokens = mx.where(where, cfg.pad_token_id or 0, tokens)
        h = self.embed(tokens)
        if where is not None:
            h = merge_images(h, images[0], images[1])
        ple = self.per_layer_inputs(tokens, h) if cfg.hidden_size_per_layer_input else None  # images: <pad>'s ids
        return h, ple

    def pass_on(self, h: mx.array, ple: Optional[mx.array]) -> mx.array:
        """Send the next rank the stream and the per-layer inputs of the layers after this rank's, in one array."""
        if ple is not None:
            rest = ple[:, :, len(self.split.layers) :, :]
            h = mx.concatenate([h, rest.reshape(*h.shape[:2], -1).astype(h.dtype)], axis=-1)
        return self.split.pass_on(h)

    def received(self, B: int, T: int) -> tuple[mx.array, Optional[mx.array]]:
        """What the previous rank's `pass_on` sent: the stream and the per-layer inputs from this rank's layers on."""
        H, P = self.cfg.hidden_size, self.cfg.hidden_size_per_layer_input
        rest = self.cfg.num_hidden_layers - self.split.layers.start
        x = self.split.receive((B, T, H + rest * P))
        return x[..., :H], (x[..., H:].reshape(B, T, rest, P) if P else None)


def image_blocks(where: np.ndarray) -> np.ndarray:
    """[B, T]: each run of image tokens numbered 0, 1, … per row (one image each), -1 for text."""
    starts = where & ~np.concatenate([np.zeros_like(where[:, :1]), where[:, :-1]], axis=1)
    return np.where(where, np.cumsum(starts, axis=1) - 1, -1)


def merge_images(h: mx.array, where: np.ndarray, features: mx.array) -> mx.array:
    """h with the image positions' embeddings replaced by the soft tokens, in row-major order."""
    flat = h.reshape(-1, h.shape[-1])
    flat[mx.array(np.flatnonzero(where.reshape(-1)))] = features.astype(h.dtype)
    return flat.reshape(h.shape)


class Target(CausalLM):
    """The Gemma 4 text target."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg, Gemma4TextModel(cfg))

    def sanitize(self, weights: dict) -> dict:
        """Accept mlx-lm's `gemma4` wrapper layout too (an mlx-community checkpoint: `language_model.model.*`; its
        towers are not the target's: gemma4_vision loads the vision one)."""
        return {k.removeprefix("language_model."): v for k, v in weights.items() if not k.startswith(TOWERS)}


TOWERS = ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.")
Model = Target


def config_of(raw: dict) -> TextConfig:
    return TextConfig.from_dict(text_config_of(raw))
