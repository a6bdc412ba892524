"""The OpenAI-compatible HTTP API: FastAPI routes over one `GenerationWorker`.

A request's life: FastAPI validates the body against `schemas`; the handler checks what the
schema cannot know (the model name, the context length, the vocabulary), tokenizes in a
thread pool (long prompts and chat templates are CPU work the event loop must not do), and
submits a `Job`. The worker thread sends the job's events back onto the event loop with
`loop.call_soon_threadsafe`, into an `asyncio.Queue` the handler reads, so the loop only ever
awaits. A streamed reply is server-sent events ending in `data: [DONE]`; if the client goes
away, Starlette cancels the stream and the job is cancelled with it; a non-streamed request
watches for the disconnect itself.

Every error, from malformed JSON to a full queue, leaves as OpenAI's error JSON
(`{"error": {"message", "type", "param", "code"}}`) with the matching status
(`http_errors`), and each request writes one log line. Before any of this, `gate` checks the
API key and the body's size; `formats` wraps pieces of text as chat or text completions.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from ..errors import MlxLlamaError
from ..generate import check_token_ids
from ..sampling import SamplingParams
from . import schemas as S
from .formats import ChatFormat, CompletionFormat, sse
from .gate import LOCAL_ORIGINS, GateMiddleware, JsonBodyByDefault
from .http_errors import APIError, error_json, install_error_handlers
from .worker import (Delta, Failed, Finished, GenerationWorker, Job, QueueFull, ShuttingDown,
                     TokenLogprob)

log = logging.getLogger("mlx_llama.server")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ------------------------------------------------------------------------------------------
# Shared request handling
# ------------------------------------------------------------------------------------------


@dataclass
class ServerContext:
    worker: GenerationWorker
    tokenizer: Any
    model_id: str
    created: int
    longest_token: int = 64  # characters in the vocabulary's longest token (see create_app)

    def check_prompt_chars(self, n_chars: int, param: str) -> None:
        """Refuse, before tokenizing, text that cannot fit the context however it splits:
        tokenizing megabytes holds the interpreter for seconds, and every other request
        (health checks included) waits that long. Twice the bound, for templates and merges."""
        limit = 2 * self.worker.context_length * self.longest_token
        if n_chars > limit:
            raise APIError(400, f"the {param} has {n_chars} characters, far more than the "
                           f"model's context of {self.worker.context_length} tokens can hold: "
                           "shorten it", param=param, code="context_length_exceeded")

    def check_model(self, name: str) -> None:
        if name != self.model_id:  # repr: a lone surrogate in `name` must not break the JSON
            raise APIError(404, f"model {name!r} is not served here: this server serves "
                           f"{self.model_id!r} (see GET /v1/models)", param="model",
                           code="model_not_found")


def reject_unsupported(body: S.SamplingFields) -> None:
    if body.n not in (None, 1):
        raise APIError(400, f"n={body.n} is not supported: this server returns one choice per "
                       "request; send n=1 or leave it out, and send several requests for "
                       "several answers", param="n", code="unsupported_value")
    if body.stream_options is not None and not body.stream:  # as OpenAI: it would do nothing
        raise APIError(400, "stream_options is only allowed with stream: true; drop it or "
                       "stream the reply", param="stream_options", code="invalid_value")
    if not isinstance(body, S.ChatCompletionRequest):
        return
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, f"response_format {body.response_format.type!r} is not supported: "
                       "this server writes plain text; drop response_format or send "
                       "{\"type\": \"text\"}", param="response_format", code="unsupported_value")
    if body.tool_choice not in (None, "none", "auto"):
        raise APIError(400, f"tool_choice {body.tool_choice!r} is not supported: this server "
                       "has no tool calling; drop tool_choice or send \"none\"",
                       param="tool_choice", code="unsupported_value")


def sampling_params(body: S.SamplingFields, vocab_size: int) -> SamplingParams:
    """Map the request's sampling fields to `SamplingParams` (OpenAI defaults when absent)."""
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise APIError(400, f"logit_bias key {key!r} is not a token id: keys must be token "
                           "ids written as strings, e.g. {\"50256\": -100}",
                           param="logit_bias") from None
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias=bias,
        seed=None if body.seed is None else body.seed % (1 << 64),
    )
    try:
        return params.validate(vocab_size)
    except MlxLlamaError as e:
        param = next((f for f in ("logit_bias", "temperature", "top_p", "top_k", "min_p",
                                  "repetition_penalty", "frequency_penalty", "presence_penalty")
                      if f in str(e)), None)
        raise APIError(400, str(e), param=param) from None


