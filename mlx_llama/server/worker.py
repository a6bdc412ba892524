"""The one thread that owns the model and runs every generation, one request at a time.

MLX evaluates a graph on the calling thread, and a model's KV caches and the random state are
plain shared objects: two requests stepping the model from different threads would interleave
their work and their random draws. So exactly one thread loads the model and runs all
forward passes; HTTP handlers only enqueue `Job`s and read the events a job emits.

- Requests wait in a FIFO queue bounded by `max_queue`; a full queue is refused at once
  (`QueueFull`) rather than left to time out, so clients can back off.
- A job emits events through a callback the submitter provides. The server's callback hands
  them to the asyncio loop with `loop.call_soon_threadsafe`, so the loop never waits on the
  model and the worker never waits on a slow client.
- `Job.cancel()` (a client went away) is checked before every token and between prefill
  chunks, so a cancelled job stops at its next token and the next job starts right after.
- Finished jobs leave a `JobRecord` (timings, token counts, cache use, how cancellation went)
  in `worker.records`: the server logs it and tests inspect it.
"""

from __future__ import annotations

import codecs
import collections
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .. import memory
from ..errors import MlxLlamaError
from ..generate import stream_generate
from ..loading import read_weights_now
from ..sampling import SamplingParams
from .prefix_cache import PrefixCacheStore

log = logging.getLogger("mlx_llama.server")


class QueueFull(Exception):
    """Raised by `submit` when `max_queue` requests are already waiting."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting = waiting
        self.retry_after = retry_after


def json_logprob(value: float) -> float:
    """A token the biases ruled out (-inf) or arithmetic lost (NaN) as OpenAI writes an
    impossible token: -9999.0. JSON has no infinities, and the schema wants a number."""
    return float(value) if math.isfinite(value) else -9999.0


class ShuttingDown(MlxLlamaError):
    """A job refused or ended because the server is exiting (HTTP 503: retry elsewhere)."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry later")


class Cancelled(Exception):
    """Raised inside the worker to abandon a job whose client has gone."""


# ------------------------------------------------------------------------------------------
# Events a job emits (worker thread -> submitter)
# ------------------------------------------------------------------------------------------


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass
class Delta:
    """New text (possibly empty: held back by the detokenizer or a possible stop string), and
    the logprobs of the tokens that text completes (see `LogprobAligner`)."""

    text: str
    token: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


class LogprobAligner:
    """Releases a token's logprob with the text it spells, not when it is sampled.

    Text is held back while it may be part of a stop string or of a character; a token's
    logprob goes out with the piece that sends the last of its text, so a stream's tokens
    never run ahead of its content. When the run ends, a token whose text was partly sent (a
    stop string cut inside it) goes out too, so every sent character has its token; tokens
    wholly inside a stop string, and end tokens (no text at all), never do.

    Where each token's text starts and ends comes from its bytes, decoded as one stream (a
    token that ends inside a character ends with that character); a private detokenizer's
    pieces give the offset between that stream and the text, which is not zero when the
    decoder drops a SentencePiece word-initial space.
    """

    def __init__(self, tokenizer, after: list[int] = ()) -> None:
        self.detokenizer = tokenizer.detokenizer(after)  # as stream_generate's own
        self.special = frozenset(tokenizer.all_special_ids)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stream_chars = 0  # whole characters the tokens' bytes spell so far
        self.spelled = 0  # characters of text the tokens spell so far
        self.waiting: list[tuple[int, int, TokenLogprob]] = []  # in stream characters
        self.placed: list[tuple[int, int, TokenLogprob]] = []  # in text characters
        self.released = 0  # characters sent to the client

    def add(self, token: int, logprob: TokenLogprob, released: str, last: bool) -> list[TokenLogprob]:
        if int(token) not in self.special:
            start = self.stream_chars
            self.stream_chars += len(self.utf8.decode(bytes(logprob.bytes)))
            inside = 1 if self.utf8.getstate()[0] else 0
            self.waiting.append((start, self.stream_chars + inside, logprob))
            self._place(self.detokenizer.add_token(token))
        if last:
            self._place(self.detokenizer.finalize())
        self.released += len(released)
        ready, kept = [], []
        for entry in self.placed:
            start, end, _ = entry
            sent = start < self.released if last else end <= self.released
            (ready if sent else kept).append(entry)
        self.placed = kept
        return [lp for _, _, lp in ready]

    def _place(self, piece: str) -> None:
        if not piece:
            return
        self.spelled += len(piece)
        shift = max(self.stream_chars - self.spelled, 0)
        self.placed += [(max(a - shift, 0), max(b - shift, 0), lp) for a, b, lp in self.waiting]
        self.waiting = []


@dataclass
class Finished:
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prefill_tps: float
    decode_tps: float


@dataclass
class Failed:
    error: BaseException


Event = Delta | Finished | Failed


