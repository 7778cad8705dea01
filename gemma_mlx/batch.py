"""Batch mode: speculative rounds for several sequences at once, with ragged acceptance.

Every row has its own length, so its own RoPE offsets, masks and rollback (cache.py keeps lengths per row), and a
round is the same `Round` as batch 1: one drafter pass per draft step for all rows, one target forward over
B×(K+1) tokens, per-row acceptance. Rows join between rounds (prefilled alone, then merged into the batch cache)
and leave when they finish (EOS, stop string, max_tokens), which is what a server needs. K is shared by the batch
and chosen by the same rule as batch 1 on the batch's measured round times (more rows make verification relatively
cheaper, and with MoE targets the expert union grows slower than the tokens).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from .cache import TargetCache
from .drafter import Drafter
from .sampling import SamplingParams, verify_choices
from .speculative import DraftLength, Round, Stats
from .target import Target


@dataclass
class Row:
    id: int
    prompt: list
    max_tokens: int
    stops: tuple = ()
    tokens: list = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    finish_reason: Optional[str] = None


class BatchDecoder:
    """Add rows, step rounds, collect finished rows."""

    def __init__(self, target: Target, drafter: Drafter | None, params: SamplingParams = SamplingParams(),
                 draft: DraftLength | None = None, eos_ids=frozenset(), tokenizer=None, chunk: int = 256,
                 seed: int | None = None):
        self.target, self.drafter, self.params, self.eos_ids = target, drafter, params, frozenset(eos_ids)
        self.draft = draft or DraftLength(fixed=0 if drafter is None else None)
        self.tokenizer, self.chunk = tokenizer, chunk
        self.cache = TargetCache(target.config, batch=0, chunk=chunk)
        self.rows: list[Row] = []
        self.x = self.g = None
        self.key = mx.random.key(seed if seed is not None else int(time.time_ns() % 2**31))
        self.ids = itertools.count()

    def _next_key(self):
        self.key, sub = mx.random.split(self.key)
        return sub

    def add(self, prompt: list[int], max_tokens: int, stops=()) -> Row:
        """Prefill a new row alone and merge it into the batch (between rounds)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        row = Row(next(self.ids), [int(t) for t in prompt], max_tokens, tuple(s for s in stops if s))
        row.stats.prompt_tokens = row.stats.prefill_tokens = len(row.prompt)
        t0 = time.perf_counter()
        cache = TargetCache(self.target.config, batch=1, chunk=self.chunk)
        logits, hidden = self.target.prefill(mx.array([row.prompt]), cache)
        _, first = verify_choices(logits, mx.zeros((1, 0), mx.int32), self.params, self._next_key())
        first = first.astype(mx.int32)
        row.stats.prefill_seconds = time.perf_counter() - t0
        if not self._emit(row, [int(first.item())]):
            self.cache.extend_rows(cache)
            self.x = first if self.x is None else mx.concatenate([self.x, first])
            self.g = hidden if self.g is None else mx.concatenate([self.g, hidden])
            self.rows.append(row)
        return row

    def step(self) -> list[Row]:
        """One round for every row; returns the rows that finished in it (they have left the batch)."""
        if not self.rows:
            return []
        room = max(r.max_tokens - len(r.tokens) for r in self.rows)
        k = 0 if self.drafter is None else min(self.draft.choose(), room - 1)
        result, self.x, self.g = Round(self.target, self.drafter, self.cache, self.x, self.g, k, self.params,
                                       self._next_key()).finish()
        self.draft.update(k, [len(t) - 1 for t in result.tokens], result.seconds)
        done = []
        for row, new in zip(self.rows, result.tokens):
            row.stats.record(k, len(new) - 1)
            row.stats.decode_seconds += result.seconds
            if self._emit(row, new):
                done.append(row)
        if done:
            keep = [i for i, r in enumerate(self.rows) if r.finish_reason is None]
            self.cache.take_rows(keep)
            idx = mx.array(keep, dtype=mx.int32)
            self.x, self.g = self.x[idx], self.g[idx]
            self.rows = [self.rows[i] for i in keep]
        return done

    def _emit(self, row: Row, new: list[int]) -> bool:
        """Append a row's new tokens up to EOS / max_tokens / a stop string; True when the row is finished."""
        for t in new:
            row.tokens.append(t)
            if t in self.eos_ids:
                row.finish_reason = "stop"
                break
            if len(row.tokens) >= row.max_tokens:
                row.finish_reason = "length"
                break
        row.stats.generated_tokens = len(row.tokens)
        if row.stops and self.tokenizer is not None and row.finish_reason is None:
            text = self.tokenizer.decode(row.tokens)
            if any(s in text for s in row.stops):
                row.finish_reason = "stop"
        return row.finish_reason is not None

    def text(self, row: Row) -> str:
        tokens = [t for t in row.tokens if t not in self.eos_ids]
        text = self.tokenizer.decode(tokens)
        cut = min((i for i in (text.find(s) for s in row.stops) if i >= 0), default=-1)
        return text if cut < 0 else text[:cut]


def generate_batch(engine, prompts, max_tokens=256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   min_p: float = 0.0, draft_tokens="auto", stop=(), seed: int | None = None):
    """Generate for several prompts at once; one Generation per prompt, in order."""
    from .generate import Generation, draft_length

    decoder = BatchDecoder(engine.target, engine.drafter, SamplingParams(temperature, top_p, top_k, min_p),
                           draft_length(0 if engine.drafter is None else draft_tokens), engine.eos_ids,
                           engine.tokenizer, engine.chunk, seed)
    stops = [stop] if isinstance(stop, str) else list(stop)
    rows = [decoder.add(engine.encode(p), max_tokens, stops) for p in prompts]
    while decoder.rows:
        decoder.step()
    return [Generation(decoder.text(r), r.tokens, r.stats, r.finish_reason) for r in rows]
