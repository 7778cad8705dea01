"""bench/run.py's quiet-machine check: a repeat measured while other processes were busy is rerun, and counted busy
if it still is after the reruns."""

import numpy as np

from bench import quiet, run


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
    monkeypatch.setattr(run, "one_repeat", fake_repeat)
    monkeypatch.setattr(quiet, "busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(quiet, "own_cpu", lambda children: 0.0)
    monkeypatch.setattr(quiet.time, "time", lambda: clock["t"])
    monkeypatch.setattr(run, "step_costs", lambda *a, **k: {"plain": 1.0})
    res, _ = run.run_shape("x", alphas=[], ks=[], n_new=4, repeats=2, prompts=[[2, 3]], busy_cores=0.3, reruns=2)
    assert np.allclose(res["other_processes_cores"], [0.1, 1.5])
    assert res["busy_repeats"] == 1
    assert res["plain_tps"] == 10.0
