"""The Gemma 4 text target (`gemma4_text`, and the `gemma4` wrapper reduced to text), spec §1.

Parameter names are mlx-lm's `gemma4_text.Model` tree, so converted checkpoints load in both. Unlike mlx-lm the
forward returns (logits, final-norm hidden states), the hidden state being the drafter's input, and it writes the
`TargetCache` of cache.py: rings with rollback for sliding layers, read in place by the drafter.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gemma4_text import Router

from .cache import Span, TargetCache
from .config import FULL, ConfigError, TextConfig, text_config_of
from .moe import Experts


# On the CPU backend MLX runs mx.fast.rms_norm and mx.fast.rope as their reference graphs of small ops (they are fused
# kernels only on Metal). A decode step runs ~7 norms and 2 RoPEs a layer on a few thousand numbers each, where per-op
# dispatch costs more than the math: compiled, each becomes one or two fused kernels (on Metal, the same kernel).


@partial(mx.compile, shapeless=True)
def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """x / rms(x) · weight (Gemma 4 multiplies by w, spec §1.3.1); weight None: no scale."""
    return mx.fast.rms_norm(x, weight, eps)


@mx.compile  # not shapeless: RoPE's graph slices by shape (one trace per shape: decode and verify use a handful)
def rope(x: mx.array, offset: mx.array, freqs: mx.array) -> mx.array:
    """Non-interleaved RoPE over the whole head with the given periods, positions offset + 0..T-1 per row."""
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)


# Eigen's rational approximation of tanh in float32 (|error| < 4e-7 against tanh in float64; mx.tanh: 1e-7): odd
# numerator and even denominator polynomials in x², on x clamped to ±7.905 (where tanh rounds to ±1).
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
           -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_TANH_CLAMP = 7.90531110763549805


@partial(mx.compile, shapeless=True)
def tanh(x: mx.array) -> mx.array:
    """tanh by multiplies, adds and one divide, which fuse into the kernel around it. On the CPU backend mx.tanh is a
    libm call per element (14 ns; this: 3 ns), and GELU and the logit softcap run it over every MLP activation and
    logit: about a million of them in an 8-token verify of the e2b-like bench target."""
    y = mx.clip(x.astype(mx.float32), -_TANH_CLAMP, _TANH_CLAMP)
    y2 = y * y
    p, q = _TANH_P[-1], _TANH_Q[-1]
    for a in _TANH_P[-2::-1]:
        p = p * y2 + a
    for b in _TANH_Q[-2::-1]:
        q = q * y2 + b
    return (y * p / q).astype(x.dtype)


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, x: mx.array) -> mx.array:
    """gelu_tanh(gate) · x (gelu_pytorch_tanh, as nn.gelu_approx), fused."""
    return 0.5 * gate * (1 + tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate * gate * gate))) * x  # no pow()


@partial(mx.compile, shapeless=True)
def softcap(x: mx.array, cap: float) -> mx.array:
    return tanh(x / cap) * cap


# BLAS sgemm of a few rows against a large weight (x @ W.T) repacks the weight on every call, so on the CPU backend a
# verify of K+1 tokens cost nearly K+1 decode steps. As W @ x.T the weight is streamed once (bench/README.md).
SKINNY_ROWS = 32


def linear(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T; for at most SKINNY_ROWS rows on the CPU backend, computed as (weight @ x.T).T."""
    rows = x.size // x.shape[-1]
    if rows > SKINNY_ROWS or mx.default_device() != mx.cpu:
        return x @ weight.T
    return (weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        y = linear(x, self.weight)
        return y + self.bias if "bias" in self else y


class Embedding(nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return linear(x, self.weight)


class RMSNorm(nn.RMSNorm):
    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self["weight"], self.eps)


class RoPE(nn.Module):
    """Non-interleaved RoPE; `proportional` rotates the first p·D/2 pairs with exponents over the full D and
    leaves the rest unrotated (spec §1.3.4), expressed as `inf` periods."""

    def __init__(self, params: dict, head_dim: int):
        super().__init__()
        kind = params.get("rope_type", "default")
        base, factor = params.get("rope_theta", 10_000.0), params.get("factor", 1.0)
        if kind == "proportional":
            pairs = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
            rotated = factor * base ** (mx.arange(0, 2 * pairs, 2, dtype=mx.float32) / head_dim)
            self._freqs = mx.concatenate([rotated, mx.full((head_dim // 2 - pairs,), mx.inf)])
        elif kind == "default" and params.get("partial_rotary_factor", 1.0) == 1.0:
            self._freqs = base ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)
        else:
            raise ConfigError(f"rope {params} is not supported")
        mx.eval(self._freqs)  # a constant: evaluate now, so any thread can use it (MLX streams are per thread)

    def __call__(self, x: mx.array, offset: mx.array) -> mx.array:
        return rope(x, offset, self._freqs)


class Attention(nn.Module):
    """Scale 1.0 (q/k are RMS-normalised per head). Producer layers write K/V into their cache; consumer layers
    (kv-shared, §1.4) attend to their producer's cache and own only q/o projections."""

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
        keys, values = cache.view()
        o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def __call__(self, x):
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Spec §1.3.3: attention, dense MLP (+ MoE beside it), PLE injection, then `layer_scalar` on the whole stream."""

    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.layer_type = cfg.layer_types[i]
        self.self_attn = Attention(cfg, i)
        self.mlp = MLP(H, cfg.mlp_size(i))
        self.input_layernorm = RMSNorm(H, eps=eps)
        self.post_attention_layernorm = RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps=eps)
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
        if self.enable_moe:  # router and experts read the residual stream r, not the MLP's normed input (§1.3.5)
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
        """The scaled token embedding E[x]·√H (also the drafter's input, §2.3); the scale rounds to the weight dtype
        as in HF."""
        e = self.embed_tokens(tokens)
        return e * mx.array(math.sqrt(self.cfg.hidden_size), dtype=e.dtype)

    def per_layer_inputs(self, tokens: mx.array, e: mx.array) -> mx.array:
        """PLE (§1.3.2): [B, T, N, P] = (norm(proj(e)·H^-½) + E_ple[x]·√P)·2^-½."""
        cfg = self.cfg
        N, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        t = self.embed_tokens_per_layer(tokens)
        t = (t * mx.array(math.sqrt(P), dtype=t.dtype)).reshape(*tokens.shape, N, P)
        c = self.per_layer_model_projection(e) * (cfg.hidden_size**-0.5)
        c = self.per_layer_projection_norm(c.reshape(*tokens.shape, N, P))
        return (c + t) * (2.0**-0.5)

    def __call__(self, tokens: mx.array, cache: TargetCache) -> mx.array:
        cfg = self.cfg
        B, T = tokens.shape
        start = cache.lengths.copy()
        offset = mx.array(start, dtype=mx.int32)
        reads = {t: cache.reads(t, start, T) for t in set(cfg.layer_types)}
        h = self.embed(tokens)
        ple = self.per_layer_inputs(tokens, h) if cfg.hidden_size_per_layer_input else None
        for i, layer in enumerate(self.layers):
            slots, mask = reads[layer.layer_type]
            c = Span(cache.layers[cfg.kv_source(i)], slots)
            h = layer(h, offset, c, mask, None if ple is None else ple[:, :, i, :])
        return self.norm(h)


class CausalLM(nn.Module):
    """What the engine needs from a target family (Gemma 4 here, Gemma 3 in gemma3.py): `(logits, final-norm
    hidden) = target(tokens, cache)`, its cache and chunked prefill. Subclasses set `config`, `model` (with
    `embed_tokens` and `embed`) and `lm_head` when the head is untied."""

    def __call__(self, tokens: mx.array, cache: TargetCache, last_only: bool = False):
        hidden = self.model(tokens, cache)
        if last_only:
            hidden = hidden[:, -1:]
        return self.logits(hidden), hidden

    def logits(self, hidden: mx.array) -> mx.array:
        out = self.model.embed_tokens.as_linear(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return out if cap is None else softcap(out, cap)

    def make_cache(self, batch: int = 1, chunk: int = 256) -> TargetCache:
        return TargetCache(self.config, batch, chunk)

    def prefill(self, tokens: mx.array, cache: TargetCache):
        """Run a prompt through in chunks of at most `cache.chunk` tokens; returns the last position's
        (logits, hidden)."""
        for s in range(0, tokens.shape[1], cache.chunk):
            logits, hidden = self(tokens[:, s : s + cache.chunk], cache, last_only=True)
            mx.eval(logits, hidden, cache.state())
        return logits, hidden


class Target(CausalLM):
    """The Gemma 4 text target."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = Gemma4TextModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def sanitize(self, weights: dict) -> dict:
        """Accept mlx-lm's `gemma4` wrapper layout too (an mlx-community checkpoint: `language_model.model.*`)."""
        return {k.removeprefix("language_model."): v for k, v in weights.items()}

    @classmethod
    def from_config_dict(cls, raw: dict) -> "Target":
        return cls(TextConfig.from_dict(text_config_of(raw)))
