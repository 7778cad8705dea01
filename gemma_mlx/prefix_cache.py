"""The prefix cache across requests: the target caches of finished sequences, kept (least recently used first out,
bounded in bytes) so that a request that starts with the same tokens prefills only the rest. An agent resends its
whole conversation every turn; with this, turn 20 does not pay for turns 1-19 again.

A kept cache is what a cold prefill of its tokens leaves (the target's K/V at every position, sliding rings
included), cut back to a shared prefix by moving the write pointer, so a request resumed from it decodes exactly as
from a cold start. A ring that no longer holds what the shared prefix needs (the prefix ends more than the ring's
spare slots before the kept sequence does) is not used: `TargetCache.truncate` says so.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx

from .cache import TargetCache


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.entries: OrderedDict[tuple, TargetCache] = OrderedDict()  # tokens -> the batch-1 cache holding them

    def clear(self):
        self.entries.clear()

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.entries.values())

    def take(self, prompt: list[int], least=lambda n: n) -> tuple[TargetCache | None, int]:
        """A batch-1 cache holding the longest prefix of `prompt` that a kept sequence shares (at most all tokens but
        the last, which is run for its logits), and that prefix's length; (None, 0) if there is none. `least`: the
        smallest of every pipeline rank's value (pipeline.Split.least), so that every rank resumes from the same
        prefix (each rank keeps and evicts its own caches)."""
        best, common = None, 0
        for tokens in self.entries:
            n = min(common_prefix(tokens, prompt), len(prompt) - 1)
            if n > common:
                best, common = tokens, n
        common = least(common)
        cache = self.entries[best].row(0) if common else None  # a copy: the kept one stays as it is
        if not least(int(cache is not None and cache.truncate(common))):
            return None, 0
        self.entries.move_to_end(best)
        return cache, common

    def keep(self, tokens: list[int], cache: TargetCache):
        """Keep a batch-1 cache holding `tokens`; kept sequences it extends are dropped, then the least recently
        used ones until the cache fits its limit."""
        tokens = tuple(tokens)
        if not tokens or cache.nbytes() > self.limit:
            return
        mx.eval(cache.state())  # a snapshot of its own, not a graph holding the batch's buffers
        for old in [t for t in self.entries if common_prefix(t, tokens) == len(t)]:
            del self.entries[old]
        self.entries[tokens] = cache
        while self.nbytes > self.limit:
            self.entries.popitem(last=False)
