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
import math
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
from .generate import ChatTemplateError, Engine, LoadError, draft_length
from .image import ImageError
from .openai_request import (MAX_BODY_BYTES, BadRequest, chat_messages, check_tool_messages, check_unsupported,
                             draft_setting, include_usage, is_int, number, stop_strings, tool_use)
from .prefix_cache import PrefixCache
from .sampling import SamplingParams
from .tool_calls import GEMMA4_START, ToolCallText, ToolUse


def error(message: str, status: int = 400, param=None, code=None, kind="invalid_request_error",
          headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


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
    tools: Optional[ToolUse] = None
    images: Optional[tuple] = None  # the prompt's image tokens and soft tokens (Decoder.add)
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
    row: Optional[Row] = None
    cancelled: bool = False
    started: float = 0.0  # when it joined a batch

    def publish(self, final_error: Optional[str] = None):
        """From the worker thread: hand the row's new text (stops.TextStream's, as `generate` gives it) and its end
        to the request's event loop."""
        text = self.row.stream.take() if self.row else ""
        done = final_error or (self.row.finish_reason if self.row else None)
        if text or done:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, (text, done))


class QueueFull(Exception):
    """More requests wait than QUEUE_PER_ROW x max_batch; `retry_after` estimates the seconds until there is room."""

    def __init__(self, retry_after: int):
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


QUEUE_PER_ROW = 4  # waiting requests per batch row beyond which a request is refused (429) rather than queued


class Scheduler:
    """The worker thread: admits jobs between rounds (up to max_batch rows in all), steps every active batch."""

    def __init__(self, engine: Engine, max_batch: int = 8, draft_tokens="auto", cache_mb: float = 1024):
        self.engine, self.max_batch, self.draft_tokens = engine, max_batch, draft_tokens
        self.max_waiting = QUEUE_PER_ROW * max_batch
        self.job_seconds = 1.0  # a running mean of how long a request holds its row
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
        """Queue a job, or raise QueueFull when max_waiting jobs already wait."""
        waiting = self.waiting.qsize()
        if waiting >= self.max_waiting:
            raise QueueFull(max(1, math.ceil(self.job_seconds * (1 + waiting / self.max_batch))))
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
                    self.engine.target.split.heartbeat()
                    continue
                for decoder, jobs in active:
                    for job in jobs:
                        if job.cancelled and job.row.finish_reason is None:
                            decoder.cancel(job.row)  # it leaves after this round
                    decoder.step()
                    for job in list(jobs):
                        job.publish()
                        if job.row.finish_reason is not None:
                            jobs.remove(job)
                            self.job_seconds += 0.2 * (time.perf_counter() - job.started - self.job_seconds)
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
            job.started = time.perf_counter()
            try:
                job.row = decoder.add(job.prompt, job.max_tokens, job.stops, job.seed, job.images)
            except Exception as e:  # its prefill failed: it alone fails (it is in no batch yet)
                job.publish(final_error=f"internal error: {e}")
                continue
            job.publish()
            if job.row.finish_reason is None:
                jobs.append(job)


# --- HTTP ---------------------------------------------------------------------------------------------------------


async def request_body(request: Request) -> dict:
    """The JSON body, read up to MAX_BODY_BYTES (a larger one is a 413 before it is all in memory)."""
    too_large = BadRequest(f"request body larger than {MAX_BODY_BYTES // 2**20} MB", status=413)
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise too_large
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep to parse
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def request_prompt(body: dict, engine: Engine, chat: bool, tools: Optional[ToolUse]) -> tuple[list[int], tuple]:
    """The prompt's tokens and its images (None without); a `tool_choice` that forces a call adds the call's
    opening (tool_calls.forced_prefix)."""
    if chat:
        try:
            messages = chat_messages(body.get("messages"))
            check_tool_messages(messages, engine.tokenizer)
            prompt, images = engine.encode_images(messages, tools=tools and tools.tools)
            return prompt + (list(engine.tokenizer.encode(tools.prefix, add_special_tokens=False))
                             if tools and tools.prefix else []), images
        except ChatTemplateError as e:
            raise BadRequest(str(e).replace("--raw in the CLI, ", ""), param="messages") from None
        except (ImageError, LoadError) as e:  # not an image, too large, remote, or no vision tower
            raise BadRequest(str(e), param="messages") from None
    text = body.get("prompt")
    if not isinstance(text, str) or not text:
        raise BadRequest("prompt must be a non-empty string", param="prompt")
    return engine.encode(text), None


