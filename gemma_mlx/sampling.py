"""Token choice for the verify step: greedy, or exact speculative sampling with greedy drafts.

Drafts are the drafter's greedy tokens, i.e. a point-mass proposal q = δ_d. The exact rule for that proposal:
accept d_i with probability p_i(d_i); at the first rejection sample from p_i with d_i removed and renormalised;
after K acceptances sample the bonus token from p_K. Every emitted token is then distributed exactly as plain
sampling from p (transformers' rule, min(1, p/q) with q = softmax(raw drafter logits), is not).

p is the target distribution after the same processors as plain sampling (mlx-lm's top-p / min-p / top-k filters
on log-probabilities, then the temperature), and plain sampling is this same code with K = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def processed_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Logits whose softmax is the distribution plain sampling draws from ([..., V], float32)."""
    logprobs = logits.astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    if params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p > 0.0:
        logprobs = apply_min_p(logprobs, params.min_p)
    if 0 < params.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, params.top_k)
    return logprobs * (1.0 / params.temperature)


def verify_choices(logits: mx.array, drafts: mx.array, params: SamplingParams, key=None):
    """For verify logits [B, K+1, V] and drafts [B, K], return, lazily:
    accept [B, K] bool (draft i accepted given all before it were), and fallback [B, K+1] int (the token to emit
    when the first rejection is at i, or the bonus token at i = K)."""
    K = drafts.shape[1]
    if params.greedy:
        target = mx.argmax(logits, axis=-1)
        return drafts == target[:, :K], target
    z = processed_logits(logits, params)
    k_accept, k_sample = mx.random.split(key, 2) if key is not None else (None, None)
    p_draft = mx.exp(mx.take_along_axis(z[:, :K], drafts[..., None].astype(mx.int32), axis=-1)[..., 0]
                     - mx.logsumexp(z[:, :K], axis=-1)) if K else mx.zeros(drafts.shape)
    accept = mx.random.uniform(shape=drafts.shape, key=k_accept) < p_draft
    # Residual at a rejection: p with the rejected draft removed; bonus after full acceptance: p itself.
    removed = mx.put_along_axis(z[:, :K], drafts[..., None].astype(mx.int32), mx.array(-mx.inf, z.dtype), axis=-1)
    fallback = mx.random.categorical(mx.concatenate([removed, z[:, K:]], axis=1), key=k_sample)
    return accept, fallback
