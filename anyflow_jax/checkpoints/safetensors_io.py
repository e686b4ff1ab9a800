"""Minimal safetensors reading and writing with NumPy (no torch), lazy per tensor.

Reading validates the header against the file size, so a truncated or corrupt file fails with a
message naming the file instead of returning garbage. bf16 tensors come back as
``ml_dtypes.bfloat16`` arrays (the dtype JAX uses), so they stay bf16 unless converted.
"""
from __future__ import annotations

import itertools
import json
import os
import struct
from typing import Iterable, Sequence

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


def _normalize_index(index, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per axis of a basic index (slices of step 1, fewer than ``ndim`` allowed)."""
    index = tuple(index) if isinstance(index, (tuple, list)) else (index,)
    if len(index) > len(shape):
        raise IndexError(f"index {index} has more entries than the tensor's {len(shape)} axes")
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for ix, dim in zip(index, shape):
        if not isinstance(ix, slice):
            raise IndexError(f"only slices can be read from a safetensors tensor, got {ix!r}")
        start, stop, step = ix.indices(dim)
        if step != 1:
            raise IndexError(f"only slices of step 1 can be read from a safetensors tensor, got {ix!r}")
        out.append((start, max(start, stop)))
    return tuple(out)


class SafetensorsFile:
    """Index of one safetensors file; tensors are read on demand with :meth:`read` (whole) or
    :meth:`read_slice` (only the bytes of a rectangular block).

    ``bytes_read`` counts the tensor bytes read from the file so far (both methods); ``on_read``
    (if set) is called as ``on_read(name, index, nbytes)`` after each read, ``index`` being None
    for a whole-tensor read.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.bytes_read = 0
        self.on_read = None
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
        self.bytes_read += len(buf)
        if self.on_read is not None:
            self.on_read(name, None, len(buf))
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def read_slice(self, name: str, index: Sequence[slice] | slice) -> np.ndarray:
        """``tensor[index]`` for a block ``index`` (slices of step 1), reading only its bytes.

        The block is read as contiguous runs of the row-major tensor (one ``pread`` per run,
        directly into the returned array): a block that spans whole trailing axes is one run; a
        block narrower than the last axis costs one run per row. Nothing else of the tensor is
        read or held in memory.
        """
        dtype, shape, start, _ = self.entries[name]
        bounds = _normalize_index(index, shape)
        out_shape = tuple(b - a for a, b in bounds)
        out = np.empty(out_shape, dtype=dtype)
        total = out.nbytes
        if total:
            # the innermost axis k that is not taken whole: every run covers axes k.. contiguously
            k = 0
            for ax in range(len(shape) - 1, -1, -1):
                if bounds[ax] != (0, shape[ax]):
                    k = ax
                    break
            strides = [1] * len(shape)
            for ax in range(len(shape) - 2, -1, -1):
                strides[ax] = strides[ax + 1] * shape[ax + 1]
            run = out_shape[k] * strides[k] * dtype.itemsize if shape else dtype.itemsize
            base = self._data_start + start + (bounds[k][0] * strides[k] * dtype.itemsize if shape else 0)
            view = memoryview(out.reshape(-1).view(np.uint8))
            pos = 0
            fd = os.open(self.path, os.O_RDONLY)
            try:
                for outer in itertools.product(*(range(a, b) for a, b in bounds[:k])):
                    offset = base + sum(i * s for i, s in zip(outer, strides)) * dtype.itemsize
                    got = os.preadv(fd, [view[pos:pos + run]], offset)
                    if got != run:
                        raise SafetensorsError(f"{self.path}: truncated while reading tensor {name!r}")
                    pos += run
            finally:
                os.close(fd)
        self.bytes_read += total
        if self.on_read is not None:
            self.on_read(name, bounds, total)
        return out


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
