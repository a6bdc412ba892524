"""Scaled dot-product attention over what a KV cache hands back, in bounded memory.

Two concerns live here so the model's Attention stays a few lines:

1. Quantized caches. Keys and values may arrive quantized (see `QuantizedKVCache`): values
   as `mx.quantize` triples per token, keys as triples per channel (transposed, grouped
   along tokens) plus a full-precision tail of recent keys. Grouped-query attention is done
   by viewing the queries as (batch, kv_heads, n_rep, length, head_dim): each group of
   `n_rep` query heads shares one key/value head by broadcasting, so K/V are never repeated
   (which would undo the memory quantization saved). Both products are
   `mx.quantized_matmul`: scores = q K^T on the keys' triples (and a plain matmul on the
   tail), output = softmax(scores) V on the values'; the cache is never dequantized.

2. Peak memory of long prefills. Where attention is not a fused kernel (MLX's CPU backend,
   and the quantized path everywhere), the (heads, queries, keys) score matrix is
   materialized: a prompt chunk of L queries after T cached keys costs L*T per head, which
   grows with the prompt, not the chunk. Queries are therefore processed in blocks of
   max(64, L*L // T), each evaluated before the next is built (lazily, MLX would hold all
   blocks' scores at once), so one block's scores never exceed those of a chunk attending
   to itself (L*L) and a prefill's peak follows its chunk. Each block sees only the keys up
   to its last query (the rest are masked anyway; quantized keys, grouped along tokens, are
   masked rather than cut). Decoding (L = 1) and a first chunk (T = L) are never split.
"""

from __future__ import annotations

import mlx.core as mx

MIN_QUERY_BLOCK = 64


def expand_mask(mask: str | mx.array | None, queries: int, keys: int) -> mx.array | None:
    """A boolean (queries, keys) mask, or None when every key is visible.

    "causal" is aligned to the end of the keys: query i sees keys up to keys - queries + i.
    """
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown mask {mask!r}")
        q_pos = mx.arange(keys - queries, keys)[:, None]
        return mx.arange(keys)[None, :] <= q_pos
    return mask


def quantized_attention(
    queries: mx.array,
    keys: tuple[mx.array, mx.array, mx.array, mx.array],
    values: tuple[mx.array, mx.array, mx.array],
    scale: float,
    mask: str | mx.array | None,
    group_size: int,
    bits: int,
) -> mx.array:
    """softmax(scale * q K^T + mask) V for (B, heads, L, D) queries; returns (B, heads, L, D).

    `keys` is (packed, scales, biases, tail): the first three hold the quantized keys
    transposed, (B, kv, D, grouped tokens) in groups along the tokens, so q @ K^T is a
    quantized matmul without transposition; `tail` holds the most recent keys, (B, kv, r, D),
    in full precision (fewer than a group). `values` are (B, kv, T, D) quantized per token.
    """
    batch, heads, length, dim = queries.shape
    packed, scales, biases, tail = keys
    kv_heads = tail.shape[1]
    q = (queries * scale).reshape(batch, kv_heads, heads // kv_heads, length, dim)
    # (B, kv, ...) -> (B, kv, 1, ...): broadcast over the query heads of a group.
    parts = []
    if packed.shape[-1]:
        grouped = tuple(mx.expand_dims(a, 2) for a in (packed, scales, biases))
        parts.append(mx.quantized_matmul(q, *grouped, transpose=False, group_size=group_size,
                                         bits=bits))
    if tail.shape[2]:
        parts.append(q @ mx.expand_dims(tail, 2).swapaxes(-1, -2))
    scores = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    allowed = expand_mask(mask, length, scores.shape[-1])
    if allowed is not None:
        scores = mx.where(allowed, scores, mx.finfo(scores.dtype).min)
    weights = mx.softmax(scores, axis=-1, precise=True)
    v = tuple(mx.expand_dims(a, 2) for a in values)
    out = mx.quantized_matmul(weights, *v, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(batch, heads, length, dim)


def query_block(queries: int, keys: int) -> int:
    """Queries per block so a block's scores stay within max(L*L, 64*T) per head."""
    return max(MIN_QUERY_BLOCK, queries * queries // max(keys, 1))


def fused_kernel() -> bool:
    """Whether `mx.fast.scaled_dot_product_attention` runs fused (on a GPU): no score matrix."""
    return mx.default_device().type == mx.DeviceType.gpu


def _attend(q, k, v, scale: float, mask, cache) -> mx.array:
    if isinstance(k, tuple):  # a quantized cache hands back packed triples (see above)
        return quantized_attention(q, k, v, scale, mask, cache.group_size, cache.bits)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def attention(q: mx.array, k, v, scale: float, mask: str | mx.array | None,
              cache=None) -> mx.array:
    """Attention of (B, heads, L, D) queries over the keys/values a cache returned.

    `mask` is None (all visible), "causal" (aligned to the end of the keys) or a boolean
    (L, T) array that also hides every key after its query (as the rotating cache's window
    does); `cache` supplies `group_size`/`bits` when K/V are quantized.
    """
    length = q.shape[2]
    quantized = isinstance(k, tuple)
    total = (v[0] if quantized else v).shape[2]
    block = query_block(length, total)
    if block >= length or (fused_kernel() and not quantized):
        return _attend(q, k, v, scale, mask, cache)
    rows = expand_mask(mask, length, total) if quantized else None
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        if quantized:  # keys grouped along tokens cannot be cut anywhere: mask rows instead
            kb, vb, part = k, v, None if rows is None else rows[start:end]
        else:
            visible = total if mask is None else total - length + end
            kb, vb = k[..., :visible, :], v[..., :visible, :]
            part = mask if mask is None or isinstance(mask, str) else mask[start:end, :visible]
        out = _attend(q[:, :, start:end], kb, vb, scale, part, cache)
        mx.eval(out)  # one block's scores at a time: lazily, MLX would hold them all at once
        outs.append(out)
    return mx.concatenate(outs, axis=2)
