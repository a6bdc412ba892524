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

Speed: the search is one kernel compiled by numba, the Python ecosystem's JIT compiler for
numeric loops: each group of `g` weights is read from memory once and every candidate's
rounding and sums run on it while it sits in the core's L1 cache, rows dealt over the CPU
cores. Written with MLX operations instead, each candidate was a pass over the whole matrix
for the codes and three more for the sums (MLX does not fuse an element-wise chain into a
reduction, and has no custom CPU kernels): that cost 5-7x mx.quantize; this costs about what
mx.quantize does (docs/quantization.md, "Speed"). The kernels are compiled once per machine
and cached on disk (numba's cache, beside this file or in the user's cache folder).
"""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import overload

import mlx.core as mx

from mlx_llama.cpu_streams import stream_count

# Candidate grids (delta, anchor), see _fit_group: each costs one more loop over a group.
CANDIDATES = ((1.0, 0.5), (1.0, 0.0), (1.0, 1.0))
REFINE_STEPS = 1
TINY = 1e-10
# Rows of a rank-2 Importance (the embedding's two roles) whose weights are made at a time:
# about 16 MB of float32 weights, never the whole (vocab, hidden) matrix.
WEIGHT_BLOCK_ELEMENTS = 1 << 22
# Below this many weights a call runs on one thread: waking the others costs more than they
# save, and GPTQ's per-group calls sit between numpy's multi-threaded matmuls (measured: a
# 576x1536 GPTQ took 767 ms with every call on 2 threads, 504 ms on one).
PARALLEL_MIN_ELEMENTS = 1 << 18
# Reassociating the sums (and fusing multiply-adds) lets LLVM vectorize the loops over a
# group. No flag assumes finite values; a fused x * inv + shift can move a code only at an
# exact tie between two codes.
_FAST = {"reassoc", "contract", "nsz", "arcp"}


def quantize_search(
    w: mx.array,
    bits: int,
    group_size: int,
    importance=None,
    *,
    candidates: tuple[tuple[float, float], ...] = CANDIDATES,
    refine: int = REFINE_STEPS,
) -> tuple[mx.array, mx.array, mx.array]:
    """(out, in) float matrix -> (packed uint32 codes, scales, biases) minimizing the error.

    importance: None (plain squared error), a (in,) vector (one weight per input channel,
    e.g. mean squared activations), an (out, in) matrix (one weight per element), or an
    object whose `block(start, stop)` gives the weights of rows start..stop.
    Scales and biases come out in `w`'s dtype. Unlike `mx.quantize`, the result is computed
    now (on the CPU, whatever MLX's default device).
    """
    rows, cols = w.shape
    source = _host_matrix(w)
    scales, biases = _fit_matrix(source, importance, bits, group_size, candidates, refine)
    stored_scales, scales = round_to_dtype(scales, w.dtype)
    stored_biases, biases = round_to_dtype(biases, w.dtype)
    packed = np.empty((rows, cols * bits // 32), np.uint32)
    with _threads(w.size):
        _quantize_rows(source, scales, biases, bits, group_size, packed)
    return mx.array(packed), stored_scales, stored_biases


def fit_groups(x: np.ndarray, h: np.ndarray | None, bits: int,
               group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Best (scales, biases), float32 (rows, cols // group_size), for the groups of `group_size`
    consecutive values in each row of the float32 matrix `x`; `h`: None, (cols,) or (rows, cols)
    error weights. (GPTQ fits one column group of its running matrix at a time with this.)"""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return _fit_matrix(x, h, bits, group_size, CANDIDATES, REFINE_STEPS)


def check_groups(cols: int, group_size: int) -> None:
    """Refuse a row length that is not whole groups: the kernels would leave its tail out
    (and MLX could not load the result), where mx.quantize raises."""
    if group_size <= 0 or cols % group_size:
        raise ValueError(f"rows of {cols} values are not whole groups of {group_size}: "
                         "choose a group size that divides the input dimension")


def pack_codes(codes, bits: int) -> mx.array:
    """(rows, n) integer codes below 2**bits -> (rows, n*bits/32) uint32 in MLX's layout.

    MLX stores codes as one little-endian bit stream: code i occupies bits [i*bits,
    (i+1)*bits) of the row, and the stream is read as uint32 words; for 3, 5 and 6 bits a
    code can straddle two words.
    """
    codes = np.ascontiguousarray(np.asarray(codes), dtype=np.uint32)
    rows, n = codes.shape
    packed = np.empty((rows, n * bits // 32), np.uint32)
    with _threads(codes.size):
        _pack_rows(codes, bits, packed)
    return mx.array(packed)


def round_to_dtype(values: np.ndarray, dtype: mx.Dtype) -> tuple[mx.array, np.ndarray]:
    """`values` rounded to the stored dtype: (that array, its values back in float32), so the
    codes are taken against what is written."""
    stored = mx.array(values).astype(dtype)
    return stored, np.array(stored.astype(mx.float32))


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


# ---------------------------------------------------------------------------------------------
# Between MLX and the kernels
# ---------------------------------------------------------------------------------------------


def _fit_matrix(source: np.ndarray, importance, bits: int, group_size: int, candidates,
                refine: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 (scales, biases) of every group of `source` (a `_host_matrix`); the error
    weights as `quantize_search` takes them, a rank-2 Importance made a block of rows at a
    time."""
    rows, cols = source.shape
    check_groups(cols, group_size)
    scales = np.empty((rows, cols // group_size), np.float32)
    biases = np.empty_like(scales)
    deltas, anchors = _grids(candidates)
    step = rows if not hasattr(importance, "block") else max(1, WEIGHT_BLOCK_ELEMENTS // cols)
    with _threads(source.size):
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            h = _row_weights(importance, start, stop, cols)
            _fit_rows(source[start:stop], h, bits, group_size, deltas, anchors, refine,
                      scales[start:stop], biases[start:stop])
    return scales, biases


def _host_matrix(w: mx.array) -> np.ndarray:
    """The weights as a C-ordered numpy matrix the kernels read: float32 as it is, bfloat16 as
    its raw 16 bits (numpy has no bfloat16; the kernel widens a row at a time, so no float32
    copy of the matrix is made), anything else converted to float32."""
    if w.dtype == mx.bfloat16:
        return np.ascontiguousarray(np.asarray(w.view(mx.uint16)))
    if w.dtype != mx.float32:
        w = w.astype(mx.float32)
    return np.ascontiguousarray(np.asarray(w))


def _row_weights(importance, start: int, stop: int, cols: int) -> np.ndarray:
    """Error weights (MLX or numpy) for rows start..stop as a float32 (1 or stop - start,
    cols) matrix."""
    if importance is None:
        return np.ones((1, cols), np.float32)
    if hasattr(importance, "block"):
        h = importance.block(start, stop)
    else:
        h = importance[start:stop] if importance.ndim == 2 else importance
    h = np.asarray(h.astype(mx.float32)) if isinstance(h, mx.array) else np.asarray(h, np.float32)
    return np.ascontiguousarray(h.reshape(-1, cols))


def _grids(candidates) -> tuple[np.ndarray, np.ndarray]:
    """The candidate grids' (deltas, anchors) as the float32 vectors the kernel takes."""
    pairs = np.array(candidates, np.float32).reshape(-1, 2)
    return np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])


class _threads:
    """Run the kernels on as many cores as the runtime's matmuls use (cpu_streams), for a
    call on `elements` weights large enough to pay for them."""

    def __init__(self, elements: int):
        self.count = 1 if elements < PARALLEL_MIN_ELEMENTS else stream_count()

    def __enter__(self):
        self.before = numba.get_num_threads()
        numba.set_num_threads(min(self.count, numba.config.NUMBA_NUM_THREADS))

    def __exit__(self, *exc):
        numba.set_num_threads(self.before)


# ---------------------------------------------------------------------------------------------
# The kernels (numba). Rows are independent: each thread takes whole rows, so the result does
# not depend on the thread count.
# ---------------------------------------------------------------------------------------------


def _widen(row):
    """A matrix row as float32 (the Python body is never run: numba compiles the overload)."""
    raise NotImplementedError


@overload(_widen)
def _widen_impl(row):
    if row.dtype == numba.types.uint16:  # bfloat16 bits: the top half of a float32
        return lambda row: (row.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return lambda row: row


@numba.njit(parallel=True, cache=True, fastmath=_FAST)
def _fit_rows(source, weights, bits, group_size, deltas, anchors, refine, scales, biases):
    rows, cols = source.shape
    top = np.float32(2**bits - 1)
    per_row = np.int64(1) if weights.shape[0] > 1 else np.int64(0)
    for r in numba.prange(rows):
        x = _widen(source[r])
        h = weights[np.int64(r) * per_row]
        centred = np.empty(group_size, np.float32)
        for g in range(cols // group_size):
            lo = group_size * g
            s, b = _fit_group(x[lo:lo + group_size], h[lo:lo + group_size], top, centred,
                              deltas, anchors, refine)
            scales[r, g] = s
            biases[r, g] = b


@numba.njit(inline="always", fastmath=_FAST)
def _fit_group(x, h, top, xc, deltas, anchors, refine):
    """(scale, bias) of one group: the candidates and refinement of the module docstring."""
    lo = x[0]
    hi = x[0]
    for v in x:
        lo = min(lo, v)
        hi = max(hi, v)
    # Centre on the mid-range: the problem is shift invariant (the bias absorbs it) and the
    # error sums lose less precision to cancellation.
    mid = (lo + hi) / np.float32(2)
    half = max(hi - lo, np.float32(TINY)) / np.float32(2)
    sw = sx = sxx = 0.0  # float64: the error expansion cancels (8-bit errors are ~1e-5 of sxx)
    for i in range(x.shape[0]):
        c = x[i] - mid
        xc[i] = c
        hc = np.float64(h[i])
        sw += hc
        sx += hc * c
        sxx += hc * c * c
    best_s, best_b = _minmax_grid(lo, hi, top)
    best_b -= mid
    sq, sqq, sqx = _code_sums(xc, h, best_s, best_b, top)
    best_e = _error(best_s, best_b, sw, sx, sxx, sq, sqq, sqx)
    for k in range(deltas.shape[0]):
        # A grid of top + delta steps over the range: delta > 0 is finer and leaves part of
        # the range uncovered, at the top (anchor 0), the bottom (anchor 1) or both (0.5).
        step = 2 * half / (top + deltas[k])
        b0 = -half + step * deltas[k] * anchors[k]
        s, b, e = _refit(_code_sums(xc, h, step, b0, top), sw, sx, sxx, step, b0)
        if e < best_e:
            best_s, best_b, best_e = s, b, e
    for _ in range(refine):
        s, b, e = _refit(_code_sums(xc, h, best_s, best_b, top), sw, sx, sxx, best_s, best_b)
        if e < best_e:
            best_s, best_b, best_e = s, b, e
    return best_s, best_b + mid


@numba.njit(inline="always", fastmath=_FAST)
def _code_sums(xc, h, s, b, top):
    """(sum h q, sum h q^2, sum h q x) for the codes q the grid (s, b) gives."""
    inv = np.float32(1 / s)  # the loop runs in float32 whatever the scalars' type
    shift = np.float32(-b * inv)
    sq = sqq = sqx = 0.0
    for i in range(xc.shape[0]):
        q = nearest_code(xc[i], inv, shift, top)
        hq = np.float64(h[i] * q)
        sq += hq
        sqq += hq * q
        sqx += hq * xc[i]
    return sq, sqq, sqx


@numba.njit(inline="always")
def nearest_code(x, inv, shift, top):
    """round(x / s - b / s) clipped to [0, top], given inv = 1/s and shift = -b/s (float32):
    the one rounding every kernel here (and GPTQ's) uses, ties to even like mx.quantize."""
    return min(max(np.rint(x * inv + shift), np.float32(0)), top)


@numba.njit(inline="always")
def _minmax_grid(lo, hi, top):
    """mx.quantize's (scale, bias): min/max, nudged so that 0.0 is exactly a code.

    The extreme of larger magnitude becomes the bias and the scale is adjusted so that zero
    falls on a code (the scale is negative when that extreme is the maximum).
    """
    scale = max((hi - lo) / top, np.float32(TINY))
    if abs(lo) > abs(hi):
        edge = lo
    else:
        edge = hi
        scale = -scale
    q0 = np.rint(edge / scale)
    if q0 == 0:
        return scale, np.float32(0)
    return edge / q0, edge


@numba.njit(inline="always")
def _refit(code_sums, sw, sx, sxx, s0, b0):
    """Weighted least-squares (s, b) for fixed codes, given their sums, and its error; falls
    back to (s0, b0) where the codes do not determine a line (all equal)."""
    sq, sqq, sqx = code_sums
    s, b = s0, b0
    det = sw * sqq - sq * sq
    if det > np.float32(1e-6) * sw * sqq + np.float32(TINY):
        fit_s = (sw * sqx - sq * sx) / det
        if abs(fit_s) > TINY:
            s, b = fit_s, (sqq * sx - sq * sqx) / det
    return s, b, _error(s, b, sw, sx, sxx, sq, sqq, sqx)


@numba.njit(inline="always")
def _error(s, b, sw, sx, sxx, sq, sqq, sqx):
    """sum h (x - s q - b)^2 expanded into the running sums."""
    return sxx - 2 * s * sqx - 2 * b * sx + s * s * sqq + 2 * s * b * sq + b * b * sw


@numba.njit(parallel=True, cache=True)
def _quantize_rows(source, scales, biases, bits, group_size, packed):
    """The nearest code of every weight for its group's stored (scale, bias), packed."""
    rows, cols = source.shape
    top = np.float32(2**bits - 1)
    for r in numba.prange(rows):
        x = _widen(source[r])
        codes = np.empty(cols, np.uint32)
        for g in range(cols // group_size):
            inv = np.float32(1) / scales[r, g]
            shift = -biases[r, g] * inv
            for i in range(group_size * g, group_size * (g + 1)):
                codes[i] = np.uint32(nearest_code(x[i], inv, shift, top))
        _pack_row(codes, bits, packed[r])


@numba.njit(parallel=True, cache=True)
def _pack_rows(codes, bits, packed):
    for r in numba.prange(codes.shape[0]):
        _pack_row(codes[r], bits, packed[r])


@numba.njit(inline="always")
def _pack_row(codes, bits, words):
    """One row's codes into its little-endian bit stream of uint32 words."""
    words[:] = 0
    for i in range(codes.shape[0]):
        pos = i * bits
        word, shift = pos // 32, pos % 32
        words[word] |= codes[i] << np.uint32(shift)
        if shift + bits > 32:  # straddles into the next word
            words[word + 1] |= codes[i] >> np.uint32(32 - shift)
