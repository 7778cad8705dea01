"""Batch-mode bench: aggregate tokens/s of speculative vs plain batched decoding at B = 1, 2, 4, 8 (dense and MoE
targets, drafter of controlled acceptance α = 0.7), and the MoE verify-cost ratio t(B×(K+1) tokens) / t(B tokens)
with and without the expert-union path. CPU figures (fp32); ratios from one run, medians of repeats, every
speculative row asserted identical to its plain row.

    python -m bench.batch [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import gemma_mlx  # noqa: F401
import mlx.core as mx
import numpy as np

from gemma_mlx.batch import BatchDecoder
from gemma_mlx.cache import TargetCache
from gemma_mlx.speculative import DraftLength

from .controlled import ControlledDrafter
from .run import build


def run(target, drafter, prompts, n_new, k, references=None, alpha=0.7, seed=0):
    decoder = BatchDecoder(target, None, draft=DraftLength(fixed=0))
    if k:
        decoder.drafter = ControlledDrafter(drafter, lambda: [references[r.id] for r in decoder.rows], alpha, seed)
        decoder.draft = DraftLength() if k == "auto" else DraftLength(fixed=k)
    rows = [decoder.add(p, n_new) for p in prompts]
    t0 = time.perf_counter()
    while decoder.rows:
        decoder.step()
    seconds = time.perf_counter() - t0
    return [r.tokens for r in rows], sum(len(r.tokens) - 1 for r in rows) / seconds, rows


def verify_cost(target, batch, k, union, reps=5):
    """Median seconds of one target forward over B×(K+1) tokens at a 64-token context."""
    for layer in target.model.layers:
        if layer.enable_moe:
            layer.experts.union = union
    cache = TargetCache(target.config, batch=batch, chunk=16)
    target(mx.array(np.random.default_rng(0).integers(3, 30000, (batch, 16))), cache)
    for _ in range(3):
        target(mx.array(np.random.default_rng(1).integers(3, 30000, (batch, 16))), cache)
    times = []
    for _ in range(reps):
        tokens = mx.array(np.random.default_rng(2).integers(3, 30000, (batch, k + 1)))
        t0 = time.perf_counter()
        mx.eval(target(tokens, cache))
        times.append(time.perf_counter() - t0)
        cache.rollback(k + 1)
    for layer in target.model.layers:
        if layer.enable_moe:
            layer.experts.union = True
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    report = {}
    lines = ["| target | B | plain tok/s | MTP tok/s | speedup | tokens/round |", "|---|---|---|---|---|---|"]
    for shape in ("31b-like", "26b-a4b-like"):
        target, drafter = build(shape)
        report[shape] = {}
        for b in args.batches:
            prompts = [[2] + rng.integers(3, 30000, int(rng.integers(20, 200))).tolist() for _ in range(b)]
            plain_tps, spec_tps, tokens_per_round = [], [], []
            for rep in range(args.repeats):
                out, tps, _ = run(target, None, prompts, args.tokens, 0)
                plain_tps.append(tps)
                refs = {i: p + o for i, (p, o) in enumerate(zip(prompts, out))}
                spec, tps, rows = run(target, drafter, prompts, args.tokens, "auto", refs, seed=rep)
                assert spec == out, f"{shape} B={b}: batched speculative rows differ from plain"
                spec_tps.append(tps)
                tokens_per_round.append(np.mean([r.stats.mean_accepted_length for r in rows]))
            entry = dict(plain_tps=statistics.median(plain_tps), spec_tps=statistics.median(spec_tps),
                         speedup=statistics.median(spec_tps) / statistics.median(plain_tps),
                         tokens_per_round=float(np.mean(tokens_per_round)))
            report[shape][b] = entry
            lines.append(f"| {shape} | {b} | {entry['plain_tps']:.1f} | {entry['spec_tps']:.1f} | "
                         f"{entry['speedup']:.2f}x | {entry['tokens_per_round']:.2f} |")
            print(lines[-1], flush=True)
        if shape == "26b-a4b-like":
            costs = {}
            for b in args.batches:
                base = verify_cost(target, b, 0, True)
                costs[b] = dict(union=verify_cost(target, b, 4, True) / base,
                                per_pair=verify_cost(target, b, 4, False) / base)
            report["moe_verify_cost_ratio_K4"] = costs
    ratio = "\n".join(f"- B={b}: t(B×5)/t(B) = {c['union']:.2f} with the expert union, {c['per_pair']:.2f} without"
                      for b, c in report["moe_verify_cost_ratio_K4"].items())
    text = ("Batch mode, CPU figures (fp32, 2 cores), α = 0.7, K auto, medians of "
            f"{args.repeats} repeats, every row asserted identical to plain:\n\n" + "\n".join(lines) +
            "\n\nMoE verify cost (26b-a4b-like, K = 4):\n" + ratio + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch.json").write_text(json.dumps(report, indent=1))
    (args.out / "batch.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
