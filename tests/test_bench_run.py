"""bench/run.py: the quiet-machine check (a repeat measured while other processes were busy is rerun, and counted
busy if it still is after the reruns), the limit each row's efficiency is measured against, how the step costs
behind it are timed, and the shapes' drafters priced as the real pairs'."""

import numpy as np
import pytest

from bench import batch, quiet, run


def test_a_repeat_on_a_busy_machine_is_rerun(monkeypatch):
    others_per_attempt = iter([1.5, 0.1, 1.5, 1.5, 1.5])  # repeat 1: busy then quiet; repeat 2: busy three times
    clock = {"busy": 0.0, "t": 0.0}

    def fake_repeat(shape, target, drafter, configs, auto, prompts, n_new, rep, res):
        clock["t"] += 10.0
        clock["busy"] += 10.0 * next(others_per_attempt)
        res["kv_bytes_plain"] = res["kv_bytes_spec"] = 0
        return [10.0], {c: [20.0] for c in configs}, {c: [] for c in configs}

    monkeypatch.setattr(run, "build", lambda shape: (object(), object()))
    monkeypatch.setattr(run, "nbytes", lambda m: 1)
    monkeypatch.setattr(run, "drafter_cost", lambda target, drafter: 0.0)
    monkeypatch.setattr(run, "one_repeat", fake_repeat)
    monkeypatch.setattr(quiet, "busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(quiet, "own_cpu", lambda children: 0.0)
    monkeypatch.setattr(quiet.time, "time", lambda: clock["t"])
    monkeypatch.setattr(run, "step_costs", lambda *a, **k: {"plain": 1.0})
    res, _ = run.run_shape("x", alphas=[], ks=[], n_new=4, repeats=2, prompts=[[2, 3]], busy_cores=0.3, reruns=2)
    assert np.allclose(res["other_processes_cores"], [0.1, 1.5])
    assert res["busy_repeats"] == 1
    assert res["plain_tps"] == 10.0


# a round of K costs 1 + 0.6 K plain steps (draft 0.1 a step, verify 1 + 0.5 a token beyond the first)
COSTS = {"plain": 1.0} | {f"draft{k}": 0.1 * k for k in range(1, 9)} | \
    {f"verify{k}": 1.0 + 0.5 * k for k in range(1, 9)}


def stats(rounds):
    """A run's Stats from its rounds, (K, n accepted) each."""
    from gemma_mlx.speculative import Stats

    s = Stats()
    for k, n in rounds:
        s.record(k, n)
    return s


def run_rows(monkeypatch, runs, alphas, ks):
    """run_shape on one repeat whose runs (configuration -> Stats) are given, each 1.5x plain, at COSTS."""
    def fake_repeat(shape, target, drafter, configs, auto, prompts, n_new, rep, res):
        res["kv_bytes_plain"] = res["kv_bytes_spec"] = 0
        return [10.0], {c: [15.0] for c in configs}, {c: [runs[c]] for c in configs}

    monkeypatch.setattr(run, "build", lambda shape: (object(), object()))
    monkeypatch.setattr(run, "nbytes", lambda m: 1)
    monkeypatch.setattr(run, "drafter_cost", lambda target, drafter: 0.0)
    monkeypatch.setattr(run, "one_repeat", fake_repeat)
    monkeypatch.setattr(run, "others_since", lambda start: 0.0)
    monkeypatch.setattr(run, "step_costs", lambda *a, **k: COSTS)
    return run.run_shape("x", alphas=alphas, ks=ks, n_new=4, repeats=1, prompts=[[2, 3]])[0]["configs"]


def test_k_auto_is_measured_against_the_best_k_plain_included(monkeypatch):
    """A fixed-K row's limit is at its K; a K auto row's at the best K for its measured acceptance, which is plain
    decoding (1.0) for a drafter that is never right."""
    runs = {c: stats([(4, n)] * 20) for c, n in {(1.0, "auto"): 2, (0.0, "auto"): 0, (0.7, 4): 4}.items()}
    rows = run_rows(monkeypatch, runs, alphas=[1.0, 0.0], ks=[4])
    # auto: positions 1, 2 always right, 3 never: K = 1, 2, 3 give 2 / 1.6, 3 / 2.2, 3 / 2.8; K = 4 row: 5 / 3.4
    assert np.isclose(rows["alpha=1.0,K=auto"]["limit"], 3 / 2.2)
    assert np.isclose(rows["alpha=0.7,K=4"]["limit"], 5 / 3.4)
    assert rows["alpha=0.0,K=auto"]["limit"] == 1.0
    assert np.isclose(rows["alpha=0.0,K=auto"]["efficiency"], 1.5)


def test_k_auto_limit_uses_every_run_at_its_alpha(monkeypatch):
    """A position K auto reached once (accepted: 1.00) is priced at the rate of every run at that α (21 of 41), not
    at its own one round."""
    runs = {(0.7, "auto"): stats([(1, 1)] * 20 + [(2, 2)]), (0.7, 2): stats([(2, 2)] * 20 + [(2, 1)] * 20)}
    rows = run_rows(monkeypatch, runs, alphas=[0.7], ks=[2])
    auto = rows["alpha=0.7,K=auto"]
    assert auto["acceptance_by_position"] == [1.0, 1.0]  # its own rates, as the table shows them
    # pooled: position 1 61/61, position 2 21/41; K = 1: 2 / 1.6 beats K = 2: (2 + 21/41) / 2.2 (own rates: 3 / 2.2)
    assert np.isclose(auto["limit"], 2 / 1.6)
    assert np.isclose(rows["alpha=0.7,K=2"]["limit"], (1 + 1 + 0.5) / 2.2)  # its own rates


def test_a_draft_is_timed_after_a_verify_as_in_a_round(monkeypatch):
    """The drafter's cost is measured where a round runs it, after a target forward (its weights no longer in the
    CPU caches), not back to back; the plain step back to back, as plain decoding runs it."""
    import mlx.core as mx

    clock = {"t": 0.0, "last": None}

    class Target:
        def __call__(self, tokens, cache):
            clock["t"] += 10.0 + tokens.shape[1]
            clock["last"] = "target"
            return mx.zeros((1,))

        def make_cache(self, batch):
            return type("Cache", (), {"rollback": lambda self, n: None})()

        def prefill(self, tokens, cache):
            return None, None

    class Drafter:
        def draft(self, target, x, g, cache, k):
            clock["t"] += k * (2.0 if clock["last"] == "target" else 1.0)  # cold after the target, warm after itself
            clock["last"] = "drafter"
            return mx.zeros((1, k))

    monkeypatch.setattr(run.time, "perf_counter", lambda: clock["t"])
    costs = run.step_costs(Target(), Drafter(), [2, 3], ks=[1, 3])
    assert costs == {"plain": 11.0, "draft1": 2.0, "verify1": 12.0, "draft3": 6.0, "verify3": 14.0}


def test_step_params_are_what_the_real_models_are_named_for():
    """Built lazily at full size (nothing allocated): a decode step of 31B reads ~31B parameters, of 26B-A4B ~4B
    (8 of its 128 experts), of E2B ~2.3B (its 2.3B PLE table is a row lookup, not read)."""
    steps = {shape: [run.step_params(m) for m in run.pair(**real)] for shape, real in run.REAL_PAIRS.items()}
    assert 30e9 < steps["31b-like"][0] < 32e9
    assert 3.5e9 < steps["26b-a4b-like"][0] < 4.5e9
    assert 2.0e9 < steps["e2b-like"][0] < 2.6e9
    assert steps["e2b-like"][1] < 20e6  # the centroid head scores 32 of 2048 buckets: 1/64 of the 67M-row table
    assert 0.3e9 < steps["31b-like"][1] < 0.6e9  # d 1024 with the whole 262144-row head


@pytest.mark.parametrize("shape", list(run.SHAPES) + [f"batch-{t}" for t in batch.TARGETS])
def test_each_bench_drafter_costs_what_its_real_pair_does(shape):
    """c = drafter step / target step parameters within 10% of the real pair's, so the bench prices drafting as
    the real models would."""
    if shape.startswith("batch-"):
        name = shape.removeprefix("batch-")
        target, drafter = run.pair(*batch.target_configs(name))
        real = batch.DRAFTERS[name]["real"]
    else:
        target, drafter = run.pair(*run.shape_configs(shape))
        real = shape
    c, c_real = run.drafter_cost(target, drafter), run.drafter_cost(*run.pair(**run.REAL_PAIRS[real]))
    assert abs(c / c_real - 1) < 0.10, (c, c_real)


def test_controlled_drafts_are_right_on_the_same_positions_whatever_k():
    """The coin is per row and position: runs at different K (or a position guessed again next round) find the same
    positions right, so their speeds compare pairwise; over many positions a fraction ≈ α is right."""
    import mlx.core as mx

    from bench.controlled import ControlledDrafter

    class Wrong:  # a drafter that always proposes token 0
        def draft(self, target, x, g, cache, k):
            return mx.zeros((len(cache.lengths), k), mx.uint32)

    class Cache:
        def __init__(self, lengths):
            self.lengths = np.array(lengths)

    reference = list(range(1, 5001))  # token at position p is p + 1, never 0

    def right(drafter, at, k):  # which of the k positions after `at` row 0 is drafted right on
        return np.array(drafter.draft(None, None, None, Cache([at, at]), k))[0] > 0

    a, b = (ControlledDrafter(Wrong(), [reference] * 2, 0.7, seed=5) for _ in range(2))
    for at in (10, 11, 57):
        assert (right(a, at, 7)[:3] == right(b, at, 3)).all()
    assert (right(a, 20, 4)[1:] == right(a, 21, 3)).all()  # guessed again in the next round: the same outcome
    many = np.concatenate([right(a, at, 8) for at in range(0, 4000, 8)])
    assert abs(many.mean() - 0.7) < 0.03
    both = np.stack([np.array(a.draft(None, None, None, Cache([at, at]), 8)) > 0 for at in range(0, 800, 8)])
    assert (both[:, 0] != both[:, 1]).any()  # each row tosses its own coins
