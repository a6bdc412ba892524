"""Benchmark prompt processing and decoding: `mlx-llama bench -m MODEL [-p 512] [-g 128] [-n 5]`.

What is measured is the generation engine (chunked prefill, then greedy decode with the next
step's graph built while the current one computes), on a *fixed* token sequence, so runs of
different models, versions or machines are comparable and no tokenizer cost is mixed in:

- time to first token (TTFT): from the start of the prefill until the first generated token id
  is on the host; prompt tokens/s is `prompt_tokens / TTFT`;
- decode tokens/s: tokens after the first, over the time since the first;
- peak memory: MLX's peak allocation during the trial (weights included: they are resident);
- model size: bytes of the parameters as held in memory (after the load-time compute dtype);
- implied bandwidth: the bytes one decode step must read (every weight except the embedding
  table's unused rows, plus the key/value cache at the mean context) times decode tokens/s.
  Far below the machine's memory bandwidth means decode is compute- or overhead-bound.

Each trial starts from an empty cache; one warm-up trial (not reported) comes first so that
compilation and first-touch page faults are excluded. Figures are the median over trials, with
the spread (min and max) alongside, because a shared machine is noisy.

The timing core (`time_trial`) takes any callable that starts a token stream, so the mlx-lm
comparison in `benchmarks/` times mlx-lm's generator with the very same clock.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn

from .errors import MlxLlamaError

FIRST_ID = 3  # ids below this are special (unknown, BOS, EOS) in most Llama vocabularies


def fixed_prompt(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    """A reproducible sequence of `length` ordinary token ids (same on every machine)."""
    rng = random.Random(seed)
    return [rng.randrange(FIRST_ID, vocab_size) for _ in range(length)]


@dataclass
class Trial:
    prompt_tokens: int
    generation_tokens: int
    ttft_s: float
    decode_s: float
    peak_memory_bytes: int

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s

    @property
    def generation_tps(self) -> float:
        # The first token belongs to the prompt's time; the rest to decoding.
        return (self.generation_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0


def time_trial(start: Callable[[], Iterable], prompt_tokens: int, generation_tokens: int) -> Trial:
    """Time one generation: `start()` begins the work and returns an iterable of tokens.

    Only the first `generation_tokens` items are consumed; each must already be on the host
    (an int), which is what makes the clock honest for lazily evaluated arrays.
    """
    if generation_tokens < 2:
        raise MlxLlamaError("benchmark needs at least 2 generated tokens (-g 2) to time decoding")
    mx.synchronize()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    stream = iter(start())
    next(stream)
    t_first = time.perf_counter()
    for _ in range(generation_tokens - 1):
        next(stream)
    t_last = time.perf_counter()
    close = getattr(stream, "close", None)
    if close:
        close()  # let a generator stop its pending step before memory is read
    mx.synchronize()
    return Trial(prompt_tokens, generation_tokens, t_first - t0, t_last - t_first,
                 mx.get_peak_memory())


def engine_tokens(model, prompt: list[int], cache: list | None = None,
                  prefill_chunk: int | None = None) -> Iterator[int]:
    """Greedy tokens from this project's engine (prefill, then overlapped decode)."""
    from .generate import decode, prefill
    from .sampling import SamplingParams, make_sampler

    cache = model.make_cache() if cache is None else cache
    logits = prefill(model, prompt, cache, prefill_chunk)
    for token, _ in decode(model, logits, cache, make_sampler(SamplingParams())):
        yield token


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter as the model holds them in memory."""
    return sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))


def embedding_bytes(model: nn.Module) -> int:
    """Bytes of the input embedding table (packed weight, scales and biases if quantized)."""
    try:
        table = model.model.embed_tokens
    except AttributeError:
        return 0
    return sum(v.nbytes for _, v in nn.utils.tree_flatten(table.parameters()))


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads.

    The embedding table is only gathered (one row per token) unless it is also the output head
    (tied embeddings), in which case it is read whole by the projection.
    """
    tied = not hasattr(model, "lm_head")
    embedding = embedding_bytes(model)
    rows = getattr(getattr(model, "args", None) or getattr(model, "config", None), "vocab_size", 0)
    row = embedding // rows if rows else 0
    return parameter_bytes(model) - (0 if tied else embedding - row)


def cache_bytes_per_token(cache: list) -> float:
    """Key/value bytes held per token of context (0 for an empty cache)."""
    total = sum(_nbytes(c) for c in cache)
    offset = getattr(cache[0], "offset", 0) if cache else 0
    return total / offset if offset else 0.0


