"""The demo pair split across 2 processes on this machine (mlx.launch --backend ring over 127.0.0.1): what a hop
between ranks costs a round, and what MTP gains over plain decoding when every round pays it.

One run: the demo pair in one process, then split over 2 ranks; in each, the demo prompts decoded plain and with MTP
(auto K) `--repeats` times, alternating which goes first, every MTP output asserted token-identical to plain. Per
round: its time (decode time / rounds, medians over prompts), the exchanges rank 0 makes in it (counted), and what
one exchange of each kind costs between the two ranks (timed alone, same processes); peak RSS per rank. Absolute
figures are CPU figures.

    python -m bench.pipeline [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from gemma_mlx import _blas, demo

from .run import blas_ok

RESULTS = Path(__file__).resolve().parent / "results"
# Per-exchange cost of MLX's TCP ring over a Thunderbolt bridge: round trips of 0.38-0.95 ms measured between Mac
# Studios during a pipeline run (exo-explore/exo issue 2295); JACCL (RDMA over Thunderbolt 5) is lower still.
THUNDERBOLT_MS = (0.4, 1.0)


def decode(engine, tokens: int, repeats: int) -> dict:
    """demo.compare on the demo prompts: medians of per-prompt speed-ups, tokens/s and per-round times."""
    results = demo.compare(engine, demo.by_label(demo.DEMO), max_tokens=tokens, repeats=repeats)
    assert all(c.identical for c in results), "MTP output differs from plain greedy"
    s = demo.summary(results)
    s["plain_round_ms"] = statistics.median(1000 / t for c in results for t in c.plain_tps)
    s["mtp_round_ms"] = statistics.median(1000 * a / t for c in results for t, a in zip(c.mtp_tps, c.accepted_length))
    return s


def exchange_costs(split, hidden: int, repeats: int = 50) -> dict:
    """Milliseconds of one exchange of each kind between the ranks (every rank runs this at the same time):
    a broadcast of a few integers (how drafts, acceptances, K and announcements travel) and the activations of
    1 and 4 tokens sent from rank 0 to rank 1."""
    import mlx.core as mx

    def timed(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1000 * (time.perf_counter() - t) / repeats

    costs = {"broadcast": timed(lambda: mx.eval(mx.distributed.all_sum(mx.zeros((8,), mx.int32), group=split.group)))}
    for t in (1, 4):
        shape = (1, t, hidden)

        def hop():
            if split.rank == 0:
                mx.eval(mx.distributed.send(mx.ones(shape), 1, group=split.group))
            elif split.rank == 1:
                mx.eval(mx.distributed.recv(shape, mx.float32, 0, group=split.group))
            mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=split.group))  # both wait for the hop

        costs[f"activations of {t}"] = timed(hop) - costs["broadcast"]
    return costs


def counting_exchanges(split) -> Counter:
    """Count rank 0's exchanges in the rounds of plain and of MTP runs ("plain rounds", "plain broadcast", ...; bench
    instrumentation: wraps this split's methods and Decoder.step)."""
    from gemma_mlx.decode import Decoder

    counts, mode = Counter(), [None]
    for name, kind in (("from_last", "broadcast"), ("from_leader", "broadcast"), ("least", "broadcast"),
                       ("announce", "announcement"), ("pass_on", "activations")):
        method = getattr(split, name)

        def counted(*args, _method=method, _kind=kind, **kwargs):
            if mode[0]:
                counts[f"{mode[0]} {_kind}"] += 1
            return _method(*args, **kwargs)

        setattr(split, name, counted)
    step = Decoder.step

    def counted_step(self):
        mode[0] = "plain" if self.draft.fixed == 0 else "mtp"
        counts[f"{mode[0]} rounds"] += bool(self.rows)
        try:
            return step(self)
        finally:
            mode[0] = None

    Decoder.step = counted_step
    return counts


def rank_main(out: Path, tokens: int, repeats: int) -> int:
    """One rank of the split run (started by mlx.launch); rank 0 writes the figures to `out`."""
    from gemma_mlx import pipeline
    from gemma_mlx.generate import follow

    engine = demo.load_pair(pipeline.join())
    split = engine.target.split
    costs = exchange_costs(split, engine.target.config.hidden_size)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    if split.rank != 0:
        follow(engine)
        print(json.dumps({"rank": split.rank, "peak_rss_mb": peak()}), flush=True)
        return 0
    counts = counting_exchanges(split)
    summary = decode(engine, tokens, repeats)
    pipeline.quit_followers(split)
    out.write_text(json.dumps(dict(summary=summary, costs=costs, counts=dict(counts), layout=split.describe(),
                                   peak_rss_mb=peak())))
    return 0


