"""Command-line options that choose the KV cache kind, shared by every subcommand that runs
the model (generate, chat, perplexity, cache-prompt, serve).

`--kv-bits 8|4` (with `--kv-group-size`, `--quantized-kv-start`) picks the quantized cache,
`--max-kv-size N` the rotating one, neither the default; `--prompt-cache FILE` starts from a
saved prompt (see prompt_cache.py). The functions here turn parsed arguments into a cache
factory, so the CLI stays argument parsing only.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any, Callable

from .cache import KV_BITS, KV_GROUP_SIZES, PromptCache
from .errors import MlxLlamaError


def add_cache_arguments(parser: argparse.ArgumentParser, prompt_cache: bool = True) -> None:
    g = parser.add_argument_group("KV cache")
    g.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                   help="store keys/values quantized to this many bits (default: full precision)")
    g.add_argument("--kv-group-size", type=int, choices=KV_GROUP_SIZES, default=64,
                   help="values sharing one scale and bias in the quantized cache (default 64)")
    g.add_argument("--quantized-kv-start", type=int, default=0, metavar="N",
                   help="keep the cache in full precision until it holds N tokens, then quantize")
    g.add_argument("--max-kv-size", type=int, default=None, metavar="N",
                   help="rotating cache: keep at most N tokens (the first 4 and the most recent)")
    if prompt_cache:
        g.add_argument("--prompt-cache", default=None, metavar="FILE",
                       help="start from a prompt saved by `mlx-llama cache-prompt`; the prompt "
                            "given here is appended to it and only that part is prefilled")


def cache_spec(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(kind, options) for `Llama.make_cache` from parsed arguments."""
    bits = getattr(args, "kv_bits", None)
    max_size = getattr(args, "max_kv_size", None)
    if bits is not None and max_size is not None:
        raise MlxLlamaError("--kv-bits and --max-kv-size cannot be combined: choose one cache kind")
    if bits is not None:
        return "quantized", {"bits": bits, "group_size": args.kv_group_size,
                             "start": args.quantized_kv_start}
    unused = [flag for flag, value, default in (
        ("--kv-group-size", getattr(args, "kv_group_size", 64), 64),
        ("--quantized-kv-start", getattr(args, "quantized_kv_start", 0), 0)) if value != default]
    if unused:
        raise MlxLlamaError(f"{', '.join(unused)} only with --kv-bits (the quantized cache): "
                            "add --kv-bits 8 or 4, or drop it")
    if max_size is not None:
        return "rotating", {"max_size": max_size}
    return "default", {}


def cache_factory(args: argparse.Namespace, model) -> Callable[[], list]:
    """A `make_layers` for `PromptCache`: fresh per-layer caches of the chosen kind.

    The options are checked against the model now, so a bad flag fails before any work.
    """
    kind, options = cache_spec(args)
    model.make_cache(kind, **options)
    return partial(model.make_cache, kind, **options)


def open_prompt_cache(args: argparse.Namespace, model) -> PromptCache:
    """The cache for a generate/chat run: loaded from `--prompt-cache`, or a fresh one.

    A loaded file keeps the cache kind it was saved with; asking for another kind as well
    is refused rather than silently ignored.
    """
    path = getattr(args, "prompt_cache", None)
    if path is None:
        return PromptCache(cache_factory(args, model))
    from .prompt_cache import load_prompt_cache

    cache = load_prompt_cache(path, model)
    kind, options = cache_spec(args)
    saved_kind, saved_options = cache.layers[0].kind, cache.layers[0].options()
    same = kind == saved_kind and all(saved_options.get(k) == v for k, v in options.items())
    if kind != "default" and not same:
        raise MlxLlamaError(
            f"{path} holds a {saved_kind} cache: drop --kv-bits/--max-kv-size (the file's kind "
            "is used) or re-create it with `mlx-llama cache-prompt` and those options"
        )
    return cache


def continue_prompt(cache: PromptCache, prompt, chat: bool | None):
    """(prompt, chat) for `stream_generate`: with a loaded prompt cache, `prompt` continues
    the saved one (appended to its text, inside the same user message for chat models)."""
    saved = cache.saved_prompt
    if saved is None:
        return prompt, chat
    if chat is False and saved.chat:
        raise MlxLlamaError(
            "the prompt cache was saved with the chat template: drop --no-chat-template, or "
            "re-create the cache with `mlx-llama cache-prompt --no-chat-template`"
        )
    if isinstance(prompt, list):  # [system, user] messages built by the CLI from --system
        system = next((m["content"] for m in prompt if m.get("role") == "system"), None)
        if system is not None and system != saved.system:
            raise MlxLlamaError(
                "the prompt cache was saved with a different system message: drop --system "
                "(the saved one is used) or re-create the cache with this one"
            )
        prompt = next(m["content"] for m in prompt if m.get("role") == "user")
    from .tokenizer import check_utf8

    check_utf8(prompt)  # here, so a bad character's position is in the user's text, not the sum
    return saved.continued(prompt), saved.chat
