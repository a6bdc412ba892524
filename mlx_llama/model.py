"""The Llama forward pass: attention, MLP, blocks and the causal language model.

Module and parameter names mirror Hugging Face's `LlamaForCausalLM`, so a checkpoint's
weights load 1:1 without renaming. Grouped-query attention is handled by
`mx.fast.scaled_dot_product_attention`, which accepts fewer key/value heads than query heads:
K/V stay at the key/value head count, in the cache and in the kernel.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import attention
from .cache import KVCache, causal_mask, make_caches
from .config import ModelConfig
from .fused import (RMSNorm, RotaryTables, cast, decode_attention, embed, lean_graph,
                    rotary_constants, swiglu)
from .rope import RoPE


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.rope = RoPE(self.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.kv_dtype: mx.Dtype | None = None  # None: keys/values in the activations' dtype

    def _stored(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        if self.kv_dtype is None:
            return k, v
        return cast(k, self.kv_dtype), cast(v, self.kv_dtype)

    def _attend(self, q: mx.array, k, v, scale: float, mask, cache) -> mx.array:
        """(B, H, L, D) queries -> (B, L, H*D), computed at the cache's dtype (the queries are
        cast to it) and returned at the queries' dtype."""
        kv = (k[1] if isinstance(k, tuple) else k).dtype  # scales of a quantized cache
        if not isinstance(k, tuple) and mask is None and q.shape[2] == 1 and lean_graph():
            q = q if scale == 1.0 else q * scale
            return cast(decode_attention(cast(q, kv), k, v), q.dtype)
        out = cast(attention(cast(q, kv), k, v, scale, mask, cache), q.dtype)
        return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)

    def __call__(self, x: mx.array, cache: KVCache | None = None,
                 rope: RotaryTables | None = None) -> mx.array:
        batch, length, _ = x.shape
        if rope is not None and length == 1:
            return self.decode(x, cache, rope)
        q = self.q_proj(x).reshape(batch, length, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, length, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset)
        k = self.rope(k, offset)
        k, v = self._stored(k, v)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
            mask = cache.make_mask(length)  # a rotating cache may narrow the causal window
        else:
            mask = causal_mask(length)
        # Quantized K/V, and query blocks that bound the score matrix: see attention.py.
        return self.o_proj(self._attend(q, k, v, self.scale, mask, cache))

    def decode(self, x: mx.array, cache, rope: RotaryTables) -> mx.array:
        """One token with few operations (fused.py): for a single position, (B, 1, H*D) and
        (B, H, 1, D) share a memory layout, so heads need a reshape and no transpose."""
        batch, dim = x.shape[0], self.head_dim
        # Rotated as (B*heads, D) rows: a 2-D matmul with the swap matrix (q gets the scale).
        q = rope.rotate_queries(self.q_proj(x).reshape(-1, dim)).reshape(batch, -1, 1, dim)
        k = rope.rotate_keys(self.k_proj(x).reshape(-1, dim)).reshape(batch, -1, 1, dim)
        v = self.v_proj(x).reshape(batch, self.n_kv_heads, 1, dim)
        k, v = self._stored(k, v)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        mask = cache.make_mask(1) if cache is not None else None
        return self.o_proj(self._attend(q, k, v, 1.0, mask, cache))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache | None = None,
                 rope: RotaryTables | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache, rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [TransformerBlock(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # Underscored: not a parameter. Used by the lean decode step (fused.py).
        self._rotary = rotary_constants(self.layers[0].self_attn.rope) if self.layers else None
        self.compute_dtype: mx.Dtype | None = None  # None: the embedding's dtype

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        h = embed(self.embed_tokens, tokens, self.compute_dtype)
        caches = cache if cache is not None else [None] * len(self.layers)
        rope = self.rotary_tables(tokens.shape[1], caches[0] if caches else None)
        for layer, layer_cache in zip(self.layers, caches):
            h = layer(h, layer_cache, rope)
        return self.norm(h)

    def rotary_tables(self, length: int, cache) -> RotaryTables | None:
        """Shared cos/sin for a decode step where RoPE is not a fused kernel (else None)."""
        if length != 1 or not lean_graph() or self._rotary is None:
            return None
        attn = self.layers[0].self_attn
        offset = cache.offset if cache is not None else 0
        return RotaryTables.build(self._rotary, offset, 1, attn.rope.scale, attn.scale)


class Llama(nn.Module):
    """Causal LM: (batch, length) token ids -> (batch, length, vocab) logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        return self.project(self.model(tokens, cache))

    def project(self, hidden: mx.array) -> mx.array:
        """Final hidden states -> logits (split out so prefill can project only the last one)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def set_dtypes(self, compute: mx.Dtype | None, kv: mx.Dtype | None) -> None:
        """Activations' dtype (the embedding's output is cast to it) and the KV cache's."""
        self.model.compute_dtype = compute
        for layer in self.model.layers:
            layer.self_attn.kv_dtype = kv

    def make_cache(self, kind: str = "default", **options) -> list:
        """Fresh per-layer caches: "default" (`KVCache`), "quantized" (bits, group_size,
        start) or "rotating" (max_size, keep); see cache.py."""
        return make_caches(len(self.model.layers), kind, head_dim=self.config.head_dim, **options)
