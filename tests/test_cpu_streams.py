"""Quantized matmuls split over CPU streams: the same numbers, no extra memory, can be off."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_llama import cpu_streams
from mlx_llama.config import ModelConfig
from mlx_llama.model import Llama


def quantized_llama(tie: bool, quantize: bool = True) -> Llama:
    mx.random.seed(0)
    cfg = ModelConfig.from_dict(dict(
        model_type="llama", vocab_size=1000, hidden_size=128, intermediate_size=320,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie))
    model = Llama(cfg)
    params = nn.utils.tree_map(lambda p: p + 0.02 * mx.random.normal(p.shape), model.parameters())
    model.update(params)
    if quantize:
        nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_split_model_gives_the_same_logits_bit_for_bit(tie):
    model = quantized_llama(tie)
    tokens = mx.array([[5, 17, 256, 999, 3, 42, 7, 8, 9, 10]])

    def prompt_and_step():
        cache = model.make_cache()
        prompt = model(tokens, cache)
        return prompt, model(mx.array([[11]]), cache)

    before = prompt_and_step()
    split = cpu_streams.use_cpu_streams(model, 2)
    # q/o (128 rows), gate/up (320), down (128) per layer and the 1000-row head (the tied
    # embedding or lm_head); k/v (64 rows) stay whole.
    assert split == 2 * 5 + 1
    assert isinstance(model.model.layers[0].mlp.gate_proj, cpu_streams.ShardedQuantizedLinear)
    after = prompt_and_step()  # a prompt (many rows) and a decode step (one row)
    assert all(mx.array_equal(b, a) for b, a in zip(before, after))


@pytest.mark.parametrize("tie", [True, False])
def test_split_float_model_gives_the_same_logits_and_gradients(tie):
    """The converter's float32 source model (dense=True): calibration differentiates through
    the split matmuls, so the gradients must be those of whole ones too."""
    model = quantized_llama(tie, quantize=False)
    tokens = mx.array([[5, 17, 256, 999, 3, 42, 7, 8, 9, 10]])

    def logits_and_grad():
        def loss(x):
            h = model.model.embed_tokens(tokens) + x
            for layer in model.model.layers:
                h = layer(h)
            return model.project(model.model.norm(h))
        probe = mx.zeros((1, tokens.shape[1], 128))
        grad = mx.grad(lambda x: (loss(x) ** 2).mean())(probe)
        return loss(probe), grad

    before = logits_and_grad()
    assert cpu_streams.use_cpu_streams(model, 2) == 0  # quantized layers only by default
    split = cpu_streams.use_cpu_streams(model, 2, dense=True)
    assert split == 2 * 5 + 1
    assert isinstance(model.model.layers[0].mlp.gate_proj, cpu_streams.ShardedLinear)
    after = logits_and_grad()
    assert mx.allclose(before[0], after[0], rtol=1e-6, atol=1e-6).item()
    assert mx.allclose(before[1], after[1], rtol=1e-5, atol=1e-7).item()
    assert mx.array_equal(before[0], after[0]).item()


def test_shards_are_views_and_one_stream_changes_nothing(monkeypatch):
    model = quantized_llama(True)
    mx.eval(model.parameters())
    held = mx.get_active_memory()
    assert cpu_streams.use_cpu_streams(model, 3) > 0
    assert mx.get_active_memory() - held < 0.01 * held  # slices share the weights' buffers
    fresh = quantized_llama(True)
    monkeypatch.setenv("MLX_LLAMA_CPU_STREAMS", "1")
    assert cpu_streams.stream_count() == 1
    assert cpu_streams.use_cpu_streams(fresh) == 0
    assert type(fresh.model.layers[0].mlp.gate_proj) is nn.QuantizedLinear
    monkeypatch.setenv("MLX_LLAMA_CPU_STREAMS", "4")
    assert cpu_streams.stream_count() == 4
