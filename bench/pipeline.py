"""The demo pair split across 2 processes on this machine (mlx.launch --backend ring over 127.0.0.1): what a hop
between ranks costs a round, and what MTP gains over plain decoding when every round pays it.

One run: the demo pair in one process (2 BLAS threads, then 1 as each rank has), then split over 2 ranks (started as
mlx.launch starts them); in each, the demo prompts decoded plain and with MTP (auto K) `--repeats` times, alternating
which goes first, every MTP output asserted token-identical to plain. Per round: its time (decode time / rounds,
medians over prompts), the exchanges rank 0 makes in it (counted), and what one exchange of each kind costs between
the two ranks (timed alone, same processes); peak memory per process. Absolute figures are CPU figures.

    python -m bench.pipeline [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
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
    """Milliseconds of one exchange of each kind between ranks 0 and 1 (every rank runs this at the same time): a
    broadcast of a few integers (how drafts, acceptances, K and announcements travel), and a send of the activations
    of 1 and 4 tokens (half a round trip: rank 0 sends, rank 1 sends the same back)."""
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

        def round_trip():
            if split.rank == 0:
                mx.eval(mx.distributed.send(mx.ones(shape), 1, group=split.group))
                mx.eval(mx.distributed.recv(shape, mx.float32, 1, group=split.group))
            elif split.rank == 1:
                x = mx.distributed.recv(shape, mx.float32, 0, group=split.group)
                mx.eval(mx.distributed.send(x, 0, group=split.group))

        costs[f"activations of {t}"] = timed(round_trip) / 2
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


def memory() -> dict:
    """This process's peak RSS and MLX's peak allocation (weights, caches, temporaries), MB."""
    import mlx.core as mx

    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "mlx_peak_mb": mx.get_peak_memory() / 2**20}


def part_main(out: Path, tokens: int, repeats: int) -> int:
    """One measured process: alone (not launched), or one rank of the split (rank 0 writes `out`, the others print
    their memory)."""
    from gemma_mlx import pipeline
    from gemma_mlx.generate import follow

    engine = demo.load_pair(pipeline.join())
    split = engine.target.split
    if split.size == 1:
        out.write_text(json.dumps(dict(summary=decode(engine, tokens, repeats), memory=[memory()])))
        return 0
    costs = exchange_costs(split, engine.target.config.hidden_size)
    if split.rank != 0:
        follow(engine)
        print(json.dumps({"rank": split.rank, "memory": memory()}), flush=True)
        return 0
    counts = counting_exchanges(split)
    summary = decode(engine, tokens, repeats)
    pipeline.quit_followers(split)
    out.write_text(json.dumps(dict(summary=summary, costs=costs, counts=dict(counts), layout=split.describe(),
                                   memory=[memory()])))
    return 0


def measured(tokens: int, repeats: int, ranks: int = 1, threads: int | None = None) -> dict:
    """A part_main run in new processes: alone, or `ranks` ranks started as mlx.launch --backend ring starts them on
    one host (MLX_RANK, MLX_HOSTFILE) but without its I/O loop, which polls its children's stdin pipes without
    blocking and takes one of this machine's 2 cores. `threads`: BLAS threads per process (default: the cores,
    shared among local ranks)."""
    env = dict(os.environ)
    if threads:
        env.update({v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    with tempfile.TemporaryDirectory() as work:
        hostfile, out = Path(work) / "hosts.json", Path(work) / "rank0.json"
        if ranks > 1:
            hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(ranks)]))
        procs = [subprocess.Popen([sys.executable, "-m", "bench.pipeline", "--part-out", str(out), "--tokens",
                                   str(tokens), "--repeats", str(repeats)], stdout=subprocess.PIPE, text=True,
                                  cwd=Path(__file__).resolve().parent.parent,
                                  env=dict(env, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)) if ranks > 1 else env)
                 for r in range(ranks)]
        outputs = [p.communicate()[0] for p in procs]
        if not out.exists():
            raise SystemExit("a measured run failed (its errors are above)")
        result = json.loads(out.read_text())
    result["memory"] += [json.loads(line)["memory"] for o in outputs[1:] for line in o.splitlines()
                         if line.startswith('{"rank"')]
    return result


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def per_round(counts: dict, mode: str) -> dict:
    """Exchanges per round of rank 0: broadcasts (an announcement is two: its length, then its bytes) and sends."""
    rounds = counts[f"{mode} rounds"]
    return {"broadcasts": (counts.get(f"{mode} broadcast", 0) + 2 * counts.get(f"{mode} announcement", 0)) / rounds,
            "sends": counts.get(f"{mode} activations", 0) / rounds}


def report(alone: dict, alone_1: dict, split: dict, tokens: int, repeats: int) -> str:
    costs = split["costs"]
    mb = lambda run, key: [round(m[key]) for m in run["memory"]]  # noqa: E731
    lines = [
        f"Demo pair (Gemma 3 270M fp32 + its distilled drafter), CPU figures ({platform.machine()}, "
        f"{os.cpu_count()} cores, {_blas.status}); {len(demo.DEMO)} demo prompts × {tokens} tokens, greedy, auto K, "
        f"medians of {repeats} alternating repeats; every MTP output token-identical to plain in every run. "
        f"Split: 2 ranks on this machine (MLX's ring backend over 127.0.0.1), 1 BLAS thread each, layers "
        f"{split['layout']['layers']}, weights {[round(b / 2**20) for b in split['layout']['weight_bytes']]} MiB; "
        f"MLX peak memory {mb(split, 'mlx_peak_mb')} MB per rank, {mb(alone, 'mlx_peak_mb')} MB alone; peak RSS "
        f"{mb(split, 'peak_rss_mb')} MB per rank, {mb(alone, 'peak_rss_mb')} MB alone.",
        "",
        "| | plain round (ms) | MTP round (ms) | tokens per MTP round | plain tok/s | MTP tok/s | MTP / plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in (("one process, 2 BLAS threads", alone), ("one process, 1 BLAS thread", alone_1),
                      ("2 ranks, 1 BLAS thread each", split)):
        s = run["summary"]
        lines.append(f"| {name} | {s['plain_round_ms']:.1f} | {s['mtp_round_ms']:.1f} | "
                     f"{s['mean_accepted_length']:.2f} | {s['plain_tps']:.1f} | {s['mtp_tps']:.1f} | "
                     f"{s['speedup']:.2f}x |")
    plain, mtp = per_round(split["counts"], "plain"), per_round(split["counts"], "mtp")
    lines += ["", "| exchange between the ranks | ms each | per plain round | per MTP round |", "|---|---|---|---|",
              f"| broadcast of a few integers | {costs['broadcast']:.2f} | {plain['broadcasts']:.1f} | "
              f"{mtp['broadcasts']:.1f} |",
              f"| activations of 1 token, rank 0 → 1 | {costs['activations of 1']:.2f} | {plain['sends']:.1f} | |",
              f"| activations of 4 tokens, rank 0 → 1 | {costs['activations of 4']:.2f} | | {mtp['sends']:.1f} |"]
    hop = {m: c["broadcasts"] * costs["broadcast"] + c["sends"] * costs[f"activations of {1 if m == 'plain' else 4}"]
           for m, c in (("plain", plain), ("mtp", mtp))}
    s1, s2 = alone_1["summary"], split["summary"]
    lines += ["", f"The exchanges cost a plain round about {hop['plain']:.1f} ms here and an MTP round "
              f"{hop['mtp']:.1f} ms; against one process on the same single BLAS thread, the split's rounds took "
              f"{s2['plain_round_ms'] - s1['plain_round_ms']:+.1f} ms (plain) and "
              f"{s2['mtp_round_ms'] - s1['mtp_round_ms']:+.1f} ms (MTP).",
              "", "A model, not a measurement: two Macs over Thunderbolt (MLX's TCP ring, "
              f"{THUNDERBOLT_MS[0]}-{THUNDERBOLT_MS[1]} ms an exchange), each rank computing as fast as one process "
              "on a whole machine (this run's 2-thread round times and tokens per round), with these exchanges per "
              "round:", "", "| ms per exchange | plain ms/token | MTP ms/token | MTP / plain |", "|---|---|---|---|"]
    s = alone["summary"]
    for ms in THUNDERBOLT_MS:
        p = s["plain_round_ms"] + (plain["broadcasts"] + plain["sends"]) * ms
        m = (s["mtp_round_ms"] + (mtp["broadcasts"] + mtp["sends"]) * ms) / s["mean_accepted_length"]
        lines.append(f"| {ms} | {p:.1f} | {m:.1f} | {p / m:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)  # set for the measured processes
    args = ap.parse_args(argv)
    if args.part_out:
        return part_main(args.part_out, args.tokens, args.repeats)
    ok, dt = blas_ok()
    if not ok and sys.platform.startswith("linux"):
        print(f"MLX is on the reference BLAS (2048³ matmul {dt:.2f} s > 0.5 s): no speed figures")
        return 1
    alone = measured(args.tokens, args.repeats)
    alone_1 = measured(args.tokens, args.repeats, threads=1)
    split = measured(args.tokens, args.repeats, ranks=2)
    text = report(alone, alone_1, split, args.tokens, args.repeats)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(dict(alone=alone, alone_1_thread=alone_1, split=split),
                                                      indent=1))
    (RESULTS / "pipeline.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
