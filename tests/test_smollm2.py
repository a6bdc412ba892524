"""The real model: SmolLM2-135M (bundled GGUF) against transformers, and 8-bit quality."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import nll_per_token
from mlx_llama.generate import decode, prefill
from mlx_llama.loading import load_model
from mlx_llama.sampling import greedy

PROMPT = "The three most important inventions of the nineteenth century were"


@pytest.fixture(scope="module")
def ours(smollm2_mlx):
    model, _ = load_model(smollm2_mlx, compute_dtype=mx.float32)
    return model


@pytest.fixture(scope="module")
def tokenizer(smollm2_mlx):
    from mlx_llama.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_mlx)


def test_greedy_continuation_matches_transformers(ours, tokenizer, smollm2_reference):
    import torch

    prompt = tokenizer.encode(PROMPT)
    with torch.no_grad():
        ref = smollm2_reference.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt):].tolist()
    cache = ours.make_cache()
    steps = decode(ours, prefill(ours, prompt, cache), cache, greedy)
    got = [token for token, _ in (next(steps) for _ in range(32))]
    assert got == ref


def reference_nll(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits.numpy()
    return nll_per_token(logits, tokens)


def test_paragraph_perplexity_matches_transformers(ours, tokenizer, smollm2_reference, paragraph):
    tokens = np.array([tokenizer.encode(paragraph)])
    assert tokens.shape[1] > 150
    ppl_ref = np.exp(reference_nll(smollm2_reference, tokens).mean())
    ppl = np.exp(nll_per_token(ours(mx.array(tokens)), tokens).mean())
    assert abs(ppl / ppl_ref - 1) < 0.005


def test_8bit_conversion_keeps_perplexity(smollm2_hf_bf16, tokenizer, tmp_path, paragraph):
    from convert.api import convert

    full, _ = load_model(smollm2_hf_bf16, compute_dtype=mx.float32)
    q8_folder = convert(str(smollm2_hf_bf16), tmp_path / "q8", quantize=True, bits=8,
                        progress=False)
    q8, _ = load_model(q8_folder, compute_dtype=mx.float32)
    assert "scales" in str(q8.model.layers[0].mlp.down_proj.parameters().keys())
    tokens = np.array([tokenizer.encode(paragraph)])
    ppl_full = np.exp(nll_per_token(full(mx.array(tokens)), tokens).mean())
    ppl_q8 = np.exp(nll_per_token(q8(mx.array(tokens)), tokens).mean())
    assert abs(ppl_q8 / ppl_full - 1) < 0.02
