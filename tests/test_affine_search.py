"""The scale search kernel (convert/affine.py): the same choices as the search written plainly
in numpy, codes that are the nearest ones for the scales and biases it stores, and results
that do not depend on how the rows are dealt over threads or blocks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from convert import affine
from convert.affine import CANDIDATES, fit_groups, quantize_search, reconstruction_error
from convert.sensitivity import Importance


def _matrix(rows: int, cols: int, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.standard_t(4, size=(rows, cols)).astype(np.float32))


def _importance(kind: str, rows: int, cols: int):
    rng = np.random.default_rng(7)
    if kind == "none":
        return None
    if kind == "channels":
        return mx.array(rng.gamma(0.5, size=cols).astype(np.float32))
    return mx.array(rng.gamma(0.5, size=(rows, cols)).astype(np.float32))


def _reference_fit(x: np.ndarray, h: np.ndarray, bits: int, refine: int = 1):
    """The search of affine.py's docstring, written plainly: float64 numpy over (groups, size),
    each error computed from the dequantized weights, not from running sums. As there, a
    candidate's codes stay fixed while its (s, b) are refitted, and it is judged by that
    fit's error."""
    n = 2**bits - 1
    lo, hi = x.min(-1), x.max(-1)

    def codes(s, b):
        return np.clip(np.rint((x - b[:, None]) / s[:, None]), 0, n)

    def error(s, b, q):
        return (h * (x - s[:, None] * q - b[:, None]) ** 2).sum(-1)

    def refit(s0, b0):  # weighted least squares of x on the codes (s0, b0) give
        q = codes(s0, b0)
        sw, sq, sqq = h.sum(-1), (h * q).sum(-1), (h * q * q).sum(-1)
        sx, sqx = (h * x).sum(-1), (h * q * x).sum(-1)
        det = sw * sqq - sq * sq
        ok = det > 1e-6 * sw * sqq + 1e-10
        safe = np.where(ok, det, 1)
        s = np.where(ok, (sw * sqx - sq * sx) / safe, s0)
        b = np.where(ok, (sqq * sx - sq * sqx) / safe, b0)
        return s, b, error(s, b, q)

    def keep_better(best, s, b, e):
        better = e < best[2]
        return [np.where(better, new, old) for new, old in zip((s, b, e), best)]

    # mx.quantize's grid: the larger extreme is the bias, zero lands on a code.
    scale = np.maximum((hi - lo) / n, 1e-10)
    edge = np.where(np.abs(lo) > np.abs(hi), lo, hi)
    scale = np.where(np.abs(lo) > np.abs(hi), scale, -scale)
    q0 = np.rint(edge / scale)
    s, b = np.where(q0 != 0, edge / np.where(q0 != 0, q0, 1), scale), np.where(q0 != 0, edge, 0)
    best = [s, b, error(s, b, codes(s, b))]
    for delta, anchor in CANDIDATES:
        step = (hi - lo) / (n + delta)
        best = keep_better(best, *refit(step, lo + step * delta * anchor))
    for _ in range(refine):
        best = keep_better(best, *refit(best[0], best[1]))
    return best[0], best[1]


@pytest.mark.parametrize(("bits", "group", "kind", "dtype"), [
    (4, 64, "channels", mx.bfloat16),
    (3, 32, "none", mx.float16),
    (8, 64, "elements", mx.float32),
    (2, 128, "channels", mx.bfloat16),
    (5, 64, "channels", mx.float32),
])
def test_kernel_makes_the_choices_of_the_plain_search(bits, group, kind, dtype):
    """Same (scale, bias) per group as the reference, up to rounding in near ties (float32
    codes against float64 ones), and the same total error to 0.1%: a dropped candidate or
    refinement moves it by 3% or more."""
    rows, cols = 64, 512
    w = _matrix(rows, cols, bits).astype(dtype)
    h = _importance(kind, rows, cols)
    packed, scales, biases = quantize_search(w, bits, group, h)
    x = np.array(w.astype(mx.float32), np.float64).reshape(-1, group)
    hh = np.ones_like(x) if h is None else np.broadcast_to(
        np.array(h, np.float64), (rows, cols)).reshape(-1, group)
    s_ref, b_ref = _reference_fit(x, hh, bits)
    s_ref = np.array(mx.array(s_ref.astype(np.float32)).astype(dtype).astype(mx.float32))
    b_ref = np.array(mx.array(b_ref.astype(np.float32)).astype(dtype).astype(mx.float32))
    s = np.array(scales.astype(mx.float32)).reshape(-1)
    b = np.array(biases.astype(mx.float32)).reshape(-1)
    close = np.isclose(s, s_ref, rtol=1e-3, atol=0) & np.isclose(b, b_ref, rtol=1e-3, atol=1e-6)
    assert close.mean() > 0.95, close.mean()
    q_ref = np.clip(np.rint((x - b_ref[:, None]) / s_ref[:, None]), 0, 2**bits - 1)
    err_ref = float((hh * (x - s_ref[:, None] * q_ref - b_ref[:, None]) ** 2).sum())
    # Dequantized in float32, as the runtime's float32 matmuls read them.
    err = reconstruction_error(w, packed, scales.astype(mx.float32), biases.astype(mx.float32),
                               bits, group, h)
    assert abs(err - err_ref) < 1e-3 * err_ref, (err, err_ref)


