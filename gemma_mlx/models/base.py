"""What the model families share: the fused ops the CPU backend needs (RMSNorm, RoPE, GELU, the logit softcap), the
layers built on them (their projections through matmul.linear), `CausalLM` (the interface the engine runs), the
layer-type names and ConfigError."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional
from functools import partial
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import TargetCache
from ..pipeline import Split
from .matmul import linear

SLIDING, FULL = "sliding_attention", "full_attention"


class ConfigError(ValueError):
    """A config that gemma-mlx cannot run; the message is one line meant for the user."""


@dataclass
class FamilyConfig:
    """What the families' config dataclasses share: the fields whose transformers 5.23.0 defaults are the same in
    `Gemma3TextConfig` and `Gemma4TextConfig`, and `from_dict`, which keeps the fields the class knows and resolves
    the rest against transformers' defaults (`_resolve`), refusing what the runtime cannot run."""

    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: Optional[int] = 0
    eos_token_id: object = 1
    bos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    layer_types: Optional[list] = None
    final_logit_softcapping: Optional[float] = None

    MODEL_TYPE = ""

    @classmethod
    def from_dict(cls, raw: dict):
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in known})
        cfg.model_type = cls.MODEL_TYPE
        cfg._resolve(dict(raw))
        return cfg

    def _resolve_common(self, pattern: int, family: str):
        """Layer types (by default every `pattern`-th layer full, as HF), EOS ids as a list, and the checks both
        families make."""
        n = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != n:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {n} layers")
        if bad := set(self.layer_types) - {SLIDING, FULL}:
            raise ConfigError(f"unknown layer type {sorted(bad)[0]!r}")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if self.attention_bias:
            raise ConfigError(f"attention_bias=true is not a {family} checkpoint")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not supported")


# On the CPU backend MLX runs mx.fast.rms_norm and mx.fast.rope as their reference graphs of small ops (they are fused
# kernels only on Metal). A decode step runs ~7 norms and 2 RoPEs a layer on a few thousand numbers each, where per-op
# dispatch costs more than the math: compiled, each becomes one or two fused kernels (on Metal, the same kernel).


