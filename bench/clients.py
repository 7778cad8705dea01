"""Concurrent clients against `gemma-mlx serve` on the demo pair: aggregate completion tokens/s at 1, 4 and 8
clients, MTP and plain decoding in the same run on the same server and weights (plain = the request's
`"mtp": false`), alternating repeats, medians; acceptance per draft position of the MTP requests, and the process's
peak memory. Every MTP reply is checked against the plain reply to the same prompt (greedy: they must be equal).
Tokens/s are CPU figures.

    python -m bench.clients [--clients 1 4 8] [--requests 2] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import resource
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx2 as httpx

from gemma_mlx import demo
from gemma_mlx.draft_length import K_MAX
from gemma_mlx.server import build_app


def start(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", srv, thread


def wave(url: str, prompts: list, clients: int, requests: int, tokens: int, mtp: bool) -> dict:
    """`clients` threads, each sending `requests` chat requests one after another; aggregate tokens/s."""
    def client(c):
        out = []
        for r in range(requests):
            prompt = prompts[(c * requests + r) % len(prompts)]
            body = {"model": "demo", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                    "temperature": 0, "mtp": mtp}
            reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=600).json()
            out.append((prompt, reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"],
                        reply["mtp"]))
        return out

    t0 = time.perf_counter()
    with futures.ThreadPoolExecutor(clients) as pool:
        replies = [r for rs in pool.map(client, range(clients)) for r in rs]
    seconds = time.perf_counter() - t0
    return dict(tokens_per_second=sum(r[2] for r in replies) / seconds, replies=replies)


def acceptance(replies: list) -> list:
    """Pooled over the MTP replies, by draft position: the mean of the per-request rates, weighted by rounds."""
    rows = [(r[3]["acceptance_by_position"], r[3]["rounds"]) for r in replies]
    out = []
    for j in range(K_MAX):
        pairs = [(a[j], n) for a, n in rows if j < len(a) and a[j] is not None]
        out.append(round(sum(a * n for a, n in pairs) / sum(n for _, n in pairs), 3) if pairs else None)
    return out


def run(url: str, prompts: list, clients: list, requests: int, tokens: int, repeats: int) -> list[dict]:
    rows = []
    for c in clients:
        plain, spec, same, spec_replies = [], [], True, []
        for rep in range(repeats):
            order = (False, True) if rep % 2 == 0 else (True, False)  # alternate which goes first
            got = {m: wave(url, prompts, c, requests, tokens, m) for m in order}
            plain.append(got[False]["tokens_per_second"])
            spec.append(got[True]["tokens_per_second"])
            texts = {p: t for p, t, _, _ in got[False]["replies"]}
            same = same and all(texts[p] == t for p, t, _, _ in got[True]["replies"])
            spec_replies += got[True]["replies"]
        ratios = [s / p for s, p in zip(spec, plain)]
        rows.append(dict(clients=c, plain_tokens_per_second=round(statistics.median(plain), 1),
                         mtp_tokens_per_second=round(statistics.median(spec), 1),
                         speedup=round(statistics.median(ratios), 3), identical=same,
                         tokens_per_round=round(statistics.mean(r[3]["mean_accepted_length"] for r in spec_replies), 2),
                         acceptance_by_position=acceptance(spec_replies)))
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict], peak_mb: float, args) -> str:
    lines = [f"Demo pair (Gemma 3 270M fp32 + the committed drafter) served by `gemma-mlx serve` (max batch 8, K "
             f"auto), {args.requests} requests per client of {args.tokens} tokens at temperature 0, chat prompts from "
             f"gemma_mlx/demo_prompts.json; medians of {args.repeats} alternating repeats; CPU tokens/s, this "
             f"machine's 2 cores; peak RSS {peak_mb:.0f} MB.", "",
             "| clients | plain tok/s | MTP tok/s | MTP / plain | tokens per round | acceptance by position | "
             "MTP = plain |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = " / ".join(f"{a:.2f}" for a in r["acceptance_by_position"] if a is not None)
        lines.append(f"| {r['clients']} | {r['plain_tokens_per_second']:.1f} | {r['mtp_tokens_per_second']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['tokens_per_round']:.2f} | {acc} | "
                     f"{'yes' if r['identical'] else 'NO'} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    engine = demo.load_pair()
    app = build_app(engine, "demo", max_batch=8)
    url, srv, thread = start(app)
    prompts = [p.text for p in demo.PROMPTS if p.group == "chat"]
    try:
        wave(url, prompts, 1, 1, 8, True)  # warm-up: compile the draft steps, calibrate K auto a little
        rows = run(url, prompts, args.clients, args.requests, args.tokens, args.repeats)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        app.state.scheduler.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = table(rows, peak_mb, args)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clients.md").write_text(text + "\n")
    (args.out / "clients.json").write_text(json.dumps(dict(rows=rows, peak_rss_mb=round(peak_mb), **vars(args)),
                                                      indent=1, default=str))


if __name__ == "__main__":
    main()
