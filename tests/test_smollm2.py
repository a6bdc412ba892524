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


def test_8bit_conversion_keeps_perplexity(smollm2_hf_bf16, smollm2_paragraph, tmp_path):
    """8-bit conversion of the bfloat16 export against full precision.

    The export holds the GGUF's dequantized weights, so the full-precision model's logits are
    those of the imported GGUF run in float32 (the shared `smollm2_paragraph`), not a second
    dense float32 forward, which MLX's CPU backend makes minutes long. The first 128 tokens
    keep the 8-bit forward short; logits are causal, so the window is exact.
    """
    from convert.api import convert

    q8_folder = convert(str(smollm2_hf_bf16), tmp_path / "q8", quantize=True, bits=8,
                        progress=False)
    q8, _ = load_model(q8_folder, compute_dtype=mx.float32)
    assert q8.model.layers[0].mlp.down_proj.bits == 8
    ids = np.array([smollm2_paragraph["ids"][:128]])
    ppl_full = np.exp(nll_per_token(smollm2_paragraph["ours"][None, :128], ids).mean())
    ppl_q8 = np.exp(nll_per_token(q8(mx.array(ids)), ids).mean())
    assert abs(ppl_q8 / ppl_full - 1) < 0.02


def test_a_stop_string_that_is_a_special_token_stops_on_it(ours, tokenizer):
    """stop=["<|im_start|>"] never fired: special tokens are left out of the decoded text
    the stop strings are matched against."""
    from mlx_llama.generate import stream_generate

    start = tokenizer.token_to_id("<|im_start|>")
    assert start in tokenizer.all_special_ids
    force = {start: 100.0}  # the model writes <|im_start|> first
    steps = list(stream_generate(ours, tokenizer, "Say hi", 6, stop=["<|im_start|>"],
                                 logit_bias=force))
    assert [(s.token, s.finish_reason) for s in steps] == [(start, "stop")]
    assert steps[0].text == ""
    unstopped = list(stream_generate(ours, tokenizer, "Say hi", 3, logit_bias=force))
    assert len(unstopped) == 3 and unstopped[-1].finish_reason == "length"
