"""Reads and writes safetensors files without torch, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to its dtype,
shape and byte range, then the raw bytes. Each read copies one tensor into a fresh buffer with pread (no
memory map, so a converted file's pages never count against resident memory); bf16 and fp8 come back as
`ml_dtypes` arrays.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


class CorruptFileError(ValueError):
    """A safetensors file whose header or byte ranges do not hold together."""


def _entry(e: Any) -> tuple[np.dtype, tuple[int, ...], int, int] | None:
    """(dtype, shape, begin, end) of one header entry, or None when it is malformed."""
    if not isinstance(e, dict) or not isinstance(e.get("dtype"), str) or e["dtype"] not in DTYPES:
        return None
    shape, offsets = e.get("shape"), e.get("data_offsets")
    ints = lambda v, n=None: (
        isinstance(v, list)
        and (n is None or len(v) == n)
        and all(type(x) is int and 0 <= x < 2**62 for x in v)
    )
    if not ints(shape) or not ints(offsets, 2) or offsets[0] > offsets[1]:
        return None
    return DTYPES[e["dtype"]], tuple(shape), offsets[0], offsets[1]


class SafetensorsFile:
    """One safetensors file opened for reading tensor by tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CorruptFileError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise CorruptFileError(
                    f"{self.path}: truncated or corrupt header (says {n} bytes, file {size})"
                )
            try:
                header = json.loads(f.read(n))
            except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, or nesting too deep
                raise CorruptFileError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CorruptFileError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CorruptFileError(
                f"{self.path}: corrupt safetensors header (__metadata__ is not str -> str)"
            )
        self.metadata: dict[str, str] = metadata
        self._start = 8 + n
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            entry = _entry(e)
            if entry is None:
                raise CorruptFileError(f"{self.path}: corrupt header entry for tensor {name!r}: {e}"[:300])
            dtype, shape, begin, end = entry
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise CorruptFileError(f"{self.path}: tensor {name!r} byte range does not match its shape")
            if self._start + end > size:
                raise CorruptFileError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {self._start + end}, "
                    f"file has {size}"
                )
            self._entries[name] = (dtype, shape, begin, end)
        # As the safetensors library requires: the byte ranges tile the data from 0 without gaps or overlaps.
        ranges = sorted((b, e) for _, _, b, e in self._entries.values())
        at = 0
        for b, e in ranges:
            if b != at:
                how = "overlap" if b < at else "leave gaps"
                raise CorruptFileError(
                    f"{self.path}: corrupt header: tensor byte ranges {how} at {min(b, at)}"
                )
            at = e
        if self._start + at != size:
            raise CorruptFileError(f"{self.path}: {size - self._start - at} bytes after the last tensor")
        self._file = open(self.path, "rb")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entries[name]
        return end - begin

    def read(self, name: str) -> np.ndarray:
        """Returns one tensor in a fresh host buffer (read with pread: no file pages stay mapped)."""
        dtype, shape, begin, end = self._entries[name]
        buf = np.empty(end - begin, np.uint8)
        view, offset, done = memoryview(buf), self._start + begin, 0
        while done < len(buf):
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise CorruptFileError(f"{self.path}: truncated while reading tensor {name!r}")
            done += n
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
    shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> None:
    """Writes tensors to `path` atomically (a temporary file renamed into place).

    `tensors` may be a mapping or an iterator of (name, array). With `shapes` (name -> (shape, dtype)) given
    up front, the header is written first and tensors are streamed one at a time in that order, so the
    iterator never needs to hold more than one array.
    """
    path = os.fspath(path)
    items: Iterator[tuple[str, np.ndarray]]
    if shapes is None:
        tensors = dict(tensors)
        shapes = {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in tensors.items()}
        items = iter(tensors.items())
    else:
        items = iter(tensors.items()) if isinstance(tensors, Mapping) else iter(tensors)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, (shape, dtype) in shapes.items():
        dtype = np.dtype(dtype)
        if dtype not in CODES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            names = list(shapes)
            count = 0
            for name, array in items:
                if count >= len(names) or name != names[count]:
                    raise ValueError(f"tensor {name!r} out of the header's order")
                count += 1
                shape, dtype = shapes[name]
                a = np.asarray(array)  # tobytes() writes C order; keeps 0-d arrays 0-d
                if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
                    raise ValueError(f"tensor {name!r}: got {a.shape} {a.dtype}, header says {shape} {dtype}")
                f.write(a.tobytes())
            if count != len(names):
                raise ValueError(f"{len(names) - count} tensors named in the header were never written")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
