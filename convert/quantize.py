"""Affine group quantization of weight matrices and the recipe that decides, per tensor, how.

`quantize_weight` is the one place numbers are turned into codes: MLX's affine scheme, where
each group of `group_size` consecutive input weights gets a scale and a bias and every weight
becomes a `bits`-bit code, packed into uint32 words. It is kept a small pure function so that
a better scale search (error-minimizing instead of min/max) can replace its body without
touching the rest of the converter.

The recipe follows what works in practice (and what mlx-lm does):
- only Linear and Embedding weights are quantized (norms and biases are tiny and sensitive);
- a matrix whose input dimension is not a multiple of the group size stays in float;
- the embedding and the output head keep more bits (8 by default): they are a small share of
  a large model's weights but each of their errors lands directly on a token's logit.
Every choice that differs from the default is recorded per layer in the config's
`quantization` block, the format mlx-lm and mlx-llama both read.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlx_llama.errors import MlxLlamaError

VALID_BITS = (2, 3, 4, 5, 6, 8)
VALID_GROUP_SIZES = (32, 64, 128)
# Modules whose weights may be quantized: the Linear projections, the embedding, the head.
QUANTIZABLE_LEAVES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "embed_tokens", "lm_head",
)
HIGH_PRECISION_MODULES = ("model.embed_tokens", "lm_head")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int

    def as_dict(self) -> dict[str, int]:
        return {"group_size": self.group_size, "bits": self.bits}


@dataclass(frozen=True)
class QuantRecipe:
    """What the user asked for. `embedding_bits=None` keeps embedding and head unquantized."""

    bits: int = 4
    group_size: int = 64
    embedding_bits: int | None = 8

    def __post_init__(self) -> None:
        for label, value in (("--bits", self.bits), ("--embeddings-bits", self.embedding_bits)):
            if value is not None and value not in VALID_BITS:
                raise MlxLlamaError(
                    f"{label} {value} is not supported: choose one of "
                    f"{', '.join(map(str, VALID_BITS))}"
                )
        if self.group_size not in VALID_GROUP_SIZES:
            raise MlxLlamaError(
                f"--group-size {self.group_size} is not supported: choose one of "
                f"{', '.join(map(str, VALID_GROUP_SIZES))}"
            )

    @property
    def default(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size)


def quantize_weight(w: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """(out, in) float matrix -> (packed uint32 codes, scales, biases), MLX affine layout.

    Scales and biases come out in `w`'s dtype, so cast `w` first to choose theirs.
    """
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return wq, scales, biases


def plan_tensor(name: str, shape: tuple[int, ...], recipe: QuantRecipe) -> QuantSpec | None:
    """How to quantize parameter `name` of `shape`, or None to keep it in float."""
    if not name.endswith(".weight") or len(shape) != 2:
        return None
    module = name[: -len(".weight")]
    if module.rsplit(".", 1)[-1] not in QUANTIZABLE_LEAVES:
        return None
    if shape[-1] % recipe.group_size:
        return None
    if module in HIGH_PRECISION_MODULES:
        if recipe.embedding_bits is None:
            return None
        return QuantSpec(recipe.embedding_bits, recipe.group_size)
    return recipe.default


def spec_from_block(module: str, block: dict) -> QuantSpec:
    """The (bits, group size) an mlx-lm `quantization` block gives `module`."""
    override = block.get(module)
    source = override if isinstance(override, dict) else block
    return QuantSpec(int(source.get("bits", block.get("bits", 4))),
                     int(source.get("group_size", block.get("group_size", 64))))


def quantization_block(specs: dict[str, QuantSpec], default: QuantSpec) -> dict:
    """mlx-lm's config block: the default, plus each module whose choice differs from it."""
    block: dict = {**default.as_dict(), "mode": "affine"}
    for module in sorted(specs):
        if specs[module] != default:
            block[module] = specs[module].as_dict()
    return block

