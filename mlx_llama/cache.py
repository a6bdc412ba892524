"""Key/value caches for incremental decoding.

Every kind keeps keys and values at the *key/value* head count (grouped-query attention is done
by the attention kernel, never by repeating heads in memory) and shares one small interface:
`offset` (tokens seen, the rotary position of the next token), `update_and_fetch(k, v)`,
`make_mask(length)` (the mask for the queries just added), `state`/`restore` (the arrays a
prompt-cache file holds), `nbytes`, `is_trimmable` and `trim(n)`.

- `KVCache` (the default) grows its buffers in blocks of `step` tokens, so appending a token is
  a slice update rather than a reallocation; memory is proportional to the tokens held.
- `QuantizedKVCache` stores keys and values with `mx.quantize` (8 or 4 bits) and hands the
  packed triples to the attention, which multiplies with them directly; it can hold the first
  `start` tokens in full precision and quantize from then on.
- `RotatingKVCache` keeps the first `keep` tokens and the most recent ones, at most `max_size`
  in all, so a chat can go on forever in bounded memory.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .errors import MlxLlamaError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


def causal_mask(length: int) -> str | None:
    """The mask for `length` new queries that see every held key before them.

    "causal" aligns the mask to the end of the keys, which is what a prompt chunk that follows
    cached tokens needs; a single decode token attends to everything.
    """
    return "causal" if length > 1 else None


def grown(old: mx.array | None, shape: tuple[int, ...], dtype: mx.Dtype, held: int,
          axis: int = 2) -> mx.array:
    """A zeroed buffer of `shape` holding the first `held` entries of `old` along `axis`.

    Caches grow in blocks: copying what is held into a bigger buffer now and then costs far
    less than concatenating every token."""
    fresh = mx.zeros(shape, dtype)
    if old is not None and held:
        index = (slice(None),) * (axis % len(shape)) + (slice(0, held),)
        fresh[index] = old[index]
    return fresh


def round_up(n: int, step: int) -> int:
    return (n + step - 1) // step * step


class LayerCache:
    """What every cache kind shares: its size, the prompt mask, and its options."""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def make_mask(self, length: int) -> str | mx.array | None:
        return causal_mask(length)

    def options(self) -> dict[str, Any]:
        """Constructor arguments (saved in prompt-cache files to rebuild the same kind)."""
        return {}

    def shrink(self) -> None:
        """Give back unused capacity before the cache is kept for later (kinds that grow in
        blocks override this)."""

    is_trimmable = True  # (the rotating cache's turns False once it has dropped a token)

    def can_trim_to(self, keep: int) -> bool:
        """Whether trimming to `keep` tokens leaves what a fresh cache fed those tokens holds."""
        return self.is_trimmable

    @property
    def allocated_nbytes(self) -> int:
        """Bytes its buffers hold, unused capacity included (what dropping it frees)."""
        held = _buffer_bytes(getattr(self, "keys", None)) + _buffer_bytes(
            getattr(self, "values", None)) + _buffer_bytes(getattr(self, "key_tail", None))
        return max(held, self.nbytes)


class KVCache(LayerCache):
    kind = "default"
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
        capacity = round_up(needed, self.step)
        self.keys, self.values = (grown(old, (*new.shape[:2], capacity, new.shape[3]), new.dtype,
                                        self.offset)
                                  for old, new in ((self.keys, keys), (self.values, values)))

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The arrays that hold data, trimmed to the tokens held (for eval and saving)."""
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def shrink(self) -> None:
        """Give back the unused capacity when it is more than what is held (a short prompt
        kept for reuse would otherwise hold a whole 256-token block). Copies what is held;
        the next append grows a block again."""
        if self.keys is None or self.keys.shape[2] - self.offset <= self.offset:
            return
        self.keys, self.values = (mx.contiguous(a[..., : self.offset, :])
                                  for a in (self.keys, self.values))
        mx.eval(self.keys, self.values)

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (e.g. to reuse a prefix); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def meta_state(self) -> dict[str, int]:
        return {"offset": self.offset}

    def restore(self, arrays: list[mx.array], meta: dict[str, int]) -> None:
        """Take back what `state` and `meta_state` gave (the inverse of saving)."""
        self.keys, self.values = arrays
        self.offset = int(meta["offset"])
        _check_restored(self.keys, self.offset)


