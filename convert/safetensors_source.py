"""Read a Hugging Face model folder (config.json + safetensors weights) into a `SourceModel`.

Weights are opened lazily with `mx.load`: nothing is read from disk until the writer evaluates
a tensor, so a model far larger than memory converts one tensor at a time. Before that, every
file's header is checked by hand — the JSON is valid, each tensor's byte range matches its
dtype and shape and lies inside the file — so a truncated download or a corrupt file is
refused up front, with its name, instead of failing half-way through a conversion.

PyTorch `.bin`/`.pth` files are never opened: they are pickles, and unpickling runs code.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import mlx.core as mx

from mlx_llama.config import ModelConfig
from mlx_llama.errors import MlxLlamaError

from .source import SourceModel

# Files copied verbatim to the output folder next to the weights.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
COPIED_PATTERNS = ("*.tiktoken",)
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype -> bytes per element (the ones MLX can load).
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4,
               "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Valid safetensors types that MLX cannot load (F64) or that need a checkpoint-specific
# dequantization (the F8 variants of FP8 checkpoints): a clear refusal, not "corrupt".
UNCONVERTIBLE_DTYPES = ("F64",)
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_folder(folder: Path, label: str | None = None) -> SourceModel:
    """A local Hugging Face folder -> SourceModel with lazily loaded weights."""
    folder = Path(folder)
    config = read_config(folder)
    ModelConfig.from_dict(config)  # refuses unsupported architectures before any weight is read
    weights: dict[str, mx.array] = {}
    weight_map = index_weight_map(folder) or {}
    for path in safetensors_files(folder):
        # A tensor the index places in another file is a stale copy there (transformers
        # reads it from the named file too): skipped, not a conflict.
        names = [n for n in check_header(path) if weight_map.get(n, path.name) == path.name]
        duplicate = next((n for n in names if n in weights), None)
        if duplicate is not None:
            raise MlxLlamaError(
                f"tensor {duplicate} appears in more than one file in {folder}: remove stray "
                "copies of the weights (keep one set of .safetensors files)"
            )
        tensors = open_lazily(path)
        weights.update({n: tensors[n] for n in names})
    return SourceModel(
        config=config,
        weights=weights,
        quantization=_mlx_quantization(config),
        files=copied_files(folder),
        source=label or str(folder),
    )


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        hint = ""
        if list(folder.glob("*.safetensors")) or list(folder.glob("*.bin")):
            hint = " (it has weights but no config: copy the model's config.json next to them)"
        raise MlxLlamaError(f"no config.json in {folder}: not a Hugging Face model folder{hint}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxLlamaError(f"{path} is not valid JSON ({e}); re-download the model") from None
    if not isinstance(config, dict):
        raise MlxLlamaError(f"{path} does not hold a JSON object; re-download the model")
    foreign = config.get("quantization_config") or {}
    if isinstance(foreign, dict) and foreign.get("quant_method"):
        raise MlxLlamaError(
            f"{folder} is already quantized with {foreign['quant_method']}, which mlx-llama cannot "
            "read: convert the original float16/bfloat16 model instead"
        )
    return config


def index_weight_map(folder: Path) -> dict[str, str] | None:
    """tensor name -> file name from the folder's safetensors index, if it has one."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a mapping of names to files")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise MlxLlamaError(
            f"{index} is not a valid safetensors index (no weight_map); re-download the model"
        ) from None
    return weight_map


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files: those the index names if there is one, else every *.safetensors."""
    weight_map = index_weight_map(folder)
    if weight_map is not None:
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise MlxLlamaError(
                f"{folder} lacks {len(absent)} weight file(s) its index lists (first: "
                f"{absent[0]}): the download is incomplete; download it again"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pth")) or list(folder.glob("*.pt")):
        raise MlxLlamaError(
            f"{folder} has only PyTorch .bin/.pth weights, which mlx-llama will not unpickle "
            "(pickles can run code): use the repo's safetensors files (many repos offer them "
            "under --revision refs/pr/1) or re-save with transformers' save_pretrained(out, "
            "safe_serialization=True)"
        )
    gguf = sorted(folder.glob("*.gguf"))
    if gguf:
        raise MlxLlamaError(
            f"{folder} holds a GGUF file, not a Hugging Face checkpoint: convert the file itself "
            f"(`mlx-llama convert {gguf[0]} -o OUT`)"
        )
    raise MlxLlamaError(
        f"no weights in {folder}: expected model.safetensors or sharded *.safetensors files "
        "next to config.json"
    )


def check_header(path: Path) -> list[str]:
    """Validate a safetensors file's header against its size; return its tensor names."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, "it is shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise _corrupt(path, "its header length is impossible (truncated or not safetensors)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError):
        raise _corrupt(path, "its header is not valid JSON") from None
    end = 0
    names = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            if not all(type(n) is int for n in (start, stop, *shape)):
                raise TypeError("offsets and shape must be whole numbers")
            if dtype in UNCONVERTIBLE_DTYPES or str(dtype).startswith("F8"):
                raise MlxLlamaError(
                    f"{path}: tensor {name} is stored as {dtype}, which mlx-llama does not "
                    "convert: use a float32, float16 or bfloat16 checkpoint of the model")
            expected = DTYPE_SIZES[dtype] * math.prod(shape)
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"tensor {name} has a malformed or unsupported entry") from None
        if stop - start != expected or start < 0:
            raise _corrupt(path, f"tensor {name}'s byte range does not match its shape")
        end = max(end, stop)
        names.append(name)
    if 8 + header_len + end > size:
        raise MlxLlamaError(
            f"{path} is truncated ({size} bytes, its header needs {8 + header_len + end}): the "
            "download is incomplete; download it again"
        )
    return names


def open_lazily(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX reports format problems as RuntimeError/ValueError
        raise _corrupt(path, f"MLX cannot read it ({str(e).splitlines()[0]})") from None


def copied_files(folder: Path) -> dict[str, bytes]:
    """Tokenizer, chat template and generation config, as bytes, to be written unchanged."""
    paths = [folder / name for name in COPIED_FILES]
    paths += [p for pattern in COPIED_PATTERNS for p in sorted(folder.glob(pattern))]
    return {p.name: p.read_bytes() for p in paths if p.is_file()}


def _mlx_quantization(config: dict) -> dict | None:
    """An MLX folder given as source: its tensors arrive quantized and keep their block."""
    block = config.get("quantization")
    return dict(block) if isinstance(block, dict) else None


def _corrupt(path: Path, why: str) -> MlxLlamaError:
    return MlxLlamaError(f"{path} is corrupt: {why}; download or convert it again")
