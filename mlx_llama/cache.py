"""Key/value caches for incremental decoding.

`KVCache` keeps keys and values at the *key/value* head count (grouped-query attention is done
by the fused attention kernel, never by repeating heads in memory) and grows its buffers in
blocks of `step` tokens, so appending a token is a slice update rather than a reallocation.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (batch, kv_heads, new, head_dim) keys/values; return everything held so far."""
        new = keys.shape[2]
        end = self.offset + new
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        batch, heads, _, k_dim = keys.shape
        v_dim = values.shape[3]
        capacity = ((needed + self.step - 1) // self.step) * self.step
        grown_k = mx.zeros((batch, heads, capacity, k_dim), keys.dtype)
        grown_v = mx.zeros((batch, heads, capacity, v_dim), values.dtype)
        if self.keys is not None and self.offset:
            grown_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            grown_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = grown_k, grown_v

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The arrays that hold data, trimmed to the tokens held (for eval and saving)."""
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (e.g. to reuse a prefix); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class PromptCache:
    """Per-layer caches plus the token ids they hold, so a later prompt that starts with the
    same tokens (the next turn of a chat) prefills only what is new."""

    def __init__(self, make_layers) -> None:
        # `make_layers` (e.g. `model.make_cache`) builds fresh per-layer caches of the chosen kind.
        self.make_layers = make_layers
        self.layers: list = make_layers()
        self.tokens: list[int] = []

    def reuse(self, tokens: list[int]) -> int:
        """Trim to the longest common prefix with `tokens`; return how many are reused.

        At least one token is always left to prefill: its logits start the decode.
        """
        common = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            common += 1
        held = self.layers[0].offset if self.layers else 0
        common = min(common, len(tokens) - 1, held)
        if common < held:
            trimmable = all(getattr(c, "is_trimmable", True) for c in self.layers)
            if trimmable:
                for c in self.layers:
                    c.trim(held - common)
            else:
                common = 0
                self.layers = self.make_layers()
        self.tokens = list(tokens[:common])
        return common

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)
