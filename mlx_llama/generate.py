"""The generation engine: prefill the prompt, then decode one token at a time.

Shape of the loop (as in gpt-fast): `prefill` runs the prompt through the model in chunks,
evaluating the cache between chunks so peak memory follows the chunk, not the prompt;
`decode` then builds step n+1's graph while step n computes (`mx.async_eval`), so the host's
Python work for a token overlaps the device's work for the previous one. Detokenizing and stop
checks are the only per-token host work.
"""

from __future__ import annotations

import codecs
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import mlx.core as mx

from .cache import PromptCache
from .errors import MlxLlamaError
from .memory import peak_memory_gb, wired_limit
from .sampling import LogitsProcessor, SamplingParams, make_sampler

PREFILL_CHUNK = 512


def default_prefill_chunk(model) -> int:
    """Tokens per prompt chunk for `model`: what loading chose for its backend (see
    loading.py: 64 where each token costs the same whatever the chunk), else PREFILL_CHUNK."""
    return getattr(model, "prefill_chunk", None) or PREFILL_CHUNK

Prompt = "str | list[int] | list[dict[str, Any]]"


@dataclass
class GenerationResponse:
    """One step of `stream_generate`: the new text and what it cost so far."""

    text: str
    token: int | None
    logprobs: mx.array | None
    finish_reason: str | None  # None while generating; "stop" or "length" on the last item
    prompt_tokens: int
    cached_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float

    @property
    def peak_memory(self) -> float:
        """mlx-lm's name for `peak_memory_gb` (also in GB), so code written for it runs."""
        return self.peak_memory_gb



