"""The real pair: Gemma 3 270M (PyPI GGUF, fp32) with its distilled drafter, MTP vs plain greedy decoding.

8 varied prompts × 128 new tokens, medians of alternating repeats (plain, MTP, plain, MTP, ...), every MTP output
asserted token-identical to plain greedy, acceptance per draft position. Absolute tokens/s are CPU figures.

    python -m bench.real [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
from pathlib import Path

from gemma_mlx import _blas, demo

from .run import blas_ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=len(demo.PROMPTS))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    ok, dt = blas_ok()
    if not ok and sys.platform.startswith("linux"):
        print(f"MLX is on the reference BLAS (2048³ matmul {dt:.2f} s > 0.5 s): no speed figures")
        return 1
    engine = demo.load_pair()
    load_before = os.getloadavg()[0]
    results = demo.compare(engine, demo.PROMPTS[: args.prompts], max_tokens=args.tokens, repeats=args.repeats,
                           on_result=lambda c: print(f"{c.speedup:.2f}x  identical={c.identical}  {c.prompt[:40]!r}"))
    s = demo.summary(results)
    report = dict(machine=f"{platform.machine()} {os.cpu_count()} cores, CPU fp32", blas=_blas.status,
                  load_before=load_before, load_after=os.getloadavg()[0], tokens=args.tokens, repeats=args.repeats,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, summary=s,
                  per_prompt=[dict(prompt=c.prompt, identical=c.identical, speedup=c.speedup, plain_tps=c.plain_tps,
                                   mtp_tps=c.mtp_tps, accepted_length=c.accepted_length) for c in results])
    assert s["identical"], "MTP output differs from plain greedy"
    lines = [f"Gemma 3 270M (Q4_K_M GGUF dequantized to fp32) + distilled drafter: CPU figures ({report['machine']}, "
             f"{report['blas']}), batch 1, greedy, {s['prompts']} prompts × {args.tokens} tokens, medians of "
             f"{args.repeats} alternating repeats; every MTP output token-identical to plain "
             f"(load {load_before:.1f} → {report['load_after']:.1f}).", "",
             "| prompt | plain tok/s (CPU) | MTP tok/s (CPU) | speed-up | tokens/round |", "|---|---|---|---|---|"]
    for c, p in zip(results, report["per_prompt"]):
        lines.append(f"| {c.prompt[:36]!r} | {min(c.plain_tps):.1f}–{max(c.plain_tps):.1f} | "
                     f"{min(c.mtp_tps):.1f}–{max(c.mtp_tps):.1f} | {c.speedup:.2f}x | "
                     f"{sum(c.accepted_length) / len(c.accepted_length):.2f} |")
    lines += ["", f"Median speed-up {s['speedup']:.2f}x (plain {s['plain_tps']:.1f} → MTP {s['mtp_tps']:.1f} tok/s), "
              f"mean accepted length {s['mean_accepted_length']:.2f} tokens/round, acceptance by draft position "
              + " ".join(f"{a:.2f}" for a in s["acceptance_by_position"]) + "."]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real.json").write_text(json.dumps(report, indent=1))
    (args.out / "real.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
