"""gemma-mlx serve: an OpenAI-compatible HTTP server whose concurrent requests share batched MTP rounds.

One worker thread owns the model and runs rounds (decode.py); requests join the batch between rounds and leave when
they finish or their client disconnects. Requests with the same sampling settings share a batch (greedy ones all
do). Every request samples from its own seed (sampling.py), so a seeded request shares the batch and still gets the
tokens it gets alone. HTTP is Starlette + uvicorn.

The caches of finished requests are kept (prefix_cache.py, `--cache-mb`): a request that resends a conversation
prefills only its new tokens (`usage.prompt_tokens_details.cached_tokens` counts the others).

Beyond OpenAI's fields, responses carry `mtp`: mean tokens per round, acceptance, and acceptance per draft position.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .decode import Decoder, Row
from .draft_length import K_MAX
from .prefix_cache import PrefixCache
from .generate import ChatTemplateError, Engine, draft_length
from .sampling import SamplingParams


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error(message: str, status: int = 400, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# --- request fields, checked as OpenAI's API does: a 400 naming the field --------------------------------------

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


@dataclass
class Job:
    """One request in the scheduler: its prompt and settings, and where its tokens go."""

    prompt: list
    max_tokens: int
    params: SamplingParams
    stops: tuple
    seed: Optional[int]
    loop: asyncio.AbstractEventLoop
    draft: object = None  # "auto" or a fixed K for this request; None: the server's setting
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
    row: Optional[Row] = None
    cancelled: bool = False

    def publish(self, final_error: Optional[str] = None):
        """From the worker thread: hand the row's new text (stops.TextStream's, as `generate` gives it) and its end
        to the request's event loop."""
        text = self.row.stream.take() if self.row else ""
        done = final_error or (self.row.finish_reason if self.row else None)
        if text or done:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, (text, done))


class Scheduler:
    """The worker thread: admits jobs between rounds (up to max_batch rows in all), steps every active batch."""

    def __init__(self, engine: Engine, max_batch: int = 8, draft_tokens="auto", cache_mb: float = 1024):
        self.engine, self.max_batch, self.draft_tokens = engine, max_batch, draft_tokens
        self.prefix_cache = PrefixCache(int(cache_mb * 2**20))  # shared by every batch: one target
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.batches: dict[tuple, tuple[Decoder, list[Job]]] = {}
        self.wake = threading.Event()
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="gemma-mlx-rounds")
        self.thread.start()
        atexit.register(self.close)

    def close(self):
        """Stop the worker between rounds. MLX aborts the process if a thread is still inside it at exit."""
        self.closed = True
        self.wake.set()
        self.thread.join(timeout=60)

    def submit(self, job: Job):
        self.waiting.put(job)
        self.wake.set()

    def _run(self):
        while not self.closed:
            try:
                self._admit()
                active = [(d, jobs) for d, jobs in self.batches.values() if d.rows]
                if not active:
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                for decoder, jobs in active:
                    for job in jobs:
                        if job.cancelled and job.row.finish_reason is None:
                            job.row.cancelled = True  # the decoder drops it after this round
                    decoder.step()
                    for job in list(jobs):
                        job.publish()
                        if job.row.finish_reason is not None:
                            jobs.remove(job)
            except Exception as e:  # the server never dies from a request: fail the jobs in flight, keep going
                for decoder, jobs in self.batches.values():
                    for job in jobs:
                        job.publish(final_error=f"internal error: {e}")
                self.batches.clear()

    def _admit(self):
        while sum(len(d.rows) for d, _ in self.batches.values()) < self.max_batch:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                return
            if job.cancelled:
                continue
            setting = self.draft_tokens if job.draft is None else job.draft
            key = (job.params, setting)  # rows of a batch share K: one batch per sampling and K setting
            if key not in self.batches:
                engine = self.engine
                draft = draft_length(engine, 0 if engine.drafter is None else setting)
                self.batches[key] = (Decoder(engine.target, engine.drafter, job.params, draft, engine.eos_ids,
                                             engine.tokenizer, engine.chunk, prefix_cache=self.prefix_cache), [])
            decoder, jobs = self.batches[key]
            job.row = decoder.add(job.prompt, job.max_tokens, job.stops, job.seed)
            job.publish()
            if job.row.finish_reason is None:
                jobs.append(job)


# --- HTTP ---------------------------------------------------------------------------------------------------------


async def request_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep to parse
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def request_prompt(body: dict, engine: Engine, chat: bool) -> list[int]:
    if chat:
        try:
            return engine.encode(chat_messages(body.get("messages")))
        except ChatTemplateError as e:
            raise BadRequest(str(e).replace("--raw in the CLI, ", ""), param="messages") from None
    text = body.get("prompt")
    if not isinstance(text, str) or not text:
        raise BadRequest("prompt must be a non-empty string", param="prompt")
    return engine.encode(text)


def draft_setting(body: dict, engine: Engine):
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


