"""Turn a model argument into a local folder: a path as given, or a hub repo id downloaded
through `huggingface_hub`.

The library does everything a careful downloader needs — the standard cache (`HF_HOME`),
tokens from `HF_TOKEN` or `huggingface-cli login`, resumable downloads, `HF_HUB_OFFLINE=1`
served from the cache — so this module only decides *which* files to fetch (never pickles or
GGUF files a runtime does not read) and turns the library's exception zoo into one line that
says what to do.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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

# Only files at the top of a repo: sub-folders hold originals (`original/consolidated.pth`),
# ONNX exports and the like, which can be many gigabytes and are never read.
IGNORE_SUBFOLDERS = ["*/*"]
# Mistral-style repos ship their weights twice: Hugging Face shards and one `consolidated`
# file in Mistral's own naming, which is never read (and doubles the download).
IGNORE_FILES = [*IGNORE_SUBFOLDERS, "consolidated*.safetensors"]

LOGIN_HINT = "log in with `huggingface-cli login` or set HF_TOKEN"


def looks_like_repo_id(spec: str) -> bool:
    return bool(REPO_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def with_local_hint(spec: str, error: MlxLlamaError) -> MlxLlamaError:
    """`out/typo` where `out/` is a folder here was most likely meant as a local path: say
    that there is no such folder before what the hub said."""
    org = spec.split("/")[0]
    if Path(org).is_dir():
        return MlxLlamaError(f"there is no folder {spec} here (though {org}/ exists), and as a "
                             f"hub repo id: {error}")
    return error


def resolve_model_folder(spec: str | Path, revision: str | None = None) -> Path:
    """A local model folder for `spec`: the folder itself, or a hub repo's cached snapshot."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MlxLlamaError(
                f"{path} is a file, not a model folder; convert it with "
                f"`mlx-llama convert {path} -o OUT`"
            )
        return path
    if isinstance(spec, str) and looks_like_repo_id(spec):
        try:
            folder = download(spec, revision, MODEL_FILES)
        except MlxLlamaError as e:
            raise with_local_hint(spec, e) from None
        if not any(folder.glob("*.safetensors")):  # e.g. only pytorch_model.bin (not fetched)
            raise MlxLlamaError(
                f"{spec} has no .safetensors weights, so it is not an MLX model repo: convert "
                f"it (`mlx-llama convert {spec} -o OUT`), then run the folder")
        return folder
    raise MlxLlamaError(f"model path {spec} does not exist; give a model folder or a hub repo id")


def download(
    repo_id: str, revision: str | None, patterns: list[str], progress: bool = True
) -> Path:
    """Fetch the files of `repo_id` matching `patterns` (top level only); return the snapshot.

    config.json comes first and must describe a model mlx-llama runs: a repo of another
    architecture is refused before gigabytes of its weights are fetched. Progress bars are
    huggingface_hub's own, shown only when stderr is a terminal.
    """
    folder = _snapshot(repo_id, revision, ["config.json"], False)
    if not (folder / "config.json").is_file():
        raise MlxLlamaError(not_a_model_repo(repo_id, revision))
    from .config import ModelConfig

    try:
        config = json.loads((folder / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise MlxLlamaError(f"{repo_id}'s config.json is not valid JSON ({e}): it is not a "
                            "usable model repo") from None
    try:
        ModelConfig.from_dict(config)
    except MlxLlamaError as e:
        raise MlxLlamaError(f"{repo_id}: {e}") from None
    return _snapshot(repo_id, revision, patterns, progress)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], progress: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        with _library_warnings_as_one_note(), _progress_bars(progress and sys.stderr.isatty()):
            return Path(snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
                ignore_patterns=IGNORE_FILES,
            ))
    except MlxLlamaError:
        raise
    except Exception as e:  # the library raises a dozen types; each gets its own sentence
        raise MlxLlamaError(describe_hub_error(e, repo_id, revision)) from None


def not_a_model_repo(repo_id: str, revision: str | None) -> str:
    """Why a repo without config.json cannot be used, naming its GGUF files if it has some."""
    try:
        from huggingface_hub import HfApi

        ggufs = sorted((f for f in HfApi().list_repo_files(repo_id, revision=revision)
                        if f.lower().endswith(".gguf")),
                       key=lambda f: ("-of-" in f, "/" in f, f))  # whole files first
    except Exception:  # offline, or the listing failed: say what we know
        ggufs = []
    if ggufs:
        return (f"{repo_id} holds GGUF files ({', '.join(ggufs[:3])}{', ...' if len(ggufs) > 3 else ''}), "
                "not a Hugging Face model folder: download one (`huggingface-cli download "
                f"{repo_id} {ggufs[0]} --local-dir .`) and run `mlx-llama convert {ggufs[0]} -o OUT`")
    return (f"{repo_id} has no config.json: it is not a Hugging Face or MLX model repo; "
            "check the repo id")


