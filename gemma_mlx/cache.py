"""KV caches of the target's producer layers: written by the target, read in place by the drafter.

One `LayerCache` per producer layer holds K and V as `[B, kv_heads, slots, head_dim]` and each row's length (the
number of positions it holds = the next position to write). Position p of a row lives in slot p (full layers,
a linear buffer that grows) or slot p mod capacity (sliding layers, a ring). The slot -> position map is a pure
function of the row's length, so:
- masks are built from positions, never from write order (attention is permutation-invariant over keys: RoPE is
  already in K), so the ring never needs re-ordering and writes never concatenate;
- rollback of rejected drafts is `length -= n`: stale slots map to positions outside every window.

A ring of capacity `W + chunk` serves target queries (positions q-W < p <= q) and the drafter (the W+1 newest
accepted positions, docs/design.md) as long as one forward writes at most `chunk` tokens and `chunk >= K_max + 1`.
The slots beyond the window are what rollback (and a chat turn that rewrites the end of the conversation) goes back
to; a target forward reads only the slice of slots its queries can see (`TargetCache.reads`), the whole ring only
when that slice would wrap around the ring's end.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import mlx.core as mx
import numpy as np



GROW_STEP = 256


class LayerCache:
    """One producer layer's K/V, `[B, kv_heads, slots, head_dim]`, and each row's length; where a position lives is
    its subclass's: `LinearCache` (full layers) or `RingCache` (sliding layers)."""

    ring_capacity: int | None = None
    window: int | None = None

    def __init__(self, batch: int):
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.keys = self.values = None

    @property
    def is_ring(self) -> bool:
        return self.ring_capacity is not None

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def slots(self, lengths: np.ndarray | None = None) -> int:
        """How many slots are worth reading for these row lengths (by default the current ones)."""
        raise NotImplementedError

    def positions(self, lengths: np.ndarray | None = None) -> np.ndarray:
        """Position held by each readable slot, per row: int [B, slots], -1 for empty slots (for the given row
        lengths, by default the current ones)."""
        lengths = self.lengths if lengths is None else lengths
        return self._positions(lengths, self.slots(lengths))

    def buffer_positions(self) -> np.ndarray:
        """`positions` over every allocated slot, as `buffer()` reads them."""
        return self._positions(self.lengths, self.keys.shape[2] if self.keys is not None else self.slots())

    def write(self, keys: mx.array, values: mx.array):
        """Append T new positions to every row (K/V: [B, kv_heads, T, head_dim])."""
        B, _, T, _ = keys.shape
        self._check_fits(T)
        self._reserve(keys, values, int(self.lengths.max()) + T)
        slots = self._slot_of(self.lengths[:, None] + np.arange(T)[None, :])
        first = int(slots[0, 0])
        if (slots == first + np.arange(T)).all():  # every row writes the same run of slots: a slice update
            self.keys[..., first : first + T, :] = keys.astype(self.keys.dtype)
            self.values[..., first : first + T, :] = values.astype(self.values.dtype)
        else:
            self.keys = _put_slots(self.keys, slots, keys)
            self.values = _put_slots(self.values, slots, values)
        self.lengths = self.lengths + T

    def view(self) -> tuple[mx.array, mx.array]:
        """The readable K/V, in place (no copy)."""
        n = self.slots()
        return self.keys[..., :n, :], self.values[..., :n, :]

    def buffer(self) -> tuple[mx.array, mx.array]:
        """All allocated slots: a shape that changes only when a linear buffer grows (the drafter's compiled
        steps read this, masked by `buffer_positions`)."""
        return self.keys, self.values

    def rollback(self, n):
        """Forget the last n positions of each row (n: int or one int per row)."""
        n = np.broadcast_to(np.asarray(n, dtype=np.int64), self.lengths.shape)
        if (n < 0).any() or (n > self.lengths).any():
            raise ValueError(f"cannot roll back {n.tolist()} of {self.lengths.tolist()} positions")
        if (n > self._rollback_bound()).any():
            raise ValueError(f"sliding ring cannot roll back more than {self.max_rollback()} positions")
        self.lengths = self.lengths - n

    def max_rollback(self) -> int:
        """How far back every row can go and still hold what the target and the drafter read."""
        raise NotImplementedError

    def _rollback_bound(self):
        return self.max_rollback()

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def take_rows(self, rows: list[int]):
        """Keep only these rows (batch rows that finished leave; between rounds, so a copy is fine). A linear
        buffer also drops the slots only the rows that left were using."""
        self.lengths = self.lengths[rows]
        if self.keys is None:
            return
        idx = mx.array(rows, dtype=mx.int32)
        size = self._allocation(int(self.lengths.max(initial=0)))
        self.keys, self.values = self.keys[..., :size, :][idx], self.values[..., :size, :][idx]

    def row(self, i: int) -> "LayerCache":
        """A batch-1 copy of row i, in new arrays (writing to either leaves the other as it is)."""
        out = copy.copy(self)
        out.lengths = self.lengths[i : i + 1].copy()
        if self.keys is not None:
            size = self._allocation(int(out.lengths[0]))
            out.keys, out.values = self.keys[i : i + 1, :, :size], self.values[i : i + 1, :, :size]
        return out

    def extend_rows(self, others: list["LayerCache"]):
        """Append the rows of other caches (prefilled rows joining the batch) in one copy; linear buffers are padded
        to a common size (the padding is never attended: masks come from positions)."""
        parts = ([self] if self.keys is not None else []) + list(others)
        size = max(c.keys.shape[2] for c in parts)
        self.keys = mx.concatenate([_pad_slots(c.keys, size) for c in parts])
        self.values = mx.concatenate([_pad_slots(c.values, size) for c in parts])
        self.lengths = np.concatenate([c.lengths for c in parts])

    def _reserve(self, keys: mx.array, values: mx.array, needed: int):
        B, kv, _, _ = keys.shape
        size = self._allocation(needed)
        have = 0 if self.keys is None else self.keys.shape[2]
        if have >= size:
            return
        new_k = mx.zeros((B, kv, size, keys.shape[3]), keys.dtype)
        new_v = mx.zeros((B, kv, size, values.shape[3]), values.dtype)
        if have:  # amortised growth of the linear buffer (every GROW_STEP tokens), never on the ring
            new_k[..., :have, :] = self.keys
            new_v[..., :have, :] = self.values
        self.keys, self.values = new_k, new_v

    def _check_fits(self, T: int):
        pass

    def _slot_of(self, pos: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _positions(self, lengths: np.ndarray, n: int) -> np.ndarray:
        raise NotImplementedError

    def _allocation(self, needed: int) -> int:
        raise NotImplementedError


class LinearCache(LayerCache):
    """A full layer: position p in slot p of a buffer that grows by GROW_STEP slots."""

    def slots(self, lengths: np.ndarray | None = None) -> int:
        return int((self.lengths if lengths is None else lengths).max())

    def span(self, start: np.ndarray, T: int) -> slice:
        """The slots a T-token forward from row lengths `start` can see: the used prefix."""
        return slice(0, int((start + T).max()))

    def max_rollback(self) -> int:
        return int(self.lengths.min())

    def _rollback_bound(self):
        return self.lengths  # each row as far as its own length

    def _slot_of(self, pos: np.ndarray) -> np.ndarray:
        return pos

    def _positions(self, lengths: np.ndarray, n: int) -> np.ndarray:
        j = np.arange(n)[None, :]
        return np.where(j <= lengths[:, None] - 1, j, -1)

    def _allocation(self, needed: int) -> int:
        return -(-needed // GROW_STEP) * GROW_STEP


class RingCache(LayerCache):
    """A sliding layer: position p in slot p mod capacity of a ring of `window + chunk` slots."""

    def __init__(self, batch: int, capacity: int, window: int):
        super().__init__(batch)
        self.ring_capacity, self.window = capacity, window

    def slots(self, lengths: np.ndarray | None = None) -> int:
        return self.ring_capacity

    def span(self, start: np.ndarray, T: int) -> slice:
        """The slots a T-token forward from row lengths `start` can see: the window of each row in one slice, unless
        one wraps around the ring's end (then the whole ring)."""
        first = np.maximum(start - self.window + 1, 0)  # the oldest position the first query sees
        lo = first % self.ring_capacity
        hi = lo + (start + T - first)
        if (hi > self.ring_capacity).any():
            return slice(0, self.ring_capacity)
        return slice(int(lo.min()), int(hi.max()))

    def max_rollback(self) -> int:
        """How far back a row can go and still hold the drafter's W+1 newest positions."""
        return self.ring_capacity - self.window - 1

    def _check_fits(self, T: int):
        if T > self.ring_capacity:
            raise ValueError(f"a forward of {T} tokens does not fit a sliding ring of {self.ring_capacity}")

    def _slot_of(self, pos: np.ndarray) -> np.ndarray:
        return pos % self.ring_capacity

    def _positions(self, lengths: np.ndarray, n: int) -> np.ndarray:
        last = lengths[:, None] - 1
        pos = last - (last - np.arange(n)[None, :]) % self.ring_capacity
        return np.where(pos >= 0, pos, -1)

    def _allocation(self, needed: int) -> int:
        return self.ring_capacity


class Span:
    """One layer's cache as a forward sees it: writes go to the cache, `view()` reads only the slots in `slots`."""

    def __init__(self, cache: LayerCache, slots: slice):
        self.cache, self.slots = cache, slots

    def write(self, keys: mx.array, values: mx.array):
        self.cache.write(keys, values)

    def view(self) -> tuple[mx.array, mx.array]:
        return self.cache.keys[..., self.slots, :], self.cache.values[..., self.slots, :]


class KV:
    """K/V handed to a consumer layer in the place of a cache (the drafter's layers, which only read)."""

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values

    def view(self) -> tuple[mx.array, mx.array]:
        return self.keys, self.values


class Reads(NamedTuple):
    """What the queries of one forward read in the caches of one layer type: a slice of slots, and the mask over
    them (None: every query sees every slot of the slice)."""

    slots: slice
    mask: mx.array | None


def _pad_slots(a: mx.array, size: int) -> mx.array:
    return a if a.shape[2] == size else mx.pad(a, [(0, 0), (0, 0), (0, size - a.shape[2]), (0, 0)])


def _put_slots(buffer: mx.array, slots: np.ndarray, new: mx.array) -> mx.array:
    """buffer[b, :, slots[b, t], :] = new[b, :, t, :], in place when MLX can donate the buffer."""
    idx = mx.broadcast_to(mx.array(slots, dtype=mx.int32)[:, None, :, None], new.shape)
    return mx.put_along_axis(buffer, idx, new.astype(buffer.dtype), axis=2)


class TargetCache:
    """The caches of all producer layers of a target (consumer layers own none), built from the layer specs the
    model hands over (`models.base.cache_for`): whether each producer layer slides, the sliding window, and which
    layer the drafter reads for each layer type.

    `layer(i)` is the cache of producer layer i; `layers` lists them in order. Under a pipeline split (pipeline.py)
    a process holds only its own layers' caches, and `producers` names, for each layer type, its own last layer of
    that type (the drafter's, on the last rank). `chunk` is the most tokens one forward may write; the sliding rings
    have capacity `window + chunk`.
    """

    def __init__(self, sliding: dict[int, bool], window: int, producers: dict[str, int], batch: int = 1,
                 chunk: int = 256):
        self.chunk, self.window, self.producers = chunk, window, producers
        self.index = {i: n for n, i in enumerate(sliding)}
        self.layers: list[LayerCache] = [RingCache(batch, window + chunk, window) if ring else LinearCache(batch)
                                         for ring in sliding.values()]

    def layer(self, i: int) -> LayerCache:
        return self.layers[self.index[i]]

    @property
    def lengths(self) -> np.ndarray:
        return self.layers[0].lengths

    def rollback(self, n):
        for c in self.layers:
            c.rollback(n)

    def max_rollback(self) -> int:
        return min(c.max_rollback() for c in self.layers)

    def truncate(self, length: int) -> bool:
        """Keep the first `length` positions in every layer (batch 1). Also makes the layers agree again after a
        forward interrupted between layers. False (nothing changed) if a ring cannot go back that far."""
        back = [int(c.lengths[0]) - length for c in self.layers]
        if any(b > c.max_rollback() for b, c in zip(back, self.layers)):
            return False
        for b, c in zip(back, self.layers):
            c.rollback(max(b, 0))
        return True

    def take_rows(self, rows: list[int]):
        for c in self.layers:
            c.take_rows(rows)

    def extend_rows(self, others: list["TargetCache"]):
        for i, c in enumerate(self.layers):
            c.extend_rows([o.layers[i] for o in others])

    def row(self, i: int) -> "TargetCache":
        """A batch-1 copy of row i (new arrays: a snapshot the batch's later writes do not touch)."""
        out = copy.copy(self)
        out.layers = [c.row(i) for c in self.layers]
        return out

    def reads(self, layer_type: str, start: np.ndarray, T: int, blocks: np.ndarray | None = None) -> Reads:
        """The slots and mask for a T-token forward from row lengths `start` (taken before it writes), for the
        layers of this type (they all share the producer's lengths and geometry). A decode step on a sliding
        layer reads its W newest slots, unmasked, not the whole ring. `blocks`: see `visible`."""
        c = self.producer(layer_type)
        slots = c.span(start, T)
        ok = visible(start, T, c.positions(start + T)[:, slots], c.window, blocks)
        return Reads(slots, None if ok.all() else mx.array(ok[:, None]))

    def producer(self, layer_type: str) -> LayerCache:
        """The cache the drafter reads for a layer type (the last producer of that type)."""
        return self.layer(self.producers[layer_type])

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)

    def state(self) -> list[mx.array]:
        return [a for c in self.layers if c.keys is not None for a in (c.keys, c.values)]


def visible(query_start: np.ndarray, T: int, key_pos: np.ndarray, window: int | None,
            blocks: np.ndarray | None = None) -> np.ndarray:
    """Boolean [B, T, S]: query at position q sees keys at 0 <= p <= q (and p > q - window when sliding).
    `blocks` [B, T]: an image block id per query of this forward (-1 for text); a query also sees the later keys
    of its own block (Gemma 4's bidirectional attention over an image, design.md "Images")."""
    q = query_start[:, None, None] + np.arange(T)[None, :, None]
    k = key_pos[:, None, :]
    ok = (k >= 0) & (k <= q)
    if blocks is not None:
        at = k - query_start[:, None, None]  # the key's index in this forward
        inside = (at >= 0) & (at < T)
        key_block = np.take_along_axis(blocks, np.clip(at, 0, T - 1).reshape(len(blocks), -1), 1).reshape(at.shape)
        ok |= inside & (key_block == blocks[:, :, None]) & (blocks[:, :, None] >= 0)
    if window is not None:
        ok &= k > q - window
    return ok


def attention_mask(query_start: np.ndarray, T: int, key_pos: np.ndarray, window: int | None) -> mx.array:
    """`visible` as MLX's attention mask, [B, 1, T, S]."""
    return mx.array(visible(query_start, T, key_pos, window)[:, None])
