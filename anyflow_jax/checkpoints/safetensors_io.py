"""Minimal safetensors reading and writing with NumPy (no torch), lazy per tensor.

Reading validates the header against the file size, so a truncated or corrupt file fails with a
message naming the file instead of returning garbage. bf16 tensors come back as
``ml_dtypes.bfloat16`` arrays (the dtype JAX uses), so they stay bf16 unless converted.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as one."""


class SafetensorsFile:
    """Index of one safetensors file; tensors are read on demand with :meth:`read`."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(
                    f"{self.path}: corrupt or truncated safetensors file (header of {n} bytes, file of {size} bytes)")
            try:
                header = json.loads(fh.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: unreadable safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        available = size - self._data_start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: bad header entry for tensor {name!r}: {info}") from None
            if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or start > end:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has inconsistent offsets {start}..{end} for {shape} {info['dtype']}")
            if end > available:
                raise SafetensorsError(
                    f"{self.path}: truncated safetensors file: tensor {name!r} needs bytes up to {end} "
                    f"but the file holds only {available} bytes of data")
            self.entries[name] = (dtype, shape, start, end)

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.entries[name][0]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self.entries[name]
        with open(self.path, "rb") as fh:
            fh.seek(self._data_start + start)
            buf = fh.read(end - start)
        if len(buf) != end - start:
            raise SafetensorsError(f"{self.path}: truncated while reading tensor {name!r}")
        return np.frombuffer(buf, dtype=dtype).reshape(shape)


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None,
                      on_tensor=None) -> int:
    """Write ``(name, array)`` pairs to ``path``; returns the number of bytes written.

    Arrays are taken in order and written one at a time (the header is computed from shapes and
    dtypes first, so ``tensors`` may be a list of lazily materialised arrays). ``on_tensor(name)``
    is called after each tensor is written (progress reporting).
    """
    items = list(tensors)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in items:
        dt = np.dtype(arr.dtype)
        if dt not in _NAMES:
            raise SafetensorsError(f"cannot store tensor {name!r} of dtype {dt} in safetensors")
        nbytes = int(np.prod(arr.shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": _NAMES[dt], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, arr in items:
            fh.write(np.ascontiguousarray(np.asarray(arr)).tobytes())
            if on_tensor is not None:
                on_tensor(name)
        fh.flush()
        os.fsync(fh.fileno())
    return 8 + len(raw) + offset