def token_budget(ctx: ServerContext, n_prompt: int, requested: int | None, default: int | None,
                 prompt_param: str, max_param: str) -> int:
    """How many tokens to generate; refuses prompts and requests the context cannot hold."""
    limit = ctx.worker.context_length
    if n_prompt >= limit:
        raise APIError(400, f"the prompt has {n_prompt} tokens but the model's context is "
                       f"{limit}: shorten it", param=prompt_param, code="context_length_exceeded")
    room = limit - n_prompt
    if requested is None:
        return min(default or room, room)
    if requested > room:
        raise APIError(400, f"{max_param}={requested} does not fit: the prompt has {n_prompt} "
                       f"tokens and the context holds {limit}, so at most {room} can be "
                       f"generated; lower {max_param}", param=max_param,
                       code="context_length_exceeded")
    return requested


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def new_job(ctx: ServerContext, prefix: str, tokens: list[int], max_tokens: int,
            body: S.SamplingFields, top_logprobs: int | None,
            loop: asyncio.AbstractEventLoop, continuation: bool = False,
            ) -> tuple[Job, asyncio.Queue]:
    """A job whose events land in the returned queue on `loop` (from the worker thread)."""
    queue: asyncio.Queue = asyncio.Queue()
    job_ref: list[Job] = []

    def emit(event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            job_ref[0].cancel()

    job = Job(id=f"{prefix}-{uuid.uuid4().hex[:24]}", tokens=tokens, max_tokens=max_tokens,
              sampling=sampling_params(body, ctx.worker.vocab_size), emit=emit,
              stop=stop_list(body.stop), top_logprobs=top_logprobs, continuation=continuation)
    job_ref.append(job)
    return job, queue


def shutting_down(e: ShuttingDown) -> APIError:
    return APIError(503, str(e), type="server_error", code="service_unavailable")


def submit(ctx: ServerContext, job: Job) -> None:
    try:
        ctx.worker.submit(job)
    except ShuttingDown as e:
        raise shutting_down(e) from None
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e.waiting} requests are already waiting; "
                       f"retry in {e.retry_after} s", type="rate_limit_error",
                       code="rate_limit_exceeded",
                       headers={"Retry-After": str(e.retry_after)}) from None


def usage_of(done: Finished) -> S.Usage:
    return S.Usage(
        prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
        prompt_tokens_details=S.PromptTokensDetails(cached_tokens=done.cached_tokens),
    )


def log_request(job: Job, route: str, status: int, done: Finished | None, started: float,
                note: str = "") -> None:
    """One line per request: id, tokens in/out, prefill and decode speed, cache use."""
    ms = (time.perf_counter() - started) * 1000
    if done is None:
        log.info("%s %s status=%d in=%d %s time=%.0fms", job.id, route, status, len(job.tokens),
                 note, ms)
        return
    log.info(
        "%s %s status=%d in=%d out=%d cached=%d prefill=%.1f tok/s decode=%.1f tok/s "
        "cache=%s finish=%s time=%.0fms", job.id, route, status, done.prompt_tokens,
        done.completion_tokens, done.cached_tokens, done.prefill_tps, done.decode_tps,
        "hit" if done.cached_tokens else "miss", done.finish_reason, ms)


def error_of(failure: Failed) -> APIError:
    if isinstance(failure.error, ShuttingDown):
        return shutting_down(failure.error)
    if isinstance(failure.error, MlxLlamaError):
        return APIError(400, str(failure.error))
    return APIError(500, f"generation failed: {type(failure.error).__name__}: {failure.error}",
                    type="server_error", code="internal_error")


