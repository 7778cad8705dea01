"""The peers bench (bench/peers.py) in its quick mode on a tiny pair (sliding window 8, so every run crosses it): the
report's structure and the token-identity checks, not speed. mlx-vlm runs only where its venv is installed
(`make bench` creates it); otherwise the report must say why it did not run."""

import json

import pytest

from bench import peers


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    assert peers.main(["--quick", "--inprocess", "--out", str(out), "--work", str(out / "work")]) == 0
    data = json.loads((out / "peers.json").read_text())
    data["md"] = (out / "peers.md").read_text()
    return data


def rows(report, system):
    return {r["label"]: r for r in report["configs"] if r["system"] == system}


def test_structure(report):
    assert [(r["system"], r["label"]) for r in report["configs"]] == [(s, label) for s, label, _ in peers.CONFIGS]
    s = report["settings"]
    assert s["prompt_tokens"] + s["new_tokens"] > s["sliding_window"] and s["dtype"] == "fp32"
    for r in report["configs"]:
        if "error" in r:
            continue
        assert len(r["tokens"]) == len(r["reference"]) == s["new_tokens"]
        assert r["tps"] > 0 and r["yardstick_tps"] > 0 and r["peak_rss_mb"] > 0 and r["kv_bytes"] > 0
        m = r["machine"]
        assert {"load_before", "load_after", "other_processes_cores", "busy"} <= set(m)
        if r["config"]["kind"] != "plain":
            assert 0 <= r["acceptance"] <= 1 and r["tokens_per_round"] >= 1
    assert "| system | configuration |" in report["md"] and "CPU figures" in report["md"]
    assert "Quiet-machine check" in report["md"]


def test_ours_is_greedy_and_drafting_needs_no_kv(report):
    ours = rows(report, "ours")
    assert all(r["identical"] for r in ours.values())
    assert {r["kv_bytes"] for r in ours.values()} == {ours["plain"]["kv_bytes_plain"]}
    assert 0 < ours["MTP, K 3"]["drafter_bytes"] < ours["MTP, K 3"]["target_bytes"]
    assert ours["MTP, K 3, α 0.7"]["acceptance"] > 0.2


def test_mlx_lm(report):
    lm = rows(report, "mlx_lm")
    assert lm["plain"]["same_tokens_as_ours"] and lm["plain"]["identical"]
    assert lm["target as its own draft, K 3"]["identical"]  # never rolls back
    assert lm["target as its own draft, K 3"]["acceptance"] == 1.0
    # mlx-lm cannot roll back a wrapped RotatingKVCache: its draft-model output is greedy only until the cache wraps
    w = report["settings"]["sliding_window"]
    for label in ("draft model (2 layers, d 256), K 3", "draft model (2 layers, d 256), K 3, α 0.7"):
        r = lm[label]
        assert r["identical"] or r["first_difference_position"] >= w - peers.K  # a K+1-token verify wraps it


def test_mlx_lm_divergence_is_the_wrapped_window(report):
    """The same mlx-lm draft configuration with the target's window widened (its cache never wraps, so mlx-lm can
    trim it) is greedy; this also checks the forced-draft wrapper (α = 1: every draft accepted)."""
    lm = peers.MlxLm(report["settings"]["paths"], dict(kind="draft"))
    lm.model.args.sliding_window = lm.model.model.window_size = 4096
    prompt = [2, 5, 6, 7, 8, 9]
    ref = lm.plain(prompt, 24)
    forced = lm.spec(dict(kind="draft", k=3, alpha=1.0), prompt, 24, prompt + ref.tokens, 0)
    assert forced.tokens == ref.tokens and forced.accepted == forced.drafted
    natural = lm.spec(dict(kind="draft", k=3, alpha=None), prompt, 24, prompt + ref.tokens, 0)
    assert natural.tokens == ref.tokens


def test_mlx_vlm_ran_or_says_why(report):
    vlm = rows(report, "mlx_vlm")
    if report["mlx_vlm"]["python"] is None:
        assert all(r["error"] == report["mlx_vlm"]["status"] for r in vlm.values())
        assert "mlx-vlm" in report["md"]
        pytest.skip(report["mlx_vlm"]["status"])
    assert vlm["plain"]["same_tokens_as_ours"]
    for label, r in vlm.items():
        assert "error" not in r, r.get("error")
        assert r["identical"], f"mlx-vlm {label}: differs from greedy at new token {r['first_difference']}"
    layouts = report["mlx_vlm"]["layouts"]
    assert len(layouts) == 3 and layouts[-1]["ok"] and layouts[-1]["mtp_identical"]
    assert all(x["ok"] or x["error"] for x in layouts)


def test_marginal_rate_is_the_same_for_look_ahead_and_plain_streams():
    """mlx-lm computes token i+1 before it yields token i; a clock started at the first yielded token would credit it
    with one forward too many. Whole-call times with t(1) subtracted give both streams their true rate."""
    import time

    cost = 0.02

    def plain(n):
        for i in range(n):
            time.sleep(cost)
            yield i

    def look_ahead(n):
        time.sleep(cost)
        for i in range(n):
            if i + 1 < n:
                time.sleep(cost)
            yield i

    for stream in (plain, look_ahead):
        t1 = peers._timed(stream(1))[1]
        toks, tn = peers._timed(stream(6))  # short, so one forward too many would be 25% off
        assert toks == list(range(6))
        assert peers.marginal_rate(6, tn, t1) == pytest.approx(1 / cost, rel=0.1)


def test_every_system_decodes_on_one_stream(report):
    """The workers (in this process with --inprocess) put mlx-lm's and mlx-vlm's generation streams on the default
    stream: with MKL, a second BLAS-calling thread slows every system's matmuls (bench.peers.one_stream)."""
    import mlx.core as mx
    import mlx_lm.generate

    default = mx.default_stream(mx.default_device())
    assert mlx_lm.generate.generation_stream == default
    assert mx.new_thread_local_stream(mx.default_device()) == default
