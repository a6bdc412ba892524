"""Our folders and mlx-lm's are interchangeable (mlx-lm is a test-only dependency).

- a folder written by `mlx_lm.convert` loads in mlx-llama and gives mlx-lm's logits;
- a folder written by our converter loads with `mlx_lm.load` and gives our logits.
Quantized and unquantized, tied and untied: the per-layer overrides in the quantization block
(8-bit embeddings and head) must be read the same way by both.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from convert.api import convert
from mlx_llama.loading import load_model

mlx_lm = pytest.importorskip("mlx_lm")

TOKENS = mx.array(np.random.default_rng(0).integers(3, 512, size=(1, 24)).astype(np.int32))


def ours(folder) -> np.ndarray:
    model, _ = load_model(folder, compute_dtype=mx.float32)
    return np.array(model(TOKENS))


def theirs(folder) -> np.ndarray:
    model, _ = mlx_lm.load(str(folder))
    return np.array(model(TOKENS).astype(mx.float32))


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_mlx_lm_folder_loads_in_mlx_llama(tiny_checkpoints, tmp_path, variant):
    from mlx_lm import convert as mlx_lm_convert

    out = tmp_path / "mlx_lm_q4"
    mlx_lm_convert(str(tiny_checkpoints[variant]), str(out), quantize=True)
    assert "quantization" in json.loads((out / "config.json").read_text())
    assert np.abs(ours(out) - theirs(out)).max() < 1e-4


@pytest.mark.parametrize("variant, options", [
    ("gqa", dict(quantize=True)),          # 4-bit, embeddings and head at 8 bits (overrides)
    ("tied", dict(quantize=True, bits=8, group_size=32)),
    ("gqa", dict(quantize=True, embedding_bits=None)),
    ("gqa", dict(dtype="bfloat16")),
])
def test_our_folder_loads_in_mlx_lm(tiny_checkpoints, tmp_path, variant, options):
    out = convert(tiny_checkpoints[variant], tmp_path / "ours", progress=False, **options)
    expected = ours(out)
    got = theirs(out)
    tolerance = 2e-2 if options.get("dtype") == "bfloat16" else 1e-4
    assert np.abs(expected - got).max() < tolerance


def test_mlx_lm_mixed_and_mxfp4_folders_as_converter_sources(tiny_checkpoints, tmp_path):
    """mlx-lm's mixed recipes write per-layer `"group_size": null` (a TypeError traceback in
    our converter); its mxfp4 folders (no biases) were called mismatched config and weights."""
    from mlx_lm import convert as mlx_lm_convert

    from mlx_llama.errors import MlxLlamaError

    mixed = tmp_path / "mixed"
    mlx_lm_convert(str(tiny_checkpoints["gqa"]), str(mixed), quantize=True,
                   quant_predicate="mixed_3_6")
    block = json.loads((mixed / "config.json").read_text())["quantization"]
    assert any(isinstance(v, dict) and v.get("group_size") is None for v in block.values())
    again = convert(mixed, tmp_path / "again", progress=False)  # passed through bit for bit
    assert np.abs(ours(again) - ours(mixed)).max() == 0

    fp4 = tmp_path / "fp4"
    mlx_lm_convert(str(tiny_checkpoints["gqa"]), str(fp4), quantize=True, q_mode="mxfp4",
                   q_group_size=32)
    with pytest.raises(MlxLlamaError, match="quantized in mode 'mxfp4'.*mlx-llama generate -m"):
        convert(fp4, tmp_path / "fp4_again", progress=False)
    assert not (tmp_path / "fp4_again").exists()


@pytest.mark.parametrize("mode, group_size", [("mxfp4", 32), ("mxfp8", 32)])
def test_mlx_lm_microscaled_folders_run_in_mlx_llama(tiny_checkpoints, tmp_path, mode, group_size):
    """mxfp4/nvfp4/mxfp8 folders crashed on the first token: the embedding's uint8 scales
    were cast to the compute dtype as affine ones are."""
    from mlx_lm import convert as mlx_lm_convert

    out = tmp_path / mode
    mlx_lm_convert(str(tiny_checkpoints["gqa"]), str(out), quantize=True, q_mode=mode,
                   q_group_size=group_size)
    assert np.abs(ours(out) - theirs(out)).max() < 1e-3
