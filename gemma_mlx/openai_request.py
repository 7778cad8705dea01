"""The fields of an OpenAI request, checked as OpenAI's API checks them: a bad one is a BadRequest naming it (the
server answers it as a 4xx in OpenAI's error shape)."""

from __future__ import annotations

from typing import Optional

from .draft_length import K_MAX


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
NOT_IMPLEMENTED = {"tools": "tool calls", "functions": "function calls", "logprobs": "logprobs",
                   "top_logprobs": "logprobs", "logit_bias": "logit_bias", "presence_penalty": "presence_penalty",
                   "frequency_penalty": "frequency_penalty", "response_format": "response_format"}


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def number(body: dict, name: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    x = body.get(name)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:
        raise BadRequest(f"{name} must be a number", param=name)
    if not (low < x if open_low else low <= x) or x > high:
        raise BadRequest(f"{name} must be in {'(' if open_low else '['}{low}, {high}], got {x}", param=name)
    return float(x)


def stop_strings(stop) -> tuple:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("stop must be a string or a list of at most 4 non-empty strings", param="stop")
    return tuple(stops)


def check_unsupported(body: dict):
    """Fields this server does not implement are refused when they would change the answer, never ignored."""
    n = body.get("n", 1)
    if n != 1 or not is_int(n):
        raise BadRequest("n must be 1 (one choice per request)", param="n")
    for name, what in NOT_IMPLEMENTED.items():
        if body.get(name) not in (None, False, 0, [], {}) and body.get(name) != {"type": "text"}:
            raise BadRequest(f"{what} are not supported by this server" if what.endswith("s") else
                             f"{what} is not supported by this server", param=name)


def chat_messages(messages) -> list[dict]:
    """OpenAI messages as the chat template takes them: roles checked (developer = system), text content parts
    joined."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                             param=f"messages[{i}].role")
        out.append({"role": ROLES[role], "content": message_text(m.get("content"), i)})
    return out


def message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else None
    if parts is None or not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                for p in parts):
        raise BadRequest(f"messages[{i}].content must be a string or a list of text parts",
                         param=f"messages[{i}].content")
    return "".join(p["text"] for p in parts)


def draft_setting(body: dict, engine):
    """This request's MTP setting: `"mtp": false` (plain decoding) or `"draft_tokens": N | "auto"`; None: the
    server's."""
    mtp, k = body.get("mtp"), body.get("draft_tokens")
    if mtp is not None and not isinstance(mtp, bool):
        raise BadRequest("mtp must be true or false", param="mtp")
    if k is not None and k != "auto" and not (is_int(k) and 0 <= k <= K_MAX):
        raise BadRequest(f"draft_tokens must be \"auto\" or an integer in 0..{K_MAX}", param="draft_tokens")
    if mtp is False:
        return 0
    if k not in (None, 0) and engine.drafter is None:
        raise BadRequest("draft_tokens needs a drafter, and this server runs without one", param="draft_tokens")
    return k


def include_usage(body: dict) -> bool:
    """`stream_options.include_usage`: a last chunk with empty choices and the usage, as OpenAI sends it."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("stream_options must be an object like {\"include_usage\": true}", param="stream_options")
    return options.get("include_usage", False)
