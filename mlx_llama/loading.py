"""Read an MLX model folder (ours or mlx-lm's) into a ready `Llama` and its tokenizer.

Weights are opened lazily with `mx.load` and read once the model is built (its casts and row
splits applied), so nothing is read twice.
Quantized layers are built from the config's `quantization` block before the weights are
loaded, exactly as mlx-lm lays them out, so the thousands of mlx-community folders load too.

The compute dtype is chosen per backend: on the CPU backend MLX's quantized matmul is about
eight times faster with float32 activations than with bfloat16/float16, so activations and the
parameters used directly (norms, unquantized weights) are float32 there, while quantization
scales/biases and the KV cache keep the checkpoint's dtype (the memory mlx-lm uses). There the
quantized matmuls are also split over the CPU cores (cpu_streams.py); on one core, prompt
chunks of a bfloat16 checkpoint take a dense bfloat16 product instead (fused.py). On a GPU
everything keeps the stored dtype, which halves memory traffic. An explicit `compute_dtype`
is used for everything, exactly. The files on disk are never changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .errors import MlxLlamaError
from .cpu_streams import shard_arrays, use_cpu_streams
from .fused import lean_graph, use_dense_prefill
from .model import Llama

# Prompt tokens per chunk on the CPU backend's quantized kernel (see load_model).
CPU_PREFILL_CHUNK = 64
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def checked_compute_dtype(value: mx.Dtype | None | str) -> mx.Dtype | None | str:
    """"auto", None, a floating `mx.Dtype`, or its name ("bfloat16"); anything else is refused
    here, not as a TypeError deep in a cast."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    if isinstance(value, mx.Dtype) and mx.issubdtype(value, mx.floating):
        return value
    raise MlxLlamaError(f"compute_dtype must be 'auto', None, {', '.join(map(repr, DTYPES))} "
                        f"or a floating mx.Dtype, got {value!r}")


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
    """The model's weight files: `model*.safetensors`, as mlx-lm and our converter name them
    (an `adapters.safetensors` or a `consolidated.safetensors` beside them is not the model);
    any *.safetensors in a folder that has none of those."""
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        extra = ""
        if list(folder.glob("*.bin")) or list(folder.glob("*.pth")):
            extra = " (it has PyTorch .bin/.pth weights: convert it with `mlx-llama convert`)"
        elif list(folder.glob("*.gguf")):
            extra = " (it has a GGUF file: convert it with `mlx-llama convert FILE.gguf -o OUT`)"
        raise MlxLlamaError(f"no .safetensors weights in {folder}{extra}")
    return files


def _shortened(message: str, limit: int = 240) -> str:
    """MLX's message on one line (it lists the parameter names on the next ones), capped."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def cast_floating(model: nn.Module, dtype: mx.Dtype, kv_dtype: mx.Dtype | None = None) -> None:
    """Make the model compute in `dtype`: the parameters the arithmetic uses directly are cast,
    and activations (from the embedding on) are held in `dtype`, the KV cache in `kv_dtype`
    (default: `dtype`).

    Quantization scales and biases keep their stored dtype: the quantized kernel reads them as
    they are (float32 activations with bfloat16 scales give float32 results, bit for bit the
    same as with float32 scales), and stored at bfloat16 they take half the memory.
    """
    params = nn.utils.tree_flatten(model.parameters())
    model.load_weights(
        [(k, v.astype(dtype) if _compute_param(k, v) else v) for k, v in params], strict=False
    )
    if hasattr(model, "set_dtypes"):
        model.set_dtypes(dtype, kv_dtype or dtype)


def _compute_param(name: str, value: mx.array) -> bool:
    return mx.issubdtype(value.dtype, mx.floating) and not name.endswith((".scales", ".biases"))


def storage_dtype(model: nn.Module) -> mx.Dtype:
    """The floating dtype that holds most of the checkpoint's bytes (before any cast)."""
    sizes: dict[mx.Dtype, int] = {}
    for _, value in nn.utils.tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            sizes[value.dtype] = sizes.get(value.dtype, 0) + value.nbytes
    return max(sizes, key=sizes.get) if sizes else mx.float32


