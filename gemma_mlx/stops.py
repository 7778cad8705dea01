"""From emitted tokens to text, the one way generate, batch rows, chat and the server all do it.

A sequence ends at an EOS token, at max_tokens, or at a stop string (the text is cut before it). Tokens are
detokenized incrementally by mlx-lm's streaming detokenizer (one per sequence; it holds back half a UTF-8
character split across byte-fallback tokens), and while the sequence runs, text that could still become a stop
string is held back too. So a token sequence gives the same text however its tokens arrived: all at once, one
round at a time, alone or as a batch row.

    stream = TextStream(tokenizer, eos_ids, stops=["###"], max_tokens=64)
    for new_tokens in rounds:
        stream.add(new_tokens)
        print(stream.take(), end="")   # the text safe to show since the last take
        if stream.finish_reason: break
"""

from __future__ import annotations

import copy
from typing import Iterable, Optional


class TextStream:
    """One sequence: its tokens (EOS included), its text (cut at a stop string), why it finished (None while it
    runs; "stop" or "length")."""

    def __init__(self, tokenizer, eos_ids: Iterable[int], stops: Iterable[str] = (), max_tokens: Optional[int] = None):
        self.detokenizer = None
        if tokenizer is not None:  # its own copy: the wrapper's detokenizer is one object, built once (costly)
            self.detokenizer = copy.copy(tokenizer.detokenizer)
            self.detokenizer.reset()
        self.eos_ids, self.stops, self.max_tokens = frozenset(eos_ids), [s for s in stops if s], max_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: Optional[str] = None
        self._sent = 0

    def add(self, new: Iterable[int]) -> bool:
        """Take a round's tokens (those after the end are dropped); True when the sequence has finished."""
        for t in new:
            if self.finish_reason is not None:
                break
            self.tokens.append(int(t))
            if t in self.eos_ids:
                self.finish_reason = "stop"
            elif self.detokenizer is not None:
                self.detokenizer.add_token(int(t))
            if self.finish_reason is None and self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
        if self.detokenizer is None:
            return self.finish_reason is not None
        if self.finish_reason is not None:
            self.detokenizer.finalize()
        self.text += self.detokenizer.last_segment
        hit = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.text, self.finish_reason = self.text[:hit], "stop"
        return self.finish_reason is not None

    def take(self) -> str:
        """The text safe to show since the last take: all of it once finished, else short of a possible stop
        string's start."""
        safe = len(self.text) if self.finish_reason else len(self.text) - partial_stop(self.text, self.stops)
        piece = self.text[self._sent : safe]
        self._sent = max(self._sent, safe)
        return piece


def partial_stop(text: str, stops: list) -> int:
    """Length of the longest end of `text` that could be the start of a stop string (held back while streaming)."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)