def _buffer_bytes(x: Any) -> int:
    if isinstance(x, (tuple, list)):  # quantized caches hold (packed, scales, biases)
        return sum(_buffer_bytes(a) for a in x)
    return x.nbytes if x is not None else 0


def _check_restored(keys: mx.array, offset: int) -> None:
    if keys.shape[2] != offset:
        raise ValueError(f"the cache holds {keys.shape[2]} tokens but its offset says {offset}")


class QuantizedKVCache(LayerCache):
    """Keys and values stored with `mx.quantize` (8 or 4 bits) and never dequantized.

    Values are quantized per token (groups of `group_size` along the head dimension), the
    layout `softmax(scores) @ V` multiplies directly. Keys are quantized per *channel*:
    stored transposed, (head_dim, tokens), in groups of `group_size` consecutive tokens, so
    `q @ K^T` is again a plain quantized matmul. Rotary keys have a few channels far larger
    than the rest; grouped per token they would share one scale with the small channels and
    crush them to a handful of levels (at 4 bits on SmolLM2 that costs ~20% perplexity and
    the attention output errs by 22%), while each channel's values over a run of tokens
    are alike (9%; the KIVI observation). The tokens of an incomplete key group (fewer than
    `group_size`) wait in full precision in `key_tail` and are quantized once the group
    fills, so memory stays ~`bits` + 32/`group_size` bits per value (fp16 scales): 53% of a
    float16 default cache at 8 bits, 28% at 4 bits (group 64).

    `update_and_fetch` returns keys as (packed, scales, biases, tail) and values as
    (packed, scales, biases); attention.py multiplies them with `mx.quantized_matmul`.

    With `start > 0` the first updates are held in a plain `KVCache`; the update that finds
    `start` or more tokens held quantizes them all and continues quantized, so a prompt can
    be prefilled at full precision and the long decode tail stored small.
    """

    kind = "quantized"
    step = 256

    def __init__(self, bits: int = 8, group_size: int = 64, start: int = 0) -> None:
        check_quantized_options(bits, group_size, start)
        self.bits = bits
        self.group_size = group_size
        self.start = start
        self.offset = 0
        self.grouped = 0  # tokens whose keys are quantized (a multiple of group_size)
        self.keys: tuple[mx.array, ...] | None = None  # (B, kv, D, capacity) along tokens
        self.key_tail: mx.array | None = None  # (B, kv, < group_size, D) full precision
        self.values: tuple[mx.array, ...] | None = None  # (B, kv, capacity, D) per token
        self._plain: KVCache | None = KVCache() if start > 0 else None

    @property
    def quantized(self) -> bool:
        """False while the first `start` tokens are still held in full precision."""
        return self._plain is None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self._plain is not None:
            if self.offset < self.start:
                out = self._plain.update_and_fetch(keys, values)
                self.offset = self._plain.offset
                return out
            self._quantize_plain()
        self._append(keys, values)
        return self._fetch()

    def _append(self, keys: mx.array, values: mx.array) -> None:
        end = self.offset + keys.shape[2]
        if self.values is None or end > self.values[0].shape[2]:
            self._grow(keys, end)
        for buffer, part in zip(self.values, self._quantize(values)):
            buffer[..., self.offset : end, :] = part
        tail = keys if self.key_tail is None else mx.concatenate([self.key_tail, keys], axis=2)
        full = tail.shape[2] // self.group_size * self.group_size
        if full:
            packed = self._quantize(tail[..., :full, :].swapaxes(2, 3))
            for buffer, part, per in zip(self.keys, packed, self._key_columns()):
                buffer[..., self.grouped // per : (self.grouped + full) // per] = part
            self.grouped += full
        self.key_tail = tail[..., full:, :]
        self.offset = end

    def _key_columns(self) -> tuple[int, int, int]:
        """Tokens per column of the packed keys, of their scales and of their biases (and, the
        same numbers, head dimensions per column of the values')."""
        return 32 // self.bits, self.group_size, self.group_size

    def _fetch(self):
        keys = tuple(a[..., : self.grouped // per] for a, per in zip(self.keys, self._key_columns()))
        values = tuple(a[..., : self.offset, :] for a in self.values)
        return keys + (self.key_tail,), values

    def _quantize(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _grow(self, like: mx.array, needed: int) -> None:
        """Room for `needed` tokens (rounded up to `step`), keeping what is held."""
        capacity = round_up(needed, self.step)
        batch, heads, _, dim = like.shape
        dtypes = (mx.uint32, like.dtype, like.dtype)
        # Values hold tokens on axis 2; keys, transposed, on the last axis.
        per = self._key_columns()
        old_v = self.values or (None,) * 3
        old_k = self.keys or (None,) * 3
        self.values = tuple(grown(o, (batch, heads, capacity, dim // p), t, self.offset)
                            for o, p, t in zip(old_v, per, dtypes))
        self.keys = tuple(grown(o, (batch, heads, dim, capacity // p), t, self.grouped // p,
                                axis=-1)
                          for o, p, t in zip(old_k, per, dtypes))

    def shrink(self) -> None:
        if self._plain is not None:  # before `start`: a plain cache growing in blocks
            self._plain.shrink()

    @property
    def allocated_nbytes(self) -> int:
        if self._plain is not None:
            return self._plain.allocated_nbytes
        return super().allocated_nbytes

    def _quantize_plain(self) -> None:
        plain, self._plain = self._plain, None
        self.offset = 0
        if plain.offset:
            self._append(*plain.state)

    @property
    def state(self) -> tuple[mx.array, ...]:
        """Plain (keys, values) before `start`; then the 3 key arrays, the key tail and the
        3 value arrays, trimmed to what is held."""
        if self._plain is not None:
            return self._plain.state
        if self.values is None:
            return ()
        keys, values = self._fetch()
        return keys + values

    def can_trim_to(self, keep: int) -> bool:
        # Once quantized, a cut below `start` would leave quantized tokens that a fresh cache
        # holds in full precision (their full-precision values are gone).
        return self._plain is not None or keep >= self.start

    def trim(self, n: int) -> int:
        if self._plain is not None:
            n = self._plain.trim(n)
            self.offset = self._plain.offset
            return n
        n = min(self.offset, n)
        if n == 0:
            return 0
        keep = self.offset - n
        whole = keep // self.group_size * self.group_size
        if whole < self.grouped:  # the cut falls in quantized groups: back to the tail
            cols = tuple(a[..., whole // per : self.grouped // per]
                         for a, per in zip(self.keys, self._key_columns()))
            back = mx.dequantize(*cols, group_size=self.group_size, bits=self.bits)
            self.key_tail = mx.concatenate([back.swapaxes(2, 3).astype(self.key_tail.dtype),
                                            self.key_tail], axis=2)
            self.grouped = whole
        self.key_tail = self.key_tail[..., : keep - self.grouped, :]
        self.offset = keep
        return n

    def options(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "start": self.start}

    @property
    def meta_state(self) -> dict[str, int]:
        return {"offset": self.offset, "quantized": int(self.quantized), "grouped": self.grouped}

    def restore(self, arrays: list[mx.array], meta: dict[str, int]) -> None:
        offset = int(meta["offset"])
        if not int(meta["quantized"]):
            self._plain = KVCache()
            self._plain.restore(arrays, meta)
            self.offset = offset
            return
        if len(arrays) != 7:
            raise ValueError(f"a quantized layer needs 7 arrays, got {len(arrays)}")
        self._plain = None
        self.keys, self.key_tail, self.values = tuple(arrays[:3]), arrays[3], tuple(arrays[4:])
        self.offset, self.grouped = offset, int(meta["grouped"])
        per_word = 32 // self.bits
        if (self.values[0].shape[2] != offset or self.keys[0].shape[3] * per_word != self.grouped
                or self.grouped + self.key_tail.shape[2] != offset
                or self.grouped % self.group_size):
            raise ValueError(f"quantized keys/values do not add up to offset {offset}")


def check_quantized_options(bits: int, group_size: int, start: int = 0,
                            head_dim: int | None = None) -> None:
    """Refuse settings `mx.quantize` cannot honour, naming the fix."""
    if bits not in KV_BITS:
        raise MlxLlamaError(f"--kv-bits must be 4 or 8, got {bits}")
    if group_size not in KV_GROUP_SIZES:
        raise MlxLlamaError(f"--kv-group-size must be 32, 64 or 128, got {group_size}")
    if start < 0:
        raise MlxLlamaError(f"--quantized-kv-start must be 0 or more, got {start}")
    if head_dim is not None and head_dim % group_size:
        fits = [g for g in KV_GROUP_SIZES if head_dim % g == 0]
        fix = f"use --kv-group-size {' or '.join(map(str, fits))}" if fits else \
            "this model cannot use a quantized cache: drop --kv-bits"
        raise MlxLlamaError(
            f"--kv-group-size {group_size} does not divide the model's head size {head_dim}: {fix}"
        )


class RotatingKVCache(LayerCache):
    """At most `max_size` tokens: the first `keep` (attention sinks) and the most recent.

    Decoding writes each new token over the oldest non-kept one (a ring buffer), so memory
    stays flat however long the chat runs. Keys are stored already rotated at their absolute
    positions, so overwriting never needs re-rotation and `offset` keeps counting every token
    seen. A token at position p attends to the kept tokens and to the last `max_size - keep`
    positions up to itself; a multi-token chunk gets an explicit mask with that window, so
    chunked prefill gives the same result as feeding tokens one at a time. Until the cache
    first overflows it is exactly the default cache (same arrays, same masks).
    """

    kind = "rotating"
    step = 256

    def __init__(self, max_size: int, keep: int = 4) -> None:
        check_rotating_options(max_size, keep)
        self.max_size = max_size
        self.keep = keep
        self.offset = 0
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.size = 0  # tokens held (<= max_size)
        self._ring = keep  # next slot to overwrite once full
        self._mask: str | mx.array | None = None

    @property
    def window(self) -> int:
        """How many recent positions (the query's own included) a query sees besides `keep`."""
        return self.max_size - self.keep

    @property
    def is_trimmable(self) -> bool:
        """Only while nothing has been dropped: a dropped token cannot come back."""
        return self.size == self.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[2] == 1:
            return self._append_one(keys, values)
        return self._append_chunk(keys, values)

    def _append_one(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.size < self.max_size:
            slot = self.size
            if self.keys is None or slot >= self.keys.shape[2]:
                self._grow(keys, values)
            self.size += 1
        else:
            slot = self._ring
            self._ring = self._ring + 1 if self._ring + 1 < self.max_size else self.keep
        self.keys[..., slot : slot + 1, :] = keys
        self.values[..., slot : slot + 1, :] = values
        self.offset += 1
        self._mask = None  # one query: order does not matter, and everything held is visible
        return self.keys[..., : self.size, :], self.values[..., : self.size, :]

    def _grow(self, keys: mx.array, values: mx.array) -> None:
        capacity = min(self.max_size, self.size + self.step)
        self.keys, self.values = (grown(old, (*new.shape[:2], capacity, new.shape[3]), new.dtype,
                                        self.size)
                                  for old, new in ((self.keys, keys), (self.values, values)))

    def _in_order(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The held keys/values, oldest first."""
        if self.size == 0:
            return ()
        k, v = self.keys[..., : self.size, :], self.values[..., : self.size, :]
        if self.size < self.max_size or self._ring == self.keep:
            return k, v
        r, keep = self._ring, self.keep
        return tuple(
            mx.concatenate([a[..., :keep, :], a[..., r:, :], a[..., keep:r, :]], axis=2)
            for a in (k, v)
        )

    def held_positions(self) -> mx.array:
        """Absolute positions of the held tokens, oldest first."""
        if self.size == self.offset:
            return mx.arange(self.size)
        recent = self.size - self.keep
        return mx.concatenate([mx.arange(self.keep), mx.arange(self.offset - recent, self.offset)])

    def _append_chunk(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        new = keys.shape[2]
        held = self._in_order()
        if held:
            all_k = mx.concatenate([held[0], keys], axis=2)
            all_v = mx.concatenate([held[1], values], axis=2)
        else:
            all_k, all_v = keys, values
        if self.is_trimmable and self.offset + new <= self.max_size:
            self._mask = "causal"  # nothing falls outside the window: the default cache's mask
        else:
            key_pos = mx.concatenate([self.held_positions(), mx.arange(self.offset, self.offset + new)])
            query_pos = mx.arange(self.offset, self.offset + new)[:, None]
            seen = key_pos[None, :] <= query_pos
            in_window = (key_pos[None, :] < self.keep) | (query_pos - key_pos[None, :] < self.window)
            self._mask = seen & in_window
        self.offset += new
        total = all_k.shape[2]
        if total > self.max_size:
            tail = total - self.window
            self.keys, self.values = (
                mx.concatenate([a[..., : self.keep, :], a[..., tail:, :]], axis=2)
                for a in (all_k, all_v)
            )
        else:
            self.keys, self.values = all_k, all_v
        self.size = self.keys.shape[2]
        self._ring = self.keep
        return all_k, all_v

    def make_mask(self, length: int) -> str | mx.array | None:
        """The mask for the `length` queries of the last update."""
        return self._mask if length > 1 else None

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """Held keys/values oldest first (a canonical order, for saving)."""
        return self._in_order()

    def trim(self, n: int) -> int:
        if not self.is_trimmable:
            return 0
        n = min(self.offset, n)
        self.offset -= n
        self.size -= n
        self._ring = self.keep
        return n

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a[..., : self.size, :].nbytes for a in (self.keys, self.values))

    def options(self) -> dict[str, Any]:
        return {"max_size": self.max_size, "keep": self.keep}

    @property
    def meta_state(self) -> dict[str, int]:
        return {"offset": self.offset}

    def restore(self, arrays: list[mx.array], meta: dict[str, int]) -> None:
        self.keys, self.values = arrays
        self.offset = int(meta["offset"])
        self.size = self.keys.shape[2]
        self._ring = self.keep
        if self.size > self.max_size or self.size > self.offset or (
            self.size < self.max_size and self.size != self.offset
        ):
            raise ValueError(f"{self.size} held tokens do not fit offset {self.offset}")


def check_rotating_options(max_size: int, keep: int) -> None:
    if keep < 0:
        raise MlxLlamaError(f"the rotating cache's keep must be 0 or more, got {keep}")
    if max_size <= keep:
        raise MlxLlamaError(
            f"--max-kv-size {max_size} must be larger than the {keep} tokens always kept: "
            "give a larger size"
        )


CACHE_KINDS = {"default": KVCache, "quantized": QuantizedKVCache, "rotating": RotatingKVCache}


def make_caches(num_layers: int, kind: str = "default", head_dim: int | None = None,
                **options: Any) -> list:
    """One cache of `kind` per layer; `options` are that kind's constructor arguments.

    `head_dim` lets a quantized cache refuse a group size that does not divide the head
    before anything runs.
    """
    if kind not in CACHE_KINDS:
        raise MlxLlamaError(f"unknown cache kind '{kind}': use one of {', '.join(CACHE_KINDS)}")
    if kind == "quantized":
        check_quantized_options(options.get("bits", 8), options.get("group_size", 64),
                                options.get("start", 0), head_dim)
    try:
        return [CACHE_KINDS[kind](**options) for _ in range(num_layers)]
    except TypeError as e:
        raise MlxLlamaError(f"bad option for the {kind} cache: {e}") from None


class PromptCache:
    """Per-layer caches plus the token ids they hold, so a later prompt that starts with the
    same tokens (the next turn of a chat) prefills only what is new."""

    def __init__(self, make_layers) -> None:
        # `make_layers` (e.g. `model.make_cache`) builds fresh per-layer caches of the chosen kind.
        self.make_layers = make_layers
        self.layers: list = make_layers()
        self.tokens: list[int] = []
        # Set when loaded from a prompt-cache file: the text it holds, to continue from.
        self.saved_prompt = None

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
            trimmable = all(c.can_trim_to(common) for c in self.layers)
            if trimmable:
                for c in self.layers:
                    c.trim(held - common)
            else:
                common = 0
                self.layers = self.make_layers()
        self.tokens = list(tokens[:common])
        return common

    def keep_what_is_held(self, tokens: list[int]) -> None:
        """After a prefill of `tokens` was interrupted: record the ones every layer holds, so
        a retry reuses them. A layer that got further (stopped inside a chunk) is trimmed back;
        if one cannot be, the cache starts over."""
        held = min((c.offset for c in self.layers), default=0)
        if any(c.offset > held and not c.can_trim_to(held) for c in self.layers):
            self.layers, self.tokens = self.make_layers(), []
            return
        for c in self.layers:
            if c.offset > held:
                c.trim(c.offset - held)
        self.tokens = list(tokens[:held])

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)
