"""The forward pass matches transformers on every Llama variant, in one pass and via the cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import TINY_VARIANTS
from mlx_llama.loading import load_model

SEQ = 64


def reference_logits(folder, tokens: np.ndarray) -> np.ndarray:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def tokens_for(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(1, SEQ)).astype(np.int32)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_logits_match_transformers(tiny_checkpoints, variant):
    folder = tiny_checkpoints[variant]
    model, _ = load_model(folder, compute_dtype=mx.float32)
    tokens = tokens_for(model.config.vocab_size)
    expected = reference_logits(folder, tokens)

    full = np.array(model(mx.array(tokens)))
    assert np.abs(full - expected).max() < 1e-4

    cache = model.make_cache()
    stepwise = [np.array(model(mx.array(tokens[:, i : i + 1]), cache)) for i in range(SEQ)]
    assert np.abs(np.concatenate(stepwise, axis=1) - expected).max() < 1e-4


def test_chunked_prefill_equals_one_pass(tiny_checkpoints):
    """A prompt chunk after cached tokens needs the causal mask aligned to the cache's end."""
    model, _ = load_model(tiny_checkpoints["gqa"], compute_dtype=mx.float32)
    tokens = mx.array(tokens_for(model.config.vocab_size, seed=1))
    full = np.array(model(tokens))
    cache = model.make_cache()
    chunks = [np.array(model(tokens[:, s : s + 24], cache)) for s in range(0, SEQ, 24)]
    assert np.abs(np.concatenate(chunks, axis=1) - full).max() < 1e-4


def test_kv_heads_are_not_repeated(tiny_checkpoints):
    model, _ = load_model(tiny_checkpoints["gqa"], compute_dtype=mx.float32)
    cache = model.make_cache()
    model(mx.array(tokens_for(model.config.vocab_size)), cache)
    keys, values = cache[0].state
    assert keys.shape == (1, model.config.num_key_value_heads, SEQ, model.config.head_dim)
    assert values.shape == keys.shape