def read_job(body: dict, engine: Engine, chat: bool) -> Job:
    """The request's job, every field checked (BadRequest names the first bad one). Any `model` name is served by
    the loaded model, as llama.cpp's and LM Studio's servers do (many clients send a fixed one)."""
    if body.get("model") is not None and not isinstance(body.get("model"), str):
        raise BadRequest("model must be a string", param="model")
    check_unsupported(body)
    tools = tool_use(body, engine.tokenizer, chat)
    prompt, images = request_prompt(body, engine, chat, tools)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if not is_int(max_tokens) or max_tokens < 1:
        raise BadRequest("max_tokens must be a positive integer", param="max_tokens")
    context = engine.target.config.max_position_embeddings
    if len(prompt) + max_tokens > context:
        raise BadRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                         f"({context} tokens)", param="messages" if chat else "prompt", code="context_length_exceeded")
    top_k = body.get("top_k", 0)
    if not is_int(top_k) or top_k < 0:
        raise BadRequest(f"top_k must be an integer >= 0 (0 = all tokens), got {top_k!r}", param="top_k")
    params = SamplingParams(number(body, "temperature", 1.0, 0, 2), number(body, "top_p", 1.0, 0, 1, open_low=True),
                            top_k, number(body, "min_p", 0.0, 0, 1))
    seed = body.get("seed")
    if seed is not None and not is_int(seed):
        raise BadRequest("seed must be an integer", param="seed")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("stream must be true or false", param="stream")
    include_usage(body)
    stops = stop_strings(body.get("stop"))
    if tools and engine.tokenizer.tool_call_start == GEMMA4_START:  # a call's turn ends where its result would go
        stops += ("<|tool_response>",)
    return Job(prompt, max_tokens, params, stops, seed, asyncio.get_running_loop(), draft=draft_setting(body, engine),
               tools=tools, images=images)


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
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            return error(f"the server is busy ({self.scheduler.max_waiting} requests are waiting); retry after "
                         f"{e.retry_after} s", 429, code="rate_limit_exceeded", kind="requests",
                         headers={"Retry-After": str(e.retry_after)})
        if body.get("stream"):
            return StreamingResponse(self.stream(job, rid, chat, include_usage(body)), media_type="text/event-stream")
        text, finish = "", None
        while finish is None:
            piece, finish = await job.updates.get()
            text += piece
        if finish not in ("stop", "length"):
            return error(finish, 500, kind="server_error")
        if chat:
            message, finish = self.reply(job, text, finish)
            choice = {"index": 0, "message": message, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.model_id, "choices": [choice],
                             "usage": usage(job), "mtp": mtp(job)})

    def reply(self, job: Job, text: str, finish: str) -> tuple[dict, str]:
        """The assistant message of a whole reply: its content, and its tool calls if the request had tools."""
        if job.tools is None:
            return {"role": "assistant", "content": text}, finish
        content, calls = ToolCallText.of(self.engine.tokenizer, job.tools).finish(text)
        if not calls:
            return {"role": "assistant", "content": content}, finish
        return ({"role": "assistant", "content": content.strip() or None, "tool_calls": calls},
                "tool_calls" if finish == "stop" else finish)

    def chunk(self, rid: str, chat: bool, delta: Optional[str], finish=None, role=False, extra=None,
              calls=None) -> str:
        if chat:
            d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
            if calls:
                d["tool_calls"] = calls
            choice = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        payload = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": int(time.time()), "model": self.model_id, "choices": [choice], **(extra or {})}
        return f"data: {json.dumps(payload)}\n\n"

    async def stream(self, job: Job, rid: str, chat: bool, usage_chunk: bool = False):
        finish, calls = None, ToolCallText.of(self.engine.tokenizer, job.tools) if job.tools else None
        try:
            if chat:
                yield self.chunk(rid, chat, None, role=True)
            while finish is None:
                piece, finish = await job.updates.get()
                if calls is not None:  # content outside the calls as it comes; each call once it is whole
                    delta, new = calls.finish(piece) if finish else calls.add(piece)
                    if delta or new:
                        yield self.chunk(rid, chat, delta or None, calls=tool_call_deltas(calls, new))
                elif piece:
                    yield self.chunk(rid, chat, piece)
            if calls is not None and calls.calls and finish == "stop":
                finish = "tool_calls"
            if finish not in ("stop", "length", "tool_calls"):
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


def tool_call_deltas(calls: ToolCallText, new: list) -> list:
    """Streamed calls carry their index in the reply (OpenAI's `delta.tool_calls[].index`)."""
    first = len(calls.calls) - len(new)
    return [{"index": first + i, **call} for i, call in enumerate(new)]


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
