"""Write an MLX model folder (mlx-lm's layout) safely: streamed, sharded and atomic.

Streamed: a safetensors file is a JSON header followed by raw tensor bytes. Shapes and dtypes
of lazy MLX arrays are known before they are computed, so the header is written first and then
each tensor is evaluated, written and released in turn. Peak memory is one tensor's worth
(plus the source tensor it comes from), not a shard's and not a model's.

Atomic: everything goes to a hidden temporary folder next to the destination
(`.OUT.tmp-<random>`), which is checked by the caller and only then renamed into place. If
anything goes wrong — an exception, Ctrl-C, a full disk — the temporary folder is removed and
an existing destination is left exactly as it was. Replacing a folder (`--force`) renames the
old one aside, renames the new one in, and only then deletes the old one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_llama.errors import MlxLlamaError

SAFETENSORS_DTYPES = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32",
    mx.int32: "I32", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16",
    mx.int64: "I64", mx.uint64: "U64", mx.bool_: "BOOL",
}
WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most `max_bytes` (a bigger tensor goes alone)."""
    shards: list[list[str]] = []
    used = 0
    for name, nbytes in sizes:
        if not shards or (used + nbytes > max_bytes and shards[-1]):
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_weights(
    folder: Path,
    tensors: list[tuple[str, mx.array] | None],
    max_shard_bytes: int,
    on_written: Callable[[str, int], None] | None = None,
) -> dict:
    """Write lazily computed `tensors` as shards + index; returns the index dict.

    The list is consumed: each slot is set to None once its tensor is on disk, so the list no
    longer keeps the computed array (or the loaded source it came from) alive.
    """
    sizes = [(t[0], t[1].nbytes) for t in tensors if t is not None]
    groups = plan_shards(sizes, max_shard_bytes)
    files = shard_file_names(len(groups))
    weight_map: dict[str, str] = {}
    position = 0
    for group, file_name in zip(groups, files):
        count = len(group)
        write_safetensors(folder / file_name, tensors, position, count, on_written)
        weight_map.update({name: file_name for name in group})
        position += count
    index = {
        "metadata": {"total_size": sum(n for _, n in sizes)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(folder / WEIGHTS_INDEX, index)  # mlx-lm writes it for a single file too
    return index


def write_safetensors(
    path: Path,
    tensors: list[tuple[str, mx.array] | None],
    start: int,
    count: int,
    on_written: Callable[[str, int], None] | None = None,
) -> None:
    """Write `tensors[start:start+count]` to one safetensors file, one tensor at a time."""
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, array in tensors[start : start + count]:
        if array.dtype not in SAFETENSORS_DTYPES:
            raise MlxLlamaError(f"cannot store tensor {name} of dtype {array.dtype} in safetensors")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i in range(start, start + count):
            name, array = tensors[i]
            tensors[i] = None
            f.write(tensor_bytes(name, array))
            nbytes = array.nbytes
            del array
            if on_written is not None:
                on_written(name, nbytes)


def tensor_bytes(name: str, array: mx.array) -> memoryview:
    """Evaluate `array` and expose its bytes in row-major order, without a copy if possible."""
    try:
        mx.eval(array)
    except Exception as e:  # a source file that turned unreadable, or an MLX error
        raise MlxLlamaError(
            f"cannot compute tensor {name}: {str(e).splitlines()[0]}; check the source files"
        ) from None
    view = memoryview(array)
    if view.c_contiguous:
        return view.cast("B")
    flat = array.view(mx.uint8) if array.dtype == mx.bfloat16 else array
    return memoryview(np.ascontiguousarray(np.asarray(flat))).cast("B")


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_extra_files(folder: Path, files: dict[str, str | bytes]) -> None:
    """Tokenizer, chat template, generation config: as the source has them.

    Only plain file names are accepted, and the files the converter writes itself (config,
    weights, index, model card) are never taken from the source.
    """
    for name, content in files.items():
        if Path(name).name != name or name in ("config.json", "README.md") or (
            name.endswith((".safetensors", ".safetensors.index.json"))
        ):
            continue
        data = content.encode() if isinstance(content, str) else content
        (folder / name).write_bytes(data)


# Files a desktop drops into any folder it shows: a folder holding only these counts as empty.
DESKTOP_JUNK = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".directory"})


def check_destination(out: Path, force: bool) -> None:
    """Refuse an existing, non-empty destination unless `force` and it is a model folder
    (checked before any work, and again just before the old folder is replaced)."""
    if out.exists() and not out.is_dir():
        raise MlxLlamaError(f"{out} exists and is not a folder: choose another output path")
    if not out.is_dir():
        above = next((p for p in Path(os.path.abspath(out)).parents if p.exists()), None)
        if above is not None and not above.is_dir():  # `-o notes.txt/model`
            raise MlxLlamaError(f"{above} is a file, so the output folder {out} cannot be made "
                                "inside it: choose another output path")
        return
    here = Path.cwd().resolve()  # even an empty one: it is renamed away under the user's shell
    if out.resolve() == here or out.resolve() in here.parents:
        raise MlxLlamaError(
            f"output folder {out} holds the current directory: run from elsewhere or choose "
            "another output path"
        )
    entries = [p.name for p in out.iterdir() if p.name not in DESKTOP_JUNK]
    if not entries:
        return
    if not force:
        raise MlxLlamaError(
            f"output folder {out} already exists: pass --force to replace it, or choose another path"
        )
    # --force deletes the old folder: only ever a model folder, never e.g. `-o .` in a project
    # or a fresh clone that holds nothing but its .git.
    if not (out / "config.json").is_file():
        raise MlxLlamaError(
            f"output folder {out} is not a model folder (no config.json), so --force will not "
            "delete it: choose another output path"
        )
    if ".git" in entries:
        raise MlxLlamaError(
            f"output folder {out} is a git repository (it holds .git), so --force will not "
            "delete it: convert into another folder and copy the files in"
        )


@contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out`; on a clean exit, move it into place.

    On any exception (KeyboardInterrupt included) the temporary folder is deleted and `out`
    is not touched. A symlinked `out` is written where it points (the link keeps working);
    renaming over the link itself would put the model beside the link and orphan its target.
    """
    out = Path(os.path.realpath(out))
    check_destination(out, force)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # -o new/dirs/out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        commit(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # innermost first; only the ones this call made, if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def commit(tmp: Path, out: Path, force: bool) -> None:
    """Rename `tmp` to `out`; an existing `out` is renamed aside first and deleted last."""
    check_destination(out, force)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
