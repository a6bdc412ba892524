"""Import a Llama GGUF file (llama.cpp's format) without loss.

`mx.load` already reads GGUF's Q4_0, Q4_1 and Q8_0 blocks as MLX affine triples with group
size 32 (Q4_0 and Q8_0 have no offset, so their biases are -8 and -128 times the scale, which
is exact), and F32/F16 tensors as plain arrays. So the import keeps every quantized block as
it is and only has to:

1. refuse any other stored type (mx.load would silently turn it into float16);
2. rename llama.cpp's tensors to Hugging Face names;
3. undo llama.cpp's reordering of the Q and K rows (see `unpermute_rows`), which is a pure
   row permutation, so it moves packed rows, scales and biases together and stays bit-exact;
4. rebuild config.json and the tokenizer files from the metadata.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_llama.errors import MlxLlamaError

from .gguf_config import ARCH, build_config
from .gguf_file import GGUFHeader, TensorInfo, read_header
from .gguf_tokenizer import tokenizer_files
from .source import SourceModel

GROUP_SIZE = 32
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
PLAIN_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = PLAIN_TYPES + tuple(QUANT_BITS)

_GLOBAL_MODULES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp's Llama 3 RoPE divisors: not a parameter, it becomes config.json's rope_scaling.
ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> tuple[str, str] | None:
    """('model.layers.3.self_attn.q_proj', 'weight') for 'blk.3.attn_q.weight'; None if unknown."""
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        module = _LAYER_MODULES.get(part)
        return (f"model.layers.{layer}.{module}", kind) if module else None
    base, _, kind = gguf_name.rpartition(".")
    module = _GLOBAL_MODULES.get(base)
    return (module, kind) if module and kind in ("weight", "bias") else None


def unpermute_rows(rows: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row order, giving Hugging Face's half-split RoPE order.

    Hugging Face rotates dimension i of a head with dimension i + head_dim/2; llama.cpp
    rotates adjacent pairs (2j, 2j+1). Its converter therefore reorders each head's rows as
    (2, head_dim/2) -> (head_dim/2, 2): GGUF row 2j+t of a head is HF row t*head_dim/2 + j.
    Reversing that is a transpose of each head's (head_dim/2, 2) grid of rows. It acts on
    axis 0 only, so packed quantized rows, their scales and biases can all go through it.
    """
    shape = rows.shape
    head_dim = shape[0] // n_heads
    grid = rows.reshape(n_heads, head_dim // 2, 2, *shape[1:])
    return grid.swapaxes(1, 2).reshape(shape)


def _check_vocabulary(md: dict, vocab_size: int, name: str) -> None:
    """Every token and special id must have an embedding row: ids past the table would read
    outside it (non-finite logits, or a crash of the whole process)."""
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) > vocab_size:
        raise MlxLlamaError(f"{name} is inconsistent: its vocabulary has {len(tokens)} tokens but "
                            f"token_embd.weight has {vocab_size} rows; re-create the file")
    # (the unknown token is looked up in the token list, which may be shorter than the table)
    for key, size in (("bos_token_id", vocab_size), ("eos_token_id", vocab_size),
                      ("unknown_token_id", len(tokens) if tokens is not None else vocab_size)):
        value = md.get(f"tokenizer.ggml.{key}")
        if value is not None and not 0 <= int(value) < size:
            raise MlxLlamaError(f"{name} is inconsistent: tokenizer.ggml.{key} is {value}, "
                                f"outside its {vocab_size}-token vocabulary; re-create the file")


