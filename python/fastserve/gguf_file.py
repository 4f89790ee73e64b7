"""A GGUF file's header (metadata and tensor table) and its tensors' bytes, memory-mapped.

The `gguf` package's GGUFReader makes a numpy array per array element, which for a
128k-token vocabulary with 280k merges takes seconds to tens of seconds; this parser reads
the same header in a fraction of that (one struct call per string) and leaves the tensor
data in the mmap until a tensor is dequantized. Format: https://github.com/ggml-org/ggml/
blob/master/docs/gguf.md (versions 2 and 3; little-endian).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format of one scalar.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9

# ggml tensor type id -> (name, elements per block, bytes per block), for the types whose
# size the loader needs to know; any other id is named through the gguf package if present.
TENSOR_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}


def type_name(type_id: int) -> str:
    if type_id in TENSOR_TYPES:
        return TENSOR_TYPES[type_id][0]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(type_id).name
    except (ImportError, ValueError):
        return f"type {type_id}"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    shape: tuple[int, ...]  # ggml order: innermost (row length) first
    offset: int  # from the start of the file

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Outermost dimension first (torch / HF order)."""
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_bytes(self) -> int:
        _, block, size = TENSOR_TYPES[self.type_id]
        return self.n_elements // block * size


class GGUFFile:
    """Parsed header plus the mmap of a GGUF file. `fields`: metadata key -> Python value
    (str, int, float, bool, or a list of them); `tensors`: the tensor table in file order."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        if buf[:4] != MAGIC:
            raise ValueError(f"{self.path!r} is not a GGUF file (no GGUF magic)")
        self.version = struct.unpack_from("<I", buf, 4)[0]
        if self.version not in (2, 3):
            if self.version > 0xFFFF:
                raise ValueError(f"{self.path!r} is a big-endian GGUF file; only little-endian files are supported")
            raise ValueError(f"{self.path!r} is GGUF version {self.version}; versions 2 and 3 are supported")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        self.fields: dict[str, Any] = {}
        try:
            for _ in range(n_kv):
                key, pos = self._string(pos)
                (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
                self.fields[key], pos = self._value(kind, pos)
            self.tensors: list[TensorInfo] = []
            for _ in range(n_tensors):
                name, pos = self._string(pos)
                (n_dims,) = struct.unpack_from("<I", buf, pos)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
                type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
                pos += 4 + 8 * n_dims + 12
                self.tensors.append(TensorInfo(name, type_id, tuple(int(d) for d in dims), offset))
        except (struct.error, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{self.path!r} has a corrupt or truncated GGUF header: {e}") from e
        align = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        self.data_start = (pos + align - 1) // align * align
        self.tensors = [TensorInfo(t.name, t.type_id, t.shape, self.data_start + t.offset) for t in self.tensors]

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._map, pos)
        end = pos + 8 + n
        if end > len(self._map):
            raise ValueError("string past the end of the file")
        return self._map[pos + 8 : end].decode("utf-8", errors="replace"), end

    def _value(self, kind: int, pos: int) -> tuple[Any, int]:
        if kind == _STRING:
            return self._string(pos)
        if kind in _SCALARS:
            fmt = "<" + _SCALARS[kind]
            return struct.unpack_from(fmt, self._map, pos)[0], pos + struct.calcsize(fmt)
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = struct.unpack_from("<IQ", self._map, pos)
        pos += 12
        if item in _NUMPY:
            arr = np.frombuffer(self._map, dtype=_NUMPY[item], count=count, offset=pos)
            return arr.tolist(), pos + arr.nbytes
        if item == _STRING:
            out = []
            buf, unpack = self._map, struct.Struct("<Q").unpack_from
            for _ in range(count):
                (n,) = unpack(buf, pos)
                out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
            return out, pos
        values = []
        for _ in range(count):
            v, pos = self._value(item, pos)
            values.append(v)
        return values, pos

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes as a read-only uint8 view of the mmap."""
        if t.type_id not in TENSOR_TYPES:
            raise ValueError(f"GGUF tensor {t.name!r} has type {t.type_name}, which fastserve does not load")
        if t.offset + t.n_bytes > len(self._map):
            raise ValueError(f"GGUF tensor {t.name!r} runs past the end of {self.path!r} (truncated file?)")
        return np.frombuffer(self._map, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
