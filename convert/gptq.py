"""GPTQ: round a matrix's columns in order and let the columns not yet rounded absorb the error.

Rounding every weight to its nearest code minimizes the weight error, but what matters is the
layer's output error on real inputs: E||(W - Q) x||^2 = sum_i (W - Q)_i H (W - Q)_i^T with
H = E[x x^T], the covariance of the layer's inputs (measured by calibrate.py). When input
channels are correlated, the error of one rounded column can be partly cancelled by moving
the columns that are still to be rounded. GPTQ (Frantar et al., 2022) does this with the
Cholesky factor U of H^-1 (H^-1 = U^T U, U upper triangular): after rounding column j,

    e = (w_j - q_j) / U_jj,    W[:, j+1:] -= e U[j, j+1:]

which is the optimal update of the remaining columns for that error (the Optimal Brain
Surgeon step), done for all rows at once. The updates are applied lazily, one group of
columns at a time.

Group parameters: when the first column of a group is reached, the group's scale and bias are
chosen by the error-minimizing search (affine.fit_groups, weighted by the input channels'
mean squares) on the group's weights *as the earlier columns' errors have moved them*, rounded
to the stored dtype, and then every column of the group is rounded to that grid. The result
is plain MLX affine quantization: codes, a scale and a bias per group.

Every row is handled independently of the others (the updates move weights along a row), so
quantizing a sample of rows gives exactly those rows of the full result: sensitivity.py
measures formats that way.

The covariance comes from a few hundred calibration tokens, fewer than a wide layer has
inputs, so it is singular and noisy; GPTQ trusting it fully fits the calibration text (on
SmolLM2 it raised perplexity). Its off-diagonal is shrunk toward zero by SHRINK, and the
diagonal damped by DAMP, before it is inverted (docs/quantization.md has the measurements).
The tied embedding gets GPTQ for its head role (the covariance of the final norm's output).
"""

from __future__ import annotations

import mlx.core as mx
import numba
import numpy as np

from .affine import check_groups, fit_groups, nearest_code, pack_codes, round_to_dtype

DAMP = 0.01  # added to H's diagonal, relative to its mean: keeps H^-1 well conditioned
# H's off-diagonal is shrunk by this fraction toward zero: a covariance estimated from a few
# thousand tokens is noisy, and GPTQ that trusts it fully fits the calibration text.
SHRINK = 0.5


def shrunk(cov, shrink: float = SHRINK) -> np.ndarray:
    """(1 - shrink) H + shrink diag(H): the covariance GPTQ trusts (float32)."""
    h = np.array(cov, dtype=np.float32)
    return (1 - shrink) * h + shrink * np.diag(np.diag(h))


def inverse_factor(cov: np.ndarray, damp: float = DAMP, shrink: float = SHRINK) -> np.ndarray:
    """Upper-triangular U with U^T U = (H' + damp * mean(diag H) * I)^-1 (float64), where
    H' = (1 - shrink) H + shrink diag(H).

    With J the matrix that reverses the order of the channels and J H J = M M^T (Cholesky),
    U = J M^-1 J (then U^T U = J M^-T M^-1 J = H^-1): one Cholesky and one triangular inverse,
    a seventh of the arithmetic of inverting H and factoring the inverse (3x faster measured
    on 4096 inputs; a 1B model's `down_proj` has 8192).
    """
    h = shrunk(cov, shrink).astype(np.float64)
    diag = np.diag(h).copy()
    dead = diag <= 0  # a channel that never carries a signal: its weights cannot matter
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    mean = float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += damp * mean
    low = np.linalg.cholesky(h[::-1, ::-1])
    return np.ascontiguousarray(lower_inverse(low)[::-1, ::-1])