async def watch_disconnect(request: Request, ctx: ServerContext, job: Job) -> None:
    """Cancel `job` when the client disconnects (the body has been read already, so the next
    ASGI message can only be `http.disconnect`)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            ctx.worker.cancel(job)
            return


class JobStream(StreamingResponse):
    """A streamed reply that cancels its job however the response ends early: a client that
    disconnects before the first chunk never starts the body generator, so the generator's
    own `finally` alone would miss it."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], **kw) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def stream_events(ctx: ServerContext, job: Job, queue: asyncio.Queue, fmt,
                        include_usage: bool, started: float,
                        state: dict) -> AsyncIterator[str]:
    """Server-sent events for one job. Deltas that piled up while the client was slow are
    sent as one chunk; if the client disconnects, Starlette cancels this generator and the
    `finally` cancels the job."""
    done = False
    status = 200
    try:
        head = fmt.head(include_usage)
        if head is not None:
            yield sse(head)
        while True:
            events = [await queue.get()]
            while not queue.empty() and not isinstance(events[-1], (Finished, Failed)):
                events.append(queue.get_nowait())
            text = "".join(e.text for e in events if isinstance(e, Delta))
            items = [lp for e in events if isinstance(e, Delta) for lp in e.logprobs]
            if text or items:
                yield sse(fmt.piece(text, items, include_usage))
            last = events[-1]
            if isinstance(last, Finished):
                yield sse(fmt.tail(last.finish_reason, include_usage))
                if include_usage:
                    yield sse(fmt.usage(usage_of(last)))
                yield sse("[DONE]")
                done = state["done"] = True
                log_request(job, fmt.route, 200, last, started, "stream")
                return
            if isinstance(last, Failed):
                err = error_of(last)
                status = err.status
                payload = S.ErrorResponse(error=S.ErrorDetail(
                    message=err.message, type=err.type, param=err.param, code=err.code))
                yield sse(payload.model_dump_json())
                yield sse("[DONE]")
                done = state["done"] = True
                log_request(job, fmt.route, status, None, started, f"error={err.message!r}")
                return
    finally:
        if not done:
            state["done"] = True
            ctx.worker.cancel(job)
            log_request(job, fmt.route, 499, None, started, "client disconnected: cancelled")


async def collect(request: Request, ctx: ServerContext, job: Job, queue: asyncio.Queue, fmt,
                  started: float):
    """Wait for the whole completion, cancelling it if the client disconnects meanwhile."""
    watcher = asyncio.ensure_future(watch_disconnect(request, ctx, job))
    finished = False
    try:
        parts: list[str] = []
        items: list[TokenLogprob] = []
        while True:
            event = await queue.get()
            if isinstance(event, Delta):
                parts.append(event.text)
                items.extend(event.logprobs)
            elif isinstance(event, Finished):
                finished = True
                log_request(job, fmt.route, 200, event, started)
                return fmt.whole("".join(parts), event.finish_reason, items, usage_of(event))
            else:
                finished = True
                if job.cancelled.is_set():  # the client left; nobody reads this reply
                    log_request(job, fmt.route, 499, None, started, "client disconnected")
                    return None
                raise error_of(event)
    finally:
        watcher.cancel()
        if not finished:
            ctx.worker.cancel(job)


async def respond(request: Request, ctx: ServerContext, job: Job, queue: asyncio.Queue, fmt,
                  body: S.SamplingFields, started: float):
    submit(ctx, job)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        state = {"done": False}

        def on_close() -> None:
            if not state["done"]:
                state["done"] = True
                ctx.worker.cancel(job)
                log_request(job, fmt.route, 499, None, started, "client disconnected: cancelled")

        return JobStream(
            stream_events(ctx, job, queue, fmt, include_usage, started, state), on_close,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                     "X-Request-Id": job.id})
    result = await collect(request, ctx, job, queue, fmt, started)
    if result is None:
        return error_json(499, "the client closed the connection", code="client_closed")
    return JSONResponse(result.model_dump(), headers={"X-Request-Id": job.id})


async def encode(fn: Callable, *args, param: str) -> list[int]:
    """Tokenize off the event loop; template and tokenizer errors become 400s on `param`."""
    try:
        tokens = await run_in_threadpool(fn, *args)
    except MlxLlamaError as e:
        raise APIError(400, str(e), param=param) from None
    if not tokens:
        raise APIError(400, f"the {param} is empty: give some text", param=param)
    return list(tokens)


# ------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------

router = APIRouter()


def context(request: Request) -> ServerContext:
    return request.app.state.ctx


@router.api_route("/health", methods=["GET", "HEAD"], response_model=S.Health)  # (probes use HEAD)
async def health(request: Request) -> S.Health:
    ctx = context(request)
    return S.Health(model=ctx.model_id, busy=ctx.worker.busy, waiting=ctx.worker.waiting)


@router.get("/v1/models", response_model=S.ModelList)
async def list_models(request: Request) -> S.ModelList:
    ctx = context(request)
    return S.ModelList(data=[S.ModelCard(id=ctx.model_id, created=ctx.created)])


