"""The ring / linear KV caches (spec §4): slot -> position map, masks, in-place writes, rollback."""

import gemma_mlx  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from gemma_mlx.cache import LinearCache, RingCache, attention_mask
from gemma_mlx.models.base import cache_for


def _kv(B, T, start, kv=1, D=2):
    """K/V whose every element encodes its row and position, to check where writes land."""
    pos = start[:, None] + np.arange(T)[None, :]
    val = (np.arange(B)[:, None] * 1000 + pos).astype(np.float32)
    arr = mx.array(np.broadcast_to(val[:, None, :, None], (B, kv, T, D)).copy())
    return arr, arr + 0.5


def _stored_positions(cache):
    """What each readable slot actually holds (decoded from the written values)."""
    keys, _ = cache.view()
    return np.array(keys[:, 0, :, 0]) % 1000


def test_linear_cache_holds_positions_in_order_and_grows():
    c = LinearCache(batch=1)
    for T in (3, 1, 1, 300):
        c.write(*_kv(1, T, c.lengths))
    assert c.lengths.tolist() == [305]
    assert c.keys.shape[2] == 512  # grown in steps of 256
    assert (_stored_positions(c)[0] == np.arange(305)).all()
    assert (c.positions()[0] == np.arange(305)).all()


@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 4, 1, 6, 1, 1, 2], [6, 6, 6], [1] * 25])
def test_ring_slot_positions_match_what_was_written(chunks):
    W, chunk = 8, 6
    c = RingCache(batch=1, capacity=W + chunk, window=W)
    for T in chunks:
        c.write(*_kv(1, T, c.lengths))
        pos = c.positions()[0]
        held = pos >= 0
        assert (_stored_positions(c)[0][held] == pos[held]).all()
        # the ring always holds the newest `capacity` positions
        assert sorted(pos[held].tolist()) == list(range(max(0, c.lengths[0] - c.ring_capacity), c.lengths[0]))


def test_ring_rollback_then_rewrite_equals_never_written():
    W, chunk = 8, 5
    a = RingCache(batch=1, capacity=W + chunk, window=W)
    b = RingCache(batch=1, capacity=W + chunk, window=W)
    rng = np.random.default_rng(0)
    for _ in range(30):
        a.write(*_kv(1, 1, a.lengths))
        b.write(*_kv(1, 1, b.lengths))
        r = int(rng.integers(1, chunk))  # a verify writes at most `chunk` tokens and keeps at least one
        junk_k, junk_v = _kv(1, r, a.lengths)
        a.write(junk_k * 0 - 7, junk_v * 0 - 7)  # rejected drafts: garbage values
        a.rollback(r)
        # every slot a mask can select (window W+1 for the drafter, W for the target) holds the true value
        for window in (W, W + 1):
            q = a.lengths - 1
            ma = np.array(attention_mask(q, 1, a.positions(), window))[0, 0, 0]
            mb = np.array(attention_mask(q, 1, b.positions(), window))[0, 0, 0]
            assert ma.sum() == mb.sum() == min(window, a.lengths[0])
            assert sorted(_stored_positions(a)[0][ma]) == sorted(_stored_positions(b)[0][mb])


def test_rollback_limits_are_enforced():
    c = RingCache(batch=1, capacity=8 + 4, window=8)
    c.write(*_kv(1, 4, c.lengths))
    assert c.max_rollback() == 3
    with pytest.raises(ValueError):
        c.rollback(4)
    with pytest.raises(ValueError):
        LinearCache(batch=1).rollback(1)


def test_per_row_lengths_write_and_rollback_independently():
    c = LinearCache(batch=3)
    c.write(*_kv(3, 4, c.lengths))
    c.rollback(np.array([0, 2, 3]))
    c.write(*_kv(3, 2, c.lengths))
    assert c.lengths.tolist() == [6, 4, 3]
    stored, pos = _stored_positions(c), c.positions()
    for row in range(3):
        held = pos[row] >= 0
        assert (stored[row][held] == np.arange(c.lengths[row])).all()
        assert held.sum() == c.lengths[row]


def test_mask_sliding_window_includes_query_and_excludes_empty_slots():
    key_pos = np.array([[0, 1, 2, 3, 4, -1, -1]])
    m = np.array(attention_mask(np.array([3]), 2, key_pos, window=3))[0, 0]
    # query 3 sees 1..3, query 4 sees 2..4
    assert m[0].tolist() == [False, True, True, True, False, False, False]
    assert m[1].tolist() == [False, False, True, True, True, False, False]
    full = np.array(attention_mask(np.array([3]), 2, key_pos, window=None))[0, 0]
    assert full[1].tolist() == [True] * 5 + [False] * 2


def test_ring_rejects_a_forward_larger_than_its_capacity():
    c = RingCache(batch=1, capacity=10, window=8)
    with pytest.raises(ValueError):
        c.write(*_kv(1, 11, c.lengths))


def test_a_forward_reads_only_the_slots_its_queries_see():
    """`TargetCache.reads`: every key a query may see is in the slice, with the right mask; a decode step on a
    sliding layer reads its W newest slots unmasked unless they wrap around the ring's end (then the whole ring)."""
    from types import SimpleNamespace

    from gemma_mlx.cache import Span

    W, chunk = 8, 4
    cfg = SimpleNamespace(sliding_window=W, first_shared_layer=2, layer_types=["sliding_attention", "full_attention"],
                          producer_for=lambda t: 0 if t == "sliding_attention" else 1)
    for B, steps in ((1, [3, 1, 4, 1, 1, 2, 1, 1, 1, 3, 1, 1, 1, 1, 4, 1, 1, 1]), (2, [3, 1, 2, 1, 1, 4, 1, 1, 1])):
        cache = cache_for(cfg, batch=B, chunk=chunk)
        if B == 2:  # rows of different lengths: the second row starts 3 positions later
            for c in cache.layers:
                c.write(*_kv(B, 3, c.lengths))
                c.lengths[0] = 0
        wrapped = 0
        for T in steps:
            start = cache.lengths.copy()
            for c in cache.layers:
                c.write(*_kv(B, T, c.lengths))
            for t, c in (("sliding_attention", cache.layers[0]), ("full_attention", cache.layers[1])):
                slots, mask = cache.reads(t, start, T)
                window = W if t == "sliding_attention" else None
                whole = attention_mask(start, T, c.positions(), window)  # what reading every slot would see
                pos = c.positions()[:, slots]
                seen = np.array(whole)[..., slots] if mask is None else np.array(mask)
                if mask is None:
                    assert np.array(whole)[..., slots].all()
                # the slice holds every visible slot, and the mask sees the same keys as over the whole buffer
                assert np.array(whole).sum() == np.array(whole)[..., slots].sum() == seen.sum()
                keys, _ = Span(c, slots).view()
                held = np.array(keys[:, 0, :, 0]) % 1000
                assert ((held == pos) | (pos < 0) | ~seen.any(axis=(1, 2))).all()
                if t == "sliding_attention" and B == 1 and T == 1:
                    n = slots.stop - slots.start
                    wrapped += n == c.ring_capacity
                    assert n == c.ring_capacity or (n == min(W, c.lengths[0]) and mask is None)
        assert B == 2 or wrapped  # the steps cross the ring's end at least once
