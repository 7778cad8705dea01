"""Batch mode: every row of a batched run is token-identical to that prompt's own greedy run (transformers'
greedy, the oracle), with ragged acceptance, rows finishing at different rounds and a row joining mid-run."""

import gemma_mlx  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from oracle import hf_greedy

from bench.controlled import ControlledDrafter
from gemma_mlx.batch import BatchDecoder
from gemma_mlx.cache import TargetCache
from gemma_mlx.sampling import SamplingParams
from gemma_mlx.speculative import DraftLength

W = 8
LENGTHS = [3, 17, 6, 25, 9, 12, 30, 4]  # some longer than the window


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(3, 500, LENGTHS[i % len(LENGTHS)] - 1).tolist() for i in range(n)]


def run_batch(target, drafter, reference, rows, k, join_at=None, eos_ids=frozenset(), chunk=8):
    """rows: [(prompt, max_tokens)]; the last row joins after `join_at` rounds when given."""
    decoder = BatchDecoder(target, None, draft=DraftLength(fixed=0), eos_ids=eos_ids, chunk=chunk)
    if drafter is not None:
        decoder.drafter = ControlledDrafter(drafter, lambda: [reference[r.id] for r in decoder.rows], 0.7, seed=1)
        decoder.draft = DraftLength(fixed=k) if k != "auto" else DraftLength()
    first = rows if join_at is None else rows[:-1]
    added = [decoder.add(p, m) for p, m in first]
    rounds = 0
    while decoder.rows or (join_at is not None and len(added) < len(rows)):
        if join_at is not None and rounds == join_at and len(added) < len(rows):
            added.append(decoder.add(*rows[-1]))
        decoder.step()
        rounds += 1
    return added


@pytest.mark.parametrize("variant", ["e2blike", "moe8"])
@pytest.mark.parametrize("batch", [2, 4, 8])
def test_batched_rows_equal_their_own_greedy_runs(variant, batch, pair, hf_dir):
    target, drafter = pair(variant, batch % 4 == 0)
    ps = prompts(batch, seed=batch)
    new = [3 * W + 2 - 3 * (i % 3) for i in range(batch)]  # rows finish at different rounds
    expected = [hf_greedy(hf_dir(variant), p, n) for p, n in zip(ps, new)]
    reference = {i: p + e for i, (p, e) in enumerate(zip(ps, expected))}
    for k in (3, "auto"):
        rows = run_batch(target, drafter, reference, list(zip(ps, new)), k, join_at=4 if batch > 2 else None)
        for i, row in enumerate(rows):
            assert row.tokens == expected[i], f"row {i} (prompt length {len(ps[i])}) differs at K={k}"
            assert row.finish_reason == "length"
    outcomes = {("full" if n == k else "zero" if n == 0 else "partial")
                for r in rows for k, n in zip(r.stats.k_history, r.stats.accepted_history) if k}
    assert outcomes == {"full", "partial", "zero"}


def test_a_row_that_hits_eos_leaves_without_disturbing_the_others(pair, hf_dir):
    target, drafter = pair("plain", False)
    ps = prompts(4, seed=7)
    expected = [hf_greedy(hf_dir("plain"), p, 20) for p in ps]
    eos = expected[1][5]  # row 1 stops at its 6th token (other rows may stop there too, where it appears)
    reference = {i: p + e for i, (p, e) in enumerate(zip(ps, expected))}
    rows = run_batch(target, drafter, reference, [(p, 20) for p in ps], 4, eos_ids=frozenset({eos}))
    for row, exp in zip(rows, expected):
        stop = exp.index(eos) + 1 if eos in exp else len(exp)
        assert row.tokens == exp[:stop]
        assert row.finish_reason == ("stop" if eos in exp else "length")


def test_padded_slots_are_never_attended():
    """Rows of different lengths share buffers; a row's slots beyond its length hold other data (or padding)."""
    from gemma_mlx.config import TextConfig

    cfg = TextConfig.from_dict(dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                                    sliding_window=4, hidden_size_per_layer_input=0))
    cache = TargetCache(cfg, batch=0, chunk=4)
    for n in (3, 9):
        one = TargetCache(cfg, batch=1, chunk=4)
        for layer in one.layers:
            for s in range(0, n, 4):
                t = min(4, n - s)
                layer.write(mx.ones((1, 1, t, 2)), mx.ones((1, 1, t, 2)))
        cache.extend_rows(one)
    full = cache.layers[1]
    pos = full.positions()
    assert full.keys.shape[2] == 256 and pos.shape == (2, 9)
    assert (pos[0, 3:] == -1).all() and (pos[1] == np.arange(9)).all()


@pytest.mark.slow
def test_batched_sampling_matches_plain_sampling_per_row(pair, hf_dir):
    """Temperature > 0 in batch: each row's second token is distributed as plain sampling's (chi-square)."""
    from test_speculative import _chi2_two_sample

    target, drafter = pair("plain", False)
    ps = prompts(2, seed=3)
    params = SamplingParams(temperature=0.7)
    expected = [hf_greedy(hf_dir("plain"), p, 6) for p in ps]
    reference = {i: p + e for i, (p, e) in enumerate(zip(ps, expected))}

    def second_tokens(k, seeds):
        out = {0: [], 1: []}
        for s in seeds:
            decoder = BatchDecoder(target, None, params=params, draft=DraftLength(fixed=0), chunk=8, seed=s)
            if k:
                decoder.drafter = ControlledDrafter(drafter, lambda: [reference[r.id % 2] for r in decoder.rows],
                                                    0.8, seed=s)
                decoder.draft = DraftLength(fixed=k)
            rows = [decoder.add(ps[i % 2], 3) for i in range(200)]
            while decoder.rows:
                decoder.step()
            for r in rows:
                out[r.id % 2].append(r.tokens[1])
        return out

    plain, spec = second_tokens(0, range(30)), second_tokens(3, range(100, 130))
    for i in (0, 1):
        assert _chi2_two_sample(np.array(plain[i]), np.array(spec[i])) > 0.01
