"""Rotary position embeddings over `mx.fast.rope`, with the scalings Llama checkpoints use.

Hugging Face stores Llama weights for the "half-split" rotary layout (the first half of each
head's dimensions pairs with the second half), which is `traditional=False` in MLX. Scaling
variants only change the per-dimension frequencies, so each one reduces to a `base`/`scale`
pair or an explicit frequency vector handed to the fused kernel.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn


def llama3_periods(dims: int, base: float, scaling: dict[str, Any]) -> mx.array:
    """Per-pair rotation periods (1 / inverse frequency) for Llama 3.1's rope scaling.

    Long wavelengths are slowed by `factor`, short ones kept, and the band in between is
    blended smoothly, exactly as Meta's reference does.
    """
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    inv_freq = [1.0 / base ** (i / dims) for i in range(0, dims, 2)]
    scaled = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen > original / low:
            scaled.append(f / factor)
        elif wavelen < original / high:
            scaled.append(f)
        else:
            smooth = (original / wavelen - low) / (high - low)
            scaled.append((1 - smooth) * f / factor + smooth * f)
    return mx.array([1.0 / f for f in scaled], dtype=mx.float32)


class RoPE(nn.Module):
    """Applies rotary embeddings to (batch, heads, length, head_dim) at a position offset."""

    def __init__(self, dims: int, base: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.dims = dims
        self.base: float | None = base
        self.scale = 1.0
        kind = (scaling or {}).get("rope_type", "default")
        if kind == "linear":
            self.scale = 1.0 / float(scaling["factor"])
        if kind == "llama3":
            # Stored with a leading underscore so it is not mistaken for a weight.
            self._periods = llama3_periods(dims, base, scaling)
            self.base = None
        else:
            self._periods = None

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=self.base,
            scale=self.scale,
            offset=offset,
            freqs=self._periods,
        )
