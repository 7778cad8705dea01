"""Batch mode: speculative rounds for several sequences at once, with ragged acceptance.

Every row has its own length, so its own RoPE offsets, masks and rollback (cache.py keeps lengths per row, and masks
come from each row's slot -> position map, so padding and rejected slots are never attended), and a round is the
same `Round` as batch 1: one drafter pass per draft step for all rows, one target forward over B×(K+1) tokens,
per-row acceptance and rollback. Rows join between rounds (prefilled alone in a batch-1 cache, then merged into the
batch cache) and leave when they finish (EOS, stop string, max_tokens), which is what a server needs:

    decoder = BatchDecoder(target, drafter, eos_ids=..., tokenizer=...)
    row = decoder.add(prompt_ids, max_tokens=64, stops=["###"])   # any time between rounds
    while decoder.rows:
        for done in decoder.step():                              # one round; the rows that finished
            print(done.stream.text, done.finish_reason)

K is shared by the batch and chosen by `DraftLength` from the rows' own acceptance and the round times measured at
this batch size (more rows make verification relatively dearer; with MoE targets the expert union grows slower
than the tokens, models/moe.py).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from .models.gemma4_assistant import Drafter
from .models.gemma4_text import Target
from .sampling import SamplingParams, verify_choices
from .draft_length import DraftLength
from .speculative import Round, Stats
from .stops import TextStream


@dataclass
class Row:
    """One sequence of the batch: its prompt, stats, and its emitted tokens and text (`stream`: EOS, max_tokens and
    stop strings applied as for `generate`); `finish_reason` is None while it runs, then "stop", "length" or
    "cancelled"."""

    id: int
    prompt: list
    stream: TextStream
    stats: Stats = field(default_factory=Stats)
    cancelled: bool = False

    @property
    def tokens(self) -> list:
        return self.stream.tokens

    @property
    def finish_reason(self) -> Optional[str]:
        return "cancelled" if self.cancelled else self.stream.finish_reason


class BatchDecoder:
    """Add rows, step rounds, collect finished rows."""

    def __init__(self, target: Target, drafter: Drafter | None, params: SamplingParams = SamplingParams(),
                 draft: DraftLength | None = None, eos_ids=frozenset(), tokenizer=None, chunk: int = 256,
                 seed: int | None = None):
        self.target, self.drafter, self.params, self.eos_ids = target, drafter, params, frozenset(eos_ids)
        self.draft = draft or DraftLength(fixed=0 if drafter is None else None)
        if drafter is None and (self.draft.fixed or 0) > 0:
            raise ValueError("draft tokens requested but no drafter is loaded")
        self.tokenizer, self.chunk = tokenizer, chunk
        self.cache = target.make_cache(batch=0, chunk=chunk)
        self.rows: list[Row] = []  # the rows in the batch, in cache-row order
        self.finished: list[Row] = []  # rows finished since the last step (a row can finish at its first token)
        self.x = self.g = None  # per row: last emitted token [B, 1], target hidden before it [B, 1, H]
        self.key = mx.random.key(seed if seed is not None else int(time.time_ns() % 2**31))
        self.ids = itertools.count()

    def _next_key(self):
        self.key, sub = mx.random.split(self.key)
        return sub

    def add(self, prompt: list[int], max_tokens: int, stops=()) -> Row:
        """Prefill a new row alone and merge it into the batch (between rounds)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not prompt:
            raise ValueError("empty prompt")
        row = Row(next(self.ids), [int(t) for t in prompt], TextStream(self.tokenizer, self.eos_ids, stops, max_tokens))
        row.stats.prompt_tokens = row.stats.prefill_tokens = len(row.prompt)
        t0 = time.perf_counter()
        cache = self.target.make_cache(batch=1, chunk=self.chunk)
        logits, hidden = self.target.prefill(mx.array([row.prompt]), cache)
        _, first = verify_choices(logits, mx.zeros((1, 0), mx.int32), self.params, self._next_key())
        first = first.astype(mx.int32)
        row.stats.prefill_seconds = time.perf_counter() - t0
        if self._emit(row, [int(first.item())]):
            self.finished.append(row)
            return row
        self.cache.extend_rows(cache)
        self.x = first if self.x is None else mx.concatenate([self.x, first])
        self.g = hidden if self.g is None else mx.concatenate([self.g, hidden])
        self.rows.append(row)
        return row

    def step(self) -> list[Row]:
        """One round for every row; returns the rows that finished since the last step (they have left the batch)."""
        if self.rows:
            self._round()
        done, self.finished = self.finished, []
        return done

    def _round(self):
        room = [r.stream.max_tokens - len(r.tokens) for r in self.rows]
        k = 0 if self.drafter is None else min(self.draft.choose([r.stats for r in self.rows], room), max(room) - 1)
        result, self.x, self.g = Round(self.target, self.drafter, self.cache, self.x, self.g, k, self.params,
                                       self._next_key()).finish()
        self.draft.update(k, [len(t) - 1 for t in result.tokens], result.seconds)
        for row, new in zip(self.rows, result.tokens):
            row.stats.record(k, len(new) - 1)
            row.stats.decode_seconds += result.seconds
            if self._emit(row, new):
                self.finished.append(row)
        self._keep([i for i, r in enumerate(self.rows) if r.finish_reason is None])

    def remove(self, row: Row):
        """Take a row out of the batch between rounds (a cancelled request); the tokens it has stay in `row`."""
        row.cancelled = row.finish_reason is None
        self._keep([i for i, r in enumerate(self.rows) if r is not row])

    def _keep(self, keep: list[int]):
        if len(keep) < len(self.rows):
            self.cache.take_rows(keep)
            idx = mx.array(keep, dtype=mx.int32)
            self.x, self.g = self.x[idx], self.g[idx]
            self.rows = [self.rows[i] for i in keep]

    def _emit(self, row: Row, new: list[int]) -> bool:
        """Hand a row's new tokens to its stream (EOS / max_tokens / a stop string end it); True when finished."""
        done = row.stream.add(new)
        row.stats.generated_tokens = len(row.tokens)
        return done


def generate_batch(engine, prompts, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                   top_k: int = 0, min_p: float = 0.0, draft_tokens="auto", stop=(), seed: int | None = None) -> list:
    """Generate for several prompts at once (strings, chat messages or token ids, as `generate` takes); returns
    one `Generation` per prompt, in order. Each row is what `generate` gives for that prompt alone (greedy: the
    same tokens; sampling: the same distribution)."""
    from .generate import Generation, draft_length

    stops = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
    decoder = BatchDecoder(engine.target, engine.drafter, SamplingParams(temperature, top_p, top_k, min_p),
                           draft_length(engine, draft_tokens),
                           engine.eos_ids, engine.tokenizer, engine.chunk, seed)
    rows = [decoder.add(engine.encode(p), max_tokens, stops) for p in prompts]
    while decoder.rows:
        decoder.step()
    return [Generation(r.stream.text, r.tokens, r.stats, r.finish_reason) for r in rows]
