"""The fields of an OpenAI request, checked as OpenAI's API checks them: a bad one is a BadRequest naming it (the
server answers it as a 4xx in OpenAI's error shape)."""

from __future__ import annotations

import json
import re
from typing import Optional

from .draft_length import K_MAX
from .tool_calls import GEMMA4_START, ToolUse, forced_prefix, supports_tools

MAX_BODY_BYTES = 8 * 2**20


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
NOT_IMPLEMENTED = {"functions": "function calls", "logprobs": "logprobs",
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
    joined, an assistant's `tool_calls` with their arguments as objects, a tool result's `tool_call_id` and
    `name`."""
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
        message = {"role": ROLES[role]}
        if role == "assistant" and m.get("tool_calls") is not None:
            message["tool_calls"] = assistant_calls(m["tool_calls"], i)
            message["content"] = "" if m.get("content") is None else message_text(m.get("content"), i)
        else:
            message["content"] = message_text(m.get("content"), i)
        for key in ("tool_call_id", "name") if role == "tool" else ():
            if m.get(key) is not None and not isinstance(m[key], str):
                raise BadRequest(f"messages[{i}].{key} must be a string", param=f"messages[{i}].{key}")
            if m.get(key) is not None:
                message[key] = m[key]
        out.append(message)
    return out


def assistant_calls(calls, i: int) -> list[dict]:
    """An assistant message's earlier calls, arguments parsed from their JSON string (the template writes them in
    the model's own format)."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise BadRequest(f"{where} must be a list", param=where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"{where}[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                             "\"arguments\"}}", param=where)
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise BadRequest(f"{where}[{j}].function.arguments is not valid JSON", param=where) from None
        if not isinstance(args, dict):
            raise BadRequest(f"{where}[{j}].function.arguments must be a JSON object", param=where)
        out.append({"id": call.get("id") if isinstance(call.get("id"), str) else f"call_{i}_{j}",
                    "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def check_tool_messages(messages: list[dict], tokenizer):
    """Earlier calls and tool results need a template that can write them."""
    if supports_tools(tokenizer):
        return
    for i, m in enumerate(messages):
        if m["role"] == "tool" or "tool_calls" in m:
            raise BadRequest(f"messages[{i}] is a tool call or result, and this model's chat template has no tool "
                             "calls", param=f"messages[{i}].role")


TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def tool_use(body: dict, tokenizer, chat: bool) -> Optional[ToolUse]:
    """The request's `tools`, `tool_choice` and `parallel_tool_calls`, checked; None when no tool may be called
    (no tools, or tool_choice "none": then the tools are left out of the prompt)."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise BadRequest("parallel_tool_calls must be true or false", param="parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        return None
    if not chat:
        raise BadRequest("tools are taken by /v1/chat/completions only", param="tools")
    names = check_tools(tools)
    if not supports_tools(tokenizer):
        raise BadRequest("this model's chat template has no tool calls", param="tools")
    named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
    if not (choice in (None, "none", "auto", "required") or named and choice["function"].get("name") in names):
        raise BadRequest('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                         '{"name": <one of the tools>}}', param="tool_choice")
    if choice == "none":
        return None
    if choice not in (None, "auto") and tokenizer.tool_call_start != GEMMA4_START:
        raise BadRequest("tool_choice \"required\" or a named function needs Gemma 4's tool-call format",
                         param="tool_choice")
    return ToolUse(tools, forced_prefix(tokenizer, choice), single=not parallel)


def check_tools(tools) -> set:
    """OpenAI function tools: a name, an optional description, parameters as a JSON schema object."""
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list of {\"type\": \"function\", \"function\": {...}}", param="tools")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not TOOL_NAME.fullmatch(fn["name"]):
            raise BadRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": "
                             "<letters, digits, _ or -, at most 64>}}", param=f"tools[{i}]")
        if not isinstance(fn.get("description", ""), str):
            raise BadRequest(f"tools[{i}].function.description must be a string", param=f"tools[{i}]")
        if not isinstance(fn.get("parameters", {}), dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object", param=f"tools[{i}]")
        names.add(fn["name"])
    return names


def message_text(content, i: int):
    """A message's content: a string, text parts joined, or (with images) the text and image_url parts as a list."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else None
    if parts is None or not all(isinstance(p, dict) and (p.get("type") == "text" and isinstance(p.get("text"), str)
                                                         or p.get("type") == "image_url") for p in parts):
        raise BadRequest(f"messages[{i}].content must be a string or a list of text and image_url parts",
                         param=f"messages[{i}].content")
    if any(p["type"] == "image_url" for p in parts):
        return [{"type": "text", "text": p["text"]} if p["type"] == "text" else
                {"type": "image_url", "image_url": p.get("image_url")} for p in parts]
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
