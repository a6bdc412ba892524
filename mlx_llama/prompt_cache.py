"""Save the KV cache of a prompt to a file, so later runs prefill only what follows it.

`mlx-llama cache-prompt -m MODEL -p PROMPT -o FILE` prefills PROMPT once and writes its cache;
`mlx-llama generate --prompt-cache FILE -p MORE` continues from it (MORE is appended to the
saved prompt, inside the same user message for chat models) and prefills only MORE. In Python,
`load_prompt_cache(FILE, model)` gives a `PromptCache` to pass to `stream_generate(...,
cache=...)` with the full prompt (`cache.saved_prompt.continued(more)` builds it).

The file is safetensors: `tokens` (the prompt's ids) and `layers.{i}.{j}` (each layer's
`state` arrays), with metadata naming the format and version, the model's fingerprint, the
cache kind with its options and per-layer counters, the saved prompt, and a SHA-256 of every
array. Files are written to a temporary name in the same folder and renamed into place, so a
crash never leaves half a file under the real name. A file made by another model (different
config or weights), a truncated or altered file, or something that is not a prompt cache is
refused with a one-line message that says how to re-create it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn

from .cache import PromptCache
from .errors import MlxLlamaError

FORMAT = "mlx-llama-prompt-cache"
VERSION = 1
SAMPLES_PER_TENSOR = 256
# Marks where the user's text ends inside a rendered chat template (private-use characters).
_CUT = "\ue000mlx-llama-cut\ue000"


@dataclass(frozen=True)
class SavedPrompt:
    """The prompt a cache file holds: continuing it appends text to the user's message."""

    text: str
    system: str | None = None
    chat: bool = False

    def messages(self, text: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [{"role": "user", "content": text}]

    def continued(self, more: str) -> str | list[dict[str, str]]:
        """The full prompt for `stream_generate`: chat messages, or raw text when not chat."""
        return self.messages(self.text + more) if self.chat else self.text + more


def prefix_tokens(tokenizer, saved: SavedPrompt) -> list[int]:
    """The ids every continuation of `saved` starts with.

    For chat models the template is rendered with a marker after the user's text and cut
    there, so the cache ends inside the user's message (not at its end-of-turn), exactly
    where `continued` will append.
    """
    if not saved.chat:
        return tokenizer.encode(saved.text)
    rendered = tokenizer.apply_chat_template(saved.messages(saved.text + _CUT),
                                             add_generation_prompt=True, tokenize=False)
    if _CUT not in rendered:
        raise MlxLlamaError("the chat template drops the user's message: use --no-chat-template")
    return tokenizer.encode(rendered[: rendered.index(_CUT)])


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's config and a spread sample of every weight.

    Floating weights are sampled as float32 (exact for bf16/f16), so bf16/f16 files give the
    same fingerprint whether computed in their stored dtype or in float32 (the CPU default).
    """
    h = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True, default=str).encode())
    for name, w in sorted(nn.utils.tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        flat = w.reshape(-1)
        sample = flat[:: max(1, flat.size // SAMPLES_PER_TENSOR)][:SAMPLES_PER_TENSOR]
        if mx.issubdtype(sample.dtype, mx.floating):
            sample = sample.astype(mx.float32)
        h.update(f"{name}{tuple(w.shape)}".encode())
        h.update(memoryview(mx.contiguous(sample)))
    return h.hexdigest()[:16]


def _digest(arrays: dict[str, mx.array]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(memoryview(mx.contiguous(arrays[name])))
    return h.hexdigest()


def save_prompt_cache(path: str | Path, cache: PromptCache, model: nn.Module, *,
                      saved_prompt: SavedPrompt | None = None,
                      model_name: str | None = None, force: bool = False) -> Path:
    """Write `cache` (its layers and tokens) to `path` atomically; returns the path.

    An existing prompt cache is replaced; any other existing file only with `force`."""
    path = Path(path)
    check_writable(path, force)
    if not cache.tokens or not cache.layers or cache.layers[0].offset == 0:
        raise MlxLlamaError("the prompt cache is empty: prefill a prompt before saving it")
    arrays = {"tokens": mx.array(cache.tokens, dtype=mx.int32)}
    for i, layer in enumerate(cache.layers):
        for j, a in enumerate(layer.state):
            arrays[f"layers.{i}.{j}"] = a
    mx.eval(list(arrays.values()))
    first = cache.layers[0]
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "model": json.dumps({"fingerprint": model_fingerprint(model), "name": model_name}),
        "cache": json.dumps({
            "kind": first.kind,
            "options": first.options(),
            "layers": [layer.meta_state for layer in cache.layers],
        }),
        "prompt": json.dumps(asdict(saved_prompt) if saved_prompt else None),
        "sha256": _digest(arrays),
    }
    write_atomically(path, arrays, metadata)
    return path


def check_writable(path: Path, force: bool = False) -> None:
    """Refuse to replace a file that is not a prompt cache (a typo in -o must not eat weights)."""
    if path.is_dir():
        raise MlxLlamaError(f"{path} is a folder: give a file name for the prompt cache")
    check_folder(path)
    if path.exists() and not force and not is_prompt_cache(path):
        raise MlxLlamaError(
            f"{path} exists and is not a prompt cache: choose another -o path, or pass --force "
            "to replace it"
        )


def is_prompt_cache(path: Path) -> bool:
    """Whether `path` is a safetensors file whose metadata names this format.

    Reads only the header (8-byte length, then JSON), so checking a large file is free."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100_000_000:
                return False
            header = json.loads(f.read(size))
        return header.get("__metadata__", {}).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_atomically(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str]) -> None:
    """Write to a temporary file next to `path`, then rename it over `path`.

    The rename is atomic on one filesystem: readers see the old file or the new one, never
    a partial write. The temporary name ends in .safetensors because `mx.save_safetensors`
    would otherwise append that suffix itself.
    """
    folder = check_folder(path)
    tmp = None
    try:  # a read-only or full disk: OSError from Python, RuntimeError from MLX's writer
        # The name is cut so the temporary one stays under the 255-byte limit of a file name.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp.safetensors",
                                   dir=folder)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
        mx.save_safetensors(tmp, arrays, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        reason = (e.strerror if isinstance(e, OSError) else None) or str(e)
        raise MlxLlamaError(f"cannot write {path}: {reason}: free some space or choose another "
                            "-o path") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def check_folder(path: Path) -> Path:
    """The folder `path` goes in, which must exist (checked before minutes of prefill)."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise MlxLlamaError(f"folder {folder} does not exist: create it or choose another -o path")
    return folder


def _refuse(path: Path, problem: str) -> MlxLlamaError:
    return MlxLlamaError(
        f"prompt cache {path} {problem}: re-create it with `mlx-llama cache-prompt -m MODEL "
        f"-p PROMPT -o {path}`"
    )


def read_file(path: str | Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Arrays and decoded metadata of a prompt-cache file, checked for integrity."""
    path = Path(path)
    if path.is_dir():
        raise MlxLlamaError(f"prompt cache {path} is a folder: give the cache file's path")
    if not path.is_file():
        raise MlxLlamaError(
            f"prompt cache {path} does not exist: create it with `mlx-llama cache-prompt -m MODEL "
            f"-p PROMPT -o {path}`"
        )
    try:
        arrays, raw = mx.load(str(path), format="safetensors", return_metadata=True)
        mx.eval(list(arrays.values()))
    except Exception as e:  # MLX raises RuntimeError/ValueError with a terse message
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _refuse(path, f"is corrupt or truncated ({reason})") from None
    if raw.get("format") != FORMAT:
        raise _refuse(path, "is not an mlx-llama prompt cache")
    if raw.get("version") != str(VERSION):
        raise _refuse(path, f"has format version {raw.get('version')}, this mlx-llama reads {VERSION}")
    try:
        meta = {k: json.loads(raw[k]) for k in ("model", "cache", "prompt")}
    except (KeyError, json.JSONDecodeError):
        raise _refuse(path, "has damaged metadata") from None
    if _digest(arrays) != raw.get("sha256"):
        raise _refuse(path, "is corrupt (its contents do not match their checksum)")
    return arrays, meta


def load_prompt_cache(path: str | Path, model: nn.Module) -> PromptCache:
    """A `PromptCache` holding the saved prompt, ready for `stream_generate(..., cache=...)`.

    Refuses (MlxLlamaError) a file made by another model or one that is damaged. Floating
    arrays are cast to the dtype the model keeps its KV cache in (on the CPU backend a
    bfloat16 model computes in float32 but caches in bfloat16), so a loaded cache holds what
    the same run without the file would hold.
    """
    path = Path(path)
    arrays, meta = read_file(path)
    saved_model, prompt = meta["model"] or {}, meta["prompt"]
    if not isinstance(saved_model, dict) or not isinstance(prompt, (dict, type(None))):
        raise _refuse(path, "has damaged metadata")
    if saved_model.get("fingerprint") != model_fingerprint(model):
        made_for = f" '{saved_model['name']}'" if saved_model.get("name") else ""
        raise _refuse(path, f"was made for another model{made_for} (its weights or config differ "
                            "from this one)")
    spec = meta["cache"]
    try:
        make_layers = partial(model.make_cache, spec["kind"], **spec["options"])
        cache = PromptCache(make_layers)
        per_layer = spec["layers"]
        if len(per_layer) != len(cache.layers):
            raise ValueError(f"{len(per_layer)} layers saved, the model has {len(cache.layers)}")
        dtype = _cache_dtype(model)
        for i, (layer, layer_meta) in enumerate(zip(cache.layers, per_layer)):
            count = sum(1 for k in arrays if k.startswith(f"layers.{i}."))
            state = [_cast(arrays[f"layers.{i}.{j}"], dtype) for j in range(count)]
            _check_shapes(state, model)
            layer.restore(state, layer_meta)
        tokens = arrays["tokens"].tolist()
        if cache.layers[0].offset != len(tokens):
            raise ValueError(f"{len(tokens)} tokens saved but the cache holds {cache.layers[0].offset}")
        cache.saved_prompt = SavedPrompt(**prompt) if prompt else None
    except MlxLlamaError as e:
        raise _refuse(path, f"has unusable cache options ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _refuse(path, f"has an inconsistent structure ({e})") from None
    cache.tokens = tokens
    return cache


def _cache_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype the attention layers store keys and values in (None there: the activations')."""
    return model.model.layers[0].self_attn.kv_dtype or model.model.norm.weight.dtype


def _cast(a: mx.array, dtype: mx.Dtype) -> mx.array:
    return a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a


def _check_shapes(state: Sequence[mx.array], model: nn.Module) -> None:
    cfg = model.config
    for a in state:
        if a.ndim != 4 or a.shape[0] != 1 or a.shape[1] != cfg.num_key_value_heads:
            raise ValueError(f"array of shape {tuple(a.shape)} does not fit "
                             f"{cfg.num_key_value_heads} key/value heads")
    if len(state) == 2 and any(a.shape[3] != cfg.head_dim for a in state):
        raise ValueError(f"head size {state[0].shape[3]} is not the model's {cfg.head_dim}")


def cache_prompt(model, tokenizer, saved: SavedPrompt, kind: str = "default",
                 chunk: int = 512, **options) -> PromptCache:
    """Prefill the tokens of `saved` into a fresh cache of `kind`; returns it, ready to save."""
    from .generate import attends_within_context, prefill, rotating_cache_hint

    tokens = prefix_tokens(tokenizer, saved)
    if not tokens:
        raise MlxLlamaError("the prompt has no tokens: give some text with -p")
    limit = model.config.max_position_embeddings
    cache = PromptCache(partial(model.make_cache, kind, **options))
    if len(tokens) >= limit and not attends_within_context(cache, limit):  # as generate does
        raise MlxLlamaError(f"the prompt has {len(tokens)} tokens but the model's context is "
                            f"{limit}: shorten it, or {rotating_cache_hint(None, limit)}")
    prefill(model, tokens, cache.layers, chunk)
    mx.eval([c.state for c in cache.layers])
    cache.tokens = list(tokens)
    cache.saved_prompt = saved
    return cache


# ------------------------------------------------------------------------------------------
# CLI: mlx-llama cache-prompt -m MODEL -p PROMPT -o FILE
# ------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cache_options import add_cache_arguments
    from .cli import add_model_argument

    add_model_argument(p)
    p.add_argument("-p", "--prompt", required=True, help="prompt text, or - for stdin")
    p.add_argument("-o", "--output", required=True, help="cache file to write (.safetensors)")
    p.add_argument("--system", default=None, help="system message (chat models)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="cache the prompt as raw text even if the model has a chat template")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="tokens per prefill step (peak memory grows with it)")
    p.add_argument("--force", action="store_true",
                   help="replace -o even if it exists and is not a prompt cache")
    add_cache_arguments(p, prompt_cache=False)


def run(args: argparse.Namespace) -> int:
    from .cache_options import cache_spec
    from .cli import load_checked, read_prompt, resolve_model

    kind, options = cache_spec(args)
    if args.prefill_chunk < 1:
        raise MlxLlamaError(f"--prefill-chunk must be at least 1, got {args.prefill_chunk}")
    check_writable(Path(args.output), args.force)  # before minutes of prefill, not after
    folder = resolve_model(args.model)
    model, tokenizer = load_checked(folder)
    text = read_prompt(args.prompt)
    chat = not args.no_chat_template and bool(tokenizer.chat_template)
    saved = SavedPrompt(text=text, system=args.system if chat else None, chat=chat)
    if args.system and not chat:
        raise MlxLlamaError("--system needs a chat template: drop --system or --no-chat-template")
    mx.reset_peak_memory()
    start = time.perf_counter()
    cache = cache_prompt(model, tokenizer, saved, kind, args.prefill_chunk, **options)
    elapsed = time.perf_counter() - start
    path = save_prompt_cache(args.output, cache, model, saved_prompt=saved,
                             model_name=Path(folder).name, force=args.force)
    n = len(cache.tokens)
    print(f"saved {n} prompt tokens ({kind} cache, {cache.nbytes / 1e6:.1f} MB) to {path} | "
          f"prefill {n / max(elapsed, 1e-9):.1f} tok/s | peak memory "
          f"{mx.get_peak_memory() / 1e9:.3f} GB", file=sys.stderr)
    return 0