def read_job(body: dict, engine: Engine, chat: bool) -> Job:
    """The request's job, every field checked (BadRequest names the first bad one). Any `model` name is served by
    the loaded model, as llama.cpp's and LM Studio's servers do (many clients send a fixed one)."""
    if body.get("model") is not None and not isinstance(body.get("model"), str):
        raise BadRequest("model must be a string", param="model")
    check_unsupported(body)
    prompt = request_prompt(body, engine, chat)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if not is_int(max_tokens) or max_tokens < 1:
        raise BadRequest("max_tokens must be a positive integer", param="max_tokens")
    context = engine.target.config.max_position_embeddings
    if len(prompt) + max_tokens > context:
        raise BadRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                         f"({context} tokens)", param="messages" if chat else "prompt", code="context_length_exceeded")
    params = SamplingParams(number(body, "temperature", 1.0, 0, 2), number(body, "top_p", 1.0, 0, 1, open_low=True))
    seed = body.get("seed")
    if seed is not None and not is_int(seed):
        raise BadRequest("seed must be an integer", param="seed")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("stream must be true or false", param="stream")
    include_usage(body)
    return Job(prompt, max_tokens, params, stop_strings(body.get("stop")), seed, asyncio.get_running_loop(),
               draft=draft_setting(body, engine))


def include_usage(body: dict) -> bool:
    """`stream_options.include_usage`: a last chunk with empty choices and the usage, as OpenAI sends it."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("stream_options must be an object like {\"include_usage\": true}", param="stream_options")
    return options.get("include_usage", False)


def usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.row.tokens),
            "total_tokens": len(job.prompt) + len(job.row.tokens),
            "prompt_tokens_details": {"cached_tokens": len(job.prompt) - job.row.stats.prefill_tokens}}


def mtp(job: Job) -> dict:
    st = job.row.stats
    return {"mean_accepted_length": st.mean_accepted_length, "acceptance": st.acceptance,
            "acceptance_by_position": st.acceptance_by_position, "rounds": st.rounds}


class Api:
    """The HTTP handlers of one engine and its scheduler."""

    def __init__(self, engine: Engine, model_id: str, scheduler: Scheduler):
        self.engine, self.model_id, self.scheduler = engine, model_id, scheduler
        self.created = int(time.time())

    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "model": self.model_id, "drafter": self.engine.drafter is not None})

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                          "created": self.created, "owned_by": "gemma-mlx"}]})

    async def chat_completions(self, request: Request):
        return await self.completion(request, chat=True)

    async def completions(self, request: Request):
        return await self.completion(request, chat=False)

    async def completion(self, request: Request, chat: bool):
        try:
            body = await request_body(request)
            job = read_job(body, self.engine, chat)
        except BadRequest as e:
            return error(str(e), e.status, e.param, e.code)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.scheduler.submit(job)
        if body.get("stream"):
            return StreamingResponse(self.stream(job, rid, chat, include_usage(body)), media_type="text/event-stream")
        text, finish = "", None
        while finish is None:
            piece, finish = await job.updates.get()
            text += piece
        if finish not in ("stop", "length"):
            return error(finish, 500, kind="server_error")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_id, "choices": [choice],
                             "usage": usage(job), "mtp": mtp(job)})

    def chunk(self, rid: str, chat: bool, delta: Optional[str], finish=None, role=False, extra=None) -> str:
        if chat:
            d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        payload = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": int(time.time()), "model": self.model_id, "choices": [choice], **(extra or {})}
        return f"data: {json.dumps(payload)}\n\n"

    async def stream(self, job: Job, rid: str, chat: bool, usage_chunk: bool = False):
        finish = None
        try:
            if chat:
                yield self.chunk(rid, chat, None, role=True)
            while finish is None:
                piece, finish = await job.updates.get()
                if piece:
                    yield self.chunk(rid, chat, piece)
            if finish not in ("stop", "length"):
                yield f"data: {json.dumps({'error': {'message': finish, 'type': 'server_error'}})}\n\n"
            elif usage_chunk:
                yield self.chunk(rid, chat, None, finish=finish)
                yield self.chunk(rid, chat, None, extra={"choices": [], "usage": usage(job), "mtp": mtp(job)})
            else:
                yield self.chunk(rid, chat, None, finish=finish, extra={"usage": usage(job), "mtp": mtp(job)})
            yield "data: [DONE]\n\n"
        finally:
            if finish is None:  # the client went away mid-stream: free its row at the next round
                job.cancelled = True
                self.scheduler.wake.set()


async def http_error(request: Request, exc: HTTPException):
    what = {404: f"no route {request.url.path} (see /v1/models, /v1/chat/completions, /v1/completions)",
            405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return error(what, exc.status_code, code="not_found" if exc.status_code == 404 else None)


async def server_error(request: Request, exc: Exception):  # never a traceback to the client
    return error("internal server error", 500, kind="server_error")


def build_app(engine: Engine, model_id: str, max_batch: int = 8, draft_tokens="auto",
              cache_mb: float = 1024) -> Starlette:
    api = Api(engine, model_id, Scheduler(engine, max_batch, draft_tokens, cache_mb))
    app = Starlette(exception_handlers={HTTPException: http_error, Exception: server_error}, routes=[
        Route("/health", api.health), Route("/v1/models", api.models),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ])
    app.state.scheduler = api.scheduler
    return app


def serve(engine: Engine, model_id: str, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8,
          draft_tokens="auto", cache_mb: float = 1024):
    import uvicorn

    uvicorn.run(build_app(engine, model_id, max_batch, draft_tokens, cache_mb), host=host, port=port,
                log_level="warning")