def _nbytes(layer_cache) -> int:
    nbytes = getattr(layer_cache, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    arrays = nn.utils.tree_flatten(getattr(layer_cache, "state", ()))
    return sum(a.nbytes for _, a in arrays if isinstance(a, mx.array))


@dataclass
class Stat:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class Report:
    """What `mlx-llama bench` prints (and writes with --json)."""

    model: str
    prompt_tokens: int
    generation_tokens: int
    trials: int
    prompt_tps: Stat
    generation_tps: Stat
    ttft_s: Stat
    peak_memory_bytes: Stat
    model_bytes: int
    bytes_per_token: int
    bandwidth_gbs: Stat
    device: str = field(default_factory=lambda: str(mx.default_device()))

    def to_json(self) -> dict:
        return asdict(self)


def summarize(model_label: str, trials: list[Trial], model_bytes: int,
              bytes_per_token: int) -> Report:
    tg = [t.generation_tps for t in trials]
    return Report(
        model=model_label,
        prompt_tokens=trials[0].prompt_tokens,
        generation_tokens=trials[0].generation_tokens,
        trials=len(trials),
        prompt_tps=Stat.of([t.prompt_tps for t in trials]),
        generation_tps=Stat.of(tg),
        ttft_s=Stat.of([t.ttft_s for t in trials]),
        peak_memory_bytes=Stat.of([float(t.peak_memory_bytes) for t in trials]),
        model_bytes=model_bytes,
        bytes_per_token=bytes_per_token,
        bandwidth_gbs=Stat.of([bytes_per_token * x / 1e9 for x in tg]),
    )


def decode_bytes_per_token(model: nn.Module, cache: list, prompt_tokens: int,
                           generation_tokens: int) -> int:
    """Weights read per step plus the cache at the mean context of the decode."""
    mean_context = prompt_tokens + generation_tokens / 2
    return int(weight_bytes_per_token(model) + cache_bytes_per_token(cache) * mean_context)


def benchmark(model, label: str, prompt_tokens: int = 512, generation_tokens: int = 128,
              trials: int = 5, warmup: int = 1, seed: int = 0,
              prefill_chunk: int | None = None) -> Report:
    """Warm up, then time `trials` generations of this project's engine on a fixed prompt."""
    if prompt_tokens < 1 or trials < 1:
        raise MlxLlamaError("benchmark needs -p >= 1 prompt tokens and -n >= 1 trials")
    limit = model.config.max_position_embeddings
    if prompt_tokens + generation_tokens > limit:
        raise MlxLlamaError(
            f"-p {prompt_tokens} plus -g {generation_tokens} exceeds the model's context "
            f"({limit}): lower them"
        )
    prompt = fixed_prompt(prompt_tokens, model.config.vocab_size, seed)
    last_cache: list = []

    def start():
        last_cache[:] = model.make_cache()
        return engine_tokens(model, prompt, last_cache, prefill_chunk)

    for _ in range(warmup):
        time_trial(start, prompt_tokens, generation_tokens)
    results = [time_trial(start, prompt_tokens, generation_tokens) for _ in range(trials)]
    per_token = decode_bytes_per_token(model, last_cache, prompt_tokens, generation_tokens)
    return summarize(label, results, parameter_bytes(model), per_token)


def _fmt(stat: Stat, scale: float = 1.0, digits: int = 1) -> str:
    return (f"{stat.median * scale:.{digits}f}  "
            f"[{stat.min * scale:.{digits}f} .. {stat.max * scale:.{digits}f}]")


def format_report(r: Report) -> str:
    mb = 1e-6
    lines = [
        f"model: {r.model}  ({r.device})",
        f"prompt {r.prompt_tokens} tokens, generate {r.generation_tokens}, "
        f"{r.trials} trials after warm-up: median [min .. max]",
        f"  prompt tokens/s   {_fmt(r.prompt_tps)}",
        f"  decode tokens/s   {_fmt(r.generation_tps, digits=2)}",
        f"  time to first     {_fmt(r.ttft_s, 1e3)} ms",
        f"  peak memory       {_fmt(r.peak_memory_bytes, mb)} MB",
        f"  model size        {r.model_bytes * mb:.1f} MB",
        f"  bytes per token   {r.bytes_per_token * mb:.1f} MB (weights read + mean KV cache)",
        f"  implied bandwidth {_fmt(r.bandwidth_gbs, digits=2)} GB/s",
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_argument

    add_model_argument(p)
    p.add_argument("-p", "--prompt-tokens", type=int, default=512,
                   help="prompt length in tokens (a fixed sequence; default 512)")
    p.add_argument("-g", "--generation-tokens", type=int, default=128,
                   help="tokens to generate per trial (default 128)")
    p.add_argument("-n", "--trials", type=int, default=5, help="timed trials (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed trials first (default 1)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per prefill step (default: the engine's)")
    p.add_argument("--dense-prefill", action="store_true",
                   help="CPU: multiply prompt chunks at bfloat16 even for a float32/float16 "
                        "checkpoint (the default for bfloat16 ones; see mlx_llama/fused.py)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Benchmark prompt processing and decoding of a model on fixed token sequences."""
    from .cli import resolve_model, warn_if_too_big_then_read
    from .loading import load_model

    if args.generation_tokens < 2:
        raise MlxLlamaError("-g must be at least 2: decoding is timed from the second token")
    if args.warmup < 0:
        raise MlxLlamaError(f"--warmup must be 0 or more, got {args.warmup}")
    folder = resolve_model(args.model)
    model, _ = load_model(folder, lazy=True)
    warn_if_too_big_then_read(model)
    if args.dense_prefill:
        from .fused import use_dense_prefill

        use_dense_prefill(model)
    report = benchmark(model, str(folder), args.prompt_tokens, args.generation_tokens,
                       args.trials, args.warmup, prefill_chunk=args.prefill_chunk)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0
