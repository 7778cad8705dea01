"""An agent trace on the demo pair: a conversation resent whole every turn, as agents do, its history growing past
2,000 tokens; time to first token per turn with the server's prefix cache and without (same weights, same turns,
one run), and whether both give the same replies. Absolute seconds are CPU figures.

    python -m bench.agent [--turns 10] [--reply 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gemma_mlx
from gemma_mlx import demo
from gemma_mlx.decode import Decoder
from gemma_mlx.draft_length import DraftLength
from gemma_mlx.prefix_cache import PrefixCache

TURN = ("Here is the next part of the log file I am reading, line by line: the service started, it read its "
        "configuration, it opened the database, it listened on port 8080, it answered {n} requests, and then it "
        "wrote a warning about a slow disk and a second warning about memory. Summarise what happened so far, and "
        "say whether anything needs attention before the next part arrives. ")


def conversation(engine, turns: int, reply: int, cache: PrefixCache | None) -> list[dict]:
    """Every turn resends the whole conversation; returns per turn: prompt tokens, prefilled tokens, TTFT, reply."""
    messages, out = [], []
    decoder = Decoder(engine.target, engine.drafter, draft=DraftLength(fixed=2), eos_ids=engine.eos_ids,
                      tokenizer=engine.tokenizer, chunk=engine.chunk, prefix_cache=cache)
    for n in range(turns):
        messages.append({"role": "user", "content": TURN.format(n=100 * (n + 1)) * 2})
        row = decoder.add(engine.encode(messages), reply)
        while decoder.rows:
            decoder.step()
        out.append(dict(prompt_tokens=len(row.prompt), prefilled=row.stats.prefill_tokens,
                        ttft=round(row.stats.prefill_seconds, 3), reply=row.tokens))
        messages.append({"role": "assistant", "content": row.stream.text})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--reply", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    engine = demo.load_pair()
    gemma_mlx.generate(engine, "warm up", max_tokens=4, reuse_cache=False)
    cold = conversation(engine, args.turns, args.reply, None)
    warm = conversation(engine, args.turns, args.reply, PrefixCache(2**30))
    lines = ["| turn | prompt tokens | TTFT cold (s, CPU) | prefilled with the cache | TTFT with the cache (s, CPU) | "
             "same reply |", "|---|---|---|---|---|---|"]
    for i, (c, w) in enumerate(zip(cold, warm)):
        lines.append(f"| {i + 1} | {c['prompt_tokens']} | {c['ttft']:.2f} | {w['prefilled']} | {w['ttft']:.2f} | "
                     f"{'yes' if c['reply'] == w['reply'] else 'NO'} |")
    ratio = warm[-1]["ttft"] / warm[0]["ttft"]
    lines.append(f"\nturn {args.turns} TTFT / turn 1 TTFT with the cache: {ratio:.2f}x "
                 f"(without: {cold[-1]['ttft'] / cold[0]['ttft']:.2f}x)")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "agent.md").write_text("\n".join(lines) + "\n")
    (args.out / "agent.json").write_text(json.dumps(dict(cold=cold, warm=warm), indent=1))


if __name__ == "__main__":
    main()