def auto_kv_dtype(stored: mx.Dtype, compute: mx.Dtype) -> mx.Dtype:
    """bfloat16 for a bfloat16 checkpoint (`stored`: it was made to run at that precision, and
    mlx-lm holds its cache so); otherwise the compute dtype. float16 storage (GGUF block
    scales, say) says little about activations, and float16 attention on the CPU is slow and
    can overflow.
    """
    return mx.bfloat16 if stored == mx.bfloat16 else compute


def load_model(
    folder: str | Path, compute_dtype: mx.Dtype | None | str = "auto", lazy: bool = False
) -> tuple[Llama, dict[str, Any]]:
    """Build the model from an MLX folder; returns it with the raw config dict.

    The weights are read before this returns (as mlx-lm's `load` does unless lazy): MLX binds
    a lazy array to the thread that built it, so a model left lazy could only run on the
    thread that loaded it. `lazy=True` leaves them unread until used, for a caller that runs
    the model on this thread and wants to drop layers as it goes (the converter's check).
    """
    compute_dtype = checked_compute_dtype(compute_dtype)
    folder = Path(folder)
    raw = read_config(folder)
    cfg = ModelConfig.from_dict(raw)
    weights = read_weights(folder)
    if "tie_word_embeddings" not in raw and "lm_head.weight" not in weights:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)  # no head and no say: tied
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
            f"weights in {folder} do not fit its config.json ({_shortened(str(e))}); "
            "re-convert the model"
        ) from None
    del weights  # the model holds them now; a cast below must not keep the stored copy alive
    auto = compute_dtype == "auto"
    stored = storage_dtype(model)
    if auto:
        compute_dtype = default_compute_dtype()
    if compute_dtype is not None:
        # "auto" picks float32 on the CPU for its kernels' speed, not for more precision: the
        # KV cache then stays at the checkpoint's precision, as the scales do. An explicit
        # dtype is used throughout.
        kv_dtype = auto_kv_dtype(stored, compute_dtype) if auto else None
        cast_floating(model, compute_dtype, kv_dtype)
    if lean_graph():
        # The CPU backend. With several cores the quantized matmuls are split over them
        # (cpu_streams.py); each prompt token then costs what a decode token costs whatever
        # the chunk, so chunks are small (peak memory follows the chunk). On one core, prompt
        # chunks of a bfloat16 checkpoint multiply densely at bfloat16, its own precision
        # (about twice the one-core quantized kernel; the split kernel beats it on two).
        if use_cpu_streams(model) or not (auto and stored == mx.bfloat16):
            model.prefill_chunk = CPU_PREFILL_CHUNK
        else:
            use_dense_prefill(model)
    model.eval()
    if not lazy:
        read_weights_now(model)
    return model, raw


def read_weights_now(model: nn.Module) -> None:
    """Evaluate a lazily loaded model's weights (and their row shards) on this thread, after
    which any thread can run it. Layer by layer, so that a cast (bfloat16 weights computed in
    float32) holds one layer's stored copy at a time, not the whole model's."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    for layer in layers:
        mx.eval(layer.parameters(), shard_arrays(layer))
    mx.eval(model.parameters(), shard_arrays(model))


def load(path_or_repo: str | Path, compute_dtype: mx.Dtype | None | str = "auto",
         lazy: bool = False):
    """Load a model folder (or a Hugging Face hub repo id of an MLX model).

    Returns `(model, tokenizer)`. `compute_dtype="auto"` picks the fastest arithmetic per
    backend (see the module docstring); pass an `mx.Dtype` to compute everything in it, or None
    to keep the stored one. `lazy=True` leaves the weights unread until first used, on this
    thread (see `load_model`).
    """
    from .hub import resolve_model_folder
    from .tokenizer import load_tokenizer

    if not isinstance(path_or_repo, (str, os.PathLike)):  # pathlib's TypeError names no argument
        raise MlxLlamaError(f"load() takes a model folder or a hub repo id, got "
                            f"{type(path_or_repo).__name__} {path_or_repo!r}")
    folder = resolve_model_folder(path_or_repo)
    model, _ = load_model(folder, compute_dtype, lazy)
    return model, load_tokenizer(folder)
