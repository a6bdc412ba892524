"""Read an MLX model folder (ours or mlx-lm's) into a ready `Llama` and its tokenizer.

Weights are opened lazily with `mx.load`, so nothing is read from disk until it is used.
Quantized layers are built from the config's `quantization` block before the weights are
loaded, exactly as mlx-lm lays them out, so the thousands of mlx-community folders load too.

The compute dtype is chosen per backend: on the CPU backend MLX's quantized matmul is many
times faster with float32 activations than with bfloat16/float16, so floating parameters
(norms, quantization scales and biases) are cast to float32 there. On a GPU they keep the
stored dtype, which halves memory traffic. The files on disk are never changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .errors import MlxLlamaError
from .fused import use_dense_prefill
from .model import Llama

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def default_compute_dtype() -> mx.Dtype | None:
    """float32 on the CPU backend; None (keep what is stored) on a GPU."""
    return mx.float32 if mx.default_device().type == mx.DeviceType.cpu else None


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise MlxLlamaError(
            f"no config.json in {folder}: not a model folder; point -m at a converted model "
            "or run `mlx-llama convert SRC -o OUT` first"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxLlamaError(f"{path} is not valid JSON ({e}); re-convert the model") from None


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        extra = ""
        if list(folder.glob("*.bin")) or list(folder.glob("*.pth")):
            extra = " (it has PyTorch .bin/.pth weights: convert it with `mlx-llama convert`)"
        elif list(folder.glob("*.gguf")):
            extra = " (it has a GGUF file: convert it with `mlx-llama convert FILE.gguf -o OUT`)"
        raise MlxLlamaError(f"no .safetensors weights in {folder}{extra}")
    return files


def read_weights(folder: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for path in weight_files(folder):
        try:
            weights.update(mx.load(str(path)))
        except Exception as e:  # MLX raises RuntimeError/ValueError with a terse message
            raise MlxLlamaError(
                f"cannot read {path.name} in {folder}: the file is corrupt or truncated ({e}); "
                "re-download or re-convert the model"
            ) from None
    # Buffers that some exporters save but the forward pass recomputes.
    return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}


def quantize_layers(model: nn.Module, quantization: dict[str, Any], weights: dict) -> None:
    """Swap in quantized layers wherever the weights hold `.scales` (mlx-lm's convention).

    The top-level `group_size`/`bits` are the default; a module path mapped to a dict
    overrides them for that module, and one mapped to False stays unquantized.
    """
    default = {
        "group_size": quantization.get("group_size", 64),
        "bits": quantization.get("bits", 4),
        "mode": quantization.get("mode", "affine"),
    }

    def choose(path: str, module: nn.Module) -> bool | dict:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        if override is False:
            return False
        if isinstance(override, dict):
            return {**default, **{k: override[k] for k in default if k in override}}
        return dict(default)

    nn.quantize(model, class_predicate=choose)
    # Same layers and parameters; prompt chunks on the CPU take the dense path (fused.py).
    use_dense_prefill(model)


def cast_floating(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every floating parameter (not the packed uint32 weights) to `dtype`."""
    params = nn.utils.tree_flatten(model.parameters())
    model.load_weights(
        [(k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in params],
        strict=False,
    )


def load_model(
    folder: str | Path, compute_dtype: mx.Dtype | None | str = "auto"
) -> tuple[Llama, dict[str, Any]]:
    """Build the model from an MLX folder; returns it with the raw config dict."""
    folder = Path(folder)
    raw = read_config(folder)
    cfg = ModelConfig.from_dict(raw)
    weights = read_weights(folder)
    model = Llama(cfg)
    quantization = raw.get("quantization") or raw.get("quantization_config")
    if quantization and any(k.endswith(".scales") for k in weights):
        quantize_layers(model, quantization, weights)
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
        weights.pop("lm_head.scales", None)
        weights.pop("lm_head.biases", None)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise MlxLlamaError(
            f"weights in {folder} do not fit its config.json ({str(e).splitlines()[0]}); "
            "re-convert the model"
        ) from None
    if compute_dtype == "auto":
        compute_dtype = default_compute_dtype()
    if compute_dtype is not None:
        cast_floating(model, compute_dtype)
    model.eval()
    return model, raw


def load(path_or_repo: str | Path, compute_dtype: mx.Dtype | None | str = "auto"):
    """Load a model folder (or a Hugging Face hub repo id of an MLX model).

    Returns `(model, tokenizer)`. `compute_dtype="auto"` picks float32 on the CPU backend and
    the stored dtype on a GPU; pass an `mx.Dtype` to force one, or None to keep the stored one.
    """
    from .hub import resolve_model_folder
    from .tokenizer import load_tokenizer

    folder = resolve_model_folder(path_or_repo)
    model, _ = load_model(folder, compute_dtype)
    return model, load_tokenizer(folder)
