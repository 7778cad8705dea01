"""The decode loop, for one sequence or a batch: each round `k = policy.choose()`, draft and verify (a
speculative.Round), accept, and emit each row's tokens to its text stream (stops.py).

Rows join between rounds and leave when they finish (EOS, a stop string, max_tokens), which is what a server needs.
Every row has its own length, so its own RoPE offsets, masks and rollback (cache.py); a round is one drafter pass
per draft step for all rows and one target forward over B×(K+1) tokens, with per-row acceptance. K is shared by the
batch (draft_length.py). When a plain round (K = 0) is to be followed by another, the next one is started before
the current one is read, so building it overlaps computing this one (as mlx-lm's generate does).

    decoder = Decoder(target, drafter, eos_ids=..., tokenizer=...)
    row = decoder.add(prompt_ids, max_tokens=64, stops=["###"])   # any time between rounds
    while decoder.rows:
        for done in decoder.step():                              # one round; the rows that finished
            print(done.stream.text, done.finish_reason)

With a prefix cache (prefix_cache.py), a row that leaves hands its cache (prompt and reply) to it, and a new row
starts from the longest prefix it holds: the next turn of a conversation prefills only its new tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.core as mx
import numpy as np

from .draft_length import DraftLength, RoundClock
from .models.gemma4_assistant import Drafter
from .pipeline import ends_when_lost
from .prefix_cache import PrefixCache
from .models.gemma4_text import Target
from .sampling import SamplingParams, verify_choices
from .speculative import Round, Stats
from .stops import TextStream


@dataclass
class Row:
    """One sequence: its prompt, stats, and its emitted tokens and text (`stream`: EOS, max_tokens and stop strings
    applied); `finish_reason` is None while it runs, then "stop", "length" or "cancelled"."""

    id: int
    prompt: list
    stream: TextStream
    seed: int = 0
    stats: Stats = field(default_factory=Stats)
    cancelled: bool = False
    first_image: Optional[int] = None  # the prompt's first image token: its cache is kept only up to there

    @property
    def tokens(self) -> list:
        return self.stream.tokens

    @property
    def finish_reason(self) -> Optional[str]:
        return "cancelled" if self.cancelled else self.stream.finish_reason


class Decoder:
    """Add rows, step rounds, collect finished rows."""

    def __init__(self, target: Target, drafter: Drafter | None, params: SamplingParams = SamplingParams(),
                 draft: DraftLength | None = None, eos_ids=frozenset(), tokenizer=None, chunk: int = 256,
                 seed: int | None = None, prefix_cache: PrefixCache | None = None):
        self.target, self.drafter, self.params, self.eos_ids = target, drafter, params, frozenset(eos_ids)
        self.draft = draft or DraftLength(fixed=0 if drafter is None else None)
        if drafter is None and (self.draft.fixed or 0) > 0:
            raise ValueError("draft tokens requested but no drafter is loaded")
        self.tokenizer, self.chunk, self.prefix_cache = tokenizer, chunk, prefix_cache
        self.cache = target.make_cache(batch=0, chunk=chunk)
        self.joining = []  # caches of rows added since the last round, merged into `cache` together (_join)
        self.rows: list[Row] = []  # the rows in the batch, in cache-row order
        self.finished: list[Row] = []  # rows finished since the last step (a row can finish at its first token)
        self.x = self.g = None  # per row: last emitted token [B, 1], target hidden before it [B, 1, H]
        self.queued: Round | None = None  # the next plain round, started before the last one was read
        self.planned: int | None = None  # K chosen for the next round while the last one ran
        self.clock = RoundClock()
        self.seeds = np.random.default_rng(seed)  # seeds for the rows added without one
        self.ids = itertools.count()
        self.split = target.split  # under a pipeline split, rank 0 announces what this decoder does (pipeline.py)
        if self.split.announcing:
            self.key = self.split.new_decoder()
            self.split.announce({"op": "open", "decoder": self.key, "setup": self.setup})

    @property
    def setup(self) -> dict:
        """What another pipeline rank needs to build the same decoder (`pipeline.follow`)."""
        return {"params": dataclasses.asdict(self.params), "chunk": self.chunk, "prefix": self.prefix_cache is not None,
                "eos_ids": sorted(self.eos_ids)}

    def _announce(self, op: str, **args):
        if self.split.announcing:
            self.split.announce({"op": op, "decoder": self.key, "args": args})

    @ends_when_lost
    def add(self, prompt: list[int], max_tokens: int, stops=(), seed: int | None = None, images=None) -> Row:
        """Prefill a new row and merge it into the batch (between rounds). Sampling draws from the row's own seed
        (sampling.py), so a seeded row gives the same tokens alone or in any batch. `images`: (where, soft
        tokens) of the prompt's image tokens (models/gemma4_text.py)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not prompt:
            raise ValueError("empty prompt")
        if images is not None and self.split.size > 1:
            raise ValueError("images are not supported when the model is split across processes")
        seed = int(self.seeds.integers(2**63)) if seed is None else int(seed)
        self._announce("add", prompt=[int(t) for t in prompt], max_tokens=max_tokens, stops=list(stops), seed=seed)
        self._drop_queued()  # it has no place for the new row
        row = Row(next(self.ids), [int(t) for t in prompt], TextStream(self.tokenizer, self.eos_ids, stops, max_tokens),
                  seed=seed)
        row.stats.prompt_tokens = len(row.prompt)
        if images is not None:
            row.first_image = int(np.argmax(images[0][0]))
        t0 = time.perf_counter()
        cache, logits, hidden, row.stats.prefill_tokens = self._prefill(row, images)
        first, = self.split.from_last(lambda: (verify_choices(logits, mx.zeros((1, 0), mx.int32), self.params,
                                                               [row.seed], [[len(row.prompt)]])[1],), ((1, 1), mx.int32))
        row.stats.prefill_seconds = time.perf_counter() - t0
        if self._emit(row, [int(first.item())]):
            self.finished.append(row)
            if self.prefix_cache is not None:
                self._keep_cache(row, row.prompt, cache)
            return row
        self.joining.append(cache)
        self.x = first if self.x is None else mx.concatenate([self.x, first])
        self.g = hidden if self.g is None else mx.concatenate([self.g, hidden])
        self.rows.append(row)
        self.clock.restart()
        return row

    @ends_when_lost
    def step(self) -> list[Row]:
        """One round for every row; returns the rows that finished since the last step (they have left the batch)."""
        if self.rows:
            self._announce("step")
            self._join()
            self._round()
        done, self.finished = self.finished, []
        return done

    def follow(self, row: Row) -> Iterator[list[int]]:
        """Step until `row` finishes, yielding its new tokens after its prefill and after every round. A consumer
        that stops early cancels the row."""
        sent = 0
        try:
            while True:
                yield row.tokens[sent:]
                if sent == 0:
                    self.clock.restart()  # the consumer's first look at the row is not a round's time
                sent = len(row.tokens)
                if row.finish_reason is not None:
                    return
                self.step()
        finally:
            if row.finish_reason is None:
                self.remove(row)

    @ends_when_lost
    def remove(self, row: Row):
        """Take a row out of the batch between rounds (a cancelled request); the tokens it has stay in `row`."""
        if row in self.rows:
            self._announce("remove", row=self.rows.index(row))
        row.cancelled = row.finish_reason is None
        self._keep([i for i, r in enumerate(self.rows) if r is not row])

    @ends_when_lost
    def cancel(self, row: Row):
        """Mark a row cancelled: it leaves the batch after the next round (a client that went away)."""
        if row in self.rows:
            self._announce("cancel", row=self.rows.index(row))
            row.cancelled = True

    @ends_when_lost
    def close(self):
        """Under a pipeline split, the other ranks forget this decoder (it gets no more rows)."""
        self._announce("close")

    def _round(self):
        room = [r.stream.max_tokens - len(r.tokens) for r in self.rows]
        current, self.queued = self.queued or self._start(self._next_k(room), self.x, self.g), None
        if current.k == 0 and max(room) > 1:
            self.planned = self._choose(room)
            if self.planned == 0:
                self.queued, self.planned = self._start(0, *current.plain_next()), None
        result, self.x, self.g = current.finish()
        wall, seconds = self.clock.lap(current, self.queued)
        self.draft.update(current.k, [len(t) - 1 for t in result.tokens], seconds)
        for row, new in zip(self.rows, result.tokens):
            row.stats.record(current.k, len(new) - 1)
            row.stats.decode_seconds += wall
            if self._emit(row, new):
                self.finished.append(row)
        self._keep([i for i, r in enumerate(self.rows) if r.finish_reason is None])

    def _next_k(self, room: list[int]) -> int:
        k = self._choose(room) if self.planned is None else self.planned
        self.planned = None
        return min(k, max(room) - 1)

    def _choose(self, room: list[int]) -> int:
        """K for the next round (a pipeline's ranks take rank 0's: it is timed there)."""
        if self.drafter is None:
            return 0
        return self.split.from_leader(lambda: self.draft.choose([r.stats for r in self.rows], room))

    def _start(self, k: int, x: mx.array, g: mx.array) -> Round:
        return Round(self.target, self.drafter, self.cache, x, g, k, self.params, [r.seed for r in self.rows])

    def _prefill(self, row: Row, images=None):
        """(the row's cache, last logits, last hidden, tokens run): a new cache, or one started from the prefix cache
        when it holds a prefix of the prompt (before its first image: image tokens are the same ids for any
        image)."""
        prompt = row.prompt
        known = prompt if row.first_image is None else prompt[: row.first_image + 1]
        cache, common = self.prefix_cache.take(known, self.split.least) if self.prefix_cache else (None, 0)
        cache = cache or self.target.make_cache(batch=1, chunk=self.chunk)
        part = None if images is None else (images[0][:, common:], images[1])
        logits, hidden = self.target.prefill(mx.array([prompt[common:]]), cache, images=part)
        return cache, logits, hidden, len(prompt) - common

    def _emit(self, row: Row, new: list[int]) -> bool:
        """Hand a row's new tokens to its stream (EOS / max_tokens / a stop string end it); True when finished."""
        done = row.stream.add(new)
        row.stats.generated_tokens = len(row.tokens)
        return done

    def _join(self):
        """Merge the caches of the rows added since the last round into the batch cache in one copy (merging them
        one by one would copy the whole batch once per row)."""
        if self.joining:
            self.cache.extend_rows(self.joining)
            self.joining = []

    def _keep(self, keep: list[int]):
        if len(keep) == len(self.rows):
            return
        self._join()
        if self.prefix_cache is not None:
            for i in sorted(set(range(len(self.rows))) - set(keep)):
                self._keep_prefix(self.rows[i], i)
        self.cache.take_rows(keep)
        if self.queued is not None:
            self.queued.take_rows(keep)
        idx = mx.array(keep, dtype=mx.int32)
        self.x, self.g = self.x[idx], self.g[idx]
        self.rows = [self.rows[i] for i in keep]

    def _keep_prefix(self, row: Row, i: int):
        """Hand a leaving row's cache, cut to its prompt and reply but the last token, to the prefix cache."""
        self._keep_cache(row, row.prompt + row.tokens[:-1], self.cache.row(i))

    def _keep_cache(self, row: Row, tokens: list[int], cache):
        """Keep a batch-1 cache holding `tokens`, cut before the row's first image if it has one."""
        tokens = tokens if row.first_image is None else tokens[: row.first_image]
        if cache.truncate(len(tokens)):
            self.prefix_cache.keep(tokens, cache)

    def _drop_queued(self):
        """Forget the queued plain round: the position it wrote for each row is rolled back."""
        if self.queued is not None:
            self.cache.rollback(1)
            self.queued = None


def generate_tokens(target: Target, drafter: Drafter | None, prompt: list[int], *, max_tokens: int,
                    params: SamplingParams = SamplingParams(), draft: DraftLength | None = None,
                    eos_ids: frozenset = frozenset(), seed: int | None = None, chunk: int = 256,
                    prefix_cache: PrefixCache | None = None):
    """Yield (new tokens, stats) after the prefill and after every round, until EOS or max_tokens (an exact cap).

    With a prefix cache, the sequence's cache ends there holding the prompt and every emitted token but the last, so
    the next prompt of a conversation reuses it."""
    decoder = Decoder(target, drafter, params, draft, eos_ids, chunk=chunk, prefix_cache=prefix_cache)
    try:
        row = decoder.add(prompt, max_tokens, seed=seed)
        for new in decoder.follow(row):
            yield new, row.stats
    finally:
        decoder.close()
