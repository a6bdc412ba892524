"""The forward pass matches transformers on every Llama variant, in one pass and via the cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
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


def test_loading_a_bfloat16_checkpoint_to_compute_in_float32_holds_one_stored_copy_at_a_time(
        tmp_path, sp_model_file):
    """Reading the weights at load casts them; the stored bfloat16 copy of the whole model
    used to stay alive until the load returned (peak = float32 + bfloat16 model)."""
    from conftest import make_hf_checkpoint

    folder = make_hf_checkpoint(tmp_path / "bf16", sp_model_file, dtype="bfloat16",
                                num_hidden_layers=8, hidden_size=256, intermediate_size=512)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    model, _ = load_model(folder, compute_dtype=mx.float32)
    resident = mx.get_active_memory() - base
    peak = mx.get_peak_memory() - base
    layer_bf16 = sum(v.nbytes for _, v in tree_flatten(model.model.layers[0].parameters())) / 2
    assert resident > 0 and peak < resident + 3 * layer_bf16, (peak, resident, layer_bf16)


def test_conflicting_rope_thetas_follow_transformers(tiny_checkpoints, tmp_path):
    """With a top-level rope_theta and a different one in rope_parameters, we took the
    top-level one; transformers 5 runs with the nested one."""
    import json
    import shutil

    folder = tmp_path / "both"
    shutil.copytree(tiny_checkpoints["gqa"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_scaling", None)
    config.update(rope_theta=10000.0,
                  rope_parameters={"rope_type": "default", "rope_theta": 50.0})
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model(folder, compute_dtype=mx.float32)
    assert model.config.rope_theta == 50.0
    tokens = tokens_for(model.config.vocab_size)
    assert np.abs(np.array(model(mx.array(tokens))) - reference_logits(folder, tokens)).max() < 1e-4


def test_folders_as_mlx_lm_users_have_them_load(tiny_checkpoints, tmp_path):
    """An adapters.safetensors beside the model was read as model weights (refused); a config
    without tie_word_embeddings whose folder has no head was refused; the refusal left out
    the names MLX gives on the next lines ("Missing 1 parameters: )")."""
    import json
    import shutil

    from mlx_llama.errors import MlxLlamaError

    tied = tiny_checkpoints["tied"]
    expected = np.array(load_model(tied, compute_dtype=mx.float32)[0](mx.array([[1, 2, 3]])))
    folder = tmp_path / "m"
    shutil.copytree(tied, folder)
    mx.save_safetensors(str(folder / "adapters.safetensors"), {"lora_a": mx.zeros((2, 2))})
    config = json.loads((folder / "config.json").read_text())
    assert config.pop("tie_word_embeddings") is True
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model(folder, compute_dtype=mx.float32)
    assert np.array_equal(np.array(model(mx.array([[1, 2, 3]]))), expected)
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(MlxLlamaError, match="lm_head.weight"):
        load_model(folder)