@pytest.mark.parametrize("bits", [3, 4])
def test_codes_are_the_nearest_for_the_stored_scales(bits):
    """Every weight reads back as the grid point nearest to it (ties aside) among the 2**bits
    points its group's stored scale and bias give: nothing is lost after the search."""
    w = _matrix(24, 256, 11 + bits).astype(mx.bfloat16)
    packed, scales, biases = quantize_search(w, bits, 64, _importance("channels", 24, 256))
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    deq = np.array(mx.dequantize(packed, scales, biases, group_size=64, bits=bits))
    deq = deq.reshape(24, 4, 64)
    s = np.array(scales)[..., None]
    b = np.array(biases)[..., None]
    grid = s * np.arange(2**bits, dtype=np.float32) + b  # (24, 4, levels)
    x = np.array(w.astype(mx.float32)).reshape(24, 4, 64)
    nearest = np.abs(x[..., None] - grid[:, :, None, :]).min(-1)
    assert np.all(np.abs(x - deq) <= nearest + 1e-5 * np.abs(s))


def test_fit_groups_gives_one_pair_per_group_and_beats_minmax():
    x = np.array(_matrix(6, 128, 3))
    s, b = fit_groups(x, None, 4, 64)
    assert s.shape == b.shape == (6, 2) and s.dtype == b.dtype == np.float32
    groups = x.reshape(6, 2, 64)
    d = np.clip(np.rint((groups - b[..., None]) / s[..., None]), 0, 15) * s[..., None] + b[..., None]
    plain = mx.quantize(mx.array(x), 64, 4)
    ref = np.array(mx.dequantize(*plain, group_size=64, bits=4)).reshape(6, 2, 64)
    assert ((groups - d) ** 2).sum() < ((groups - ref) ** 2).sum()


@pytest.mark.parametrize("bits", [3, 4])
def test_thread_count_changes_no_bit(bits, monkeypatch):
    """Rows are independent: one thread or several give the same codes, scales and biases."""
    w = _matrix(600, 512, 5).astype(mx.bfloat16)
    h = _importance("channels", 600, 512)
    monkeypatch.setenv("MLX_LLAMA_CPU_STREAMS", "1")
    one = quantize_search(w, bits, 64, h)
    monkeypatch.setenv("MLX_LLAMA_CPU_STREAMS", "4")
    several = quantize_search(w, bits, 64, h)
    for a, b in zip(one, several):
        assert a.shape == b.shape and mx.array_equal(a, b).item()


def test_rank_two_weights_are_made_a_block_of_rows_at_a_time(monkeypatch):
    """The embedding's (rows @ cols) weights, made block by block, give the bits of the same
    weights passed whole; no block holds more than the bound."""
    w = _matrix(300, 256, 9).astype(mx.bfloat16)
    rng = np.random.default_rng(3)
    imp = Importance(cols=mx.array(rng.gamma(1.0, size=(2, 256)).astype(np.float32)),
                     rows=mx.array(rng.gamma(1.0, size=(300, 2)).astype(np.float32)))
    whole = quantize_search(w, 4, 64, imp.rows @ imp.cols)
    seen = []

    class Recording:  # Importance is frozen: a stand-in that records the blocks asked for
        def block(self, start, stop):
            seen.append(stop - start)
            return imp.block(start, stop)

    monkeypatch.setattr(affine, "WEIGHT_BLOCK_ELEMENTS", 64 * 256)
    blocks = quantize_search(w, 4, 64, Recording())
    assert seen == [64, 64, 64, 64, 44]
    for a, b in zip(whole, blocks):
        assert mx.array_equal(a, b).item()
