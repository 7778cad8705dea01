"""A target split across processes (gemma_mlx/pipeline.py), launched as users launch it: `mlx.launch --backend ring
-n N` over 127.0.0.1. Greedy MTP and batch output equal the transformers oracle's greedy (so the single process's),
seeded sampling equals the single process's, each rank loads only its layers' weights, a dead rank ends the others
with one line, and `info --hosts` shows the split before anything loads."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from oracle import hf_greedy
from typer.testing import CliRunner

from bench.pipeline import free_ports
from gemma_mlx import _blas
from gemma_mlx.cli import app
from gemma_mlx.decode import Decoder
from gemma_mlx.loader import describe
from gemma_mlx.pipeline import SplitError, held, layer_bytes, pinned_from, plan
from gemma_mlx.sampling import SamplingParams

HERE = Path(__file__).resolve().parent
LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
PROMPTS = [[2, 17, 301, 44, 9], [2] + [int(i) for i in np.random.default_rng(3).integers(3, 500, 19)]]  # 20 > W = 8
NEW = 26


def launch(ranks: int, command: list, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, GEMMA_MLX_JOIN_SECONDS="60")
    return subprocess.run([LAUNCH, "--backend", "ring", "-n", str(ranks), "--", *command], env=env, timeout=timeout,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def split_run(mlx_dir, hf_dir, tmp_path_factory):
    """split_run(variant, ranks) -> (the worker's result, the oracle's greedy continuations), run once each."""
    done = {}

    def get(variant, ranks):
        if (variant, ranks) not in done:
            expected = [hf_greedy(hf_dir(variant), p, NEW) for p in PROMPTS]
            work = tmp_path_factory.mktemp(f"split-{variant}-{ranks}")
            case = work / "case.json"
            case.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": NEW,
                                        "references": [p + e for p, e in zip(PROMPTS, expected)]}))
            run = launch(ranks, [sys.executable, str(HERE / "pipeline_worker.py"), str(mlx_dir(variant)),
                                 str(mlx_dir(variant, ordered=True)), str(case), str(work / "out.json")])
            assert (work / "out.json").exists(), run.stderr[-3000:]
            done[variant, ranks] = json.loads((work / "out.json").read_text()), expected
        return done[variant, ranks]

    return get


CASES = [(v, n) for n in (2, 3) for v in ("keqv", "moe", "e2blike")]


def sampled_alone(target) -> list:
    """The worker's sampled row (temperature 0.8, seed 11), plain, in this one process: a seed gives the same tokens
    at any K, and so in any split (the noise is keyed by seed and position, docs/design.md)."""
    decoder = Decoder(target, None, SamplingParams(temperature=0.8), chunk=8)
    row = decoder.add(max(PROMPTS, key=len), NEW, seed=11)
    while decoder.rows:
        decoder.step()
    return row.tokens


@pytest.mark.parametrize("variant,ranks", CASES, ids=[f"{v}-{n}ranks" for v, n in CASES])
def test_split_mtp_and_batch_are_token_identical_to_greedy(variant, ranks, split_run, mlx_target):
    result, expected = split_run(variant, ranks)
    for k, tokens in result["alone"].items():
        assert tokens == expected, f"{ranks} ranks, K={k}, one prompt at a time"
    for k, tokens in result["batch"].items():
        assert tokens == expected, f"{ranks} ranks, K={k}, both prompts in one batch"
    outcomes = {"full" if n == k else "zero" if n == 0 else "partial" for k, n in result["rounds"] if k}
    assert outcomes == {"full", "partial", "zero"}  # rollback on every rank's cache was exercised
    layers = result["distributed"]["layers"]
    assert result["distributed"]["ranks"] == ranks == len(layers)
    assert result["sampled"]["3"] == result["sampled"]["0"] == sampled_alone(mlx_target(variant))
    assert [a for a, _ in layers] == [0] + [e + 1 for _, e in layers[:-1]] and all(a <= e for a, e in layers)


@pytest.mark.parametrize("variant,ranks", CASES, ids=[f"{v}-{n}ranks" for v, n in CASES])
def test_each_rank_loads_only_its_layers(variant, ranks, split_run, mlx_dir):
    result, _ = split_run(variant, ranks)
    m = describe(mlx_dir(variant))
    sizes = layer_bytes(m.sizes, m.config.num_hidden_layers)
    loaded = result["distributed"]["weight_bytes"]
    shares = [held(sizes, r, ranks, a, e + 1) for r, (a, e) in enumerate(result["distributed"]["layers"])]
    assert loaded == shares
    assert max(loaded) < 0.8 * m.nbytes  # no rank holds the whole model
    assert result["distributed"]["layers"][-1][0] <= pinned_from(m.config)  # the drafter's producers on the last rank


# --- the plan -------------------------------------------------------------------------------------------------------


def test_plan_balances_bytes_and_keeps_the_producers_on_the_last_rank(mlx_dir):
    cfg = describe(mlx_dir("e2blike")).config  # 8 layers, kv-shared from layer 5: producers 3 (full), 4 (sliding)
    sizes = layer_bytes([(f"model.layers.{i}.w", 100) for i in range(8)] + [("model.embed_tokens.weight", 150)], 8)
    assert pinned_from(cfg) == 3
    assert plan(cfg, 2, sizes) == [(0, 3), (3, 8)]  # the last rank must hold 3-7 whatever the bytes
    even = layer_bytes([(f"model.layers.{i}.w", 100) for i in range(8)], 8)
    assert plan(cfg, 3, even) == [(0, 2), (2, 3), (3, 8)] or plan(cfg, 3, even) == [(0, 1), (1, 3), (3, 8)]
    with pytest.raises(SplitError, match="last rank must hold layers 3-7"):
        plan(cfg, 5, even)


def test_plan_of_a_model_without_shared_layers_splits_its_bytes_evenly(mlx_dir):
    cfg = describe(mlx_dir("keqv")).config  # 6 layers [S, S, F, S, S, F]: the drafter reads layers 4 and 5
    sizes = layer_bytes([(f"model.layers.{i}.w", 100) for i in range(6)], 6)
    assert plan(cfg, 2, sizes) == [(0, 3), (3, 6)]
    heavy_head = layer_bytes([(f"model.layers.{i}.w", 100) for i in range(6)] + [("lm_head.weight", 200)], 6)
    assert plan(cfg, 2, heavy_head) == [(0, 4), (4, 6)]


# --- launching -------------------------------------------------------------------------------------------------------


def test_info_shows_the_split_before_anything_loads(mlx_dir, tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]))
    result = CliRunner().invoke(app, ["info", str(mlx_dir("keqv")), "--hostfile", str(hostfile)])
    assert result.exit_code == 0, result.output
    assert "split over 2 ranks" in result.output
    assert "mac1" in result.output and "0-2 + embeddings" in result.output
    assert "mac2" in result.output and "3-5 + norm + head" in result.output
    hosts = CliRunner().invoke(app, ["info", str(mlx_dir("keqv")), "--hosts", "a,b,c"])
    assert hosts.exit_code == 0 and "split over 3 ranks" in hosts.output
    too_many = CliRunner().invoke(app, ["info", str(mlx_dir("keqv")), "--hosts", "a,b,c,d,e,f"])
    assert too_many.exit_code == 1 and "cannot split this model over 6 ranks" in too_many.output


def test_ranks_of_one_host_share_its_cores(tmp_path, monkeypatch):
    hostfile = tmp_path / "ring.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["10.0.0.9:5002"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    monkeypatch.setenv("MLX_RANK", "1")
    assert _blas.local_ranks() == 2
    monkeypatch.setenv("MLX_RANK", "2")
    assert _blas.local_ranks() == 1
    monkeypatch.delenv("MLX_RANK")
    assert _blas.local_ranks() == 1


def start_ranks(command: list, tmp_path, join_seconds: float = 60, ranks: int = 2) -> list[subprocess.Popen]:
    """The processes mlx.launch starts on one host, started here so that each one's exit can be watched; rank r's
    stderr goes to tmp_path / f"rank{r}.err"."""
    hostfile = tmp_path / "ring.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(ranks)]))
    return [subprocess.Popen(command, env=dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile),
                                               GEMMA_MLX_JOIN_SECONDS=str(join_seconds)),
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"rank{r}.err", "w"))
            for r in range(ranks)]


def gemma_mlx_command(*args) -> list:
    return [sys.executable, "-m", "gemma_mlx.cli", *args]


def test_generate_under_mlx_launch_reports_the_split(mlx_dir):
    target, drafter = str(mlx_dir("e2blike")), str(mlx_dir("e2blike", ordered=True))
    args = ["generate", "-m", target, "-d", drafter, "-p", "the cat", "--max-tokens", "12", "--json", "--raw"]
    alone = subprocess.run(gemma_mlx_command(*args), capture_output=True, text=True, timeout=120)
    split = launch(2, gemma_mlx_command(*args))
    one, two = json.loads(alone.stdout), json.loads(split.stdout)
    assert two["tokens"] == one["tokens"] and two["text"] == one["text"]
    assert "distributed" not in one
    assert two["distributed"]["ranks"] == 2 and two["distributed"]["layers"] == [[0, 2], [3, 7]]
    assert len(two["distributed"]["weight_bytes"]) == 2 and min(two["distributed"]["weight_bytes"]) > 0
    assert "split over 2 ranks: layers 0-2, 3-7" in split.stderr


@pytest.mark.parametrize("victim", [1, 0], ids=["last rank killed", "leader killed"])
def test_a_killed_rank_ends_the_other_with_one_line(victim, mlx_dir, tmp_path):
    target, drafter = str(mlx_dir("keqv")), str(mlx_dir("keqv", ordered=True))
    procs = start_ranks(gemma_mlx_command("generate", "-m", target, "-d", drafter, "-p", "the cat", "--raw",
                                          "--max-tokens", "100000"), tmp_path)
    survivor = procs[1 - victim]
    try:
        time.sleep(12)  # loaded and decoding (a prompt this long would take minutes)
        assert all(p.poll() is None for p in procs), (tmp_path / "rank0.err").read_text()
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = survivor.wait(timeout=30)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            p.kill()
    stderr = (tmp_path / f"rank{1 - victim}.err").read_text()
    assert code != 0
    assert waited < 10
    assert stderr.strip().splitlines()[-1].startswith(f"error: rank {1 - victim}: lost the other ranks of the pipeline")
    assert "Traceback" not in stderr


def test_a_rank_alone_gives_up_joining_with_one_line(mlx_dir, tmp_path):
    procs = start_ranks(gemma_mlx_command("generate", "-m", str(mlx_dir("keqv")), "-p", "hi"), tmp_path,
                        join_seconds=3)
    procs[1].kill()  # never joins
    try:
        code = procs[0].wait(timeout=30)
    finally:
        procs[0].kill()
    stderr = (tmp_path / "rank0.err").read_text()
    assert code != 0
    assert "error: rank 0: not every rank joined within 3 s" in stderr
    assert "Traceback" not in stderr


def test_the_readme_python_example_runs_split(mlx_dir, tmp_path):
    import re
    import shutil

    readme = (HERE.parent / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "pipeline.join()" in b)
    (tmp_path / "script.py").write_text(code)
    shutil.copytree(mlx_dir("e2blike"), tmp_path / "models" / "e2b")
    shutil.copytree(mlx_dir("e2blike", ordered=True), tmp_path / "models" / "e2b-assistant")
    alone = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    split = subprocess.run([LAUNCH, "--backend", "ring", "-n", "2", "--", sys.executable, "script.py"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=240)
    assert alone.returncode == 0 and alone.stdout.strip(), alone.stderr[-2000:]
    assert split.stdout == alone.stdout, split.stderr[-2000:]
