"""The compiled scale search (convert/affine.py): same results as its operations run one by
one, and codes that are the nearest ones for the scales and biases it stores."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from convert.affine import fit_groups, quantize_search


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


def _uncompiled(fn, *args):
    """fn(*args) with mx.compile off: every operation runs on its own, unfused."""
    mx.disable_compile()
    try:
        out = fn(*args)
        mx.eval(out)
        return out
    finally:
        mx.enable_compile()


@pytest.mark.parametrize(("bits", "group", "kind", "dtype"), [
    (4, 64, "channels", mx.bfloat16),
    (3, 32, "none", mx.float16),
    (8, 64, "elements", mx.float32),
    (2, 128, "channels", mx.bfloat16),
])
def test_compiled_search_equals_the_same_ops_unfused(bits, group, kind, dtype):
    """Fusion changes no bit: the JIT-compiled kernels do the same float32 arithmetic."""
    w = _matrix(40, 384, bits).astype(dtype)
    h = _importance(kind, 40, 384)
    fused = quantize_search(w, bits, group, h)
    plain = _uncompiled(quantize_search, w, bits, group, h)
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert mx.array_equal(a, b).item()


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


def test_fit_groups_keeps_its_shapes():
    x = _matrix(6, 128, 3).reshape(6, 2, 64)
    s, b = fit_groups(x, None, 4)
    assert s.shape == b.shape == (6, 2, 1)
    d = mx.clip(mx.round((x - b) / s), 0, 15) * s + b
    plain = mx.quantize(x.reshape(6, 128), 64, 4)
    ref = mx.dequantize(*plain, group_size=64, bits=4).reshape(6, 2, 64)
    assert ((x - d) ** 2).sum().item() < ((x - ref) ** 2).sum().item()


@pytest.mark.parametrize("bits", [3, 4])
def test_chunks_on_several_cpu_streams_give_the_same_bits(bits, monkeypatch):
    """Dealing the row chunks over parallel CPU streams changes no bit (groups are independent)."""
    w = _matrix(600, 512, 5).astype(mx.bfloat16)  # 600 rows: 3 chunks of 256 rows, the last short
    h = _importance("channels", 600, 512)
    monkeypatch.setenv("MLX_LLAMA_CPU_STREAMS", "1")
    one = quantize_search(w, bits, 64, h)
    mx.eval(one)
    monkeypatch.setenv("MLX_LLAMA_CPU_STREAMS", "3")
    several = quantize_search(w, bits, 64, h)
    for a, b in zip(one, several):
        assert a.shape == b.shape and mx.array_equal(a, b).item()