def prefill(
    model,
    tokens: list[int],
    cache: list,
    chunk: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> mx.array:
    """Run `tokens` into `cache`; return the (1, vocab) logits of the last token.

    Every token but the last only has to fill the cache, so those chunks are evaluated through
    the cache alone: MLX then never computes what no cache entry depends on (the last layer's
    attention output and MLP, the final norm, the output head) - on a model with few layers a
    good share of the prompt's work. The last token runs as a decode step, projecting one
    position: on a 49k vocabulary the head is a fifth of the model's work per token.
    """
    if not tokens:
        raise MlxLlamaError("nothing to prefill: the prompt has no tokens")
    if chunk is not None and (not is_whole_number(chunk) or chunk < 1):
        raise MlxLlamaError(f"the prefill chunk must be at least 1 token (an integer), "
                            f"got {chunk!r}")
    total = len(tokens)
    chunk = chunk or default_prefill_chunk(model)
    done = 0
    while done < total - 1:
        end = min(done + chunk, total - 1)
        model.model(mx.array([tokens[done:end]]), cache)
        mx.eval([c.state for c in cache])
        done = end
        if progress and done < total - 1:
            progress(done, total)
    logits = model(mx.array([tokens[-1:]]), cache)[:, -1, :]
    if progress:
        progress(total, total)
    return logits


def choose(logits: mx.array, sampler, processor: LogitsProcessor | None = None):
    """(1, vocab) logits -> (sampled token (1,), log-probabilities (1, vocab)), lazily."""
    if processor is not None:
        logits = processor(logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    token = sampler(logprobs)
    if processor is not None:
        processor.observe(token)
    return token, logprobs


def decode_step(model, token: mx.array, cache: list, sampler,
                processor: LogitsProcessor | None = None) -> tuple[mx.array, mx.array]:
    """The lazy graph of one decode step: the previous token in, the next one out.

    Kept separate so the operation count of exactly this graph can be measured (opcount.py).
    """
    return choose(model(token.reshape(1, 1), cache)[:, -1, :], sampler, processor)


def decode(
    model,
    first_logits: mx.array,
    cache: list,
    sampler,
    processor: LogitsProcessor | None = None,
    want_logprobs: bool = False,
) -> Iterator[tuple[int, mx.array | None]]:
    """Yield (token, logprobs) forever; the caller decides when to stop."""
    token, logprobs = choose(first_logits, sampler, processor)
    mx.async_eval(token, logprobs)
    while True:
        next_token, next_logprobs = decode_step(model, token, cache, sampler, processor)
        mx.async_eval(next_token, next_logprobs)
        token_id = token.item()
        yield token_id, (logprobs[0] if want_logprobs else None)
        token, logprobs = next_token, next_logprobs


class StopStrings:
    """Holds back text that might be the start of a stop string, so none is ever printed."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def encode_prompt(tokenizer, prompt, chat: bool | None = None) -> list[int]:
    """Token ids for a string, a list of chat messages, or ids as given.

    `chat=None` applies the model's chat template to strings only when the tokenizer has one.
    """
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(t, numbers.Integral) for t in prompt):  # numpy integers too
        return [t if isinstance(t, bool) else int(t) for t in prompt]  # bools: refused below
    if hasattr(prompt, "tolist") and getattr(prompt, "ndim", None) == 1:  # numpy / mlx ids
        return encode_prompt(tokenizer, prompt.tolist(), chat)
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt, str):
        raise MlxLlamaError("prompt must be a string, a list of token ids, or a list of messages")
    if not prompt:
        raise MlxLlamaError("the prompt is empty: give some text to continue")
    if uses_chat_template(tokenizer, prompt, chat):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return tokenizer.encode(prompt)


def uses_chat_template(tokenizer, prompt, chat: bool | None) -> bool:
    """Whether `encode_prompt` renders `prompt` with the chat template (else the generated
    text continues the prompt's own text)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return True
    return isinstance(prompt, str) and bool(chat or (chat is None and tokenizer.chat_template))


def whole_characters(tail: str, tokenizer, generated: list[int]) -> str:
    """What the detokenizer still held when the run ended, without the U+FFFD of a character
    whose bytes never all came (a run cut inside an emoji), as llama.cpp's server does. Only
    that one: a U+FFFD the model wrote whole, or one for a stray byte, stays."""
    if not tail.endswith("\ufffd"):
        return tail
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in generated[-8:]:  # a character is at most 4 bytes; this reaches back far enough
        utf8.decode(tokenizer.token_bytes(token))
    return tail[:-1] if utf8.getstate()[0] else tail  # bytes still waiting: cut mid-character


def check_token_ids(tokens: list[int], vocab_size: int) -> None:
    """Ids outside the vocabulary would index past the embedding table (on the CPU backend,
    a crash of the whole process), so they are refused by name."""
    bad = next((t for t in tokens if isinstance(t, bool) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise MlxLlamaError(f"prompt token id {bad!r} is outside the vocabulary "
                            f"(0..{vocab_size - 1})")


def context_length(model) -> int:
    return model.config.max_position_embeddings


def rotating_cache_hint(cache: PromptCache | None, limit: int) -> str:
    """How to go past the context: the flag, or for a loaded prompt-cache file (which keeps
    the kind it was saved with, so the flag would be refused) a file made with it."""
    if cache is not None and cache.saved_prompt is not None:
        return (f"re-create the prompt cache with a rotating cache no larger than the context "
                f"(`mlx-llama cache-prompt ... --max-kv-size {limit}`) to slide past it")
    return (f"use a rotating cache no larger than the context (--max-kv-size {limit} or less) "
            "to slide past it")


def attends_within_context(cache: PromptCache | None, limit: int) -> bool:
    """Whether every layer's cache is a window no wider than the context (`--max-kv-size`).

    Then a token attends to at most `limit` positions, and RoPE makes attention depend only on
    the distance between positions, so a chat may run past the context: the oldest tokens
    fall out of the window instead of the run stopping (llama.cpp's context shift, without
    re-rotating the keys). The window's first `keep` tokens (4: attention sinks, as in
    StreamingLLM and mlx-lm) stay, and are seen from ever farther away; how much that costs
    past the context is not measured here (no model on this machine has a context short
    enough to run past in a test)."""
    windows = [getattr(c, "max_size", None) for c in cache.layers] if cache else []
    return bool(windows) and all(w is not None and w <= limit for w in windows)


def is_whole_number(value) -> bool:
    """An integer (numpy's too), not a bool: True would otherwise pass as 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_max_tokens(max_tokens) -> None:
    """At least one token, or -1 for no limit (as in mlx-lm); anything else is refused."""
    if not is_whole_number(max_tokens) or (max_tokens < 1 and max_tokens != -1):
        raise MlxLlamaError(f"max_tokens must be an integer of at least 1 (or -1: no limit), "
                            f"got {max_tokens!r}")


def stream_generate(
    model,
    tokenizer,
    prompt,
    max_tokens: int = 256,
    *,
    sampling: SamplingParams | None = None,
    stop: list[str] | str | None = None,
    chat: bool | None = None,
    cache: PromptCache | None = None,
    logprobs: bool = False,
    prefill_chunk: int | None = None,
    prefill_progress: Callable[[int, int], None] | None = None,
    continuation: bool | None = None,
    **sampling_kwargs,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt`, yielding a `GenerationResponse` per printable piece.

    `prompt` is a string, a list of chat messages, or token ids. `max_tokens=-1` sets no
    limit (as in mlx-lm): the run ends at an end token, a stop string or the model's context
    (never, with a rotating cache no wider than the context). Sampling options may be
    given as a `SamplingParams` or as keywords (`temperature=0.7, top_p=0.9, seed=1, ...`).
    A `PromptCache(model.make_cache)` passed in is reused: the longest prefix it shares with
    this prompt (e.g. the previous turn of a chat) is kept and only the rest is prefilled;
    afterwards it holds the prompt and the completion.

    `continuation`: whether the text continues the prompt's text, so that `prompt + text`
    reads right (a SentencePiece word-initial space on the first token is kept, as OpenAI's
    and llama.cpp's completions do). By default, yes unless the chat template was applied.
    """
    if sampling is None:
        unknown = sorted(set(sampling_kwargs) - set(SamplingParams.__dataclass_fields__))
        if unknown:
            raise TypeError(f"stream_generate() got an unexpected keyword argument "
                            f"{unknown[0]!r}; sampling options are "
                            f"{', '.join(SamplingParams.__dataclass_fields__)}")
        sampling = SamplingParams(**sampling_kwargs)
    elif sampling_kwargs:
        raise MlxLlamaError("pass sampling options either as SamplingParams or as keywords")
    sampling.validate(model.config.vocab_size)
    check_max_tokens(max_tokens)
    if max_tokens == -1:  # as in mlx-lm: until an end token, a stop string or the context
        max_tokens = math.inf
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
        raise MlxLlamaError(f"stop must be a string or a list of strings, got {stop!r}")
    tokens = encode_prompt(tokenizer, prompt, chat)
    if continuation is None:
        continuation = not uses_chat_template(tokenizer, prompt, chat)
    check_token_ids(tokens, model.config.vocab_size)
    limit = context_length(model)
    if not attends_within_context(cache, limit):
        if len(tokens) >= limit:
            raise MlxLlamaError(
                f"the prompt has {len(tokens)} tokens but the model's context is {limit}: "
                f"shorten it, or {rotating_cache_hint(cache, limit)}"
            )
        max_tokens = min(max_tokens, limit - len(tokens))
    if cache is None:
        cache = PromptCache(model.make_cache)
    cached = cache.reuse(tokens)

    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = make_sampler(sampling)
    processor = LogitsProcessor(sampling, model.config.vocab_size, tokens)
    end_ids = set(tokenizer.eos_token_ids) | set(model.config.eos_token_ids)
    stop_list = [stop] if isinstance(stop, str) else list(stop or [])
    # A special token's text (stop=["<|im_start|>"]) never shows in the decoded text, which
    # leaves such tokens out: it stops on the token's id instead.
    if stop_list:
        end_ids |= {tokenizer.token_to_id(s) for s in stop_list} & set(tokenizer.all_special_ids)
    stops = StopStrings(stop_list)
    detok = tokenizer.detokenizer(after=tokens if continuation else ())
    with wired_limit(model):  # Metal: keep the weights resident for the run; else a no-op
        mx.reset_peak_memory()
        start = time.perf_counter()
        try:
            first_logits = prefill(model, tokens[cached:], cache.layers, prefill_chunk,
                                   prefill_progress)
        except BaseException:  # Ctrl-C, a cancelled request: the chunks done are reusable
            cache.keep_what_is_held(tokens)
            raise
        cache.tokens = list(tokens)
        mx.eval(first_logits)
        prompt_time = time.perf_counter() - start
        prompt_tps = (len(tokens) - cached) / max(prompt_time, 1e-9)

        def response(text, token, lp, n, finish):
            elapsed = time.perf_counter() - decode_start
            return GenerationResponse(
                text=text, token=token, logprobs=lp, finish_reason=finish,
                prompt_tokens=len(tokens), cached_tokens=cached, prompt_tps=prompt_tps,
                generation_tokens=n, generation_tps=n / max(elapsed, 1e-9),
                peak_memory_gb=peak_memory_gb(),
            )

        decode_start = time.perf_counter()
        steps = decode(model, first_logits, cache.layers, sampler,
                       processor if processor.active else None, logprobs)
        n = 0
        for n, (token, lp) in enumerate(steps, start=1):
            cache.tokens.append(token)  # decode has already fed it to the cache
            if token in end_ids:
                tail, _ = stops.feed(whole_characters(detok.finalize(), tokenizer,
                                                      cache.tokens[len(tokens):-1]))
                yield response(tail + stops.flush(), token, lp, n, "stop")
                return
            text, hit = stops.feed(detok.add_token(token))
            if hit:
                yield response(text, token, lp, n, "stop")
                return
            if n >= max_tokens:
                tail, hit = stops.feed(whole_characters(detok.finalize(), tokenizer,
                                                        cache.tokens[len(tokens):]))
                yield response(text + tail + ("" if hit else stops.flush()), token, lp, n,
                               "stop" if hit else "length")
                return
            yield response(text, token, lp, n, None)


def generate(model, tokenizer, prompt, max_tokens: int = 256, **kwargs) -> str:
    """The whole completion as one string (see `stream_generate` for the options)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))