def with_factor(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, U): the covariance and its inverse factor in float32, what gptq_quantize reads."""
    return cov, inverse_factor(cov).astype(np.float32)


def lower_inverse(m: np.ndarray) -> np.ndarray:
    """The inverse of the lower-triangular `m`, by halves: [[A, 0], [B, C]]^-1 is
    [[A^-1, 0], [-C^-1 B A^-1, C^-1]], so the work is matrix products (numpy has no
    triangular inverse; a general one costs six times the arithmetic)."""
    n = len(m)
    if n <= 128:
        return np.tril(np.linalg.inv(m))
    k = n // 2
    a, c = lower_inverse(m[:k, :k]), lower_inverse(m[k:, k:])
    out = np.zeros_like(m)
    out[:k, :k] = a
    out[k:, k:] = c
    out[k:, :k] = -c @ (m[k:, :k] @ a)
    return out


def gptq_quantize(w: mx.array, bits: int, group_size: int, cov, importance=None,
                  factor: np.ndarray | None = None,
                  shrink: float = SHRINK) -> tuple[mx.array, mx.array, mx.array]:
    """(out, in) matrix -> (packed uint32 codes, scales, biases) with GPTQ error compensation.

    cov: E[x x^T] of the layer's input, (in, in). importance: (in,) weights for the group
    search (default: cov's diagonal, floored so that no channel weighs nothing).
    factor: inverse_factor(cov, shrink=shrink), when already computed. shrink: how far H's
    off-diagonal is shrunk toward zero (see SHRINK).
    Scales and biases come out in `w`'s dtype, as with `affine.quantize_search`.
    """
    dtype = w.dtype
    rows, cols = w.shape
    check_groups(cols, group_size)
    n = 2**bits - 1
    u = inverse_factor(np.array(cov), shrink=shrink) if factor is None else factor
    u = u.astype(np.float32)
    work = np.array(w.astype(mx.float32))
    if importance is None:
        diag = np.diag(np.array(cov, dtype=np.float32))
        importance = diag + 0.01 * diag.mean() + 1e-12
    imp = np.asarray(importance, dtype=np.float32)
    codes = np.zeros((rows, cols), np.float32)
    groups = cols // group_size
    scales = np.zeros((rows, groups), np.float32)
    biases = np.zeros((rows, groups), np.float32)
    for g in range(groups):
        c0, c1 = g * group_size, (g + 1) * group_size
        s, b = fit_groups(work[:, c0:c1], imp[c0:c1], bits, group_size)
        # Round to the stored dtype first: the codes are taken against what is written.
        s = round_to_dtype(s, dtype)[1].reshape(rows)
        b = round_to_dtype(b, dtype)[1].reshape(rows)
        errs = np.empty((rows, group_size), np.float32)
        _round_group(work, u, c0, c1, s, b, np.float32(n), codes, errs)
        if c1 < cols:
            work[:, c1:] -= errs @ u[c0:c1, c1:]
        scales[:, g], biases[:, g] = s, b
    packed = pack_codes(codes, bits)
    return packed, mx.array(scales).astype(dtype), mx.array(biases).astype(dtype)


@numba.njit(cache=True)
def _round_group(work, u, c0, c1, s, b, top, codes, errs):
    """Columns c0..c1 of `work` rounded in order to each row's grid (s, b), each column's error
    spread onto the group's later columns: `e = (w_j - q_j) / U_jj`, `W[:, j+1:c1] -= e U[j,
    j+1:c1]` (the later groups get theirs in one matmul). A loop compiled by numba: in numpy
    this was a few operations per column, and their Python overhead dominated `--method gptq`
    conversions. The float32 arithmetic is the same, operation for operation."""
    inv = np.float32(1) / s
    shift = -(b * inv)  # x * inv + shift is exactly x * inv - b * inv
    for r in range(work.shape[0]):
        row = work[r]
        for j in range(c0, c1):
            q = nearest_code(row[j], inv[r], shift[r], top)
            codes[r, j] = q
            e = (row[j] - (s[r] * q + b[r])) / u[j, j]
            errs[r, j - c0] = e
            for k in range(j + 1, c1):
                row[k] -= e * u[j, k]


def output_error(w: mx.array, dequantized: mx.array, cov) -> float:
    """E||(W - Q) x||^2 summed over outputs: trace((W - Q) H (W - Q)^T)."""
    d = np.array(w.astype(mx.float32), dtype=np.float64) - np.array(
        dequantized.astype(mx.float32), dtype=np.float64)
    return float(np.sum((d @ np.array(cov, dtype=np.float64)) * d))
