"""Token choice for the verify step: greedy, or exact speculative sampling with greedy drafts.

Drafts are the drafter's greedy tokens, i.e. a point-mass proposal q = δ_d, and the sampled token at each position
is the Gumbel-max sample argmax_v(z_v + G_v) of the target's processed logits z, with noise G that depends only on
the row's seed and the token's position. A draft is accepted iff it equals that sample, and at the first rejection
the sample itself is emitted. This is the exact rule for a point-mass proposal (accept d with probability p(d);
on rejection, a sample from p with d removed and renormalised: the Gumbel-max sample conditioned on not being d),
so every emitted token is distributed exactly as plain sampling from p (transformers' min(1, p/q) rule with q =
softmax(raw drafter logits) is not). And because the noise is keyed by (seed, position), a seeded row emits the
same tokens whatever K, the drafts and the batch it runs in are: plain and MTP, alone and batched, agree token for
token.

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


def _mix(x: mx.array) -> mx.array:
    """A 32-bit integer hash with good avalanche (lowbias32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


def position_noise(seeds, positions, vocab: int) -> mx.array:
    """Gumbel noise [B, T, V] for the tokens at `positions` [B, T] (ints) of rows seeded `seeds` [B]: a counter-based
    hash of (seed, position, token), so it depends on nothing else."""
    seeds = [int(s) % 2**64 for s in seeds]
    lo = mx.array([s & 0xFFFFFFFF for s in seeds], dtype=mx.uint32)[:, None]
    hi = mx.array([s >> 32 for s in seeds], dtype=mx.uint32)[:, None]
    row = _mix(_mix(_mix(lo) ^ hi) ^ mx.array(positions, dtype=mx.uint32))  # [B, T]
    bits = _mix(row[..., None] ^ (mx.arange(vocab, dtype=mx.uint32) * 0x9E3779B9))
    u = ((bits >> 8).astype(mx.float32) + 0.5) * (1.0 / 2**24)  # uniform in (0, 1)
    return -mx.log(-mx.log(u))


def verify_choices(logits: mx.array, drafts: mx.array, params: SamplingParams, seeds=None, positions=None):
    """For verify logits [B, K+1, V] and drafts [B, K], return, lazily: accept [B, K] bool (draft i accepted given
    all before it were), and fallback [B, K+1] int (the token to emit when the first rejection is at i, or the bonus
    token at i = K). Sampling needs each row's seed and the positions [B, K+1] of the tokens the logits predict."""
    K = drafts.shape[1]
    if params.greedy:
        target = mx.argmax(logits, axis=-1)
        return drafts == target[:, :K], target
    sample = mx.argmax(processed_logits(logits, params) + position_noise(seeds, positions, logits.shape[-1]), axis=-1)
    return drafts == sample[:, :K], sample
