"""Export a model to a plain Hugging Face folder in float (dequantizing where needed).

The bundled SmolLM2 exists only as a Q4_1 GGUF; benchmarks and quality tests need it the way
users have models: a bfloat16 (or float32) Hugging Face folder with safetensors, config.json and
tokenizer files, which transformers, mlx-lm and our converter all read. Dequantizing MLX affine
triples is exact arithmetic (code * scale + bias), so nothing is lost beyond the target dtype.

    python -m convert.export SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2-bf16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx

from mlx_llama.errors import MlxLlamaError

from .source import SourceModel
from .writer import staged_folder, write_extra_files, write_json

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def dequantized_weights(src: SourceModel, dtype: mx.Dtype) -> dict[str, mx.array]:
    """Plain float tensors for every weight, quantized triples folded back into matrices."""
    quant = src.quantization or {}
    out: dict[str, mx.array] = {}
    for name, array in src.weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name[: -len(".weight")]
        if f"{module}.scales" in src.weights:
            params = quant.get(module) if isinstance(quant.get(module), dict) else quant
            # In float32: mx.dequantize computes in the scales' dtype (float16 from a GGUF),
            # which would round code * scale + bias before it reaches the target dtype.
            scales, biases = (src.weights[f"{module}.{part}"].astype(mx.float32)
                              for part in ("scales", "biases"))
            array = mx.dequantize(array, scales, biases, group_size=params.get("group_size", 64),
                                  bits=params.get("bits", 4))
        out[name] = array.astype(dtype)
    return out


def export_hf(src: SourceModel, out: str | Path, dtype: str = "bfloat16") -> Path:
    """Write `src` as an unquantized Hugging Face folder at `out` (atomically)."""
    out = Path(out)
    if out.exists():
        raise MlxLlamaError(f"{out} already exists; choose a new output folder")
    weights = dequantized_weights(src, DTYPES[dtype])
    mx.eval(weights)  # here: a failure computing them is not a failure to write
    try:  # the converter's staging: parent folders made, atomic, the umask's permissions
        with staged_folder(out, force=False) as tmp:
            mx.save_safetensors(str(tmp / "model.safetensors"), weights,
                                metadata={"format": "pt"})
            config = {k: v for k, v in src.config.items()
                      if k not in ("quantization", "quantization_config")}
            write_json(tmp / "config.json", {**config, "torch_dtype": dtype})
            write_extra_files(tmp, src.files)
    except (OSError, RuntimeError) as e:  # MLX reports a failed write as RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise MlxLlamaError(f"cannot write {out} ({why}): check the path, its permissions "
                            "and the free disk space") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.export", description=__doc__.splitlines()[0])
    p.add_argument("src", help="a .gguf file")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = p.parse_args(argv)
    try:
        from .gguf import read_gguf

        export_hf(read_gguf(args.src), args.out, args.dtype)
    except MlxLlamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
