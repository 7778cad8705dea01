"""One speculative round: draft K → verify K+1 in one target forward → accept → roll back.

State between rounds, per row: the last emitted token x (position L−1, not yet in the cache), the target's
final-norm hidden g at position L−2, and the target cache holding positions 0…L−2. A round:
1. the drafter proposes d_1…d_K from (x, g), reading the cache in place;
2. the target runs [x, d_1…d_K] at positions L−1…L−1+K, writing K+1 cache entries;
3. the first n drafts the target agrees with are accepted, plus one token of the target's own (sampling.py);
4. the cache forgets the K−n rejected positions; x ← last emitted token, g ← target hidden at verify index n.
Drafting and verification are one lazy graph, evaluated once: one host sync per round. K = 0 is plain decoding;
K comes from draft_length.py, and decode.py runs the rounds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .cache import TargetCache
from .draft_length import K_MAX
from .models.gemma4_assistant import Drafter
from .models.gemma4_text import Target
from .sampling import SamplingParams, verify_choices


@dataclass
class RoundResult:
    tokens: list[list[int]]  # emitted tokens per row (n_b accepted drafts + 1)
    drafted: int  # K of this round


class Round:
    """One round for every row, in flight: the draft + verify graph is built lazily and evaluated asynchronously;
    `finish` reads it (the one host sync), accepts and rolls the cache back. x [B, 1] int, g [B, 1, H]; `seeds`:
    each row's sampling seed. `started` and `built_at` say when it was built, for draft_length.RoundClock."""

    def __init__(self, target: Target, drafter: Drafter | None, cache: TargetCache, x: mx.array, g: mx.array,
                 k: int, params: SamplingParams, seeds=None):
        self.cache, self.k, self.started = cache, k, time.perf_counter()
        B, split = x.shape[0], target.split
        positions = cache.lengths[:, None] + 1 + np.arange(k + 1)  # of the tokens the verify logits predict
        self.drafts = mx.zeros((B, 0), mx.int32)
        if k:  # the drafter runs on the last rank of a pipeline; the first embeds its drafts
            self.drafts, = split.from_last(lambda: (drafter.draft(target, x, g, cache, k),), ((B, k), mx.int32))
            if split.size > 1:
                mx.eval(self.drafts)  # before any rank waits for activations (a receive cannot wait for it)
        logits, self.hidden = target(mx.concatenate([x, self.drafts.astype(x.dtype)], axis=1), cache)
        self.accept, self.fallback = split.from_last(
            lambda: verify_choices(logits, self.drafts, params, seeds, positions), ((B, k), mx.bool_),
            ((B, k + 1), mx.int32))
        mx.async_eval(self.drafts, self.accept, self.fallback, self.hidden)
        self.built_at = time.perf_counter()

    @property
    def build_seconds(self) -> float:
        return self.built_at - self.started

    def plain_next(self):
        """With K = 0 nothing is rejected, so the next (x, g) are known lazily: the next round can be queued before
        this one is read (how plain decoding hides graph building, as mlx-lm does)."""
        assert self.k == 0
        return self.fallback.astype(mx.int32), self.hidden

    def take_rows(self, rows: list[int]):
        """Keep only these rows of a round in flight (the others left the batch)."""
        idx = mx.array(rows, dtype=mx.int32)
        self.drafts, self.accept, self.fallback, self.hidden = (a[idx] for a in (self.drafts, self.accept,
                                                                                   self.fallback, self.hidden))

    def finish(self):
        """Read the round (the host sync), accept and roll the cache back: (RoundResult, next x, next g)."""
        accept, fallback, drafts = np.array(self.accept), np.array(self.fallback), np.array(self.drafts)
        n = np.argmin(np.concatenate([accept, np.zeros((len(accept), 1), bool)], axis=1), axis=1)  # leading Trues
        self.cache.rollback(self.k - n)
        emitted = [drafts[b, : n[b]].tolist() + [int(fallback[b, n[b]])] for b in range(len(n))]
        next_x = mx.array([[e[-1]] for e in emitted], dtype=mx.int32)
        next_g = mx.take_along_axis(self.hidden, mx.array(n, dtype=mx.int32)[:, None, None], axis=1)
        return RoundResult(emitted, self.k), next_x, next_g


def speculative_round(target, drafter, cache, x, g, k, params, seeds=None):
    """Draft, verify, accept and roll back, synchronously; `seeds`: each row's (sampling only)."""
    return Round(target, drafter, cache, x, g, k, params, seeds).finish()


@dataclass
class Stats:
    """What a generation did; all counts are for one sequence (batch rows keep one each)."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually run (the rest came from the reused prompt cache)
    generated_tokens: int = 0
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    attempted_by_position: list = field(default_factory=lambda: [0] * K_MAX)
    accepted_by_position: list = field(default_factory=lambda: [0] * K_MAX)
    k_history: list = field(default_factory=list)
    accepted_history: list = field(default_factory=list)  # n accepted drafts per round
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def record(self, k: int, n_accepted: int):
        self.rounds += 1
        self.drafted_tokens += k
        self.accepted_tokens += n_accepted
        self.k_history.append(k)
        self.accepted_history.append(n_accepted)
        for j in range(min(k, n_accepted + 1)):  # position j was reached iff drafts before it were accepted
            self.attempted_by_position[j] += 1
            self.accepted_by_position[j] += int(j < n_accepted)

    @property
    def time_to_first_token(self) -> float:
        return self.prefill_seconds

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time of the rounds that made them."""
        return (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per decode round (1.0 = plain decoding)."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def acceptance_by_position(self) -> list:
        return [a / n for a, n in zip(self.accepted_by_position, self.attempted_by_position) if n]

    @property
    def k_last(self) -> int:
        return self.k_history[-1] if self.k_history else 0

    def as_dict(self) -> dict:
        return dict(prompt_tokens=self.prompt_tokens, prefill_tokens=self.prefill_tokens,
                    generated_tokens=self.generated_tokens, rounds=self.rounds, drafted_tokens=self.drafted_tokens,
                    accepted_tokens=self.accepted_tokens, mean_accepted_length=self.mean_accepted_length,
                    acceptance=self.acceptance, acceptance_by_position=self.acceptance_by_position,
                    k_history=self.k_history, time_to_first_token=self.time_to_first_token,
                    tokens_per_second=self.tokens_per_second, prefill_seconds=self.prefill_seconds,
                    decode_seconds=self.decode_seconds)
