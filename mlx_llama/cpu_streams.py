"""Every CPU core for the quantized matmuls: the output rows split across MLX streams.

MLX's CPU backend runs the operations of a stream on one thread, and its quantized matmul
does not spread itself over cores: a decode step of a model on a laptop's CPU (or a Linux
box, or CI) uses one core however many there are. MLX does run *streams* in parallel, one
thread each. So on the CPU backend each quantized linear layer (and a tied, quantized output
head) keeps row slices of its weight, one per stream, multiplies each slice on its own
stream and concatenates the outputs. The arithmetic is the same kernel on the same rows, so
the results are bit for bit those of one matmul; measured on 2 cores, a gate/up pair of
TinyLlama's shape runs 1.9x faster.

The slices are views of the loaded arrays (no memory is added) and are not parameters:
the model's names, saving and `load_weights` are unchanged. On a GPU one kernel already fills
the device, so nothing here is used there. `MLX_LLAMA_CPU_STREAMS=1` turns it off, any other
number sets how many streams (default: the cores this process may use, at most 8).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

MAX_STREAMS = 8
# Layers with fewer output rows than this per stream stay whole: the hop between streams
# would cost more than the rows.
MIN_ROWS_PER_STREAM = 64

_extra_streams: list[mx.ThreadLocalStream] = []


def stream_count() -> int:
    """How many streams to split over: MLX_LLAMA_CPU_STREAMS, else the usable cores."""
    setting = os.environ.get("MLX_LLAMA_CPU_STREAMS")
    if setting:
        try:
            return max(1, int(setting))
        except ValueError:
            return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_STREAMS))


def streams(n: int) -> list[mx.ThreadLocalStream | None]:
    """`n` CPU streams: None (the default stream, where the rest of the graph runs) first."""
    while len(_extra_streams) < n - 1:
        # Thread-local: MLX (since its streams became per-thread) binds a plain stream to the
        # thread that made it, and a model loaded on one thread is often run on another (an
        # app's worker thread). Older MLX has only global streams.
        make = getattr(mx, "new_thread_local_stream", mx.new_stream)
        _extra_streams.append(make(mx.cpu))
    return [None, *_extra_streams[: n - 1]]


def row_slices(arrays: list[mx.array | None], n: int) -> list[list[mx.array | None]]:
    """Split each array (same first dimension) into `n` contiguous row ranges.

    Left lazy here: the loader evaluates them with the weights (`shard_arrays`), as views of
    them, unless it loads lazily (the converter's layer-by-layer check).
    """
    rows = arrays[0].shape[0]
    bounds = [rows * i // n for i in range(n + 1)]
    return [[None if a is None else a[lo:hi] for a in arrays]
            for lo, hi in zip(bounds, bounds[1:])]


def on_streams(part, shards) -> mx.array:
    """`part(*arrays)` of each (stream, *arrays) row shard on its own stream, the outputs
    concatenated; the first shard (stream None) runs where the caller's graph runs.
    Differentiable: each shard's gradient is taken on its stream too."""
    outputs = [part(*shards[0][1:])]
    for stream, *arrays in shards[1:]:
        with mx.stream(stream):
            outputs.append(part(*arrays))
    return mx.concatenate(outputs, axis=-1)


def _shards(module: nn.Module, n: int):
    """Row shards of a layer's weight (with its scales and biases when quantized) over `n`
    streams, or None to keep it whole."""
    rows = module["weight"].shape[0]
    n = min(n, rows // MIN_ROWS_PER_STREAM)
    if n < 2:
        return None
    arrays = [module["weight"]]
    if "scales" in module:
        arrays += [module["scales"], module.get("biases")]
    parts = row_slices(arrays, n)
    return [(stream, *part) for stream, part in zip(streams(n), parts)]


def _split(module: nn.Module, x: mx.array, shards) -> mx.array:
    """x @ W.T for `module`'s row shards: the quantized kernel (MLX's CPU matmul is one
    thread, quantized or not) or the float matmul."""
    if "scales" in module:
        def part(w, scales, biases):
            return mx.quantized_matmul(x, w, scales, biases, transpose=True,
                                       group_size=module.group_size, bits=module.bits,
                                       mode=module.mode)
    else:
        def part(w):
            return x @ w.T
    return on_streams(part, shards)


class _SplitLinear:
    """A linear layer's call with its matmul as row shards, when it has them."""

    def __call__(self, x: mx.array) -> mx.array:
        shards = self.__dict__.get("_row_shards")
        if shards is None:
            return super().__call__(x)
        y = _split(self, x, shards)
        if "bias" in self:
            y = y + self["bias"]
        return y


class _SplitHead:
    """An embedding whose use as the tied output head is split the same way."""

    def as_linear(self, x: mx.array) -> mx.array:
        shards = self.__dict__.get("_row_shards")
        if shards is None:
            return super().as_linear(x)
        return _split(self, x, shards)


class ShardedQuantizedLinear(_SplitLinear, nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose matmul runs as row shards on parallel CPU streams."""


class ShardedQuantizedEmbedding(_SplitHead, nn.QuantizedEmbedding):
    """A quantized embedding whose head matmul runs as row shards."""


class ShardedLinear(_SplitLinear, nn.Linear):
    """`nn.Linear` whose matmul runs as row shards on parallel CPU streams."""


class ShardedEmbedding(_SplitHead, nn.Embedding):
    """A float embedding whose head matmul runs as row shards."""


def shard_arrays(model: nn.Module) -> list[mx.array]:
    """The row shards' arrays (views of the weights, kept outside `parameters()`), for a
    loader that reads the weights up front to evaluate with them."""
    return [a for _, module in model.named_modules()
            for _, *arrays in (module.__dict__.get("_row_shards") or ())
            for a in arrays if a is not None]


def use_cpu_streams(model: nn.Module, n: int | None = None, dense: bool = False) -> int:
    """Split the quantized layers of `model` over `n` CPU streams; returns how many were split.

    dense: split the float layers too. The runtime leaves them whole (its float models take
    other paths, see loading.py); the converter's float32 source model, which calibration runs
    forward and backward, splits them (1.8x on 2 cores for a SmolLM2-sized layer pair).
    Call after the parameters are final (loaded and cast): the shards are views of them.
    """
    n = stream_count() if n is None else n
    if n < 2:
        return 0
    split = 0
    tied_head = "lm_head" not in model  # else the embedding is only looked up, never multiplied
    # MLX's class -> its split version (a second call re-shards the split ones, subclasses
    # such as fused.DenseFriendlyQuantizedLinear included).
    splittable = {nn.QuantizedLinear: ShardedQuantizedLinear}
    if dense:
        splittable[nn.Linear] = ShardedLinear
    if tied_head:
        splittable[nn.QuantizedEmbedding] = ShardedQuantizedEmbedding
        if dense:
            splittable[nn.Embedding] = ShardedEmbedding
    already = tuple(splittable.values())
    for _, module in model.named_modules():
        if type(module) in splittable:
            module.__class__ = splittable[type(module)]
        elif not isinstance(module, already):
            continue
        shards = _shards(module, n)
        object.__setattr__(module, "_row_shards", shards)
        split += shards is not None
    return split
