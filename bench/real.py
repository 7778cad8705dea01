"""The real pair: Gemma 3 270M (PyPI GGUF, fp32) with its distilled drafter, MTP vs plain greedy decoding on the 24
held-out prompts of gemma_mlx/demo_prompts.json (8 prose, 8 code, 8 chat).

Each prompt is decoded plain and with MTP (auto K) `--repeats` times, alternating which goes first; a speed-up is
the median MTP tokens/s over the median plain tokens/s of the same prompt in the same run; every MTP output is
asserted token-identical to plain greedy. Also: acceptance per draft position, tokens per round, per group and in
all, and the check that no prompt shares a word 6-gram with the drafter's training text (its corpus files and
prompts, as recorded in the drafter's acceptance.json). Absolute tokens/s are CPU figures.

    python -m bench.real [--tokens 96] [--repeats 3] [--groups prose code chat]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import sys
from pathlib import Path

from gemma_mlx import _blas, demo

from .run import blas_ok

NGRAM = 6


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def training_text(drafter_dir: Path) -> tuple[list[str], list[str]]:
    """(texts the drafter was trained on that are on this machine, corpus paths missing here)."""
    from gemma_mlx import corpus, distill

    report = json.loads((drafter_dir / "acceptance.json").read_text())
    paths = report.get("corpus") or []
    present = [p for p in paths if Path(p).exists()]
    from .distill_prompts import PROMPTS as DRAFTER_PROMPTS  # what the committed demo drafter was distilled on

    texts = list(distill.TRAIN_PROMPTS) + DRAFTER_PROMPTS + (corpus.documents(present) if present else [])
    return texts, [p for p in paths if p not in present]


def overlap(prompts: list, texts: list[str]) -> dict:
    """Per prompt label: how many of its word 6-grams occur in the training texts."""
    seen = set()
    for t in texts:
        seen |= ngrams(t)
    return {p.label: len(ngrams(p.text) & seen) for p in prompts}


def group_summary(results: list) -> dict:
    s = demo.summary(results)
    s["tokens_per_round"] = s.pop("mean_accepted_length")
    return s


def table(results: list, s: dict, groups: dict) -> list[str]:
    lines = ["| prompt | kind | plain tok/s (CPU) | MTP tok/s (CPU) | speed-up | tokens/round | 6-grams shared |",
             "|---|---|---|---|---|---|---|"]
    for c in results:
        lines.append(f"| {c.prompt.label} | {c.prompt.group} | {statistics.median(c.plain_tps):.1f} | "
                     f"{statistics.median(c.mtp_tps):.1f} | {c.speedup:.2f}x | "
                     f"{statistics.median(c.accepted_length):.2f} | {s['overlap'].get(c.prompt.label, '-')} |")
    lines += ["", "| group | prompts | median speed-up | tokens/round | acceptance by draft position |",
              "|---|---|---|---|---|"]
    for name, g in list(groups.items()) + [("all", s)]:
        lines.append(f"| {name} | {g['prompts']} | {g['speedup']:.2f}x | {g['tokens_per_round']:.2f} | "
                     + " ".join(f"{a:.2f}" for a in g["acceptance_by_position"]) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--groups", nargs="+", default=["prose", "code", "chat"])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    ok, dt = blas_ok()
    if not ok and sys.platform.startswith("linux"):
        print(f"MLX is on the reference BLAS (2048³ matmul {dt:.2f} s > 0.5 s): no speed figures")
        return 1
    prompts = [p for p in demo.PROMPTS if p.group in args.groups]
    texts, missing = training_text(demo.DRAFTER)
    shared = overlap(prompts, texts)
    engine = demo.load_pair()
    load_before = os.getloadavg()[0]
    results = demo.compare(engine, prompts, max_tokens=args.tokens, repeats=args.repeats,
                           on_result=lambda c: print(f"{c.speedup:.2f}x  identical={c.identical}  {c.prompt.label}",
                                                     flush=True))
    s = group_summary(results)
    s["overlap"] = shared
    groups = {g: group_summary([c for c in results if c.prompt.group == g]) for g in args.groups}
    report = dict(machine=f"{platform.machine()} {os.cpu_count()} cores, CPU fp32", blas=_blas.status,
                  load_before=load_before, load_after=os.getloadavg()[0], tokens=args.tokens, repeats=args.repeats,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, summary=s, groups=groups,
                  corpus_missing=missing,
                  per_prompt=[dict(label=c.prompt.label, group=c.prompt.group, identical=c.identical,
                                   speedup=c.speedup, plain_tps=c.plain_tps, mtp_tps=c.mtp_tps,
                                   accepted_length=c.accepted_length, attempted=c.attempted, accepted=c.accepted)
                              for c in results])
    assert s["identical"], "MTP output differs from plain greedy"
    check = (f"no prompt shares a word {NGRAM}-gram with the training text" if not any(shared.values()) else
             f"{sum(1 for v in shared.values() if v)} prompts share word {NGRAM}-grams with the training text")
    if missing:
        check += f" (corpus files not on this machine, unchecked: {', '.join(missing)})"
    lines = [f"Gemma 3 270M (Q4_K_M GGUF dequantized to fp32) + distilled drafter (4-bit): CPU figures "
             f"({report['machine']}, {report['blas']}), batch 1, greedy, auto K, {s['prompts']} held-out prompts × "
             f"{args.tokens} tokens, medians of {args.repeats} alternating repeats; every MTP output token-identical "
             f"to plain; {check}; load {load_before:.1f} → {report['load_after']:.1f}; peak RSS "
             f"{report['peak_rss_mb']:.0f} MB.", ""] + table(results, s, groups)
    lines += ["", f"Median speed-up {s['speedup']:.2f}x (plain {s['plain_tps']:.1f} → MTP {s['mtp_tps']:.1f} tok/s), "
              f"{s['tokens_per_round']:.2f} tokens/round."]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real.json").write_text(json.dumps(report, indent=1))
    (args.out / "real.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
