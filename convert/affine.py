"""Error-minimizing MLX affine quantization: choose each group's scale and bias by search.

MLX's affine format stores, per group of `g` consecutive input weights, a scale `s` and a
bias `b`; each weight becomes a code `q` in [0, 2**bits - 1] and is read back as `s*q + b`.
`mx.quantize` takes `b` = the group's minimum and `s` = range / (2**bits - 1). That wastes
levels: one outlier stretches the grid for the whole group, and the grid ends are placed on
the two extreme weights instead of where the weights are.

Here the pair (s, b) is chosen to minimize the (optionally importance-weighted) squared
reconstruction error sum_i h_i (w_i - s*q_i - b)^2, the way llama.cpp's k-quants choose block
scales:
1. candidates: mx.quantize's own grid (so the result is never worse than it), and grids one
   step finer than min/max that leave the extremes to clip at the top, the bottom or both;
   for each, round to codes and solve the weighted least-squares problem for (s, b) given
   those codes (closed form);
2. refinement: from the best candidate, "round to the nearest code" and "refit (s, b)"
   again; each such step can only lower the error;
3. the winner is rounded to the stored dtype and the codes are taken against the stored
   values, so what is written is what was measured.
Every error is computed from six running sums (sum h, h*x, h*x^2, h*q, h*q^2, h*q*x), never
from a second pass over the weights.

The output is plain MLX affine quantization (codes packed little-endian into uint32, scales,
biases), so mlx-lm and any MLX runtime load it unchanged.

Speed: the work is done in row chunks of about 2**17 weights, each one call of a function
compiled with mx.compile (see _chunk_function): MLX fuses each element-wise chain into one
JIT-compiled CPU kernel, the chunk is transposed so that the per-group sums reduce over the
leading axis (vector additions of whole rows on the CPU backend), and a chunk stays in
cache from one pass to the next. MLX runs each CPU stream on one thread, so on the CPU
backend the chunks are dealt out over one stream per core (as the runtime's matmuls are:
mlx_llama/cpu_streams.py); the groups are independent, so the result is bit for bit the
same. That buys only 10-15% on 2 cores: the main thread's dispatch of each chunk's compiled
graph (about 0.5 ms) is the limit, and larger chunks spill out of cache. Even so the search costs several times mx.quantize (docs/quantization.md, "Speed"):
every candidate needs its own pass over the weights and three reductions, where mx.quantize
makes one pass.
"""

from __future__ import annotations

import contextlib
import functools

import mlx.core as mx

from mlx_llama.cpu_streams import stream_count, streams

CHUNK_ELEMENTS = 1 << 17
# Candidate grids (delta, anchor), see fit_groups: each costs one pass of rounding and sums.
CANDIDATES = ((1.0, 0.5), (1.0, 0.0), (1.0, 1.0))
REFINE_STEPS = 1
TINY = 1e-10
_ROUNDER = 1.5 * 2**23  # (x + this) - this rounds x to an integer for |x| < 2**22


