"""The speculative loop: draft K → verify K+1 in one target forward → accept → roll back.

State between rounds, per row: the last emitted token x (position L−1, not yet in the cache), the target's
final-norm hidden g at position L−2, and the target cache holding positions 0…L−2. A round:
1. the drafter proposes d_1…d_K from (x, g), reading the cache in place;
2. the target runs [x, d_1…d_K] at positions L−1…L−1+K, writing K+1 cache entries;
3. the first n drafts the target agrees with are accepted, plus one token of the target's own (sampling.py);
4. the cache forgets the K−n rejected positions; x ← last emitted token, g ← target hidden at verify index n.
Drafting and verification are one lazy graph, evaluated once: one host sync per round. K = 0 is plain decoding;
K comes from draft_length.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .cache import TargetCache
from .draft_length import K_MAX, DraftLength
from .models.gemma4_assistant import Drafter
from .models.gemma4_text import Target
from .sampling import SamplingParams, verify_choices


@dataclass
class RoundResult:
    tokens: list[list[int]]  # emitted tokens per row (n_b accepted drafts + 1)
    drafted: int  # K of this round
    seconds: float


class Round:
    """One round for every row, in flight: the draft + verify graph is built lazily and evaluated asynchronously;
    `finish` reads it (the one host sync), accepts and rolls the cache back. x [B, 1] int, g [B, 1, H]."""

    def __init__(self, target: Target, drafter: Drafter | None, cache: TargetCache, x: mx.array, g: mx.array,
                 k: int, params: SamplingParams, key=None):
        self.cache, self.k, self.started = cache, k, time.perf_counter()
        self.drafts = drafter.draft(x, g, cache, k) if k else mx.zeros((x.shape[0], 0), mx.int32)
        logits, self.hidden = target(mx.concatenate([x, self.drafts.astype(x.dtype)], axis=1), cache)
        self.accept, self.fallback = verify_choices(logits, self.drafts, params, key)
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

    def finish(self, since: float | None = None, other_builds: float = 0.0):
        """Returns (RoundResult, next x, next g). The round's seconds: the wall time since the previous round
        finished (`since`; default: since this round was started), less the time spent building other rounds
        meanwhile (`other_builds`: a queued plain round), plus this round's own build when it was queued before
        `since`. Charging builds to their own round matters: on the CPU backend async_eval computes most of a graph
        this size before returning (a queued round is computed while its predecessor is still unread); on a GPU, or
        for a small graph, it returns at once and the round runs while the host works."""
        accept, fallback, drafts = np.array(self.accept), np.array(self.fallback), np.array(self.drafts)
        n = np.argmin(np.concatenate([accept, np.zeros((len(accept), 1), bool)], axis=1), axis=1)  # leading Trues
        self.cache.rollback(self.k - n)
        emitted = [drafts[b, : n[b]].tolist() + [int(fallback[b, n[b]])] for b in range(len(n))]
        next_x = mx.array([[e[-1]] for e in emitted], dtype=mx.int32)
        next_g = mx.take_along_axis(self.hidden, mx.array(n, dtype=mx.int32)[:, None, None], axis=1)
        since = self.started if since is None else since
        own_build = self.build_seconds if self.started < since else 0.0  # queued: built in the previous round's time
        seconds = max(time.perf_counter() - since - other_builds + own_build, 0.0)
        return RoundResult(emitted, self.k, seconds), next_x, next_g


def speculative_round(target, drafter, cache, x, g, k, params, key=None):
    """Draft, verify, accept and roll back, synchronously."""
    return Round(target, drafter, cache, x, g, k, params, key).finish()


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


class Session:
    """A target cache and the tokens it holds, reused across turns: a prompt that extends what the cache holds
    prefills only the new tokens."""

    def __init__(self, target: Target, chunk: int = 256):
        self.target = target
        self.chunk = chunk
        self.reset()

    def reset(self):
        self.cache = self.target.make_cache(1, self.chunk)
        self.tokens: list[int] = []

    def prefill(self, prompt: list[int]):
        """Bring the cache to `prompt` (reusing the longest common prefix) and return the last position's
        (logits, hidden) and how many tokens were run."""
        if not prompt:
            raise ValueError("empty prompt")
        prompt = [int(t) for t in prompt]
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1, len(self.tokens))  # run at least one token to get its logits
        if not self.cache.truncate(common):  # the rings no longer hold what the common prefix needs
            self.reset()
            common = 0
        self.tokens = prompt[:common]
        logits, hidden = self.target.prefill(mx.array([prompt[common:]]), self.cache)
        self.tokens = list(prompt)
        return logits, hidden, len(prompt) - common

    def extend(self, tokens: list[int]):
        """Tokens the decode rounds wrote into the cache."""
        self.tokens.extend(tokens)

    def truncate(self, n: int):
        """Drop the last n cached tokens (emitted tokens past a stop)."""
        if n:
            self.cache.rollback(n)
            del self.tokens[len(self.tokens) - n:]


def generate_tokens(target: Target, drafter: Drafter | None, session: Session, prompt: list[int], *,
                    max_tokens: int, params: SamplingParams = SamplingParams(), draft: DraftLength | None = None,
                    eos_ids: frozenset = frozenset(), seed: int | None = None):
    """Yield (new tokens, stats) after the prefill and after every round, until EOS or max_tokens (an exact cap).

    The cache ends holding the prompt and every emitted token but the last, so the next prompt of a conversation
    reuses it (Session.prefill)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    draft = draft or DraftLength(fixed=0 if drafter is None else None)
    if drafter is None and (draft.fixed or 0) > 0:
        raise ValueError("draft tokens requested but no drafter is loaded")
    key = mx.random.key(seed if seed is not None else int(time.time_ns() % 2**31))
    stats = Stats(prompt_tokens=len(prompt))
    t0 = time.perf_counter()
    logits, g, stats.prefill_tokens = session.prefill(prompt)
    key, sub = mx.random.split(key)
    _, first = verify_choices(logits, mx.zeros((1, 0), mx.int32), params, sub)
    x = first.astype(mx.int32)
    token = int(x.item())
    stats.prefill_seconds = time.perf_counter() - t0
    stats.generated_tokens = 1
    yield [token], stats
    if token in eos_ids or max_tokens == 1:
        return
    queued, planned, finished_at = None, None, time.perf_counter()
    try:
        while True:
            left = max_tokens - stats.generated_tokens
            if queued is None:
                k = 0 if drafter is None else min(draft.choose() if planned is None else planned, left - 1)
                key, sub = mx.random.split(key)
                current = Round(target, drafter, session.cache, x, g, k, params, sub)
            else:
                current, queued = queued, None
            planned = None
            if current.k == 0 and left > 1:
                planned = 0 if drafter is None else draft.choose()
                if planned == 0:
                    key, sub = mx.random.split(key)
                    queued = Round(target, drafter, session.cache, *current.plain_next(), 0, params, sub)
            result, x, g = current.finish(finished_at, queued.build_seconds if queued is not None else 0.0)
            now = time.perf_counter()
            new = result.tokens[0]
            n = len(new) - 1
            draft.update(current.k, n, result.seconds)
            stats.record(current.k, n)
            stats.decode_seconds += now - finished_at  # wall clock, host work between rounds included
            finished_at = now
            session.extend([token] + new[:-1])  # the cache now holds the previous last token and accepted drafts
            stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
            if stop is not None:
                session.truncate(len(new) - 1 - stop)
                new = new[: stop + 1]
            stats.generated_tokens += len(new)
            token = new[-1]
            yield new, stats
            if stop is not None or stats.generated_tokens >= max_tokens:
                return
    finally:
        if queued is not None:  # a plain round queued past the end wrote one position the session never emitted
            session.cache.rollback(1)
