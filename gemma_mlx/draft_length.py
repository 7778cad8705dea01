"""The draft-length policy: K for each round, fixed or chosen from the measured acceptance per draft position and
the measured round time at each K (acceptance evidence first, timings second)."""

from __future__ import annotations

import time

import numpy as np

K_MAX = 8  # the deepest draft a round may have


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
    hardware); at a batch size not fitted yet the nearest fitted one stands in, and a second K (one less, or 1
    after plain rounds) is tried there until a round at it is timed, so it gets its own fit.
    """

    PRIOR = 0.6  # acceptance at the first position before any round (with the weight of one round)
    MIN_GAIN = 0.1  # expected extra tokens per round below which drafting is not tried, whatever the round times say:
    # acceptance evidence first, timings second (noisy round times on a busy machine must not talk it into drafting)
    EXPLORE_ROUNDS = 3  # rounds at most at a second K for a batch size's fit (the first at a new K is not timed)
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
        self.explored: dict[int, int] = {}  # batch size -> rounds run at a second K there
        self.timed: set[tuple[int, int]] = set()

    def choose(self, rows: list | None = None, room: list | None = None) -> int:
        """K for the next round; `rows`: the batch rows' Stats (None or one row: pooled acceptance, which an engine
        keeps across calls), `room`: tokens each row may still emit."""
        if self.fixed is not None:
            return self.fixed
        if rows is not None and len(rows) == 1:
            rows = room = None
        batch = 1 if rows is None else len(rows)
        if self.rounds < 2:
            return self.start
        if not any(n[0] for n in self.time_n.values()):
            return 0  # measure the plain step (the first is chosen before its time is in: stay plain until it is)
        best = self.best(rows, room)
        seen = self._seen(batch)
        other = best - 1 if best >= 1 else 1  # a second K gives this batch size a fit; its first round is not timed,
        if len(seen) == 1 and best in seen and self.explored.get(batch, 0) < self.EXPLORE_ROUNDS:  # so try it twice
            self.explored[batch] = self.explored.get(batch, 0) + 1
            return other
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


class RoundClock:
    """The seconds each round cost, for `DraftLength.update`, kept out of the decode loop: the wall time since the
    previous round finished, less the building of a round queued meanwhile, plus this round's own build when it
    was queued before that. Charging builds to their own round matters: on the CPU backend async_eval computes most
    of a graph this size before returning (a queued round is computed while its predecessor is still unread); on a
    GPU it returns at once and the round runs while the host works."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.last = clock()

    def restart(self):
        self.last = self.clock()

    def lap(self, current, queued=None) -> tuple[float, float]:
        """(wall seconds since the last lap, the seconds `current` cost) for a round just finished; `queued`: the
        round started while it ran, if any (rounds have `started` and `build_seconds`)."""
        now = self.clock()
        own_build = current.build_seconds if current.started < self.last else 0.0
        other_builds = queued.build_seconds if queued is not None else 0.0
        wall, self.last = now - self.last, now
        return wall, max(wall - other_builds + own_build, 0.0)