def quantize_search(
    w: mx.array,
    bits: int,
    group_size: int,
    importance: mx.array | None = None,
    *,
    candidates: tuple[tuple[float, float], ...] = CANDIDATES,
    refine: int = REFINE_STEPS,
) -> tuple[mx.array, mx.array, mx.array]:
    """(out, in) float matrix -> (packed uint32 codes, scales, biases) minimizing the error.

    importance: None (plain squared error), a (in,) vector (one weight per input channel,
    e.g. mean squared activations), an (out, in) matrix (one weight per element), or an
    object whose `block(start, stop)` gives the weights of rows start..stop.
    Scales and biases come out in `w`'s dtype. The result is lazy, like `mx.quantize`'s.
    """
    rows, cols = w.shape
    groups = cols // group_size
    step = max(1, CHUNK_ELEMENTS // cols)
    chunk = _chunk_function(bits, candidates, refine, importance is not None)
    top = mx.array(2**bits - 1, mx.float32)  # an input, not a constant: see _chunk_function
    lanes = _lanes()
    parts = []
    for i, start in enumerate(range(0, rows, step)):
        stop = min(start + step, rows)
        with lanes[i % len(lanes)]:
            x = w[start:stop].reshape(stop - start, groups, group_size)
            h = _row_weights(importance, start, stop)
            if h is None:
                codes, scale, bias = chunk(x, top)
            else:
                h = h.astype(mx.float32).reshape(-1, groups, group_size)
                codes, scale, bias = chunk(x, h, top)
            if 32 % bits:  # codes that straddle words are packed outside the compiled function
                codes = pack_codes(codes.reshape(stop - start, cols), bits)
        parts.append((codes, scale.reshape(-1, groups), bias.reshape(-1, groups)))
    if len(parts) == 1:
        return parts[0]
    return tuple(mx.concatenate([p[i] for p in parts], axis=0) for i in range(3))


def _lanes() -> list:
    """Stream contexts to deal the chunks over: one per core on the CPU backend (the first
    is the caller's own stream), just the caller's stream on a GPU."""
    n = stream_count() if mx.default_device().type == mx.DeviceType.cpu else 1
    return [contextlib.nullcontext() if s is None else mx.stream(s) for s in streams(n)]


def _row_weights(importance, start: int, stop: int) -> mx.array | None:
    if importance is None:
        return None
    if hasattr(importance, "block"):
        return importance.block(start, stop)
    return importance if importance.ndim == 1 else importance[start:stop]


@functools.lru_cache(maxsize=None)
def _chunk_function(bits: int, candidates, refine: int, weighted: bool):
    """One chunk's whole search and packing, traced once and compiled by MLX (per shape
    and dtype): x is (rows, groups, group_size), h None or broadcastable to it.

    Compiling fuses each element-wise chain (a candidate's codes, the products its sums
    need) into one kernel, which MLX's CPU backend JIT-compiles (it is cached on disk). The
    search runs on the chunk transposed to (group_size, rows, groups): each group's sums
    are then reductions over the leading axis, which MLX's CPU backend does as vector
    additions of whole rows, several times faster than over the last axis (one element
    after the other). The codes are packed in that layout too, then transposed back.

    The top code n = 2**bits - 1 is an input rather than a constant: MLX names (and caches)
    a compiled kernel by its constants, and each new kernel costs about half a second of
    g++ the first time a machine sees it; this way the bit widths share most of them.
    """

    def chunk(x, h, n):
        xt = mx.contiguous(x.transpose(2, 0, 1))
        ht = None if h is None else mx.contiguous(h.transpose(2, 0, 1))
        scale, bias = _fit(xt, ht, n, candidates, refine, 0)
        scale = scale.astype(x.dtype)
        bias = bias.astype(x.dtype)
        rows, groups, size = x.shape
        codes = _codes(xt.astype(mx.float32), scale.astype(mx.float32),
                       bias.astype(mx.float32), n, 0)
        if 32 % bits == 0:
            per = 32 // bits
            shifts = (mx.arange(per, dtype=mx.uint32) * bits).reshape(1, per, 1, 1)
            words = codes.astype(mx.uint32).reshape(size // per, per, rows, groups) << shifts
            codes = words.sum(1).astype(mx.uint32).transpose(1, 2, 0).reshape(rows, -1)
        else:
            codes = codes.transpose(1, 2, 0)
        return codes, scale, bias

    if weighted:
        return mx.compile(lambda x, h, n: chunk(x, h, n))
    return mx.compile(lambda x, n: chunk(x, None, n))


def _codes(x: mx.array, scale: mx.array, bias: mx.array, n, axis: int) -> mx.array:
    """round((x - bias) / scale) clipped to [0, n], as float32; `scale` and `bias` are per
    group (x without its group axis `axis`).

    1/scale and bias/scale are computed per group and only then broadcast (expand_dims
    keeps MLX from fusing them into, and repeating them for, every element). Rounding by
    adding and subtracting 1.5 * 2**23 (ties to even, like mx.round) and clipping with
    selects keep the compiled CPU kernel vectorized, where mx.round calls rint and
    maximum/minimum test for NaN per element (several times slower). Values beyond 2**22 do
    not round exactly, but they are clipped to an end all the same.
    """
    inv = 1 / scale
    t = x * mx.expand_dims(inv, axis) + mx.expand_dims(-bias * inv, axis)
    t = (t + _ROUNDER) - _ROUNDER
    return mx.where(t < 0, 0.0, mx.where(t > n, n, t))


def fit_groups(
    x: mx.array, h: mx.array | None, bits: int, candidates=CANDIDATES, refine: int = REFINE_STEPS
) -> tuple[mx.array, mx.array]:
    """Best (scale, bias), each (..., 1), for the groups on the last axis of `x` (float32)."""
    s, b = _fit(x, h, 2**bits - 1, candidates, refine, -1)
    return s[..., None], b[..., None]


def _fit(x, h, n, candidates, refine, axis):
    """fit_groups for the groups along `axis` of `x` (any float dtype, the search is done in
    float32; `h` None or broadcastable to `x`); (scale, bias) come without that axis."""

    def total(a):
        return a.sum(axis)

    lo = x.min(axis).astype(mx.float32)
    hi = x.max(axis).astype(mx.float32)
    # Centre each group on its mid-range: the problem is shift invariant (the bias absorbs
    # it) and the error sums below lose less precision to cancellation.
    mid = (lo + hi) / 2
    xc = x.astype(mx.float32) - mx.expand_dims(mid, axis)
    half = mx.maximum(hi - lo, TINY) / 2
    hx = xc if h is None else h * xc
    stats = (
        mx.array(x.shape[axis], mx.float32) if h is None else total(h),
        total(hx),
        total(hx * xc),
    )

    def sums(s, b):
        q = _codes(xc, s, b, n, axis)
        hq = q if h is None else h * q
        return total(hq), total(hq * q), total(hx * q)

    # The first candidate is mx.quantize's own grid, so the search never does worse than it.
    best_s, best_b = _minmax_grid(lo, hi, n)
    best_b = best_b - mid
    best_e = _error(best_s, best_b, *stats, *sums(best_s, best_b))
    for delta, anchor in candidates:
        # A grid of n + delta steps over the range: delta > 0 is finer and leaves part of the
        # range uncovered, at the top (anchor 0), the bottom (anchor 1) or both (0.5).
        step = 2 * half / (n + delta)
        b0 = -half + step * delta * anchor
        s, b, e = _refit(sums(step, b0), stats, step, b0)
        best_s, best_b, best_e = _keep_better(s, b, e, best_s, best_b, best_e)
    for _ in range(refine):
        s, b, e = _refit(sums(best_s, best_b), stats, best_s, best_b)
        best_s, best_b, best_e = _keep_better(s, b, e, best_s, best_b, best_e)
    return best_s, best_b + mid


def _minmax_grid(lo: mx.array, hi: mx.array, n) -> tuple[mx.array, mx.array]:
    """mx.quantize's (scale, bias): min/max, nudged so that 0.0 is exactly a code.

    The extreme of larger magnitude becomes the bias and the scale is adjusted so that zero
    falls on a code (the scale is negative when that extreme is the maximum).
    """
    scale = mx.maximum((hi - lo) / n, TINY)
    side = mx.abs(lo) > mx.abs(hi)
    scale = mx.where(side, scale, -scale)
    edge = mx.where(side, lo, hi)
    q0 = mx.round(edge / scale)
    nonzero = q0 != 0
    scale = mx.where(nonzero, edge / mx.where(nonzero, q0, 1), scale)
    bias = mx.where(nonzero, edge, 0)
    return scale, bias


def _keep_better(s, b, e, best_s, best_b, best_e):
    better = e < best_e
    return mx.where(better, s, best_s), mx.where(better, b, best_b), mx.where(better, e, best_e)


def _refit(code_sums, stats, s0, b0):
    """Weighted least-squares (s, b) for fixed codes, given their sums, and its error; falls
    back to (s0, b0) where the codes do not determine a line (all equal)."""
    sw, sx, _ = stats
    sq, sqq, sqx = code_sums
    det = sw * sqq - sq * sq
    ok = det > 1e-6 * sw * sqq + TINY
    safe = mx.where(ok, det, 1.0)
    s = mx.where(ok, (sw * sqx - sq * sx) / safe, s0)
    b = mx.where(ok, (sqq * sx - sq * sqx) / safe, b0)
    ok = mx.abs(s) > TINY
    s, b = mx.where(ok, s, s0), mx.where(ok, b, b0)
    return s, b, _error(s, b, *stats, sq, sqq, sqx)


def _error(s, b, sw, sx, sxx, sq, sqq, sqx):
    """sum h (x - s q - b)^2 expanded into the running sums."""
    return sxx - 2 * s * sqx - 2 * b * sx + s * s * sqq + 2 * s * b * sq + b * b * sw


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """(rows, n) integer codes below 2**bits -> (rows, n*bits/32) uint32 in MLX's layout.

    MLX stores codes as one little-endian bit stream: code i occupies bits [i*bits,
    (i+1)*bits) of the row, and the stream is read as uint32 words. For 3, 5 and 6 bits a
    code can straddle two words, so each block of 32 codes (= `bits` words) is assembled in
    64-bit arithmetic: code c is multiplied by 2**(32 + c*bits - 32*w) for word w, the
    products are summed (their bits do not overlap) and the middle 32 bits are the word.
    """
    rows, n = codes.shape
    q = codes.astype(mx.uint32)
    if 32 % bits == 0:
        per = 32 // bits
        shifts = mx.arange(per, dtype=mx.uint32) * bits
        return (q.reshape(rows, n // per, per) << shifts).sum(-1).astype(mx.uint32)
    factors = [[0] * bits for _ in range(32)]
    for c in range(32):
        for word in range(bits):
            pos = c * bits - 32 * word
            if -32 <= pos < 32:
                factors[c][word] = 1 << (pos + 32)
    import numpy as np

    m = mx.array(np.array(factors, dtype=np.uint64))
    blocks = q.astype(mx.uint64).reshape(rows, n // 32, 32, 1) * m
    words = (blocks.sum(-2) >> mx.array(np.uint64(32))) & mx.array(np.uint64(0xFFFFFFFF))
    return words.astype(mx.uint32).reshape(rows, n * bits // 32)


def reconstruction_error(w: mx.array, packed: mx.array, scales: mx.array, biases: mx.array,
                         bits: int, group_size: int,
                         importance: mx.array | None = None) -> float:
    """sum h (w - dequantized)^2 (a diagnostic; `importance` as in `quantize_search`)."""
    d = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
    err = (w.astype(mx.float32) - d.astype(mx.float32)) ** 2
    if importance is not None:
        err = err * importance
    return float(err.sum().item())


def bits_per_weight(bits: int, group_size: int, scale_bits: int = 16) -> float:
    """Storage per weight: the code plus its share of a scale and a bias."""
    return bits + 2 * scale_bits / group_size

