"""The speculative loop: draft K → verify K+1 in one target forward → accept → roll back.

State between rounds, per row: the last emitted token x (position L−1, not yet in the cache), the target's
final-norm hidden g at position L−2, and the target cache holding positions 0…L−2. A round:
1. the drafter proposes d_1…d_K from (x, g), reading the cache in place;
2. the target runs [x, d_1…d_K] at positions L−1…L−1+K, writing K+1 cache entries;
3. the first n drafts the target agrees with are accepted, plus one token of the target's own (sampling.py);
4. the cache forgets the K−n rejected positions; x ← last emitted token, g ← target hidden at verify index n.
Drafting and verification are one lazy graph, evaluated once: one host sync per round. K = 0 is plain decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .cache import TargetCache
from .models.gemma4_assistant import Drafter
from .models.gemma4_text import Target
from .sampling import SamplingParams, verify_choices

K_MAX = 8


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


def shrunk(hits: np.ndarray, tries: np.ndarray, prior: float, first_weight: float, weight: float) -> np.ndarray:
    """Acceptance by draft position, the first estimate shrunk with `first_weight` rounds towards `prior`, each later
    one with `weight` rounds towards the previous position's: a position seldom or never reached is taken to be like
    the one before it."""
    a = np.empty(len(hits))
    for j in range(len(hits)):
        w = first_weight if j == 0 else weight
        a[j] = prior = (hits[j] + w * prior) / (tries[j] + w)
    return a


class DraftLength:
    """Chooses K each round. Fixed, or auto: pick the K maximising expected tokens per second,

        E(K) / T(K),   E(K) = 1 + Σ_{j≤K} Π_{i≤j} a_i,

    with a_i the (decayed) acceptance rate of draft position i given the ones before were accepted (shrunk towards
    a_{i-1}, a_1 towards PRIOR, while there are few rounds at i) and T(K) the measured round time at each K seen
    (the first round at each K is not timed: it pays one-time costs). Round times are not linear in K on a CPU (a
    BLAS multiplies a few rows in the time of one, then steps up, or flattens out), so a K not seen yet is put
    halfway between the time at the nearest K seen below it and the line through the K seen around it (beyond the
    deepest, along the last segment): optimism that gets it tried, and then measured, when the acceptance nearly
    pays for it. Measured times are made non-decreasing in K (noise can make a deeper round look cheaper; it never
    is), and a K whose expected extra tokens per round are below MIN_GAIN is not tried on timings alone. K = 0 (plain decoding) whenever drafting does not pay; then one round in `probe_every` is a K = 1
    probe that re-measures a_1, one in twice as many after each probe whose draft is rejected (up to 8x).

    A batch shares one K (`choose(rows, room)`): it maximises the expected tokens per second summed over the rows,
    Σ_b E_b(K) / T_B(K). E_b uses row b's own acceptance by position, shrunk (while the row has few rounds there)
    towards its estimate at the previous position, at the first position towards the pooled rate, so a row that is
    always right gets to try deeper drafts; E_b counts at most the `room` tokens the row still needs. T_B is fitted
    on the rounds run at this batch size B (verification gets relatively dearer as B grows, sooner on compute-bound
    hardware); at a batch size not fitted yet the nearest fitted one stands in, and one round tries a second K
    there so it gets its own fit.
    """

    PRIOR = 0.6  # acceptance at the first position before any round (with the weight of one round)
    MIN_GAIN = 0.1  # expected extra tokens per round below which drafting is not tried, whatever the round times say:
    # acceptance evidence first, timings second (noisy round times on a busy machine must not talk it into drafting)
    DEPTH_WEIGHT = 4.0  # weight, in rounds, of the previous position's estimate in a deeper position's (and, for a
    # batch row, of the pooled rate in its first position's): deep positions are reached in few rounds, and a rate
    # from a handful of them swings K on a CPU, where K = 4…7 cost about the same

    def __init__(self, fixed: int | None = None, k_max: int = 7, start: int = 1, probe_every: int = 32):
        if fixed is not None and not 0 <= fixed <= K_MAX:
            raise ValueError(f"draft length must be in 0..{K_MAX}, got {fixed}")
        self.fixed, self.k_max, self.start, self.probe_every = fixed, k_max, start, probe_every
        # the prior weighs one round, so drafting gets tried but a drafter that is never right is given up on after
        # a few rounds (a heavier prior kept plain decoding ~8% slower at α = 0); the warm-up drafts K = 1, the
        # cheapest round that measures a_1
        self.hits = np.zeros(K_MAX)
        self.tries = np.zeros(K_MAX)
        self.time_sum: dict[int, np.ndarray] = {}  # batch size -> decayed sum of round seconds per K
        self.time_n: dict[int, np.ndarray] = {}
        self.rounds = 0
        self.plain_streak = 0
        self.probe_gap = probe_every
        self.explored: set[int] = set()
        self.timed: set[tuple[int, int]] = set()

    def choose(self, rows: list | None = None, room: list | None = None) -> int:
        """K for the next round; `rows`: the batch rows' Stats (None: batch 1, pooled acceptance), `room`: tokens
        each row may still emit."""
        if self.fixed is not None:
            return self.fixed
        batch = 1 if rows is None else len(rows)
        if self.rounds < 2:
            return self.start
        if not any(n[0] for n in self.time_n.values()):
            return 0  # measure the plain step (the first is chosen before its time is in: stay plain until it is)
        best = self.best(rows, room)
        seen = self._seen(batch)
        if len(seen) == 1 and best in seen and batch not in self.explored:  # a second K gives this batch size a fit
            self.explored.add(batch)
            return best - 1 if best >= 2 else best + 1
        if best == 0:
            self.plain_streak += 1
            if self.plain_streak >= self.probe_gap:  # a K = 1 round to re-measure a_1; each probe whose draft
                self.plain_streak = 0  # is rejected doubles the gap to the next (up to 8x)
                self.probe_gap = min(2 * self.probe_gap, 8 * self.probe_every)
                return 1
        else:
            self.plain_streak = 0
            self.probe_gap = self.probe_every
        return best

    def best(self, rows: list | None = None, room: list | None = None) -> int:
        ks = np.arange(self.k_max + 1)
        pooled = shrunk(self.hits[: self.k_max], self.tries[: self.k_max], self.PRIOR, 1.0, self.DEPTH_WEIGHT)
        if rows is None:
            expected = 1 + np.concatenate([[0.0], np.cumsum(np.cumprod(pooled))])
        else:
            expected = np.zeros(len(ks))
            for i, stats in enumerate(rows):
                a = shrunk(np.asarray(stats.accepted_by_position[: self.k_max], float),
                           np.asarray(stats.attempted_by_position[: self.k_max], float), pooled[0],
                           self.DEPTH_WEIGHT, self.DEPTH_WEIGHT)
                reach = np.concatenate([[1.0], np.cumprod(a)])  # P(at least j drafts accepted)
                cap = (room[i] if room is not None else len(ks)) - 1  # the row emits at most room tokens
                expected += np.cumsum(np.where(ks <= cap, reach, 0.0))
        cost = self.round_time(ks, 1 if rows is None else len(rows))
        worth = ks == 0
        worth |= expected - expected[0] >= self.MIN_GAIN * (1 if rows is None else len(rows))
        return int(np.argmax(np.where(worth, expected / cost, 0.0)))

    def round_time(self, k: np.ndarray, batch: int = 1) -> np.ndarray:
        """Round seconds for each K at this batch size, up to a factor that does not depend on K (all that the
        choice needs): this batch size's fit, else the nearest batch size with a fit, else the mean round time."""
        fitted = [b for b in self.time_n if len(self._seen(b)) > 1]
        if not fitted:
            total = sum(s.sum() for s in self.time_sum.values()) / sum(n.sum() for n in self.time_n.values())
            return np.full(len(k), total)
        b = min(fitted, key=lambda b: (abs(b - batch), -b))
        seen = self.time_n[b] > 0
        ks, mean = np.nonzero(seen)[0], self.time_sum[b][seen] / self.time_n[b][seen]
        mean = np.maximum.accumulate(mean)  # a round of K drafts does all a round of fewer does, and more
        slope = np.maximum(np.diff(mean) / np.diff(ks), 0.0)
        line = np.interp(k, ks, mean)  # through the K seen, beyond them along the first / last segment
        line = np.where(k < ks[0], mean[0] + slope[0] * (k - ks[0]), line)
        line = np.where(k > ks[-1], mean[-1] + slope[-1] * (k - ks[-1]), line)
        floor = mean[np.maximum(np.searchsorted(ks, k, side="right") - 1, 0)]  # at the nearest K seen below
        t = (line + np.minimum(floor, line)) / 2
        return np.maximum(t, 1e-9)

    def _seen(self, batch: int) -> set:
        return set(np.nonzero(self.time_n[batch])[0].tolist()) if batch in self.time_n else set()

    def update(self, k: int, n_accepted, seconds: float, decay: float = 0.98):
        """After a round of K drafts: n accepted (one int, or one per batch row) in `seconds`."""
        self.rounds += 1
        rows = np.atleast_1d(n_accepted)
        if k:
            self.hits *= decay
            self.tries *= decay
            for n in rows:  # each row weighs 1/B: a round moves the estimates the same at any batch size
                self.tries[: min(k, n + 1)] += 1 / len(rows)
                self.hits[:n] += 1 / len(rows)
            if rows.max() > 0:  # drafts are being accepted: probe at the first gap again
                self.probe_gap = self.probe_every
        b = len(rows)
        if (b, k) not in self.timed:  # a first round at (B, K) pays one-time costs (first calls, new shapes)
            self.timed.add((b, k))
            return
        if b not in self.time_n:
            self.time_sum[b], self.time_n[b] = np.zeros(K_MAX + 1), np.zeros(K_MAX + 1)
        self.time_sum[b][k] = self.time_sum[b][k] * decay + seconds
        self.time_n[b][k] = self.time_n[b][k] * decay + 1


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
