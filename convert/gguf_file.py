"""The GGUF container: metadata and the tensor directory, read with `struct`.

`mx.load` reads GGUF tensors, but it quietly converts the block types it has no layout for
(K-quants, BF16, ...) to float16, and for some it fails with a terse message. An import that
promises to be lossless must know each tensor's *stored* type before it trusts those arrays,
so this module reads the header itself: the key/value metadata, every tensor's name, shape,
type and offset, and checks that the file is long enough to hold all of them (a truncated
download is the most common broken GGUF).

Layout (GGUF v2 and v3, little-endian): magic "GGUF", u32 version, u64 tensor count,
u64 key/value count, the key/values, the tensor infos, padding to `general.alignment`
(default 32), then the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_llama.errors import MlxLlamaError

# ggml tensor type id -> (name, elements per block, bytes per block). The names are ggml's,
# so an error message can say exactly what the file holds.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# Metadata value type id -> struct format of a scalar of that type.
_SCALAR_FORMATS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_NUMPY_DTYPES = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory. `shape` is row-major (numpy order), i.e. the
    reverse of GGUF's `ne` list, so it matches the arrays `mx.load` returns."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # from the start of the data section

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"unknown type {self.type_id}", 0, 0))[0]

    @property
    def nbytes(self) -> int:
        _, block, size = GGML_TYPES[self.type_id]
        count = int(np.prod(self.shape, dtype=np.int64))
        return count // block * size


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int


class _Cursor:
    """Sequential little-endian reads over a buffer; running off the end means truncation."""

    def __init__(self, buf: mmap.mmap | bytes, name: str):
        self.buf, self.pos, self.name = buf, 0, name

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise _truncated(self.name)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("Q")
        end = self.pos + length
        if end > len(self.buf):
            raise _truncated(self.name)
        raw = bytes(self.buf[self.pos : end])
        self.pos = end
        # Vocabularies may hold tokens that are not valid UTF-8 on their own; keep them visible.
        return raw.decode("utf-8", errors="replace")

    def value(self, type_id: int) -> Any:
        if type_id in _SCALAR_FORMATS:
            return self.take(_SCALAR_FORMATS[type_id])
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            return self.array()
        raise MlxLlamaError(
            f"{self.name}: unknown GGUF metadata type {type_id}; the file is corrupt"
        )

    def array(self) -> Any:
        item_type, count = self.take("I"), self.take("Q")
        if item_type in _NUMPY_DTYPES:
            dtype = np.dtype(_NUMPY_DTYPES[item_type])
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise _truncated(self.name)
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos = end
            return values
        return [self.value(item_type) for _ in range(count)]


def _truncated(name: str) -> MlxLlamaError:
    return MlxLlamaError(f"{name} is truncated or not a complete GGUF file; download it again")


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the metadata and tensor directory of a GGUF file and check its length."""
    path = Path(path)
    if not path.is_file():
        raise MlxLlamaError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            raise _truncated(path.name)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path.name)


def _parse(buf: mmap.mmap, name: str) -> GGUFHeader:
    cur = _Cursor(buf, name)
    if len(buf) < 4 or bytes(buf[:4]) != b"GGUF":
        raise MlxLlamaError(f"{name} is not a GGUF file (no GGUF magic at its start)")
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3) and int.from_bytes(version.to_bytes(4, "little"), "big") in (1, 2, 3):
        raise MlxLlamaError(f"{name} is a big-endian GGUF file, which mlx-llama cannot read: "
                            "use the little-endian file that llama.cpp and the hub publish")
    if version not in (2, 3):
        raise MlxLlamaError(
            f"{name} is GGUF version {version}; only versions 2 and 3 are supported: "
            "re-create it with a current llama.cpp"
        )
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        type_id = cur.take("I")
        if key == "general.alignment" and type_id != 4:  # llama.cpp and mx.load read uint32
            raise _corrupt(name, f"general.alignment is stored as type {type_id}, not uint32 "
                           "(MLX would read the tensors at another alignment)")
        metadata[key] = cur.value(type_id)
    tensors: dict[str, TensorInfo] = {}
    for _ in range(n_tensors):
        tname = cur.string()
        ndim = cur.take("I")
        ne = [cur.take("Q") for _ in range(ndim)]
        type_id, offset = cur.take("I"), cur.take("Q")
        if tname in tensors:
            raise _corrupt(name, f"the tensor {tname} is listed twice")
        tensors[tname] = TensorInfo(tname, tuple(reversed(ne)), type_id, offset)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _corrupt(name, f"general.alignment is {alignment!r}, not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    _check_layout(tensors.values(), alignment, name)
    _check_length(tensors, data_offset, len(buf), name)
    return GGUFHeader(version, metadata, tensors, data_offset)


def _corrupt(name: str, what: str) -> MlxLlamaError:
    return MlxLlamaError(f"{name} is corrupt ({what}); download or re-create it")


def _check_layout(tensors, alignment: int, name: str) -> None:
    """Tensors follow each other in directory order, each padded to the alignment, as
    llama.cpp writes and requires: an offset that points anywhere else (at another tensor's
    data, say) would import the wrong weights without a sign. Stops at a type whose size is
    unknown (the converter names that type in its own error)."""
    expected = 0
    for t in tensors:
        if t.type_id not in GGML_TYPES:
            return
        if t.offset != expected:
            raise _corrupt(name, f"the tensor {t.name} starts at data offset {t.offset}, where "
                                 f"the tensors before it end at {expected}")
        expected += -(-t.nbytes // alignment) * alignment


def _check_length(tensors: dict[str, TensorInfo], data_offset: int, size: int, name: str) -> None:
    known = [t for t in tensors.values() if t.type_id in GGML_TYPES]
    end = max((data_offset + t.offset + t.nbytes for t in known), default=data_offset)
    if end > size:
        raise _truncated(name)