def split_run(tokens: int, repeats: int) -> dict:
    launcher = Path(sys.executable).parent / "mlx.launch"
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "rank0.json"
        run = subprocess.run([str(launcher), "--backend", "ring", "-n", "2", "--", sys.executable, "-m",
                              "bench.pipeline", "--rank-out", str(out), "--tokens", str(tokens), "--repeats",
                              str(repeats)], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if not out.exists():
            raise SystemExit(f"the split run failed:\n{run.stderr[-3000:]}")
        result = json.loads(out.read_text())
    others = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"rank"')]
    result["peak_rss_mb"] = [result["peak_rss_mb"]] + [o["peak_rss_mb"] for o in others]
    return result


def per_round(counts: dict, mode: str) -> dict:
    """Exchanges per round of rank 0: broadcasts (an announcement is two: its length, then its bytes) and sends."""
    rounds = counts[f"{mode} rounds"]
    return {"broadcasts": (counts.get(f"{mode} broadcast", 0) + 2 * counts.get(f"{mode} announcement", 0)) / rounds,
            "sends": counts.get(f"{mode} activations", 0) / rounds}


def report(single: dict, split: dict, tokens: int, repeats: int) -> str:
    s1, s2, costs = single, split["summary"], split["costs"]
    lines = [
        f"Demo pair (Gemma 3 270M fp32 + its distilled drafter), CPU figures ({platform.machine()}, "
        f"{os.cpu_count()} cores, {_blas.status}); {len(demo.DEMO)} demo prompts × {tokens} tokens, greedy, auto K, "
        f"medians of {repeats} alternating repeats; every MTP output token-identical to plain in both runs. "
        f"Split: 2 ranks on this machine (mlx.launch --backend ring, 127.0.0.1), layers "
        f"{split['layout']['layers']}, weights {[round(b / 2**20) for b in split['layout']['weight_bytes']]} MiB, "
        f"peak RSS {[round(m) for m in split['peak_rss_mb']]} MB per rank (one process: "
        f"{single['peak_rss_mb']:.0f} MB).",
        "",
        "| | plain round (ms) | MTP round (ms) | tokens per MTP round | plain tok/s | MTP tok/s | MTP / plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in (("one process", s1), ("2 ranks", s2)):
        lines.append(f"| {name} | {s['plain_round_ms']:.1f} | {s['mtp_round_ms']:.1f} | "
                     f"{s['mean_accepted_length']:.2f} | {s['plain_tps']:.1f} | {s['mtp_tps']:.1f} | "
                     f"{s['speedup']:.2f}x |")
    lines += ["", "| exchange between the ranks | ms each | per plain round | per MTP round |", "|---|---|---|---|"]
    plain, mtp = per_round(split["counts"], "plain"), per_round(split["counts"], "mtp")
    lines += [f"| broadcast of a few integers | {costs['broadcast']:.2f} | {plain['broadcasts']:.1f} | "
              f"{mtp['broadcasts']:.1f} |",
              f"| activations of 1 token, rank 0 → 1 | {costs['activations of 1']:.2f} | {plain['sends']:.1f} | |",
              f"| activations of 4 tokens, rank 0 → 1 | {costs['activations of 4']:.2f} | | {mtp['sends']:.1f} |"]
    hop = {m: c["broadcasts"] * costs["broadcast"] + c["sends"] * costs[f"activations of {1 if m == 'plain' else 4}"]
           for m, c in (("plain", plain), ("mtp", mtp))}
    lines += ["", f"Exchanges cost a plain round about {hop['plain']:.1f} ms here and an MTP round "
              f"{hop['mtp']:.1f} ms; the split's rounds took {s2['plain_round_ms'] - s1['plain_round_ms']:+.1f} ms "
              f"(plain) and {s2['mtp_round_ms'] - s1['mtp_round_ms']:+.1f} ms (MTP) more than one process's.",
              "", "A model, not a measurement: two Macs over Thunderbolt (MLX's TCP ring, "
              f"{THUNDERBOLT_MS[0]}-{THUNDERBOLT_MS[1]} ms an exchange) with this run's one-process round times, "
              "tokens per round and exchanges per round:", "",
              "| ms per exchange | plain ms/token | MTP ms/token | MTP / plain |", "|---|---|---|---|"]
    for ms in THUNDERBOLT_MS:
        p = s1["plain_round_ms"] + (plain["broadcasts"] + plain["sends"]) * ms
        m = (s1["mtp_round_ms"] + (mtp["broadcasts"] + mtp["sends"]) * ms) / s1["mean_accepted_length"]
        lines.append(f"| {ms} | {p:.1f} | {m:.1f} | {p / m:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank-out", type=Path, help=argparse.SUPPRESS)  # set for the ranks of the split run
    args = ap.parse_args(argv)
    if args.rank_out:
        return rank_main(args.rank_out, args.tokens, args.repeats)
    ok, dt = blas_ok()
    if not ok and sys.platform.startswith("linux"):
        print(f"MLX is on the reference BLAS (2048³ matmul {dt:.2f} s > 0.5 s): no speed figures")
        return 1
    single = decode(demo.load_pair(), args.tokens, args.repeats)
    single["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    split = split_run(args.tokens, args.repeats)
    text = report(single, split, args.tokens, args.repeats)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(dict(single=single, split=split), indent=1))
    (RESULTS / "pipeline.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