def snapshot_revision(folder: Path) -> str | None:
    """The commit hash of a cached snapshot folder (`.../snapshots/<sha>`), if it is one."""
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    return None


def describe_hub_error(e: BaseException, repo_id: str, revision: str | None) -> str:
    """One line naming what went wrong with a hub download and what to do about it."""
    from huggingface_hub import errors as hf

    rev = revision or "main"
    # huggingface_hub wraps an HTTP error it met while downloading (a 500 from the hub) in
    # "not found locally": name the answer the hub gave, not the network.
    e = _http_error_within(e, hf.HfHubHTTPError) or e
    offline_error = getattr(hf, "OfflineModeIsEnabled", ())
    local_missing = getattr(hf, "LocalEntryNotFoundError", ())
    if isinstance(e, hf.GatedRepoError):
        return (
            f"{repo_id} is a gated repository: accept its terms on "
            f"https://huggingface.co/{repo_id} and {LOGIN_HINT}"
        )
    if isinstance(e, hf.RevisionNotFoundError):
        return (
            f"revision '{rev}' not found in {repo_id}: check the branch, tag or commit "
            "given to --revision"
        )
    if isinstance(e, hf.RepositoryNotFoundError):
        return (
            f"repository {repo_id} not found on the Hugging Face hub: check the name; "
            f"if it is private or gated, {LOGIN_HINT}"
        )
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return f"access to {repo_id} was refused (HTTP {status}): {LOGIN_HINT} with a token that can read it"
        if isinstance(status, int) and status >= 500:
            return (f"the Hugging Face hub failed while serving {repo_id} (HTTP {status}): "
                    "try again later")
        return f"the Hugging Face hub refused the download of {repo_id} (HTTP {status}): {_first_line(e)}"
    if isinstance(e, (offline_error, local_missing)) or _is_connection_error(e):
        if offline_mode():
            return (
                f"{repo_id} (revision '{rev}') is not in the local cache and HF_HUB_OFFLINE=1 is "
                "set: unset HF_HUB_OFFLINE and download it once while online"
            )
        return (
            f"cannot reach the Hugging Face hub to download {repo_id}: check your network "
            "connection, or set HF_HUB_OFFLINE=1 to use a cached copy"
        )
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (
            f"no space left on the device while downloading {repo_id}: free some space or "
            "point HF_HOME at a larger disk"
        )
    return f"cannot download {repo_id}: {type(e).__name__}: {_first_line(e)}"


def _http_error_within(e: BaseException, kind: type) -> BaseException | None:
    """`e` itself or the first exception of `kind` it was raised from, if any."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:  # a chain can loop back on itself
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _is_connection_error(e: BaseException) -> bool:
    """A network failure, whichever HTTP client this huggingface_hub version uses."""
    names = {cls.__name__ for cls in type(e).__mro__}
    return bool(names & {"ConnectError", "ConnectionError", "TimeoutException", "Timeout"})


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


@contextmanager
def _library_warnings_as_one_note() -> Iterator[None]:
    """huggingface_hub's warnings off for one download, but for one line when it retries.

    It logs two lines per retry of a failing request (a dozen before it gives up, half a minute
    later), and a warning for an empty pattern match that our own error already explains. The
    user needs one thing from all that: why nothing seems to happen while it waits.
    """
    library = logging.getLogger("huggingface_hub")
    http = logging.getLogger("huggingface_hub.utils._http")  # where the retry loop logs
    first_problem: list[str] = []

    class RetryNote(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            if " thrown while requesting " in message and not first_problem:
                first_problem.append(message.split(" thrown while requesting ", 1)[0].strip("'"))
            elif message.startswith(("Retrying in", "Rate limited")) and len(first_problem) == 1:
                first_problem.append("noted")
                print(f"The hub request failed ({first_problem[0]}); retrying for up to half "
                      "a minute", file=sys.stderr, flush=True)
            return False  # never the library's own lines

    note = RetryNote()
    levels = library.level, http.level
    library.setLevel(logging.ERROR)
    http.setLevel(logging.WARNING)
    http.addFilter(note)
    try:
        yield
    finally:
        http.removeFilter(note)
        library.setLevel(levels[0])
        http.setLevel(levels[1])


@contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """Turn huggingface_hub's bars off for this call only, leaving its global state as found."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if not show and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            enable_progress_bars()
