"""Fewer, fused operations for the forward pass where MLX has no fused kernel (the CPU backend).

On a GPU, `mx.fast.rms_norm`, `mx.fast.rope` and `mx.fast.scaled_dot_product_attention` are
single kernels. On MLX's CPU backend each falls back to a composition of ten to twenty
primitive operations, and every operation costs a dispatch to the stream's thread, whatever its
size. A decode step of a 30-layer model then runs thousands of tiny operations. This module
keeps the graph small without changing the arithmetic:

- `rms_norm`, `swiglu`: `mx.compile`d, so their elementwise parts run as one fused kernel
  (on a GPU the compiled norm is still the fast kernel);
- RoPE for a decode step: the cos/sin of the position are computed once per step for all
  layers (`RotaryTables`), and each query/key is rotated by one matmul with a fixed
  half-swap matrix plus one fused multiply-add; the attention scale is folded into the
  query's tables;
- `decode_attention`: one query against the cache is two matmuls and a softmax, grouped-query
  heads by a reshape (no repeated K/V, no transposes of the query or the output);
- `DenseFriendlyQuantizedLinear`: for prompt chunks on the CPU, dequantize the weight once
  per chunk and use the dense bfloat16 matmul, about twice as fast there as the quantized
  float32 kernel (which redoes the dequantization for every row). Activations are rounded to
  bfloat16 for the product only, so loading turns it on for bfloat16 checkpoints (their own
  precision); on a float32 one it would move perplexity by about 0.5-1% (see
  benchmarks/README.md), so it is opt-in there (`use_dense_prefill`, `bench --dense-prefill`).
  Decode (one row) keeps the quantized kernel.

All shapes of a decode step are fixed (one token), so each compiled function is traced once.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .cpu_streams import ShardedQuantizedLinear

# Rows (tokens) from which a quantized layer on the CPU dequantizes and multiplies densely.
DENSE_MIN_ROWS = 8
DENSE_DTYPE = mx.bfloat16
# Weights dequantized at a time by the dense path (bounds its extra memory to ~8 MB).
DENSE_BLOCK = 1 << 22


def lean_graph() -> bool:
    """True where the fast kernels decompose into many operations (MLX's CPU backend)."""
    return mx.default_device().type == mx.DeviceType.cpu


def cast(x: mx.array, dtype: mx.Dtype) -> mx.array:
    """`x` in `dtype`, adding no operation when it already is."""
    return x if x.dtype == dtype else x.astype(dtype)


def embed(table: nn.Module, tokens: mx.array, dtype: mx.Dtype | None) -> mx.array:
    """Rows of the embedding table in `dtype` (None: the table's own).

    A quantized table's rows are dequantized with their scales and biases cast to `dtype`
    first: dequantizing at the scales' stored float16/bfloat16 would round every value.
    """
    if dtype is None:
        return table(tokens)
    if not isinstance(table, nn.QuantizedEmbedding) or not mx.issubdtype(table["scales"].dtype,
                                                                         mx.floating):
        # (mxfp4/nvfp4/mxfp8 tables: their scales are uint8 exponents, used as they are)
        return cast(table(tokens), dtype)
    biases = table.get("biases")
    return mx.dequantize(
        table["weight"][tokens],
        scales=cast(table["scales"][tokens], dtype),
        biases=None if biases is None else cast(biases[tokens], dtype),
        group_size=table.group_size, bits=table.bits, mode=table.mode,
    )


@mx.compile
def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameter name, `weight`) with a compiled forward."""

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


# ---------------------------------------------------------------------------------- RoPE


def inverse_frequencies(rope) -> mx.array:
    """Per-pair angular speeds of a `rope.RoPE`, as `mx.fast.rope` derives them."""
    if rope._periods is not None:
        return 1.0 / rope._periods
    return rope.base ** (-mx.arange(0, rope.dims, 2, dtype=mx.float32) / rope.dims)


def rotary_constants(rope) -> tuple[mx.array, mx.array]:
    """(inverse frequencies, half-swap matrix) of a `rope.RoPE`: fixed for a model.

    Evaluated now: a lazy constant would be recomputed by every step that uses it.
    """
    constants = inverse_frequencies(rope), half_swap(rope.dims)
    mx.eval(constants)
    return constants


def half_swap(dims: int) -> mx.array:
    """(dims, dims) matrix with x @ P = concat(x[half:], x[:half])."""
    half = dims // 2
    eye = mx.eye(half, dtype=mx.float32)
    zero = mx.zeros((half, half), mx.float32)
    return mx.concatenate([mx.concatenate([zero, eye], axis=1),
                           mx.concatenate([eye, zero], axis=1)], axis=0)


@mx.compile
def _tables(angles: mx.array, scale: mx.array):
    cos, sin = mx.cos(angles), mx.sin(angles)
    cos2 = mx.concatenate([cos, cos], axis=-1)
    sin2 = mx.concatenate([-sin, sin], axis=-1)
    return cos2, sin2, cos2 * scale, sin2 * scale


@mx.compile
def _rotate(x: mx.array, swap: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    return x * cos + (x @ cast(swap, x.dtype)) * sin


@dataclass
class RotaryTables:
    """cos/sin for the positions of one forward pass, shared by every layer.

    Rotating x (…, dims) in the half-split layout is x*cos + swap(x)*sin with
    sin = (-sin, +sin) over the two halves. The query's tables carry the attention scale.
    """

    cos: mx.array
    sin: mx.array
    q_cos: mx.array
    q_sin: mx.array
    swap: mx.array

    @classmethod
    def build(cls, constants: tuple[mx.array, mx.array], offset: int, length: int,
              position_scale: float, attention_scale: float) -> "RotaryTables":
        """`constants` is `rotary_constants(rope)`, computed once per model."""
        inv_freq, swap = constants
        positions = mx.arange(offset, offset + length, dtype=mx.float32) * position_scale
        angles = positions[:, None] * inv_freq[None, :]
        cos, sin, q_cos, q_sin = _tables(angles, mx.array(attention_scale, mx.float32))
        return cls(cos, sin, q_cos, q_sin, swap)

    def rotate_queries(self, q: mx.array) -> mx.array:
        """Rotate and scale queries by the attention scale."""
        return _rotate(q, self.swap, cast(self.q_cos, q.dtype), cast(self.q_sin, q.dtype))

    def rotate_keys(self, k: mx.array) -> mx.array:
        return _rotate(k, self.swap, cast(self.cos, k.dtype), cast(self.sin, k.dtype))


# ----------------------------------------------------------------------------- attention


def decode_attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Attention of one already-scaled query per head over every cached key.

    q: (B, heads, 1, D); k, v: (B, kv_heads, T, D). Returns (B, 1, heads * D).
    """
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    scores = q.reshape(batch, kv_heads, heads // kv_heads, dim) @ k.swapaxes(-1, -2)
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ v).reshape(batch, 1, heads * v.shape[-1])


