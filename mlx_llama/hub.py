"""Turn a model argument into a local folder: a path as given, or a hub repo id downloaded
through `huggingface_hub` (its cache, token discovery, resume and offline mode included)."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import MlxLlamaError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# What a runtime needs from an MLX model repo: no pickles, no GGUF, no images.
MODEL_FILES = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.jinja",
    "*.tiktoken",
]


def looks_like_repo_id(spec: str) -> bool:
    return bool(REPO_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def resolve_model_folder(spec: str | Path, revision: str | None = None) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MlxLlamaError(
                f"{path} is a file, not a model folder; convert it with `mlx-llama convert {path} -o OUT`"
            )
        return path
    if isinstance(spec, str) and looks_like_repo_id(spec):
        return download(spec, revision, MODEL_FILES)
    raise MlxLlamaError(f"model path {spec} does not exist; give a model folder or a hub repo id")


def download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # refined into one-line messages in hub_errors
        raise MlxLlamaError(f"cannot download {repo_id}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