# ------------------------------------------------------------------------------------------
# Jobs
# ------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One generation request, already tokenized and validated."""

    id: str
    tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token plus k alternatives
    continuation: bool = False  # the text continues the prompt's (completions), not a chat turn
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens_generated: int = 0
    tokens_at_cancel: int | None = None  # tokens generated when cancel() was called
    cancel_requested_at: float | None = None

    def cancel(self) -> None:
        """Ask the worker to stop this job at its next token (safe from any thread)."""
        if not self.cancelled.is_set():
            self.tokens_at_cancel = self.tokens_generated
            self.cancel_requested_at = time.perf_counter()
            self.cancelled.set()


@dataclass
class JobRecord:
    """What happened to a job, for the request log and for tests."""

    id: str
    prompt_tokens: int
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    completion_tokens: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    cache: str = "miss"  # how the prompt cache was found: miss, move or fork
    finish_reason: str | None = None
    enqueued_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    tokens_after_cancel: int | None = None  # tokens made between cancel() and the worker noticing
    error: str | None = None


# ------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------


class GenerationWorker:
    """Loads the model on its own thread and runs queued jobs there, in order.

    `load_model` is called on the worker thread and returns the model; the tokenizer is
    shared with the HTTP side (encoding there, decoding here), which both tokenizer
    backends allow.
    """

    def __init__(
        self,
        load_model: Callable[[], object],
        tokenizer,
        *,
        max_queue: int = 16,
        prompt_cache_bytes: int = 2 << 30,
        history: int = 256,
        cache_kind: tuple[str, dict] = ("default", {}),
    ) -> None:
        self._load_model = load_model
        # (kind, options) for Llama.make_cache: the KV cache every request gets (--kv-bits...).
        self.cache_kind = cache_kind
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.prompt_cache_bytes = prompt_cache_bytes
        self.model = None
        self.prefix_cache: PrefixCacheStore | None = None
        self.current: Job | None = None
        self.records: collections.deque[JobRecord] = collections.deque(maxlen=history)
        self._queue: collections.deque[Job] = collections.deque()
        self._pending: dict[str, JobRecord] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._recent_seconds: collections.deque[float] = collections.deque(maxlen=16)
        self._thread = threading.Thread(target=self._main, name="mlx-llama-worker", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "GenerationWorker":
        """Start the thread and wait until the model is loaded; load errors are re-raised."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            # Wait for the thread to clear its MLX streams: exiting while it still holds them
            # aborts the process ("terminate called without an active exception", exit 134).
            self._thread.join()
            raise self._load_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the thread."""
        self.begin_shutdown()
        self._thread.join(timeout)

    def begin_shutdown(self) -> None:
        """Refuse new jobs, fail the queued ones and stop the running one at its next token,
        without waiting: safe from a signal handler on the event loop, so a server told to
        exit ends its streams at once instead of generating them to the end first."""
        with self._cond:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            if self.current is not None:
                self.current.cancel()
            self._cond.notify_all()
        for job in waiting:
            self._safe_emit(job, Failed(ShuttingDown()))

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    # -- queue -----------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        return self.current is not None

    def submit(self, job: Job) -> None:
        """Queue `job` (FIFO). Raises `QueueFull` when `max_queue` jobs are already waiting."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            idle = self.current is None and not self._queue
            if not idle and len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue), self._retry_after(len(self._queue)))
            self._pending[job.id] = JobRecord(job.id, len(job.tokens),
                                              enqueued_at=time.perf_counter())
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Cancel `job`: drop it from the queue if it has not started, else stop it."""
        job.cancel()
        with self._cond:
            if job not in self._queue:
                return
            self._queue.remove(job)
            record = self._pending.pop(job.id)
            record.finish_reason = "cancelled"
            record.finished_at = time.perf_counter()
            self.records.append(record)
        # Whoever waits on the job's events (a non-streamed handler) must hear that it ended.
        self._safe_emit(job, Failed(MlxLlamaError("the request was cancelled")))

    def _retry_after(self, waiting: int) -> int:
        """Seconds until a slot is likely free: the recent mean job time times the jobs ahead."""
        mean = sum(self._recent_seconds) / len(self._recent_seconds) if self._recent_seconds else 1
        return max(1, round(mean * (waiting + 1)))

    # -- the thread ------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._serve()
        finally:
            # MLX's streams of a thread that ends must be destroyed by that thread, or the
            # process may abort at exit ("terminate called without an active exception").
            getattr(mx, "clear_streams", lambda: None)()

    def _serve(self) -> None:
        try:
            self.model = self._load_model()
            kind, options = self.cache_kind
            make_layers = functools.partial(self.model.make_cache, kind, **options)
            make_layers()  # options are checked against the model before serving
            self.prefix_cache = PrefixCacheStore(make_layers, self.prompt_cache_bytes)
            too_big = memory.fit_warning(self.model)
            if too_big:
                log.warning(too_big)
            read_weights_now(self.model)
        except BaseException as e:  # noqa: BLE001 - handed to start()
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:  # (a job queued as the shutdown began must hear of it)
                    left, self._queue = list(self._queue), collections.deque()
                    break
                job = self._queue.popleft()
                record = self._pending.pop(job.id)
                self.current = job
            try:
                self._run(job, record)
            finally:
                # MLX keeps freed buffers for reuse; between requests they are only held
                # memory (the prefix cache keeps what is worth keeping), so give them back.
                memory.release_cached_memory()
                with self._cond:
                    self.current = None
                    record.finished_at = time.perf_counter()
                    self.records.append(record)
                    if record.started_at is not None:
                        self._recent_seconds.append(record.finished_at - record.started_at)
        for job in left:
            self._safe_emit(job, Failed(ShuttingDown()))

    def _run(self, job: Job, record: JobRecord) -> None:
        record.started_at = time.perf_counter()
        if job.cancelled.is_set():
            record.finish_reason = "cancelled"
            record.tokens_after_cancel = 0
            self._safe_emit(job, Failed(MlxLlamaError("the request was cancelled")))
            return
        checkout = self.prefix_cache.checkout(job.tokens)
        record.cache = checkout.how
        cache, keep = checkout.cache, True

        def on_prefill(done: int, total: int) -> None:
            if job.cancelled.is_set():
                raise Cancelled()

        try:
            finished, aligner = None, None
            for r in stream_generate(
                self.model, self.tokenizer, job.tokens, job.max_tokens,
                sampling=job.sampling, stop=job.stop, cache=cache,
                logprobs=job.top_logprobs is not None, prefill_progress=on_prefill,
                continuation=job.continuation,
            ):
                job.tokens_generated = r.generation_tokens
                if r.generation_tokens == 1:
                    record.cached_tokens = r.cached_tokens
                    record.prefilled_tokens = r.prompt_tokens - r.cached_tokens
                    record.prefill_tps = r.prompt_tps
                if job.cancelled.is_set():
                    record.tokens_after_cancel = r.generation_tokens - (job.tokens_at_cancel or 0)
                    raise Cancelled()
                record.completion_tokens = r.generation_tokens
                record.decode_tps = r.generation_tps
                ready = []
                if r.logprobs is not None:
                    aligner = aligner or LogprobAligner(
                        self.tokenizer, job.tokens if job.continuation else [])
                    ready = aligner.add(r.token, self._logprob(r.token, r.logprobs, job.top_logprobs),
                                        r.text, last=r.finish_reason is not None)
                job.emit(Delta(r.text, r.token, ready))
                if r.finish_reason is not None:
                    finished = Finished(r.finish_reason, r.prompt_tokens, r.cached_tokens,
                                        r.generation_tokens, r.prompt_tps, r.generation_tps)
            record.finish_reason = finished.finish_reason
            job.emit(finished)
        except Cancelled:
            record.finish_reason = "cancelled"
            if record.tokens_after_cancel is None:
                record.tokens_after_cancel = 0
            why = ShuttingDown() if self._stopping else MlxLlamaError("the request was cancelled")
            self._safe_emit(job, Failed(why))
        except MlxLlamaError as e:
            record.finish_reason, record.error = "error", str(e)
            self._safe_emit(job, Failed(e))
        except Exception as e:  # a bug or an MLX failure: keep serving, drop the suspect cache
            keep = False
            log.exception("generation failed for %s", job.id)
            record.finish_reason, record.error = "error", f"{type(e).__name__}: {e}"
            self._safe_emit(job, Failed(e))
        finally:
            if keep:  # (a job stopped in its prefill left a cache made for a shorter prompt)
                self.prefix_cache.checkin(cache, min(len(job.tokens), len(cache.tokens)))

    def _safe_emit(self, job: Job, event: Event) -> None:
        try:
            job.emit(event)
        except Exception:  # the receiver is gone (e.g. its loop closed): nothing to tell
            job.cancel()

    def _logprob(self, token: int, logprobs: mx.array, k: int) -> TokenLogprob:
        """The chosen token's log-probability and the `k` most likely alternatives."""
        chosen = logprobs[token]
        if k > 0:
            top_ids = mx.argpartition(-logprobs, k - 1)[:k]
            top_vals = logprobs[top_ids]
            mx.eval(chosen, top_ids, top_vals)
            pairs = sorted(zip(top_ids.tolist(), top_vals.tolist()), key=lambda p: -p[1])
        else:
            pairs = []
        top = []
        for token_id, value in pairs:
            name, raw = token_piece(self.tokenizer, token_id)
            top.append((name, json_logprob(value), list(raw)))
        text, raw = token_piece(self.tokenizer, token)
        return TokenLogprob(token=text, logprob=json_logprob(chosen.item()), bytes=list(raw),
                            top=top)


@lru_cache(maxsize=65536)
def token_piece(tokenizer, token: int) -> tuple[str, bytes]:
    """A token as OpenAI's logprobs show it: its text (word-initial space kept) and its bytes;
    a token that is part of a character shows as "bytes:\\xf0\\x9f" (as OpenAI writes it),
    so different tokens never share one name."""
    raw = tokenizer.token_bytes(int(token))
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def load_model_fn(folder: Path) -> Callable[[], object]:
    """A loader for `GenerationWorker` that reads an MLX (or Hugging Face) model folder."""

    def load():
        from ..loading import load_model

        model, _ = load_model(folder, lazy=True)  # the worker reads it after the fit check
        return model

    return load
