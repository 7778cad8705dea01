"""gemma-mlx bench: MTP speed-ups measured side by side (ratios in one run, same weights, same prompts, medians of
alternating repeats, token-identical output asserted), acceptance per draft position, step costs and memory.
The comparisons with mlx-lm and mlx-vlm are bench/peers.py.

No Gemma 4 weights can be downloaded here, so the targets are random-weight models at scaled-down shapes of E2B
(PLE + kv-shared + centroid drafter), 26B-A4B (MoE) and 31B (dense, k_eq_v), and the drafter runs its full
computation and then, with probability α, has its choice replaced by the target's recorded greedy continuation
(bench/controlled.py; never on the product path). Absolute tokens/s are CPU figures (fp32, 2 cores).

    python -m bench.run [--quick] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import gemma_mlx  # noqa: F401  (OpenBLAS before mlx)
from gemma_mlx import _blas
from gemma_mlx.models.gemma4_assistant import Drafter, DrafterConfig
from gemma_mlx.models.gemma4_text import Target, TextConfig
from gemma_mlx.draft_length import K_MAX, DraftLength
from gemma_mlx.decode import generate_tokens
from gemma_mlx.prefix_cache import PrefixCache
from gemma_mlx.speculative import Stats

from .controlled import ControlledDrafter
from .quiet import mark, others_since, wait_quiet

S, F = "sliding_attention", "full_attention"
# Each shape's drafter is sized so that c = (parameters a drafter step reads) / (parameters a target decode step
# reads) is its real pair's (REAL_PAIRS, within 10%: tests/test_bench_run.py). c, the verify cost and the acceptance
# set MTP's speed-up; the targets are 6-140x smaller than the real ones, and the d = 256 drafters this bench had
# before priced drafting 3.2x / 4.0x too high on E2B / 31B and 0.65x as high on 26B-A4B.
SHAPES = {
    "e2b-like": dict(target=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                                 layer_types=([S] * 3 + [F]) * 4, num_kv_shared_layers=8, use_double_wide_mlp=True,
                                 hidden_size_per_layer_input=64, vocab_size_per_layer_input=32768),
                     drafter=dict(hidden_size=112, use_ordered_embeddings=True, num_centroids=256,
                                  centroid_intermediate_top_k=32)),
    "26b-a4b-like": dict(target=dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=12,
                                     layer_types=([S] * 5 + [F]) * 2, enable_moe_block=True, num_experts=64,
                                     top_k_experts=4, moe_intermediate_size=512, hidden_size_per_layer_input=0),
                         drafter=dict(hidden_size=368, use_ordered_embeddings=False)),
    "31b-like": dict(target=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                                 layer_types=([S] * 5 + [F]) * 2, attention_k_eq_v=True,
                                 num_global_key_value_heads=2, hidden_size_per_layer_input=0),
                     drafter=dict(hidden_size=80, use_ordered_embeddings=False)),
}
COMMON = dict(vocab_size=32768, num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=256,
              sliding_window=128, final_logit_softcapping=30.0)
V = 262144
REAL_PAIRS = {  # the hub's gemma-4-E2B / 26B-A4B / 31B text configs and their -assistant drafters' (d, I, heads)
    "e2b-like": dict(target=dict(vocab_size=V, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
                                 layer_types=([S] * 4 + [F]) * 7, num_attention_heads=8, num_key_value_heads=1,
                                 head_dim=256, global_head_dim=512, sliding_window=512, num_kv_shared_layers=20,
                                 use_double_wide_mlp=True, hidden_size_per_layer_input=256,
                                 vocab_size_per_layer_input=V),
                     drafter=dict(hidden_size=256, intermediate_size=2048, num_attention_heads=4,
                                  use_ordered_embeddings=True, num_centroids=2048, centroid_intermediate_top_k=32)),
    "26b-a4b-like": dict(target=dict(vocab_size=V, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                                     layer_types=([S] * 5 + [F]) * 5, num_attention_heads=16, num_key_value_heads=8,
                                     num_global_key_value_heads=2, head_dim=256, global_head_dim=512,
                                     sliding_window=1024, attention_k_eq_v=True, enable_moe_block=True,
                                     num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                                     hidden_size_per_layer_input=0),
                         drafter=dict(hidden_size=1024, intermediate_size=8192, num_attention_heads=16,
                                      use_ordered_embeddings=False)),
    "31b-like": dict(target=dict(vocab_size=V, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60,
                                 layer_types=([S] * 5 + [F]) * 10, num_attention_heads=32, num_key_value_heads=16,
                                 num_global_key_value_heads=4, head_dim=256, global_head_dim=512, sliding_window=1024,
                                 attention_k_eq_v=True, hidden_size_per_layer_input=0),
                     drafter=dict(hidden_size=1024, intermediate_size=8192, num_attention_heads=32,
                                  use_ordered_embeddings=False)),
}


def drafter_text(target: dict, hidden_size: int = 256, intermediate_size: int | None = None,
                 num_attention_heads: int = 4) -> dict:
    """The assistant's text config for a target config dict: 4 layers [S, S, S, F], the target's KV geometry and
    sliding window; the MLP 4x the hidden size unless given."""
    return dict(vocab_size=target["vocab_size"], hidden_size=hidden_size,
                intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=4,
                num_attention_heads=num_attention_heads, num_key_value_heads=target["num_key_value_heads"],
                head_dim=target["head_dim"], global_head_dim=target["global_head_dim"], layer_types=[S, S, S, F],
                sliding_window=target["sliding_window"], attention_k_eq_v=target.get("attention_k_eq_v", False),
                num_global_key_value_heads=target.get("num_global_key_value_heads"))


def pair(target: dict, drafter: dict) -> tuple[Target, Drafter]:
    """A target and its drafter from config dicts, with random weights, lazily (nothing is allocated until evaluated:
    a real pair's shapes can be counted here)."""
    d = dict(drafter)
    text = drafter_text(target, **{k: d.pop(k) for k in ("hidden_size", "intermediate_size", "num_attention_heads")
                                   if k in d})
    tcfg = TextConfig.from_dict(target)
    return Target(tcfg), Drafter(DrafterConfig.from_dict(dict(text_config=text, backbone_hidden_size=tcfg.hidden_size,
                                                              **d)))


def step_params(model) -> int:
    """Parameters one decode step reads: a target's for one token (top-k of its experts; the PLE table is a row
    lookup), a drafter's for one draft (with the centroid head, the k_c/C of its embedding rows it scores)."""
    cfg, total = model.config, 0.0
    for name, v in tree_flatten(model.parameters()):
        if "embed_tokens_per_layer" in name or "token_ordering" in name:
            continue
        share = 1.0
        if "switch_glu" in name:
            share = cfg.top_k_experts / cfg.num_experts
        elif name == "model.embed_tokens.weight" and getattr(cfg, "use_ordered_embeddings", False):
            share = cfg.centroid_intermediate_top_k / cfg.num_centroids
        total += v.size * share
    return int(total)


def drafter_cost(target, drafter) -> float:
    """c: the parameters a drafter step reads over those a target decode step reads."""
    return step_params(drafter) / step_params(target)


def shape_configs(shape: str) -> tuple[dict, dict]:
    """The target's and the drafter's config for `pair`."""
    return {**COMMON, **SHAPES[shape]["target"]}, SHAPES[shape]["drafter"]


def build(shape: str, seed: int = 0):
    """A random-weight target and its drafter (real computation, random weights)."""
    mx.random.seed(seed)
    target, drafter = pair(*shape_configs(shape))
    if drafter.config.use_ordered_embeddings:
        perm = np.random.default_rng(seed).permutation(target.config.vocab_size).astype(np.int32)
        drafter.masked_embedding.token_ordering = mx.array(perm)
    mx.eval(target.parameters(), drafter.parameters())
    return target, drafter


def nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def decode(target, drafter, prompt, n, k, draft=None):
    """(tokens, stats, the prefix cache holding its cache) of one generation; k: an int, "auto", or 0 for plain
    decoding. `draft`: the auto draft length to use (one per configuration, kept across its runs as an engine keeps
    it across calls)."""
    draft = draft or (DraftLength() if k == "auto" else DraftLength(fixed=k))
    out, stats, kept = [], None, PrefixCache(2**40)
    for new, stats in generate_tokens(target, drafter if k else None, prompt, max_tokens=n, draft=draft,
                                      prefix_cache=kept):
        out += new
    return out, stats, kept


def step_costs(target, drafter, prompt, ks=range(1, K_MAX + 1), reps=7):
    """Median seconds of: one plain 1-token step (back to back, as plain decoding runs them), K drafter steps and one
    verify of K+1 tokens (in turn, as a round runs them: each finds the CPU caches the other left; timed back to back
    the drafter finds its weights still cached and takes 20-30% less time than in a round here). Each is synced
    alone."""
    cache = target.make_cache(1)
    _, g = target.prefill(mx.array([prompt]), cache)
    x = mx.array([[prompt[-1]]])

    def verify(k):
        mx.eval(target(mx.zeros((1, k + 1), mx.int32), cache))
        cache.rollback(k + 1)

    costs = {"plain": median_seconds([lambda: verify(0)], reps)[0]}
    for k in ks:
        costs[f"draft{k}"], costs[f"verify{k}"] = median_seconds(
            [lambda: mx.eval(drafter.draft(target, x, g, cache, k)), lambda: verify(k)], reps)
    return costs


def median_seconds(steps, reps):
    """Median seconds of each step when the steps run in turn, `reps` times."""
    times = [[] for _ in steps]
    for _ in range(reps):
        for step, t in zip(steps, times):
            t0 = time.perf_counter()
            step()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def acceptance_by_position(stats) -> list[float]:
    """Accepted / attempted drafts at each position reached, over these runs (as one run's Stats gives it)."""
    return Stats(attempted_by_position=np.sum([s.attempted_by_position for s in stats], axis=0).tolist(),
                 accepted_by_position=np.sum([s.accepted_by_position for s in stats], axis=0).tolist()
                 ).acceptance_by_position


def limit_speedup(acceptance, k, costs):
    """Expected tokens per round from measured per-position acceptance, over the measured round cost (K = 0: plain
    decoding, 1)."""
    if k == 0:
        return 1.0
    tokens = 1 + sum(np.prod(acceptance[: j + 1]) for j in range(min(k, len(acceptance))))
    return tokens * costs["plain"] / (costs[f"draft{k}"] + costs[f"verify{k}"])


def blas_ok() -> tuple[bool, float]:
    a = mx.random.normal((2048, 2048))
    mx.eval(a)
    t0 = time.perf_counter()
    mx.eval(a @ a)
    dt = time.perf_counter() - t0
    return dt < 0.5, dt


def one_repeat(shape, target, drafter, configs, auto, prompts, n_new, rep, res):
    """Plain, then every configuration, on each prompt: (plain tok/s per prompt, {config: tok/s}, {config: Stats})."""
    plain, tps, acc = [], {c: [] for c in configs}, {c: [] for c in configs}
    for p_i, prompt in enumerate(prompts):
        out, st, sess = decode(target, None, prompt, n_new, 0)
        plain.append(st.tokens_per_second)
        res["kv_bytes_plain"] = sess.nbytes
        for c in configs:
            alpha, k = c
            cd = ControlledDrafter(drafter, [prompt + out], alpha, seed=rep * 100 + p_i)
            spec_out, st, sess = decode(target, cd, prompt, n_new, k, auto.get(c))
            assert spec_out == out, f"{shape} α={alpha} K={k}: speculative output differs from plain greedy"
            tps[c].append(st.tokens_per_second)
            acc[c].append(st)
            res["kv_bytes_spec"] = sess.nbytes
    return plain, tps, acc


def run_shape(shape, alphas, ks, n_new, repeats, prompts, busy_cores=0.3, reruns=2):
    """Alternating repeats (plain and speculative runs interleaved, so drift hits both); a repeat during which other
    processes used more than `busy_cores` cores is rerun (at most `reruns` times, then kept and counted busy)."""
    target, drafter = build(shape)
    res = dict(shape=shape, target_bytes=nbytes(target), drafter_bytes=nbytes(drafter),
               drafter_cost=drafter_cost(target, drafter), configs={},
               other_processes_cores=[], busy_repeats=0)
    configs = [(a, "auto") for a in alphas] + [(0.7, k) for k in ks]
    plain_tps, tps, acc = [], {c: [] for c in configs}, {c: [] for c in configs}
    auto = {c: DraftLength() for c in configs if c[1] == "auto"}  # only a configuration's first run warms up
    for rep in range(repeats):
        for attempt in range(1 + reruns):
            start = mark()
            measured = one_repeat(shape, target, drafter, configs, auto, prompts, n_new, rep, res)
            others = others_since(start)
            if others is None or others <= busy_cores or attempt == reruns:
                break
            print(f"  {shape} repeat {rep + 1}: other processes used {others:.2f} cores, rerunning", flush=True)
        res["other_processes_cores"].append(others)
        res["busy_repeats"] += int(others is not None and others > busy_cores)
        plain_tps += measured[0]
        for c in configs:
            tps[c] += measured[1][c]
            acc[c] += measured[2][c]
    costs = step_costs(target, drafter, prompts[0])
    res["step_costs_ms"] = {k: v * 1e3 for k, v in costs.items()}
    res["plain_tps"] = statistics.median(plain_tps)
    for c in configs:
        alpha, k = c
        stats = acc[c]
        per_pos = acceptance_by_position(stats)
        # each run against the plain run of its own repeat (same prompt, minutes apart at most): the machine's
        # speed drifts by ±10% over minutes here, which a ratio of medians over all repeats would take in
        speedup = statistics.median(t / p for t, p in zip(tps[c], plain_tps))
        entry = dict(alpha=alpha, k=k, speedup=speedup, tps=statistics.median(tps[c]),
                     mean_accepted_length=float(np.mean([s.mean_accepted_length for s in stats])),
                     acceptance_by_position=per_pos, mean_k=float(np.mean([np.mean(s.k_history) for s in stats])))
        if per_pos:
            if k == "auto":  # against the best K (plain decoding, 1, included), which it should find, priced with
                # the acceptance of every run at this α (K auto seldom reaches the positions it finds do not pay, and
                # a rate from a few rounds there, 1.00 say, would price a K at what no run at this α achieved)
                at_alpha = acceptance_by_position([s for d in configs if d[0] == alpha for s in acc[d]])
                entry["limit"] = max(limit_speedup(at_alpha, j, costs) for j in range(K_MAX + 1))
            else:
                entry["limit"] = limit_speedup(per_pos, k, costs)
            entry["efficiency"] = speedup / entry["limit"]
        res["configs"][f"alpha={alpha},K={k}"] = entry
    return res, target


def table(results) -> str:
    lines = ["| shape | α | K | speedup | limit | efficiency | tokens/round | acceptance by position | tok/s (CPU) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for entry in r["configs"].values():
            lim = f"{entry['limit']:.2f}x" if entry.get("limit") else "-"
            eff = f"{entry['efficiency']:.2f}" if entry.get("efficiency") else "-"
            pos = " ".join(f"{a:.2f}" for a in entry["acceptance_by_position"][:7]) or "-"
            lines.append(f"| {r['shape']} | {entry['alpha']} | {entry['k']} (mean {entry['mean_k']:.1f}) | "
                         f"{entry['speedup']:.2f}x | {lim} | {eff} | {entry['mean_accepted_length']:.2f} | {pos} | "
                         f"{entry['tps']:.1f} vs {r['plain_tps']:.1f} |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot drawing to files, or None (said once) when the bench extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'gemma-mlx[bench]'): no plots")
        return None
    return plt


def plot(results, out: Path):
    if (plt := pyplot()) is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        ks = [(e["k"], e["speedup"]) for e in r["configs"].values() if e["alpha"] == 0.7 and e["k"] != "auto"]
        axes[0].plot([k for k, _ in ks], [s for _, s in ks], marker="o", label=r["shape"])
        auto = r["configs"].get("alpha=0.7,K=auto")
        if auto is None:
            continue
        axes[1].plot(range(1, len(auto["acceptance_by_position"]) + 1), auto["acceptance_by_position"], marker="o",
                     label=r["shape"])
    axes[0].axhline(1.0, color="gray", lw=0.5)
    axes[0].set(xlabel="draft tokens K", ylabel="speedup vs plain (fp32, CPU)", title="speedup vs K (α = 0.7)")
    axes[1].set(xlabel="draft position", ylabel="acceptance", title="acceptance per position (α = 0.7, K auto)",
                ylim=(0, 1))
    for a in axes:
        a.legend()
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, fewer tokens (a smoke run)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2, help="1: a 200-token prompt (> W); 2: plus a 40-token one")
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.0, 0.3, 0.5, 0.7, 0.9], help="α values, K auto")
    ap.add_argument("--ks", type=int, nargs="*", default=[1, 2, 4, 7], help="fixed K values (at α = 0.7)")
    ap.add_argument("--busy-cores", type=float, default=0.3,
                    help="a repeat during which other processes used more cores than this is rerun (twice at most)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    ok, dt = blas_ok()
    print(f"BLAS: {_blas.status}; 2048³ fp32 matmul {dt:.3f}s")
    if not ok and sys.platform.startswith("linux"):
        print("MLX is on the reference BLAS (2048³ matmul > 0.5 s): speed figures would be meaningless; "
              "install libopenblas0-pthread (make install does)")
        return 1
    waited = wait_quiet(args.busy_cores, 120.0)
    if waited > 5:
        print(f"waited {waited:.0f}s for other processes to use at most {args.busy_cores} cores")
    shapes = args.shapes[:1] if args.quick else args.shapes
    n_new = 24 if args.quick else args.tokens
    repeats = 1 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    prompts = [[2] + rng.integers(3, 30000, n).tolist() for n in (200, 40)][: args.prompts]
    results = []
    load_before = os.getloadavg()[0]
    for shape in shapes:
        t0 = time.time()
        r, target = run_shape(shape, alphas=args.alphas, ks=args.ks, n_new=n_new, repeats=repeats,
                              prompts=prompts[:1] if args.quick else prompts, busy_cores=args.busy_cores)
        results.append(r)
        print(f"{shape}: {time.time() - t0:.0f}s")
    report = dict(machine=f"{platform.machine()} {os.cpu_count()} cores, CPU fp32", blas=_blas.status,
                  load_before=load_before, load_after=os.getloadavg()[0],
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, results=results,
                  real_drafter_cost={s: drafter_cost(*pair(**REAL_PAIRS[s])) for s in shapes})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(report, indent=1))
    md = table(results)
    mem = "\n".join(f"- {r['shape']}: drafter/target bytes {r['drafter_bytes'] / r['target_bytes']:.3f}; c (drafter "
                    f"step / target step parameters) {r['drafter_cost']:.4f}, real pair "
                    f"{report['real_drafter_cost'][r['shape']]:.4f}; "
                    f"KV bytes plain {r['kv_bytes_plain']} vs with drafter {r['kv_bytes_spec']}" for r in results)
    quiet = "Quiet-machine check (cores used by other processes during each repeat; > " + \
        f"{args.busy_cores} reruns it, twice at most): " + "; ".join(
            f"{r['shape']} " + " ".join("?" if o is None else f"{o:.2f}" for o in r["other_processes_cores"]) +
            (f" ({r['busy_repeats']} busy)" if r["busy_repeats"] else "") for r in results)
    text = (f"CPU figures ({report['machine']}, {report['blas']}), batch 1, greedy, medians of "
            f"{repeats} alternating repeats (a speed-up: the median of each run's ratio to its repeat's plain "
            "run); every speculative run asserted token-identical to plain. K auto "
            "keeps what it measured across a configuration's runs, as an engine does across calls (the warm-up is "
            "paid in the first run only). limit: the speed-up of a zero-overhead loop with the measured acceptance by "
            "position and the measured step costs (K draft steps and a verify of K+1 tokens timed in turn, as a round "
            "runs them; a plain step), at the row's K; for K auto at the best K (K = 0, plain decoding, included) with "
            "the acceptance of every run at its α, so its efficiency also says how well it chose.\n\n"
            f"{n_new} new tokens after a {len(prompts[0])}-token prompt.\n\n"
            f"{md}\n\nMemory (peak RSS {report['peak_rss_mb']:.0f} MB):\n{mem}\n\n{quiet}\n\nPeers (mlx-lm, "
            "mlx-vlm): python -m bench.peers (peers.md).\n")
    (args.out / "speed.md").write_text(text)
    print(text)
    plot(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