# ------------------------------------------------------------------------- dense prefill


@mx.compile
def _dense_codes(codes: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    """(rows, groups, per_group) integer codes -> dense weights: one fused kernel, rounded once."""
    w = codes.astype(mx.float32) * scales[..., None].astype(mx.float32)
    return (w + biases[..., None].astype(mx.float32)).astype(DENSE_DTYPE)


def dense_matmul(x: mx.array, packed: mx.array, scales: mx.array, biases: mx.array,
                 group_size: int, bits: int) -> mx.array:
    """x @ W.T for affine 4/8-bit W, through dense `DENSE_DTYPE` weights (x already cast).

    The packed words are read as bytes (element 0 in the lowest nibble/byte). For 4 bits the
    low nibbles are the even inputs and the high nibbles the odd ones, so instead of
    interleaving them the product is x[even] @ W_low.T + x[odd] @ W_high.T: the only
    temporaries are the dense weights themselves.
    """
    rows = packed.shape[0]
    codes = mx.view(packed, mx.uint8)
    if bits == 8:
        w = _dense_codes(codes.reshape(rows, -1, group_size), scales, biases)
        return x @ w.reshape(rows, -1).T
    half = group_size // 2
    low = _dense_codes((codes & 15).reshape(rows, -1, half), scales, biases)
    high = _dense_codes((codes >> 4).reshape(rows, -1, half), scales, biases)
    return x[..., 0::2] @ low.reshape(rows, -1).T + x[..., 1::2] @ high.reshape(rows, -1).T


class DenseFriendlyQuantizedLinear(ShardedQuantizedLinear):
    """A quantized linear layer that multiplies prompt chunks densely on the CPU.

    MLX allocates an operation's output when the operation is queued, not when it runs, so a
    chunk's whole graph of dense weights would be allocated at once. The weight is therefore
    made `DENSE_BLOCK` weights at a time, each block evaluated before the next is built:
    the extra memory is one block, whatever the model.
    """

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if (rows < DENSE_MIN_ROWS or not lean_graph() or self.mode != "affine"
                or self.bits not in (4, 8)):
            return super().__call__(x)
        xd = x.astype(DENSE_DTYPE)
        out_features = self["weight"].shape[0]
        in_features = x.shape[-1]
        step = max(1, DENSE_BLOCK // in_features)
        parts = []
        for start in range(0, out_features, step):
            end = min(start + step, out_features)
            part = dense_matmul(xd, self["weight"][start:end], self["scales"][start:end],
                                self["biases"][start:end], self.group_size, self.bits)
            mx.eval(part)
            parts.append(part)
        y = (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)).astype(x.dtype)
        if "bias" in self:
            y = y + self["bias"]
        return y


def use_dense_prefill(model: nn.Module) -> int:
    """Give every quantized linear layer of `model` the dense prefill path; returns how many.

    Only the class changes: parameters, names and the decode path stay as they are.
    """
    n = 0
    for _, module in model.named_modules():
        if type(module) in (nn.QuantizedLinear, ShardedQuantizedLinear):
            module.__class__ = DenseFriendlyQuantizedLinear
            n += 1
    return n
