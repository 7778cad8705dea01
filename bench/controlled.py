"""A drafter of controlled acceptance, for tests and benchmarks only (never on the product path).

It runs the real drafter's full computation, then with probability alpha replaces each draft by the target's
recorded greedy continuation (so a draft is right with probability ≈ alpha, whatever the random weights).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class ControlledDrafter:
    def __init__(self, drafter, references, alpha: float, seed: int = 0):
        """references[b]: row b's full greedy sequence (prompt + continuation), indexed by position; or a
        callable returning that list for the rows of the current batch (rows join and leave)."""
        self.drafter, self.alpha, self.references = drafter, alpha, references
        self.rng = np.random.default_rng(seed)

    def draft(self, x, g, cache, k):
        drafts = self.drafter.draft(x, g, cache, k)
        if k == 0:
            return drafts
        # x sits at position lengths[b]; draft j (0-based) guesses position lengths[b] + 1 + j.
        pos = cache.lengths[:, None] + 1 + np.arange(k)[None, :]
        refs = self.references() if callable(self.references) else self.references
        ref = np.stack([np.asarray(r)[np.minimum(p, len(r) - 1)] for r, p in zip(refs, pos)])
        forced = self.rng.random(ref.shape) < self.alpha
        return mx.where(mx.array(forced), mx.array(ref.astype(np.uint32)), drafts.astype(mx.uint32))

    def __getattr__(self, name):  # everything else (config, bind, ...) is the real drafter's
        return getattr(self.drafter, name)
