"""Scaled dot-product attention over what a KV cache hands back, in bounded memory.

Two concerns live here so the model's Attention stays a few lines:

1. Quantized caches. Keys and values may arrive as `mx.quantize` triples (packed uint32,
   scales, biases) at the key/value head count. Grouped-query attention is done by viewing
   the queries as (batch, kv_heads, n_rep, length, head_dim): each group of `n_rep` query
   heads shares one key/value head by broadcasting, so K/V are never repeated (which would
   undo the memory quantization saved). Both products are `mx.quantized_matmul`: scores =
   q K^T with the keys' triples, output = softmax(scores) V with the values'; the cache is
   never dequantized.

2. Peak memory of long prefills. Where attention is not a fused kernel (MLX's CPU backend,
   and the quantized path everywhere), the (heads, queries, keys) score matrix is
   materialized: a prompt chunk of L queries after T cached keys costs L*T per head, which
   grows with the prompt, not the chunk. Queries are therefore processed in blocks of
   max(64, L*L // T), each evaluated before the next is built (lazily, MLX would hold all
   blocks' scores at once), so one block's scores never exceed those of a chunk attending
   to itself (L*L) and a prefill's peak follows its chunk. Each block sees only the keys up
   to its last query (the rest are masked anyway). Decoding (L = 1) and a first chunk
   (T = L) are never split.
"""

from __future__ import annotations

import mlx.core as mx

Keys = "mx.array | tuple[mx.array, mx.array, mx.array]"

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
    keys: tuple[mx.array, mx.array, mx.array],
    values: tuple[mx.array, mx.array, mx.array],
    scale: float,
    mask: str | mx.array | None,
    group_size: int,
    bits: int,
    rotated_keys: bool = False,
) -> mx.array:
    """softmax(scale * q K^T + mask) V for (B, heads, L, D) queries; returns (B, heads, L, D).

    `rotated_keys`: the keys were stored as K H (Hadamard, see cache.py), so the queries are
    rotated too: (q H)(K H)^T = q K^T.
    """
    batch, heads, length, dim = queries.shape
    kv_heads = keys[0].shape[1]
    n_rep = heads // kv_heads
    if rotated_keys:
        queries = mx.hadamard_transform(queries, scale=dim**-0.5)
    q = (queries * scale).reshape(batch, kv_heads, n_rep, length, dim)
    # (B, kv, T, ...) -> (B, kv, 1, T, ...): broadcast over the n_rep query heads of a group.
    k = tuple(mx.expand_dims(a, 2) for a in keys)
    v = tuple(mx.expand_dims(a, 2) for a in values)
    scores = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)
    allowed = expand_mask(mask, length, scores.shape[-1])
    if allowed is not None:
        scores = mx.where(allowed, scores, mx.finfo(scores.dtype).min)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(weights, *v, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(batch, heads, length, dim)


def query_block(queries: int, keys: int) -> int:
    """Queries per block so a block's scores stay within max(L*L, 64*T) per head."""
    return max(MIN_QUERY_BLOCK, queries * queries // max(keys, 1))


def _key_count(keys) -> int:
    return (keys[0] if isinstance(keys, tuple) else keys).shape[2]


def _first_keys(keys, n: int):
    if isinstance(keys, tuple):
        return tuple(a[..., :n, :] for a in keys)
    return keys[..., :n, :]


def fused_kernel() -> bool:
    """Whether `mx.fast.scaled_dot_product_attention` runs fused (on a GPU): no score matrix."""
    return mx.default_device().type == mx.DeviceType.gpu


def _attend(q, k, v, scale: float, mask, cache) -> mx.array:
    if isinstance(k, tuple):  # a quantized cache hands back (packed, scales, biases)
        return quantized_attention(q, k, v, scale, mask, cache.group_size, cache.bits,
                                   cache.rotated_keys(q.shape[-1]))
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def attention(q: mx.array, k, v, scale: float, mask: str | mx.array | None,
              cache=None) -> mx.array:
    """Attention of (B, heads, L, D) queries over the keys/values a cache returned.

    `mask` is None (all visible), "causal" (aligned to the end of the keys) or a boolean
    (L, T) array that also hides every key after its query (as the rotating cache's window
    does); `cache` supplies `group_size`/`bits` when K/V are quantized.
    """
    length = q.shape[2]
    total = _key_count(k)
    block = query_block(length, total)
    if block >= length or (fused_kernel() and not isinstance(k, tuple)):
        return _attend(q, k, v, scale, mask, cache)
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        visible = total if mask is None else total - length + end
        part = mask if mask is None or isinstance(mask, str) else mask[start:end, :visible]
        out = _attend(q[:, :, start:end], _first_keys(k, visible), _first_keys(v, visible),
                      scale, part, cache)
        mx.eval(out)  # one block's scores at a time: lazily, MLX would hold them all at once
        outs.append(out)
    return mx.concatenate(outs, axis=2)
