"""The lean CPU graph (fused.py) computes what the plain one does, and is smaller."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import TINY_VARIANTS, make_hf_checkpoint
from mlx_llama import fused
from mlx_llama.loading import load_model
from mlx_llama.opcount import decode_step_ops


def _decode_logits(model, tokens: list[int], lean: bool, monkeypatch) -> np.ndarray:
    monkeypatch.setattr(fused, "lean_graph", lambda: lean)
    monkeypatch.setattr("mlx_llama.model.lean_graph", lambda: lean)
    cache = model.make_cache()
    model(mx.array([tokens[:5]]), cache)
    out = [np.array(model(mx.array([[t]]), cache)[0, -1]) for t in tokens[5:]]
    return np.stack(out)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_lean_decode_equals_plain_decode(tiny_checkpoints, variant, monkeypatch):
    model, _ = load_model(tiny_checkpoints[variant], compute_dtype=mx.float32)
    tokens = list(range(3, 40))
    lean = _decode_logits(model, tokens, True, monkeypatch)
    plain = _decode_logits(model, tokens, False, monkeypatch)
    assert np.abs(lean - plain).max() < 1e-4


@pytest.fixture(scope="module")
def head_dim_32(tmp_path_factory, sp_model_file):
    """Heads of 32 dimensions: the smallest a quantized KV cache accepts."""
    folder = tmp_path_factory.mktemp("hd32")
    return make_hf_checkpoint(folder, sp_model_file, hidden_size=128, intermediate_size=256)


@pytest.mark.parametrize("kind, options", [("quantized", {"bits": 8, "group_size": 32}),
                                           ("rotating", {"max_size": 16})])
def test_lean_decode_with_other_caches(head_dim_32, kind, options, monkeypatch):
    model, _ = load_model(head_dim_32, compute_dtype=mx.float32)
    tokens = list(range(3, 30))
    results = []
    for lean in (True, False):
        monkeypatch.setattr("mlx_llama.model.lean_graph", lambda lean=lean: lean)
        cache = model.make_cache(kind, **options)
        model(mx.array([tokens[:5]]), cache)
        results.append(np.stack([np.array(model(mx.array([[t]]), cache)[0, -1])
                                 for t in tokens[5:]]))
    assert np.abs(results[0] - results[1]).max() < 1e-4


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     TINY_VARIANTS["llama3"]["rope_scaling"]])
def test_rotary_tables_match_fast_rope(scaling):
    from mlx_llama.rope import RoPE

    rope = RoPE(32, 500000.0, scaling)
    x = mx.random.normal((3, 32))  # (heads, dims) rows of one position
    tables = fused.RotaryTables.build(fused.rotary_constants(rope), 17, 1, rope.scale, 0.5)
    expected = rope(x.reshape(1, 3, 1, 32), 17).reshape(3, 32)
    assert mx.allclose(tables.rotate_keys(x), expected, atol=1e-5)
    assert mx.allclose(tables.rotate_queries(x), expected * 0.5, atol=1e-5)


@pytest.mark.parametrize("bits, bias", [(4, False), (8, False), (4, True)])
def test_dense_prefill_matches_quantized_kernel(bits, bias, monkeypatch):
    monkeypatch.setattr(fused, "DENSE_BLOCK", 64 * 40)  # several blocks of rows
    linear = nn.Linear(128, 200, bias=bias)
    layer = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=bits)
    fused.use_dense_prefill(layer)
    assert isinstance(layer, fused.DenseFriendlyQuantizedLinear)
    x = mx.random.normal((1, 24, 128))
    dense = layer(x)
    exact = nn.QuantizedLinear.__call__(layer, x)
    assert dense.dtype == x.dtype and dense.shape == exact.shape
    # Only the product's inputs are rounded to bfloat16.
    assert mx.abs(dense - exact).max().item() < 0.02 * mx.abs(exact).max().item()
    # One row (decode) keeps the quantized kernel, exactly.
    assert mx.array_equal(layer(x[:, :1]), nn.QuantizedLinear.__call__(layer, x[:, :1]))


def test_lean_step_has_far_fewer_ops(tiny_checkpoints, monkeypatch):
    model, _ = load_model(tiny_checkpoints["gqa"], compute_dtype=mx.float32)
    lean = sum(decode_step_ops(model).values())
    monkeypatch.setattr("mlx_llama.model.lean_graph", lambda: False)
    plain = sum(decode_step_ops(model).values())
    assert lean < 0.6 * plain


def test_auto_dtypes_on_cpu(tiny_checkpoints, tmp_path, monkeypatch):
    """auto: float32 arithmetic, bfloat16 scales and KV cache kept, dense prefill on one core
    (split quantized matmuls in small chunks on more); an explicit dtype: that dtype
    throughout and the exact quantized kernel."""
    from convert.api import convert
    from mlx_llama.cpu_streams import ShardedQuantizedLinear

    folder = convert(tiny_checkpoints["gqa"], tmp_path / "q4", quantize=True, dtype="bfloat16",
                     progress=False)
    monkeypatch.setenv("MLX_LLAMA_CPU_STREAMS", "2")
    split, _ = load_model(folder)
    assert type(split.lm_head) is ShardedQuantizedLinear and split.prefill_chunk == 64
    monkeypatch.setenv("MLX_LLAMA_CPU_STREAMS", "1")
    auto, _ = load_model(folder)
    exact, _ = load_model(folder, compute_dtype=mx.float32)
    q_proj = auto.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, fused.DenseFriendlyQuantizedLinear)
    assert not isinstance(exact.model.layers[0].self_attn.q_proj,
                          fused.DenseFriendlyQuantizedLinear)
    assert q_proj.scales.dtype == mx.bfloat16 and auto.model.norm.weight.dtype == mx.float32
    for model, kv_dtype in ((auto, mx.bfloat16), (exact, mx.float32)):
        cache = model.make_cache()
        logits = model(mx.array([list(range(3, 20))]), cache)
        assert logits.dtype == mx.float32 and cache[0].state[0].dtype == kv_dtype


def test_float32_checkpoint_stays_exact_under_auto(tiny_checkpoints, tmp_path):
    from convert.api import convert

    folder = convert(tiny_checkpoints["gqa"], tmp_path / "q4", quantize=True, progress=False)
    auto, _ = load_model(folder)
    assert not isinstance(auto.model.layers[0].mlp.up_proj, fused.DenseFriendlyQuantizedLinear)
    cache = auto.make_cache()
    auto(mx.array([[5, 6, 7]]), cache)
    assert cache[0].state[0].dtype == mx.float32


def test_stored_dtype_stays_stored_through_the_lean_decode_step(tiny_checkpoints, tmp_path):
    """compute_dtype=None keeps a bfloat16 checkpoint's dtype in the decode step too: the
    rotary swap matrix (float32) must not promote the queries and keys, and with them the
    whole residual stream, to float32."""
    from convert.api import convert

    folder = convert(tiny_checkpoints["gqa"], tmp_path / "q4", quantize=True, dtype="bfloat16",
                     progress=False)
    model, _ = load_model(folder, compute_dtype=None)
    cache = model.make_cache()
    model(mx.array([[5, 6, 7]]), cache)
    assert model.model(mx.array([[8]]), cache).dtype == mx.bfloat16
