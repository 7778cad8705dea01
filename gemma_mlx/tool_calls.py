"""Tool calls: the model's calls taken out of its reply text, as OpenAI's `tool_calls`.

The checkpoint's chat template renders the tools and a conversation's earlier calls and results. Gemma 4's:

    <|turn>system\\n<|tool>declaration:get_weather{…}<tool|><turn|>          the tools (OpenAI JSON schemas)
    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>            a call, in the model's reply
    <|tool_response>response:get_weather{value:<|"|>…<|"|>}<tool_response|>  its result, back in the prompt

mlx-lm's tokenizer wrapper finds the format from the template (its start and end markers, and its parser of what
is between them); `ToolCallText` cuts a reply into content and calls while it streams. A call that does not parse
(cut off by max_tokens, or malformed) stays in the content as the model wrote it.

    calls = ToolCallText.of(tokenizer, ToolUse(tools))
    for piece in pieces:
        content, new_calls = calls.add(piece)   # content safe to show, calls completed by this piece
    content, new_calls = calls.finish()
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Optional

from .stops import partial_stop


def supports_tools(tokenizer) -> bool:
    return bool(getattr(tokenizer, "has_tool_calling", False))


GEMMA4_START = "<|tool_call>"


@dataclass(frozen=True)
class ToolUse:
    """A request's tools (OpenAI's list, for the template), the text its `tool_choice` forces at the start of the
    reply, and whether only one call is wanted (`parallel_tool_calls: false`)."""

    tools: list
    prefix: str = ""
    single: bool = False


def forced_prefix(tokenizer, choice) -> str:
    """The text a `tool_choice` puts at the start of the reply: "required" opens a call, {"function": {"name"}}
    opens that call (Gemma 4's `call:name{`); "auto" and "none" leave the reply to the model."""
    if choice in (None, "auto", "none"):
        return ""
    start = tokenizer.tool_call_start
    if choice == "required":
        return start + "call:"
    return f"{start}call:{choice['function']['name']}{{"


class ToolCallText:
    """The reply's text so far, split into content (outside the markers) and parsed calls (inside)."""

    def __init__(self, start: str, end: str, parser, tools=None, prefix: str = "", single: bool = False):
        self.start, self.end, self.parser, self.tools, self.single = start, end, parser, tools, single
        self.pending = prefix  # text not yet given out: a call being written, or a possible marker's start
        self.calls: list[dict] = []

    @classmethod
    def of(cls, tokenizer, use: ToolUse) -> "ToolCallText":
        return cls(tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser, use.tools, use.prefix,
                   use.single)

    def add(self, text: str) -> tuple[str, list[dict]]:
        """Take the next piece of reply text; return the content now safe to show and the calls it completed."""
        self.pending += text
        content, calls = "", []
        while True:
            if not self.pending.startswith(self.start):
                i = self.pending.find(self.start)
                if i < 0:
                    cut = len(self.pending) - partial_stop(self.pending, [self.start])
                    content, self.pending = content + self.pending[:cut], self.pending[cut:]
                    return content, calls
                content, self.pending = content + self.pending[:i], self.pending[i:]
            j = self.pending.find(self.end, len(self.start))
            if j < 0:
                return content, calls
            raw, self.pending = self.pending[: j + len(self.end)], self.pending[j + len(self.end):]
            parsed = self.parse(raw[len(self.start) : j])
            if parsed is None:
                content += raw
            else:
                calls += parsed
                self.calls += parsed

    def finish(self, text: str = "") -> tuple[str, list[dict]]:
        """The reply's last piece: what is left after it (an unfinished call included, as written) is content."""
        content, calls = self.add(text)
        content, self.pending = content + self.pending, ""
        return content, calls

    def parse(self, inner: str) -> Optional[list[dict]]:
        """OpenAI-shaped calls from the text between the markers, or None if it is not a well-formed call. With
        `parallel_tool_calls: false` (single) the calls after the first are dropped."""
        try:
            parsed = self.parser(inner, self.tools)
        except Exception:  # the parsers raise ValueError, JSONDecodeError, regex errors: all mean "not a call"
            return None
        parsed = parsed if isinstance(parsed, list) else [parsed]
        if not parsed or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"]
                                 and isinstance(c.get("arguments"), dict) for c in parsed):
            return None
        if self.single:
            parsed = parsed[:1] if not self.calls else []
        return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                for c in parsed]
