"""Batch-mode bench: aggregate tokens/s of speculative vs plain batched decoding at B = 1, 2, 4, 8 for a dense and an
MoE target, with a drafter of controlled acceptance α = 0.7 (bench/controlled.py), and the MoE verify-cost ratio
t(B×(K+1) tokens) / t(B tokens) with and without the expert-union path (gemma_mlx/models/moe.py).

Random-weight targets at scaled-down shapes (hidden 1024, 8 layers; the MoE one 32 experts, top 4), fp32. Absolute
numbers are CPU figures; ratios come from one run (plain and speculative alternate, medians of the repeats), and
every speculative row is asserted identical to its plain row. Writes batch.json and batch.md to --out.

    python -m bench.batch [--tokens 32] [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import gemma_mlx  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np

from gemma_mlx import _blas
from gemma_mlx.decode import Decoder
from gemma_mlx.draft_length import DraftLength
from gemma_mlx.models.moe import Experts

from .controlled import ControlledDrafter
from .run import pair, pyplot

S, F = "sliding_attention", "full_attention"
COMMON = dict(vocab_size=32768, hidden_size=1024, num_hidden_layers=8, layer_types=[S, S, S, F] * 2,
              num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=256, sliding_window=128,
              final_logit_softcapping=30.0, hidden_size_per_layer_input=0)
TARGETS = {
    "dense": dict(intermediate_size=4096),
    "moe": dict(intermediate_size=1024, enable_moe_block=True, num_experts=32, top_k_experts=4,
                moe_intermediate_size=512),
}
# The drafters' hidden sizes give c (bench/run.py's drafter_cost) of the real pair each target stands for.
DRAFTERS = {"dense": dict(hidden_size=56, real="31b-like"), "moe": dict(hidden_size=288, real="26b-a4b-like")}
ALPHA, VERIFY_K = 0.7, 3


def target_configs(name: str) -> tuple[dict, dict]:
    """The target's and the drafter's config for `pair`."""
    return {**COMMON, **TARGETS[name]}, dict(hidden_size=DRAFTERS[name]["hidden_size"])


def build(name: str, seed: int = 0):
    """A random-weight target and a drafter for it (4 layers: the real computation, random weights)."""
    mx.random.seed(seed)
    target, drafter = pair(*target_configs(name))
    mx.eval(target.parameters(), drafter.parameters())
    return target, drafter


def decode(target, drafter, prompts, n_new, references=None, seed=0):
    """Decode all prompts as one batch: (tokens per row, aggregate decode tokens/s, rows). drafter None = plain."""
    decoder = Decoder(target, None, draft=DraftLength(fixed=0))
    if drafter is not None:
        decoder.drafter = ControlledDrafter(drafter, lambda: [references[r.id] for r in decoder.rows], ALPHA, seed)
        decoder.draft = DraftLength()
    rows = [decoder.add(p, n_new) for p in prompts]
    t0 = time.perf_counter()
    while decoder.rows:
        decoder.step()
    seconds = time.perf_counter() - t0
    return [r.tokens for r in rows], sum(len(r.tokens) - 1 for r in rows) / seconds, rows  # first token: prefill


class PerPairExperts(Experts):
    """mlx-lm's per-pair path (one product per token and expert), what the expert-union path is compared with."""

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        return (self.switch_glu(x, indices) * weights[..., None]).sum(-2)


def set_union(target, on: bool):
    for layer in target.model.layers:
        if layer.enable_moe:
            layer.experts.__class__ = Experts if on else PerPairExperts


def verify_costs(target, batch: int, k: int, reps: int):
    """Median seconds of one target forward over B tokens and over B×(K+1) tokens (a 64-token context), for the
    expert-union path and mlx-lm's per-pair path; the four are measured interleaved."""
    rng = np.random.default_rng(batch)
    cache = target.make_cache(batch=batch, chunk=64)
    mx.eval(target(mx.array(rng.integers(3, 30000, (batch, 64))), cache))
    times = {(union, t): [] for union in (True, False) for t in (1, k + 1)}
    for rep in range(reps + 1):
        for (union, t), seen in times.items():
            set_union(target, union)
            tokens = mx.array(rng.integers(3, 30000, (batch, t)))
            t0 = time.perf_counter()
            mx.eval(target(tokens, cache))
            if rep:  # the first pass warms up
                seen.append(time.perf_counter() - t0)
            cache.rollback(t)
    set_union(target, True)
    med = {key: statistics.median(v) for key, v in times.items()}
    return {("union" if union else "per_pair"): dict(t_b=med[union, 1], t_verify=med[union, k + 1],
                                                   ratio=med[union, k + 1] / med[union, 1]) for union in (True, False)}


