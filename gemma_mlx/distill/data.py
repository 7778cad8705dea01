"""Step 2: the training data: the target's own continuations and corpus windows, teacher-forced, in shards on disk."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .options import (GENERATION_BATCH, GENERATION_SHARE, PREFIX, WINDOW, DistillError, Prepared, Reporter,
                      _save_arrays, _write_json)


@dataclass
class Batch:
    """Teacher-forced target passes over B sequences padded to N (padding is never attended: masks are causal)."""

    tokens: mx.array  # [B, N] int32
    lengths: mx.array  # [B] int32
    labels: mx.array  # [B, N] int32, the target's argmax at each position (its next token)
    hidden: mx.array  # [B, N, H] final-norm hiddens
    kv: dict  # layer type -> (K, V), each [B, kv_heads, N, head_dim]: the producer layers' cache

    def arrays(self) -> dict:
        """What a shard holds: hidden and K/V in float16 (half the disk; training computes in float32)."""
        out = dict(tokens=self.tokens, lengths=self.lengths, labels=self.labels, hidden=self.hidden)
        for t, (k, v) in self.kv.items():
            out[f"k.{t}"], out[f"v.{t}"] = k, v
        return {n: a.astype(mx.float16) if mx.issubdtype(a.dtype, mx.floating) else a for n, a in out.items()}

    @classmethod
    def from_arrays(cls, a: dict) -> "Batch":
        a = {n: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x for n, x in a.items()}
        kv = {name[2:]: (a[name], a["v." + name[2:]]) for name in a if name.startswith("k.")}
        return cls(a["tokens"], a["lengths"], a["labels"], a["hidden"], kv)

    @classmethod
    def load(cls, path: Path) -> "Batch":
        return cls.from_arrays(mx.load(str(path)))

    @property
    def positions(self) -> int:
        return int(self.lengths.sum())


def teacher_force(target, seqs: list[list[int]], greedy_from: list[int] | None = None) -> Batch:
    """One target forward over the sequences (padded with 0 at the end). `greedy_from`: where each sequence's greedy
    continuation starts (its prompt length). Greedy decoding emitted the target's argmax, so from the position before
    it on a label is the sequence's next token, and the 262k-row head runs only at the other positions (the prompt's,
    and the last)."""
    N = max(map(len, seqs))
    tokens = mx.array([s + [0] * (N - len(s)) for s in seqs], dtype=mx.int32)
    cache = target.make_cache(len(seqs), chunk=N)  # rings of W + N slots: positions 0…N−1 sit in slots 0…N−1
    hidden = target.model(tokens, cache)
    labels = np.zeros((len(seqs), N), np.int32)
    unknown = np.zeros((len(seqs), N), bool)
    for b, s in enumerate(seqs):
        unknown[b, : len(s)] = True
        if greedy_from is not None:
            start = max(greedy_from[b] - 1, 0)
            labels[b, start : len(s) - 1] = s[start + 1 :]
            unknown[b, start : len(s) - 1] = False
    labels[unknown] = head_argmax(target, hidden.reshape(-1, hidden.shape[-1]), np.nonzero(unknown.reshape(-1))[0])
    kv = {}
    for t in sorted(set(target.config.layer_types)):
        k, v = cache.producer(t).view()
        kv[t] = (k[..., :N, :], v[..., :N, :])
    batch = Batch(tokens, mx.array([len(s) for s in seqs], dtype=mx.int32), mx.array(labels), hidden, kv)
    mx.eval(batch.arrays())
    return batch


def head_argmax(target, hidden: mx.array, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """The target's argmax token at these rows of hidden [P, H], a chunk of rows at a time (each chunk's logits are
    chunk × V floats)."""
    out = [mx.argmax(target.logits(hidden[mx.array(rows[i : i + chunk].astype(np.int32))][None]), axis=-1)[0]
           for i in range(0, len(rows), chunk)]
    return np.concatenate([np.array(o) for o in out]) if out else np.zeros(0, np.int32)


def encode_prompts(engine, prompts: list[str], chat: bool = True) -> list[list[int]]:
    """Chat-wrapped when asked and the tokenizer has a chat template, raw otherwise."""
    chat = chat and getattr(engine.tokenizer, "chat_template", None)
    return [engine.encode([{"role": "user", "content": p}] if chat else p) for p in prompts]


def corpus_prompts(run: "Prepared") -> list[list[int]]:
    """Openings of corpus windows (their first PREFIX tokens) for the target to continue: as many varied prompts as
    generated sequences, in the corpus's registers (none without a corpus), from the end of the shuffled windows,
    which the corpus phase reaches last."""
    if not run.documents:
        return []
    return [w[:PREFIX] for w in run.windows[::-1][: run.opts.samples]]


def training_prompts(engine, prompts: list[str]) -> list[list[int]]:
    """Every prompt raw (text to continue) and, when the tokenizer has a chat template, chat-wrapped too: the drafter
    serves both `generate --raw` and chat turns."""
    raw = encode_prompts(engine, prompts, chat=False)
    chat = encode_prompts(engine, prompts) if getattr(engine.tokenizer, "chat_template", None) else []
    return raw + chat


def held_out_prompts(engine, prompts: list[str]) -> list[list[int]]:
    """The held-out prompts, every other one chat-wrapped (when there is a chat template): both uses measured, at
    the cost of one run per prompt."""
    raw, chat = encode_prompts(engine, prompts, chat=False), encode_prompts(engine, prompts)
    return [chat[i] if i % 2 else raw[i] for i in range(len(prompts))]


TEMPERATURES = (0.0, 0.0, 0.0, 0.8)  # generation batch b at TEMPERATURES[b % 4]: mostly greedy, as decoding is


def generation_picks(n_prompts: int, b: int, size: int, seed: int) -> tuple[list[int], float]:
    """(prompt indices, temperature) of generation batch b. The batches of one temperature walk the shuffled prompts
    together, so greedy batches repeat a prompt (and its identical greedy text) only after every prompt had its turn."""
    order = np.random.default_rng(seed).permutation(n_prompts)
    cycle, slot = divmod(b, len(TEMPERATURES))
    same = [i for i, t in enumerate(TEMPERATURES) if t == TEMPERATURES[slot]]
    turn = cycle * len(same) + same.index(slot)
    return [int(order[(turn * size + i) % n_prompts]) for i in range(size)], TEMPERATURES[slot]


def generate_batch_sequences(engine, prompt_ids: list[list[int]], b: int, size: int, max_new: int,
                             seed: int) -> list[tuple[list[int], int | None]]:
    """Generation batch b: `size` prompts continued by the target (`generation_picks`), as (sequence, where its
    greedy continuation starts; None when sampled)."""
    from ..generate import generate_batch

    idx, temp = generation_picks(len(prompt_ids), b, size, seed)
    picks = [prompt_ids[i] for i in idx]
    # sampled with Gemma's recommended top-k 64 and top-p 0.95 (the top-k also spares sampling a full-vocabulary sort)
    results = generate_batch(engine, picks, max_tokens=max_new, temperature=temp, top_p=0.95, top_k=64,
                             draft_tokens=0, seed=[(seed * 100_003 + b) * 1_000 + i for i in range(len(picks))])
    return [(p + r.tokens, len(p) if temp == 0 else None) for p, r in zip(picks, results)]


def shard_paths(work: Path, state: dict) -> list[Path]:
    return [work / "data" / f"batch-{i:05d}.safetensors" for i in range(state["data_batches"])]


def save_shard(work: Path, state: dict, batch: Batch):
    _save_arrays(work / "data" / f"batch-{state['data_batches']:05d}.safetensors", batch.arrays())
    state["data_batches"] += 1
    state["data_positions"] = state.get("data_positions", 0) + batch.positions


def collect_data(run: Prepared, work: Path, state: dict, deadline, report: Reporter) -> list[Path]:
    """The data shards: the saved ones, then the target's continuations (`collect_generated`) and the corpus
    windows (`collect_corpus`) still missing. A --resume with a larger --samples or --corpus-tokens adds the
    difference."""
    share = run.opts.data_share
    data_deadline = None if deadline is None else run.started + share * (deadline - run.started)
    gen_deadline = data_deadline
    if deadline is not None and run.opts.corpus:
        gen_deadline = run.started + min(share, GENERATION_SHARE) * (deadline - run.started)
    collect_generated(run, work, state, gen_deadline, report)
    if run.opts.corpus:
        collect_corpus(run, work, state, data_deadline, report)
    state["data_done"] = True
    _write_json(work / "state.json", state)
    if not state["data_batches"]:
        raise DistillError("no training data could be made in the time budget: raise --time-budget")
    return shard_paths(work, state)


def collect_generated(run: Prepared, work: Path, state: dict, deadline, report: Reporter):
    """Generation batch by generation batch (each teacher-forced and saved) until --samples sequences or the
    deadline."""
    opts, engine, gen_size = run.opts, run.engine, GENERATION_BATCH
    total = -(-opts.samples // gen_size)
    if state["gen_batches"] >= total:
        return
    if run.documents:
        report.phase("reading the corpus")  # its windows' openings are prompts too
    prompt_ids = training_prompts(engine, run.train_prompts) + corpus_prompts(run)
    report.phase("generating the target's own text (greedy and sampled), teacher-forced", total=total)
    report.advance(state["gen_batches"])
    while state["gen_batches"] < total:
        if deadline is not None and time.perf_counter() > deadline:
            report.note(f"generation stopped by the time budget after {state['gen_batches']} batches")
            break
        b, t1 = state["gen_batches"], time.perf_counter()
        seqs = generate_batch_sequences(engine, prompt_ids, b, min(gen_size, opts.samples - b * gen_size),
                                        opts.max_new_tokens, opts.seed)
        seqs.sort(key=lambda s: len(s[0]))  # similar lengths share a training batch: little padding
        for s in range(0, len(seqs), opts.batch_size):
            part = seqs[s : s + opts.batch_size]
            greedy = None if any(g is None for _, g in part) else [g for _, g in part]
            save_shard(work, state, teacher_force(engine.target, [q for q, _ in part], greedy))
        state["gen_batches"] += 1
        state["gen_positions"] = state.get("gen_positions", 0) + sum(len(q) for q, _ in seqs)
        state["gen_seconds"] = state.get("gen_seconds", 0.0) + time.perf_counter() - t1
        _write_json(work / "state.json", state)
        report.advance(1, tokens=state["data_positions"], tokens_per_s=state["gen_positions"] / state["gen_seconds"])


def collect_corpus(run: Prepared, work: Path, state: dict, deadline, report: Reporter):
    """Corpus windows (shuffled with the seed, so a resume finds the same order), teacher-forced a batch at a time,
    until --corpus-tokens positions or the deadline."""
    opts, engine = run.opts, run.engine
    done = state.get("corpus_positions", 0)
    if done >= opts.corpus_tokens:
        return
    report.phase("reading the corpus")
    wins = run.windows
    state.setdefault("corpus_windows", 0)
    report.phase(f"teacher-forcing the corpus ({len(wins)} windows of <= {WINDOW} tokens)", total=opts.corpus_tokens)
    report.advance(done)
    t0, start = time.perf_counter(), done
    while done < opts.corpus_tokens and state["corpus_windows"] < len(wins):
        if deadline is not None and time.perf_counter() > deadline:
            report.note(f"corpus stopped by the time budget after {done} positions")
            break
        i, t1 = state["corpus_windows"], time.perf_counter()
        seqs = sorted(wins[i : i + opts.batch_size], key=len)
        batch = teacher_force(engine.target, seqs)
        save_shard(work, state, batch)
        state["corpus_windows"] += len(seqs)
        state["corpus_positions"] = done = done + batch.positions
        state["corpus_seconds"] = state.get("corpus_seconds", 0.0) + time.perf_counter() - t1
        _write_json(work / "state.json", state)
        rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
        report.advance(batch.positions, tokens_per_s=rate)
        if state["data_batches"] % 25 == 0:
            report.note(f"corpus: {done} of {opts.corpus_tokens} positions, {rate:.0f} tokens/s")
    if state["corpus_windows"] >= len(wins) and done < opts.corpus_tokens:
        report.note(f"the corpus holds {done} positions, fewer than --corpus-tokens {opts.corpus_tokens}")
