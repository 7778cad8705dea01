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
on log-probabilities, then the temperature), and plain sampling is this same code with K = 0. With a top-k, only the
k most likely tokens can be drawn, so the filters and the noise run on those k alone (`candidates`): a 262144-token
vocabulary's full sort and noise cost tens of ms a row on a CPU.
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
    logprobs = _logprobs(logits)
    if params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p > 0.0:
        logprobs = apply_min_p(logprobs, params.min_p)
    if 0 < params.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, params.top_k)
    return logprobs * (1.0 / params.temperature)


def _logprobs(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _mix(x: mx.array) -> mx.array:
    """A 32-bit integer hash with good avalanche (lowbias32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


def position_noise(seeds, positions, tokens: mx.array) -> mx.array:
    """Gumbel noise [B, T, C] for the `tokens` (ids, [C] or [B, T, C]) at `positions` [B, T] (ints) of rows seeded
    `seeds` [B]: a counter-based hash of (seed, position, token), so it depends on nothing else."""
    seeds = [int(s) % 2**64 for s in seeds]
    lo = mx.array([s & 0xFFFFFFFF for s in seeds], dtype=mx.uint32)[:, None]
    hi = mx.array([s >> 32 for s in seeds], dtype=mx.uint32)[:, None]
    row = _mix(_mix(_mix(lo) ^ hi) ^ mx.array(positions, dtype=mx.uint32))  # [B, T]
    return _gumbel(row[..., None], tokens.astype(mx.uint32))


@mx.compile
def _gumbel(row: mx.array, tokens: mx.array) -> mx.array:
    bits = _mix(row ^ (tokens * 0x9E3779B9))
    # uniform in (0, 1) on 23 bits: with 24, the largest value (1 - 2^-25) rounds to 1.0 in float32 and its noise is
    # +inf, which picks that token whatever its probability (about 1 position in 64 over a 262144-token vocabulary)
    u = ((bits >> 9).astype(mx.float32) + 0.5) * (1.0 / 2**23)
    return -mx.log(-mx.log(u))


def candidates(logits: mx.array, params: SamplingParams) -> tuple[mx.array, mx.array]:
    """(ids, processed logits) [..., C] of the tokens sampling can draw: with a top-k, its k most likely tokens and
    their `processed_logits` (top-p's threshold found among them: the tokens it keeps are the most likely), else the
    whole vocabulary."""
    V = logits.shape[-1]
    if not 0 < params.top_k < V:
        return mx.arange(V), processed_logits(logits, params)
    logprobs = _logprobs(logits)
    ids = mx.argpartition(-logprobs, kth=params.top_k - 1, axis=-1)[..., : params.top_k]
    top = mx.take_along_axis(logprobs, ids, axis=-1)
    if params.top_p < 1.0:
        top = _top_p_among_the_most_likely(top, params.top_p)
    if params.min_p > 0.0:
        top = apply_min_p(top, params.min_p)
    return ids, top * (1.0 / params.temperature)


def _top_p_among_the_most_likely(logprobs: mx.array, top_p: float) -> mx.array:
    """mlx-lm's apply_top_p for the log-probabilities of the vocabulary's most likely tokens (their mass may be
    under 1): drops those whose more likely tokens already hold top_p of the whole distribution."""
    ascending = mx.sort(logprobs, axis=-1)
    mass_above = mx.cumsum(mx.exp(ascending), axis=-1, reverse=True, inclusive=False)
    dropped = (mass_above >= top_p).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(ascending, dropped, axis=-1)
    return mx.where(logprobs < threshold, -float("inf"), logprobs)


def sample(logits: mx.array, params: SamplingParams, seeds, positions) -> mx.array:
    """The Gumbel-max sample [B, T] of the processed logits [B, T, V] with the rows' (seed, position) noise."""
    ids, z = candidates(logits, params)
    pick = mx.argmax(z + position_noise(seeds, positions, ids), axis=-1)
    if ids.ndim == 1:
        return pick
    return mx.take_along_axis(ids, pick[..., None], axis=-1)[..., 0]


def verify_choices(logits: mx.array, drafts: mx.array, params: SamplingParams, seeds=None, positions=None):
    """For verify logits [B, K+1, V] and drafts [B, K], return, lazily: accept [B, K] bool (draft i accepted given
    all before it were), and fallback [B, K+1] int (the token to emit when the first rejection is at i, or the bonus
    token at i = K). Sampling needs each row's seed and the positions [B, K+1] of the tokens the logits predict."""
    K = drafts.shape[1]
    if params.greedy:
        target = mx.argmax(logits, axis=-1)
        return drafts == target[:, :K], target
    chosen = sample(logits, params, seeds, positions)
    return drafts == chosen[:, :K], chosen