@router.get("/v1/models/{model_id:path}", response_model=S.ModelCard)
async def get_model(model_id: str, request: Request) -> S.ModelCard:
    ctx = context(request)
    ctx.check_model(model_id)
    return S.ModelCard(id=ctx.model_id, created=ctx.created)


@router.post("/v1/chat/completions", response_model=S.ChatCompletion)
async def chat_completions(body: S.ChatCompletionRequest, request: Request):
    started = time.perf_counter()
    ctx = context(request)
    ctx.check_model(body.model)
    reject_unsupported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true; set logprobs or drop top_logprobs",
                       param="top_logprobs")
    messages = [m.for_template() for m in body.messages]
    ctx.check_prompt_chars(sum(len(m.get("content", "")) for m in messages), "messages")
    tokens = await encode(
        lambda: ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True), param="messages")
    requested, max_param = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        requested, max_param = body.max_completion_tokens, "max_completion_tokens"
    max_tokens = token_budget(ctx, len(tokens), requested, None, "messages", max_param)
    top = (body.top_logprobs or 0) if body.logprobs else None
    job, queue = new_job(ctx, "chatcmpl", tokens, max_tokens, body, top,
                         asyncio.get_running_loop())
    fmt = ChatFormat(job, ctx.model_id, bool(body.logprobs))
    return await respond(request, ctx, job, queue, fmt, body, started)


def completion_prompt(ctx: ServerContext, prompt) -> str | list[int]:
    """The one prompt of a completions request: text or token ids (batches are refused)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"{len(prompt)} prompts in one request are not supported: "
                           "send one prompt per request", param="prompt",
                           code="unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, list):
        try:
            check_token_ids(prompt, ctx.worker.vocab_size)
        except MlxLlamaError as e:
            raise APIError(400, str(e), param="prompt") from None
    return prompt


@router.post("/v1/completions", response_model=S.Completion)
async def completions(body: S.CompletionRequest, request: Request):
    started = time.perf_counter()
    ctx = context(request)
    ctx.check_model(body.model)
    reject_unsupported(body)
    if body.echo:
        raise APIError(400, "echo=true is not supported: leave it out and prepend the prompt "
                       "yourself", param="echo", code="unsupported_value")
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server: leave it out",
                       param="suffix", code="unsupported_value")
    prompt = completion_prompt(ctx, body.prompt)
    if isinstance(prompt, str) and not prompt:
        raise APIError(400, "the prompt is empty: give some text", param="prompt")
    if isinstance(prompt, str):
        ctx.check_prompt_chars(len(prompt), "prompt")
        tokens = await encode(ctx.tokenizer.encode, prompt, param="prompt")
    elif prompt:
        tokens = list(prompt)
    else:
        raise APIError(400, "the prompt is empty: give some text", param="prompt")
    max_tokens = token_budget(ctx, len(tokens), body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS,
                              "prompt", "max_tokens")
    job, queue = new_job(ctx, "cmpl", tokens, max_tokens, body, body.logprobs,
                         asyncio.get_running_loop(), continuation=True)
    fmt = CompletionFormat(job, ctx.model_id, body.logprobs is not None)
    return await respond(request, ctx, job, queue, fmt, body, started)


# ------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------


def longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token stands for: the longest vocabulary entry as
    stored (byte-level and SentencePiece pieces spell each byte or character with at least one
    character of their own)."""
    pieces = (tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size))
    return max((len(p) for p in pieces if p), default=1)


def create_app(worker: GenerationWorker, tokenizer, *, model_id: str,
               api_key: str | None = None, stop_worker_on_shutdown: bool = False,
               allowed_origins: list[str] | None = None) -> FastAPI:
    """The ASGI app serving `worker`'s model (the worker must already be started).

    `allowed_origins`: web origins (or "*") that browsers may call from, besides pages served
    from this machine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if stop_worker_on_shutdown:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="mlx-llama", description="OpenAI-compatible local server",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ServerContext(worker, tokenizer, model_id, int(time.time()),
                                  longest_token_chars(tokenizer))
    app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(JsonBodyByDefault)
    app.add_middleware(GateMiddleware, api_key=api_key)
    # Outermost: preflights (which carry no API key) are answered before the gate, and the
    # gate's 401/413 carry the headers a browser needs to read them.
    app.add_middleware(CORSMiddleware, allow_origins=allowed_origins or [],
                       allow_origin_regex=LOCAL_ORIGINS, allow_methods=["GET", "POST"],
                       allow_headers=["*"], max_age=600)  # SDKs add their own (x-stainless-*)
    return app