def read_gguf(path: str | Path) -> SourceModel:
    """Read a Llama GGUF file into Hugging Face names, config and tokenizer files, losslessly."""
    path = Path(path)
    header = read_header(path)
    md = header.metadata
    arch = md.get("general.architecture")
    if arch is None:
        raise MlxLlamaError(f"{path.name} has no general.architecture: it is not a model GGUF "
                            "(or is damaged); download or re-create it")
    if arch != ARCH:
        raise MlxLlamaError(
            f"{path.name} is a '{arch}' GGUF; only Llama-architecture GGUF files "
            "(general.architecture = llama) can be imported"
        )
    _check_types(header, path.name)
    modules = _module_names(header, path.name)
    arrays = {**_load_arrays(path), **_bfloat16_arrays(path, header)}
    rope_freqs = np.array(arrays[ROPE_FREQS]) if ROPE_FREQS in header.tensors else None
    vocab_size = header.tensors["token_embd.weight"].shape[0]
    _check_vocabulary(md, vocab_size, path.name)
    config = build_config(
        md,
        path.name,
        vocab_size=vocab_size,
        tied="output.weight" not in header.tensors,
        attention_bias=any(m.endswith("q_proj") and k == "bias" for m, k in modules.values()),
        torch_dtype=_torch_dtype(header),
        rope_freqs=rope_freqs,
    )
    weights: dict[str, mx.array] = {}
    quantized: dict[str, str] = {}
    for gguf_name, (module, kind) in modules.items():
        info = header.tensors[gguf_name]
        parts = _tensor_parts(info, kind, arrays, path.name)
        if "scales" in parts:
            quantized[module] = info.type_name
        if module.endswith(("q_proj", "k_proj")):
            key = "num_attention_heads" if module.endswith("q_proj") else "num_key_value_heads"
            heads = config[key]
            _check_head_rows(info, heads * config["head_dim"], path.name)
            parts = {k: unpermute_rows(v, heads) for k, v in parts.items()}
        weights.update({f"{module}.{k}": v for k, v in parts.items()})
    files = tokenizer_files(md, path.name, config["max_position_embeddings"])
    files["generation_config.json"] = _generation_config(md)
    return SourceModel(
        config=config,
        weights=weights,
        quantization=quantization_block(quantized),
        files=files,
        source=f"gguf:{path.name} ({_describe_types(header)})",
    )


def _check_types(header: GGUFHeader, name: str) -> None:
    for info in header.tensors.values():
        if info.type_name not in SUPPORTED_TYPES:
            raise MlxLlamaError(
                f"{name} stores {info.name} as {info.type_name}, which cannot be imported without "
                f"loss; supported GGUF types are {', '.join(SUPPORTED_TYPES)}: use a GGUF "
                "quantized as Q4_0, Q4_1 or Q8_0 (or F16/BF16), or convert the original Hugging Face "
                "model"
            )


def _module_names(header: GGUFHeader, name: str) -> dict[str, tuple[str, str]]:
    """GGUF tensor name -> (HF module path, 'weight'|'bias'); unknown tensors are an error,
    because silently dropping one would not be a lossless import."""
    modules = {}
    for gguf_name in header.tensors:
        if gguf_name == ROPE_FREQS:
            continue
        mapped = hf_name(gguf_name)
        if mapped is None:
            raise MlxLlamaError(
                f"{name} has a tensor '{gguf_name}' that a Llama model does not have; "
                "this GGUF is not a plain Llama model and cannot be imported"
            )
        modules[gguf_name] = mapped
    if "token_embd.weight" not in header.tensors:
        raise MlxLlamaError(
            f"{name} has no token_embd.weight tensor: it is not a complete Llama GGUF file"
        )
    return modules


