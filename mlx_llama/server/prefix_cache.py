"""Prompt caches kept between requests, so the next turn of a chat prefills only what is new.

An HTTP client resends the whole conversation every turn. The KV cache of the previous turn
already holds all of it but the newest messages, so the server keeps recently used
`PromptCache`s and lends the one sharing the longest token prefix with a new prompt.

Two ways to lend an entry:

- *move*: the new prompt contains the whole prompt the entry was made for (the same chat one
  turn later, or a retry of the same prompt). The entry is taken out and extended in place;
  nothing is copied, and the old state is useless anyway because the new entry starts with it.
- *fork*: the prompts only share a beginning (two chats with the same system prompt). The
  shared prefix is copied into a fresh cache and the original stays, so the other
  conversation keeps its own longer prefix.

Entries are bounded by a budget in bytes (what their KV buffers hold allocated); the least
recently used go first. Only the generation worker thread touches this object, so it takes
no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from ..cache import KVCache, PromptCache


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def allocated_bytes(cache: PromptCache) -> int:
    """Bytes the cache's buffers hold, capacity included (what eviction actually frees)."""
    return sum(layer.allocated_nbytes for layer in cache.layers)


def fork(cache: PromptCache, n: int) -> PromptCache:
    """A new cache holding the first `n` tokens of `cache`; `cache` itself is left as it was.

    MLX arrays are values: slicing gives new array objects, and the first write past `n`
    makes the new cache grow into buffers of its own, so the two never share writes.
    Caches of other kinds than `KVCache` cannot be sliced this way and yield an empty cache.
    """
    new = PromptCache(cache.make_layers)
    if n <= 0 or not all(type(c) is KVCache for c in cache.layers + new.layers):
        return new
    for src, dst in zip(cache.layers, new.layers):
        if src.keys is None or src.offset < n:
            return PromptCache(cache.make_layers)
        dst.keys = src.keys[..., :n, :]
        dst.values = src.values[..., :n, :]
        dst.offset = n
    new.tokens = list(cache.tokens[:n])
    return new


@dataclass
class Entry:
    cache: PromptCache
    prompt_len: int  # tokens of the prompt it was made for (the rest are the completion)
    nbytes: int


@dataclass
class Checkout:
    """A cache lent for one request and how it was found (for logs and tests)."""

    cache: PromptCache
    matched: int  # tokens shared with the best entry (0: a fresh cache)
    how: str  # "move", "fork" or "miss"


class PrefixCacheStore:
    """An LRU of prompt caches bounded by `budget_bytes` (0 keeps nothing)."""

    def __init__(self, make_layers: Callable[[], list], budget_bytes: int) -> None:
        self.make_layers = make_layers
        self.budget_bytes = max(0, int(budget_bytes))
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self._next_key = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def checkout(self, tokens: list[int]) -> Checkout:
        """The cache to generate `tokens` with: the best entry moved or forked, or a fresh one."""
        best_key, best, rank = None, 0, (0, False)
        for key, entry in self.entries.items():  # oldest first: on a tie the newest wins
            n = common_prefix(entry.cache.tokens, tokens)
            # The longest prefix; on a tie one that can be moved (a repeat of its prompt)
            # rather than forked, which copies, or for other kinds than KVCache starts empty.
            if n and (n, n >= entry.prompt_len) >= rank:
                best_key, best, rank = key, n, (n, n >= entry.prompt_len)
        if best_key is None:
            return Checkout(PromptCache(self.make_layers), 0, "miss")
        entry = self.entries[best_key]
        if best >= entry.prompt_len:
            del self.entries[best_key]
            return Checkout(entry.cache, best, "move")
        self.entries.move_to_end(best_key)  # it was useful: keep it longer
        return Checkout(fork(entry.cache, best), best, "fork")

    def checkin(self, cache: PromptCache, prompt_len: int) -> None:
        """Keep `cache` (made for a prompt of `prompt_len` tokens) as the most recent entry."""
        if not cache.tokens:
            return
        for layer in cache.layers:
            layer.shrink()
        entry = Entry(cache, prompt_len, allocated_bytes(cache))
        if entry.nbytes > self.budget_bytes:
            return
        self.entries[self._next_key] = entry
        self._next_key += 1
        while self.nbytes > self.budget_bytes:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()
