"""Affine group quantization of weight matrices and the recipe that decides, per tensor, how.

`QuantRecipe.quantize` is the one place numbers are turned into codes: MLX's affine scheme, where
each group of `group_size` consecutive input weights gets a scale and a bias and every weight
becomes a `bits`-bit code, packed into uint32 words. The scale and bias of each group can be
*searched* to minimize the (activation-weighted) reconstruction error (affine.py) instead of
being read off the group's minimum and maximum; the stored format is the same either way, so
mlx-lm reads it unchanged.

The recipe follows what works in practice:
- only Linear and Embedding weights are quantized (norms and biases are tiny and sensitive);
- a matrix whose input dimension is not a multiple of the group size stays in float;
- the embedding and the output head keep more bits (8 by default): they are a small share of
  a large model's weights but each of their errors lands directly on a token's logit;
- with a bits-per-weight budget (`bpw`), the format of every tensor is instead chosen by
  measured sensitivity (sensitivity.py), and with calibration (`calibration`) the search
  weights each input channel's error by how large its activations are (calibrate.py);
  `prepare_recipe` runs both before any tensor is written.
Every choice that differs from the default is recorded per layer in the config's
`quantization` block, the format mlx-lm and mlx-llama both read.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import mlx.core as mx

from mlx_llama.errors import MlxLlamaError

VALID_BITS = (2, 3, 4, 5, 6, 8)
VALID_GROUP_SIZES = (32, 64, 128)
METHODS = ("auto", "search", "minmax", "gptq")
# Modules whose weights may be quantized: the Linear projections, the embedding, the head.
QUANTIZABLE_LEAVES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "embed_tokens", "lm_head",
)
HIGH_PRECISION_MODULES = ("model.embed_tokens", "lm_head")
# GPTQ: how many distinct inputs' covariances (and inverse factors) a recipe holds at once.
HELD_INPUTS = 2


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int

    def as_dict(self) -> dict[str, int]:
        return {"group_size": self.group_size, "bits": self.bits}


@dataclass
class QuantRecipe:
    """What the user asked for, and what `prepare_recipe` measured for it.

    embedding_bits=None keeps embedding and head unquantized. method: "search"
    (error-minimizing scales), "minmax" (mx.quantize, as mlx-lm does), "gptq" (the search's
    scales plus GPTQ error compensation from measured input covariances, gptq.py; implies
    calibration) or "auto" (the default): search where calibration measured the module's
    activations, min/max elsewhere.
    Unweighted, the search lowers the squared weight error but not the perplexity (on
    SmolLM2 it raised it: docs/quantization.md), so it is not the default without data.
    bpw: a bits-per-weight budget for the whole model; formats are then chosen per tensor.
    calibration: "builtin" or a text file: activation statistics weight the scale search.
    """

    bits: int = 4
    group_size: int = 64
    embedding_bits: int | None = 8
    method: str = "auto"
    bpw: float | None = None
    calibration: str | None = None
    # Filled in by prepare_recipe: per-module formats and error weights.
    overrides: dict[str, QuantSpec] = field(default_factory=dict)
    importance: dict[str, object] = field(default_factory=dict)
    # gptq: the calibration whose input rows give each layer's covariance (calibrate.py), and
    # the (H, U) of the last HELD_INPUTS distinct inputs, formed when a layer needs them.
    gptq_inputs: object | None = None
    held: OrderedDict = field(default_factory=OrderedDict)

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
        if self.method not in METHODS:
            raise MlxLlamaError(
                f"--method {self.method} is not supported: choose auto, search, minmax or gptq")
        if self.method == "minmax" and (self.bpw is not None or self.calibration is not None):
            raise MlxLlamaError(
                "--calibrate and --bpw measure activations for the scale search: use "
                "--method auto (the default) or --method search"
            )
        if self.bpw is not None and not 3.0 <= self.bpw <= 16.0:
            raise MlxLlamaError(f"--bpw {self.bpw} is out of range: choose between 3 and 16")

    @property
    def default(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size)

    @property
    def measures(self) -> bool:
        """Whether the source model must be run on calibration text first (measure.py)."""
        return self.calibration is not None or self.bpw is not None or self.method == "gptq"

    def quantize(self, module: str, w: mx.array, spec: QuantSpec):
        """Quantize `module`'s weight `w` as `spec` says, with the recipe's method and weights."""
        importance = self.importance.get(module)
        if self.method == "minmax" or (self.method == "auto" and importance is None):
            return mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
        if self.method == "gptq" and self.gptq_covers(module):
            return self.gptq(module, w, spec.bits, spec.group_size, importance)
        from .affine import quantize_search  # numba loads only for conversions that search

        return quantize_search(w, spec.bits, spec.group_size, importance)

    def gptq_covers(self, module: str) -> bool:
        """Whether calibration measured `module`'s inputs (what GPTQ needs)."""
        return self.gptq_inputs is not None and self.gptq_inputs.has_covariance(module)

    def covariance_and_factor(self, module: str):
        """(H, U) of `module`'s input: the covariance and its gptq.inverse_factor (float32).

        Formed on demand and kept for the last HELD_INPUTS distinct inputs only: the tensors
        of a layer arrive together (q, k, v share an input, gate and up another), so each is
        formed about once, and the memory held is a few (in, in) matrices, not one per input
        of the model (a 1B model's would be several GB).
        """
        from .gptq import with_factor

        owner = self.gptq_inputs.owner(module)
        if owner in self.held:
            self.held.move_to_end(owner)
        else:
            self.held[owner] = with_factor(self.gptq_inputs.covariance(module))
            while len(self.held) > HELD_INPUTS:
                self.held.popitem(last=False)
        return self.held[owner]

    def gptq(self, module: str, w: mx.array, bits: int, group_size: int, importance):
        """GPTQ on `module`'s weight `w`, with its input's covariance and inverse factor."""
        from .gptq import gptq_quantize

        cov, factor = self.covariance_and_factor(module)
        # The group search's weights: the linear layers' per-channel ones; for the tied
        # embedding (rank-2 weights) the covariance's diagonal, gptq_quantize's default.
        cols = None if importance is None else importance.channels
        return gptq_quantize(w, bits, group_size, cov, cols, factor=factor)


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether parameter `name` is the weight matrix of a module MLX can quantize."""
    return (name.endswith(".weight") and len(shape) == 2
            and name[: -len(".weight")].rsplit(".", 1)[-1] in QUANTIZABLE_LEAVES)


def requested_spec(name: str, shape: tuple[int, ...], recipe: QuantRecipe) -> QuantSpec | None:
    """The format the recipe asks for parameter `name` (None: keep it in float), whether or
    not its rows are whole groups of that format."""
    if not is_quantizable(name, shape):
        return None
    module = name[: -len(".weight")]
    if module in recipe.overrides:
        return recipe.overrides[module]
    if module in HIGH_PRECISION_MODULES:
        if recipe.embedding_bits is None:
            return None
        return QuantSpec(recipe.embedding_bits, recipe.group_size)
    return recipe.default


def plan_tensor(name: str, shape: tuple[int, ...], recipe: QuantRecipe) -> QuantSpec | None:
    """How to quantize parameter `name` of `shape`, or None to keep it in float: also when its
    rows are not whole groups of the requested format (as mlx-lm does; `convert` says how
    many matrices that kept in float)."""
    spec = requested_spec(name, shape, recipe)
    if spec is None or shape[-1] % spec.group_size:
        return None
    return spec


def most_common(specs: dict[str, QuantSpec], fallback: QuantSpec) -> QuantSpec:
    """The format most modules use: the natural default of the config block."""
    counts = Counter(specs.values())
    return counts.most_common(1)[0][0] if counts else fallback


def spec_from_block(module: str, block: dict) -> QuantSpec:
    """The (bits, group size) an mlx-lm `quantization` block gives `module`."""
    override = block.get(module)
    source = override if isinstance(override, dict) else {}

    def field(name: str, default: int) -> int:  # mlx-lm writes null for "the mode's default"
        for value in (source.get(name), block.get(name)):
            if value is not None:
                return int(value)
        return default

    return QuantSpec(field("bits", 4), field("group_size", 64))


def quantization_block(specs: dict[str, QuantSpec], default: QuantSpec) -> dict:
    """mlx-lm's config block: the default, plus each module whose choice differs from it."""
    block: dict = {**default.as_dict(), "mode": "affine"}
    for module in sorted(specs):
        if specs[module] != default:
            block[module] = specs[module].as_dict()
    return block