def _load_arrays(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises RuntimeError/ValueError with a terse message
        raise MlxLlamaError(
            f"cannot read the tensors of {path.name} ({e}); the file is corrupt: download it again"
        ) from None


def _bfloat16_arrays(path: Path, header: GGUFHeader) -> dict[str, mx.array]:
    """BF16 tensors read from their bytes: `mx.load` returns them as float16, which rounds
    and overflows (bfloat16 has float32's range), so they would not import losslessly."""
    out = {}
    with open(path, "rb") as f:
        for info in header.tensors.values():
            if info.type_name == "BF16":
                f.seek(header.data_offset + info.offset)
                raw = np.frombuffer(f.read(info.nbytes), dtype=np.uint16)
                if raw.size * 2 != info.nbytes:
                    raise MlxLlamaError(f"{path.name} is truncated ({info.name} is cut short); "
                                        "download it again")
                out[info.name] = mx.array(raw).view(mx.bfloat16).reshape(info.shape)
    return out


def _tensor_parts(
    info: TensorInfo, kind: str, arrays: dict[str, mx.array], name: str
) -> dict[str, mx.array]:
    """{'weight': ..., 'scales': ..., 'biases': ...} for a quantized tensor, {kind: array} else."""
    if info.type_name not in QUANT_BITS:
        parts = {kind: arrays.get(info.name)}
        _check_plain(info, parts[kind], name)
        return parts
    base = info.name[: -len(".weight")]
    parts = {
        "weight": arrays.get(info.name),
        "scales": arrays.get(f"{base}.scales"),
        "biases": arrays.get(f"{base}.biases"),
    }
    _check_quantized(info, parts, name)
    return parts


def _check_head_rows(info: TensorInfo, rows: int, name: str) -> None:
    if info.shape[0] != rows:
        raise MlxLlamaError(
            f"{name}: {info.name} has {info.shape[0]} rows but the metadata's heads give {rows}; "
            "the file is inconsistent"
        )


def _check_quantized(info: TensorInfo, parts: dict[str, mx.array | None], name: str) -> None:
    """The triple mx.load made must have exactly the shapes of the GGUF's blocks."""
    rows, cols = info.shape[0], int(np.prod(info.shape[1:]))
    bits = QUANT_BITS[info.type_name]
    expected = {
        "weight": (rows, cols * bits // 32),
        "scales": (rows, cols // GROUP_SIZE),
        "biases": (rows, cols // GROUP_SIZE),
    }
    for key, shape in expected.items():
        array = parts[key]
        if array is None or tuple(array.shape) != shape:
            got = None if array is None else tuple(array.shape)
            raise MlxLlamaError(
                f"{name}: {info.name} ({info.type_name}) read as {key} {got}, expected {shape}; "
                "the file is corrupt or this MLX version reads GGUF differently"
            )


def _check_plain(info: TensorInfo, array: mx.array | None, name: str) -> None:
    dtype = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}[info.type_name]
    if array is None or tuple(array.shape) != info.shape or array.dtype != dtype:
        raise MlxLlamaError(
            f"{name}: {info.name} ({info.type_name}, {info.shape}) did not read back as such; "
            "the file is corrupt or this MLX version reads GGUF differently"
        )


def quantization_block(quantized: dict[str, str]) -> dict | None:
    """mlx-lm's quantization block: the most common bit width as default, the rest as overrides.

    Which modules are quantized at all follows from the weights (a `.scales` entry), so only
    modules whose bit width differs from the default need an entry.
    """
    if not quantized:
        return None
    bits = {module: QUANT_BITS[t] for module, t in quantized.items()}
    default = Counter(bits.values()).most_common(1)[0][0]
    block: dict = {"group_size": GROUP_SIZE, "bits": default}
    for module, b in bits.items():
        if b != default:
            block[module] = {"group_size": GROUP_SIZE, "bits": b}
    return block


def _torch_dtype(header: GGUFHeader) -> str | None:
    """The dtype to declare in config.json, or None to declare none.

    The converter casts every unquantized tensor to the declared dtype, so declaring one is
    only lossless when all of them already have it. SmolLM2's (F32 norms, all else quantized)
    says float32; an F16 file with F32 norms declares nothing, and each tensor keeps its type.
    """
    plain = {t.type_name for t in header.tensors.values() if t.type_name in PLAIN_TYPES}
    if len(plain) != 1:
        return None
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[plain.pop()]


def _describe_types(header: GGUFHeader) -> str:
    """The file's most common matrix type, e.g. 'Q4_1' (as llama.cpp names its files)."""
    counts = Counter(t.type_name for t in header.tensors.values() if len(t.shape) > 1)
    return counts.most_common(1)[0][0] if counts else "no matrices"


def _generation_config(md: dict) -> str:
    config: dict = {}
    if "tokenizer.ggml.bos_token_id" in md:
        config["bos_token_id"] = int(md["tokenizer.ggml.bos_token_id"])
    eos = [
        int(md[k])
        for k in (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
        if k in md
    ]
    eos = list(dict.fromkeys(eos))
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if "tokenizer.ggml.padding_token_id" in md:
        config["pad_token_id"] = int(md["tokenizer.ggml.padding_token_id"])
    return json.dumps(config, indent=2) + "\n"
