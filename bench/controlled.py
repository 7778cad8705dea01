"""A drafter of controlled acceptance, for tests and benchmarks only (never on the product path).

It runs the real drafter's full computation, then with probability alpha replaces each draft by the target's
recorded greedy continuation (so a draft is right with probability ≈ alpha, whatever the random weights). The coin is
tossed once per row and position, not per draft: a position guessed again (in the next round, or by a run at another
K) is right again or wrong again, as a real drafter is right or wrong on the same tokens whatever K. Runs of one seed
at different K (or K auto) then see text of the same difficulty and compare pairwise, instead of each drawing its
own luck (over 96 tokens, ±15% in tokens per round).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class ControlledDrafter:
    def __init__(self, drafter, references, alpha: float, seed: int = 0):
        """references[b]: row b's full greedy sequence (prompt + continuation), indexed by position; or a
        callable returning that list for the rows of the current batch (rows join and leave)."""
        self.drafter, self.alpha, self.references, self.seed = drafter, alpha, references, seed
        self.coins: dict[int, np.ndarray] = {}  # row -> a uniform number per position

    def draft(self, target, x, g, cache, k):
        drafts = self.drafter.draft(target, x, g, cache, k)
        if k == 0:
            return drafts
        # x sits at position lengths[b]; draft j (0-based) guesses position lengths[b] + 1 + j.
        pos = cache.lengths[:, None] + 1 + np.arange(k)[None, :]
        refs = self.references() if callable(self.references) else self.references
        ref = np.stack([np.asarray(r)[np.minimum(p, len(r) - 1)] for r, p in zip(refs, pos)])
        forced = np.stack([self.row_coins(b, p[-1] + 1)[p] for b, p in enumerate(pos)]) < self.alpha
        return mx.where(mx.array(forced), mx.array(ref.astype(np.uint32)), drafts.astype(mx.uint32))

    def row_coins(self, row: int, length: int) -> np.ndarray:
        if len(self.coins.get(row, ())) < length:
            self.coins[row] = position_coins(self.seed, row, max(length, 2 * len(self.coins.get(row, ())), 256))
        return self.coins[row]

    def __getattr__(self, name):  # everything else (config, bind, ...) is the real drafter's
        return getattr(self.drafter, name)


def position_coins(seed: int, row: int, length: int) -> np.ndarray:
    """A uniform number for each position 0…length-1 of row `row` in a run of `seed`; a draft there is right iff its
    number is below α (a longer draw extends a shorter one). bench/peers.py forces mlx-lm's and mlx-vlm's drafts with
    the same numbers, so the three see the same positions right."""
    return np.random.default_rng([seed, row]).random(length)
