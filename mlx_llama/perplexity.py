"""Perplexity of a text file in sliding windows: how well a model (and cache) predicts it.

Windows (the definition of Hugging Face's sliding-window perplexity guide, made exact):
window k covers tokens [k*stride, min(k*stride + context, N)); the last window is the first
that reaches the end of the text. Window k scores the tokens from max(previous window's end,
window start + 1) to its end, each predicted from the window's tokens before it, so no token
is scored twice. With stride < context every token but the first is scored, each with at
least context - stride tokens of history (the overlap is recomputed, not scored again). With
stride == context (the default) windows are disjoint and each window's first token is only
context: N - (number of windows) tokens are scored.

Perplexity = exp(mean NLL) over the scored tokens. The standard error reported is that of the
perplexity by the delta method, ppl * sd(NLL) / sqrt(n), so "ppl ± stderr" reads naturally
(llama.cpp reports the same quantity).

With a cache kind (`--kv-bits`, `--max-kv-size`), each window is fed through a fresh cache of
that kind in chunks, so attention reads what that cache stores (e.g. quantized keys and
values): this is how cache choices are judged.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from .errors import MlxLlamaError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_mean: float  # mean negative log-likelihood per scored token, in nats
    stderr: float  # standard error of `ppl`
    n_tokens: int  # tokens scored


@dataclass(frozen=True)
class Window:
    start: int  # first token of the window
    end: int  # one past its last token
    first_target: int  # first token it scores (targets are first_target .. end-1)


def windows(n_tokens: int, context: int, stride: int | None = None) -> list[Window]:
    """The windows over `n_tokens` (see the module docstring for the definition)."""
    stride = context if stride is None else stride
    check_window_options(context, stride)
    if n_tokens < 2:
        raise MlxLlamaError(f"the text has {n_tokens} token(s): perplexity needs at least 2")
    out: list[Window] = []
    scored_to = 0
    for start in range(0, n_tokens, stride):
        end = min(start + context, n_tokens)
        first_target = max(scored_to, start + 1)
        if first_target < end:  # a last window of one token has nothing to score
            out.append(Window(start, end, first_target))
        scored_to = end
        if end == n_tokens:
            break
    return out


def check_window_options(context: int, stride: int) -> None:
    if context < 2:
        raise MlxLlamaError(f"--context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise MlxLlamaError(f"--stride must be between 1 and the context ({context}), got {stride}")


def _target_nll(hidden: mx.array, model, targets: mx.array) -> mx.array:
    """NLL of `targets` given the hidden states that predict them ((1, n, H) and (n,))."""
    logits = model.project(hidden)[0].astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return mx.logsumexp(logits, axis=-1) - picked


def window_nll(model, tokens: Sequence[int], window: Window,
               make_cache: Callable[[], list] | None = None, chunk: int | None = None) -> np.ndarray:
    """Per-target NLLs for one window.

    Without `make_cache` the window is one forward pass with no cache. With it, the window
    goes through a fresh cache in chunks of `chunk` tokens (default: the whole window in
    one), so attention reads the cache's own keys/values. Only the positions that predict
    a target are projected onto the vocabulary.
    """
    ids = mx.array(list(tokens[window.start : window.end]), dtype=mx.int32)[None]
    # Position p (relative to the window) predicts token p + 1; targets start at first_target.
    first_pos = window.first_target - 1 - window.start
    length = window.end - window.start
    if make_cache is None:
        hidden = model.model(ids)
        nll = _target_nll(hidden[:, first_pos : length - 1], model, ids[0, first_pos + 1 :])
        mx.eval(nll)
        return np.array(nll)
    cache = make_cache()
    step = chunk or length
    parts = []
    for s in range(0, length, step):
        e = min(s + step, length)
        hidden = model.model(ids[:, s:e], cache)
        lo, hi = max(s, first_pos), min(e, length - 1)  # predicting positions in this chunk
        if lo < hi:
            parts.append(_target_nll(hidden[:, lo - s : hi - s], model, ids[0, lo + 1 : hi + 1]))
        mx.eval(parts[-1:], [c.state for c in cache])  # bound the graph to one chunk
    return np.concatenate([np.array(p) for p in parts])


def token_nlls(model, tokens: Sequence[int], context: int = 512, stride: int | None = None, *,
               make_cache: Callable[[], list] | None = None, chunk: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """NLL of every scored target token, in text order (targets 1..N-1, each once)."""
    spans = windows(len(tokens), context, stride)
    out = []
    for i, w in enumerate(spans, start=1):
        out.append(window_nll(model, tokens, w, make_cache, chunk))
        if progress:
            progress(i, len(spans))
    return np.concatenate(out).astype(np.float64)


def summarize(nll: np.ndarray) -> PerplexityResult:
    """Perplexity and its standard error; a score that is not a number is refused, not
    averaged into a "nan" that reads like a result."""
    n = int(nll.size)
    bad = n - int(np.isfinite(nll).sum())
    if bad:
        raise MlxLlamaError(
            f"{bad} of the {n} token scores are not finite (NaN or infinity): the model's "
            "weights are damaged or its arithmetic overflows in this dtype; re-convert it")
    mean = float(nll.mean())
    ppl = math.exp(mean)
    sd = float(nll.std(ddof=1)) if n > 1 else 0.0
    return PerplexityResult(ppl=ppl, nll_mean=mean, stderr=ppl * sd / math.sqrt(n), n_tokens=n)


def perplexity(model, tokens: Sequence[int], context: int = 512, stride: int | None = None, *,
               make_cache: Callable[[], list] | None = None, chunk: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of `tokens` under `model` in sliding windows (see the module docstring).

    `make_cache` (e.g. `lambda: model.make_cache("quantized", bits=4)`) feeds each window
    through that cache in chunks of `chunk` tokens; `progress(done, total)` is called per window.
    """
    if context > model.config.max_position_embeddings:
        raise MlxLlamaError(
            f"--context {context} is longer than the model's {model.config.max_position_embeddings}"
            " positions: use a smaller context"
        )
    nll = token_nlls(model, tokens, context, stride, make_cache=make_cache, chunk=chunk,
                     progress=progress)
    return summarize(nll)