@partial(mx.compile, shapeless=True)
def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """x / rms(x) · weight (Gemma 4 multiplies by w); weight None: no scale."""
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
    """Non-interleaved RoPE; `linear` divides positions by `factor` (periods × factor); `proportional` rotates the
    first p·D/2 pairs with exponents over the full D and leaves the rest unrotated, expressed as `inf` periods."""

    def __init__(self, params: dict, head_dim: int):
        super().__init__()
        kind = params.get("rope_type", "default")
        base, factor = params.get("rope_theta", 10_000.0), params.get("factor", 1.0)
        if kind == "proportional":
            pairs = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
            rotated = factor * base ** (mx.arange(0, 2 * pairs, 2, dtype=mx.float32) / head_dim)
            self._freqs = mx.concatenate([rotated, mx.full((head_dim // 2 - pairs,), mx.inf)])
        elif kind in ("default", "linear") and params.get("partial_rotary_factor", 1.0) == 1.0:
            scale = factor if kind == "linear" else 1.0
            self._freqs = scale * base ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)
        else:
            raise ConfigError(f"rope {params} is not supported")
        mx.eval(self._freqs)  # a constant: evaluate now, so any thread can use it (MLX streams are per thread)

    def __call__(self, x: mx.array, offset: mx.array) -> mx.array:
        return rope(x, offset, self._freqs)


def attend(q: mx.array, cache, mask, scale: float) -> mx.array:
    """Attention of q [B, heads, T, D] over what the layer's cache view holds -> [B, T, heads·D]."""
    keys, values = cache.view()
    o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    return o.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)


def sandwich_norms(layer: nn.Module, hidden: int, eps: float, norm=RMSNorm):
    """The four norms around a Gemma layer's attention and MLP."""
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        setattr(layer, name, norm(hidden, eps))


def scaled_embedding(table: nn.Module, tokens: mx.array, hidden: int) -> mx.array:
    """E[x]·√H, the scale rounded to the weight dtype as in HF (the targets' input, and the drafter's)."""
    e = table(tokens)
    return e * mx.array(math.sqrt(hidden), dtype=e.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def __call__(self, x):
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


def image_chunk_end(where: np.ndarray, s: int, e: int, chunk: int) -> int:
    """A prefill chunk's end moved back to the start of the image it would cut (an image attends to itself
    bidirectionally, so it must be in one forward)."""
    if e >= len(where) or not (where[e - 1] and where[e]):
        return e
    b = e - 1
    while b > 0 and where[b - 1]:
        b -= 1
    if b > s:
        return b
    n = int(np.argmin(np.append(where[b:], False)))
    raise ValueError(f"an image of {n} soft tokens is longer than the prefill chunk ({chunk}): make the cache with "
                     f"a chunk of at least {n}")


def cache_for(config, batch: int = 1, chunk: int = 256, layers: range | None = None) -> TargetCache:
    """The target cache of a config (Gemma 4's or Gemma 3's: layer_types, first_shared_layer, sliding_window,
    producer_for): one layer cache per producer layer, of the given `layers` only (a pipeline rank's)."""
    types = config.layer_types
    own = [i for i in (layers or range(len(types))) if i < config.first_shared_layer]
    producers = {types[i]: i for i in own}  # each type's last own producer: the drafter's on the last rank
    return TargetCache({i: types[i] != FULL for i in own}, config.sliding_window, producers, batch, chunk)


class CausalLM(nn.Module):
    """What the engine needs from a target family (gemma4_text.py, gemma3_text.py): `(logits, final-norm
    hidden) = target(tokens, cache)`, its cache and chunked prefill. A family gives its config and its model (with
    `embed_tokens` and `embed`)."""

    def __init__(self, config, model: nn.Module):
        super().__init__()
        self.config, self.model = config, model
        self.model.split = Split.whole(config.num_hidden_layers)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def split(self) -> Split:
        return self.model.split

    def pipeline(self, split: Split):
        """Keep this rank's part of the model (its layers; the input tables on the first rank; the final norm, the
        head and the token embedding the drafter reads on the last): what is dropped is never read from disk."""
        model = self.model
        for i in range(len(model.layers)):
            if i not in split.layers:
                model.layers[i] = None
        drop = [] if split.first else [k for k in model if k.startswith(("embed_tokens_per_layer", "per_layer_"))]
        drop += [] if split.last else ["norm"] + ([] if split.first else ["embed_tokens"])
        for name in drop:
            del model[name]
        if not split.last and "lm_head" in self:
            del self["lm_head"]
        split.dtype = model.layers[split.layers.start].input_layernorm.weight.dtype
        model.split = split

    def __call__(self, tokens: mx.array, cache: TargetCache, last_only: bool = False, images=None):
        """(logits, final-norm hidden); on a pipeline rank before the last, (None, what it sent on)."""
        hidden = self.model(tokens, cache) if images is None else self.model(tokens, cache, images)
        if last_only:
            hidden = hidden[:, -1:]
        if not self.split.last:
            return None, hidden
        return self.logits(hidden), hidden

    def logits(self, hidden: mx.array) -> mx.array:
        out = self.model.embed_tokens.as_linear(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return out if cap is None else softcap(out, cap)

    def make_cache(self, batch: int = 1, chunk: int = 256) -> TargetCache:
        return cache_for(self.config, batch, chunk, self.split.layers)

    def projection_weights(self) -> list:
        """The weights `linear` multiplies (matmul.calibrate): every Linear's and the tied head's."""
        weights = [m.weight for _, m in self.named_modules() if isinstance(m, Linear)]
        tied = self.config.tie_word_embeddings and "embed_tokens" in self.model
        return weights + ([self.model.embed_tokens.weight] if tied else [])

    def prefill(self, tokens: mx.array, cache: TargetCache, images=None):
        """Run a prompt through in chunks of at most `cache.chunk` tokens; returns the last position's
        (logits, hidden). `images`: (where [1, T] bool numpy, soft tokens [n, H]) of one row's image tokens; with
        bidirectional image attention a chunk holds whole images."""
        s, T = 0, tokens.shape[1]
        while s < T:
            e = min(s + cache.chunk, T)
            part = None
            if images is not None:
                where, features = images
                if getattr(self.config, "use_bidirectional_attention", None) == "vision":
                    e = image_chunk_end(where[0], s, e, cache.chunk)
                n0, n = int(where[0, :s].sum()), int(where[0, s:e].sum())
                part = (where[:, s:e], features[n0 : n0 + n]) if n else None
            logits, hidden = self(tokens[:, s:e], cache, last_only=True, images=part)
            mx.eval([a for a in (logits, hidden) if a is not None], cache.state())
            s = e
        return logits, hidden
