"""What every reader (local folder, hub download, GGUF) hands to the writer."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx


@dataclass
class SourceModel:
    # The Hugging Face config.json content (LlamaForCausalLM).
    config: dict
    # Hugging Face parameter names -> arrays, lazily loaded (mx.load does not read until eval).
    # Already-quantized tensors (GGUF) come as MLX affine triples .weight/.scales/.biases.
    weights: dict[str, mx.array]
    # mlx-lm style quantization block for weights that arrive quantized, else None.
    quantization: dict | None = None
    # Extra files written verbatim: tokenizer.json, tokenizer_config.json, chat template, ...
    files: dict[str, str | bytes] = field(default_factory=dict)
    # Where the weights came from, for the model card (e.g. "hub:org/name@rev", "gguf:file (Q4_1)").
    source: str = ""