# ------------------------------------------------------------------------------------------
# CLI: mlx-llama perplexity -m MODEL --text FILE [--context 512] [--stride N]
# ------------------------------------------------------------------------------------------


DEFAULT_CONTEXT = 512


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cache_options import add_cache_arguments
    from .cli import add_model_argument

    add_model_argument(p)
    p.add_argument("--text", required=True, help="text file to score (UTF-8)")
    p.add_argument("--context", type=int, default=None,
                   help="window length in tokens (default 512, or the model's context if shorter)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: the context, i.e. disjoint windows)")
    p.add_argument("--max-text-tokens", type=int, default=None,
                   help="score only the first N tokens of the text")
    p.add_argument("--chunk", type=int, default=None,
                   help="with a cache option: feed each window through the cache in chunks of N")
    add_cache_arguments(p, prompt_cache=False)


def read_text(path: str) -> str:
    file = Path(path)
    if file.is_dir():
        raise MlxLlamaError(f"{path} is a folder: give a UTF-8 text file")
    if not file.is_file():
        raise MlxLlamaError(f"text file {path} does not exist: give a UTF-8 text file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MlxLlamaError(f"{path} is not UTF-8 text ({e.reason}): convert it to UTF-8") from None
    except OSError as e:  # unreadable: permissions, a broken mount
        raise MlxLlamaError(f"text file {path} cannot be read ({e.strerror or e}): check its "
                            "permissions") from None


def run(args: argparse.Namespace) -> int:
    from .cache_options import cache_spec
    from .cli import load_checked, resolve_model

    if args.context is not None:  # refuse bad windows before loading anything
        check_window_options(args.context, args.stride or args.context)
    for flag, value, least in (("--chunk", args.chunk, 1), ("--max-text-tokens", args.max_text_tokens, 2)):
        if value is not None and value < least:
            raise MlxLlamaError(f"{flag} must be at least {least}, got {value}")
    kind, options = cache_spec(args)
    text = read_text(args.text)
    model, tokenizer = load_checked(resolve_model(args.model))
    context = args.context or min(DEFAULT_CONTEXT, model.config.max_position_embeddings)
    stride = args.stride if args.stride is not None else context
    check_window_options(context, stride)
    tokens = tokenizer.encode(text)
    if args.max_text_tokens is not None:
        tokens = tokens[: args.max_text_tokens]
    if options.get("start") and not args.chunk:
        raise MlxLlamaError("--quantized-kv-start needs --chunk N here: each window otherwise "
                            "goes into the cache in one update, held at full precision")
    make_cache = None
    if kind != "default" or args.chunk:
        model.make_cache(kind, **options)  # refuse bad options before any work
        make_cache = lambda: model.make_cache(kind, **options)  # noqa: E731

    def progress(done: int, total: int) -> None:  # a line that redraws: only on a terminal
        if sys.stderr.isatty():
            print(f"\rwindow {done}/{total}", end="\n" if done == total else "",
                  file=sys.stderr, flush=True)

    start = time.perf_counter()
    result = perplexity(model, tokens, context, stride, make_cache=make_cache,
                        chunk=args.chunk, progress=progress)
    elapsed = time.perf_counter() - start
    described = kind + (f" {options}" if options else "")
    print(f"perplexity: {result.ppl:.4f} ± {result.stderr:.4f}")
    print(f"mean NLL: {result.nll_mean:.5f} nats over {result.n_tokens} scored tokens "
          f"({len(tokens)} in the text; context {context}, stride {stride}, cache {described})")
    print(f"time: {elapsed:.1f} s ({result.n_tokens / max(elapsed, 1e-9):.1f} tok/s), "
          f"peak memory {mx.get_peak_memory() / 1e9:.3f} GB", file=sys.stderr)
    return 0