def plot(decode: dict, path: Path):
    """Speed-up vs batch size, a line per target (`decode`: report["decode"], as written to batch.json)."""
    if (plt := pyplot()) is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, rows in decode.items():
        bs = sorted(rows, key=int)
        ax.plot([int(b) for b in bs], [rows[b]["speedup"] for b in bs], marker="o", label=name)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set(xlabel="batch size B", ylabel="MTP speed-up vs plain (fp32, CPU)", xticks=[1, 2, 4, 8],
           xticklabels=["1", "2", "4", "8"], title=f"speed-up vs batch size (α = {ALPHA}, K auto)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    report = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), blas=_blas.status,
                               load_average_at_start=os.getloadavg()),
                  settings=dict(dtype="fp32", alpha=ALPHA, draft_tokens="auto", new_tokens=args.tokens,
                                repeats=args.repeats, targets={k: {**COMMON, **v} for k, v in TARGETS.items()},
                                drafters=DRAFTERS),
                  decode={}, moe_verify_cost={})
    lines = ["| target | B | plain tok/s (CPU) | MTP tok/s (CPU) | speed-up | tokens/round | mean K |",
             "|---|---|---|---|---|---|---|"]
    print(lines[0] + "\n" + lines[1], flush=True)
    for name in TARGETS:
        target, drafter = build(name)
        report["decode"][name] = {}
        for b in args.batches:
            prompts = [[2] + rng.integers(3, 30000, int(rng.integers(8, 48))).tolist() for _ in range(b)]
            plain_tps, spec_tps, per_round, ks = [], [], [], []
            for rep in range(args.repeats):
                out, tps, _ = decode(target, None, prompts, args.tokens)
                plain_tps.append(tps)
                refs = {i: p + o for i, (p, o) in enumerate(zip(prompts, out))}
                spec, tps, rows = decode(target, drafter, prompts, args.tokens, refs, seed=rep)
                assert spec == out, f"{name} B={b}: batched speculative rows differ from plain"
                spec_tps.append(tps)
                per_round.append(np.mean([r.stats.mean_accepted_length for r in rows]))
                ks.append(np.mean([k for r in rows for k in r.stats.k_history]))
            entry = dict(plain_tps=statistics.median(plain_tps), spec_tps=statistics.median(spec_tps),
                         speedup=statistics.median(s / p for s, p in zip(spec_tps, plain_tps)),
                         tokens_per_round=float(np.mean(per_round)), mean_k=float(np.mean(ks)),
                         plain_tps_runs=plain_tps, spec_tps_runs=spec_tps)
            report["decode"][name][b] = entry
            lines.append(f"| {name} | {b} | {entry['plain_tps']:.1f} | {entry['spec_tps']:.1f} | "
                         f"{entry['speedup']:.2f}x | {entry['tokens_per_round']:.2f} | {entry['mean_k']:.1f} |")
            print(lines[-1], flush=True)
        if target.config.enable_moe_block:
            report["moe_verify_cost"] = {b: verify_costs(target, b, VERIFY_K, max(args.repeats, 5))
                                         for b in args.batches}
        del target, drafter
    cost_lines = [f"| B | t(B) union | t(B×{VERIFY_K + 1}) union | ratio union | t(B) per-pair | "
                  f"t(B×{VERIFY_K + 1}) per-pair | ratio per-pair |", "|---|---|---|---|---|---|---|"]
    for b, c in report["moe_verify_cost"].items():
        u, p = c["union"], c["per_pair"]
        cost_lines.append(f"| {b} | {u['t_b'] * 1e3:.0f} ms | {u['t_verify'] * 1e3:.0f} ms | {u['ratio']:.2f} | "
                          f"{p['t_b'] * 1e3:.0f} ms | {p['t_verify'] * 1e3:.0f} ms | {p['ratio']:.2f} |")
    report["seconds"] = time.perf_counter() - started
    report["machine"]["load_average_at_end"] = os.getloadavg()  # other processes skew CPU figures: look here
    text = (f"Batch mode: CPU figures ({platform.machine()}, {os.cpu_count()} cores, fp32, {_blas.status}); "
            f"α = {ALPHA}, K auto, {args.tokens} new tokens per row, medians of {args.repeats} alternating repeats, "
            "every speculative row asserted identical to plain.\n\n" + "\n".join(lines) +
            f"\n\nMoE verify cost, one target forward at K = {VERIFY_K} (medians, interleaved):\n\n" +
            "\n".join(cost_lines) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch.json").write_text(json.dumps(report, indent=1))
    (args.out / "batch.md").write_text(text)
    plot(report["decode"], args.out / "batch.png")
    print("\n" + text)
    print(f"({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
