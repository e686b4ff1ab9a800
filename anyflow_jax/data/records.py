"""ArrayRecord files of precomputed latents and text embeddings (real-data training).

One ArrayRecord record per sample. Each record is a msgpack map (see ``docs/data.md``)::

    {"format": "anyflow-latents/1",
     "latents": {"dtype": "bfloat16", "shape": [F, H, W, C], "data": <bytes>},
     "context": {"dtype": "float32",  "shape": [L, D],       "data": <bytes>},
     "caption": "a cat ...",   # optional str
     "label": 3,               # optional int
     "key": "clips/0001.mp4",  # optional str: where the sample came from (prepare writes it)
     "context_length": 12}     # optional int: the prompt's token count (context is 0 past it)

Arrays are stored as raw little-endian C-order bytes with their numpy dtype name (``bfloat16``
through ``ml_dtypes``, which JAX ships), so any msgpack reader in any language can decode them.
Files are written with ``group_size:1`` (fast random access) to a temporary sibling and renamed
into place, so a reader never sees a half-written file.
"""
from __future__ import annotations

import bisect
import operator
import os
import threading
import uuid
from typing import Any, Iterable, Mapping

import numpy as np

FORMAT = "anyflow-latents/1"
ARRAY_KEYS = ("latents", "context")
OPTIONAL_KEYS = ("caption", "label", "key", "context_length")
#: optional keys whose values are strings (kept out of batches unless asked for)
STRING_KEYS = ("caption", "key")
#: keys that describe a sample rather than feed the model (dropped unless ``include_caption``)
DESCRIPTIVE_KEYS = ("caption", "key", "context_length")
_ALLOWED_DTYPES = ("float32", "bfloat16", "float16")
_WRITER_OPTIONS = "group_size:1"


class RecordFormatError(ValueError):
    """A record file is missing, unreadable, corrupt or inconsistent (the message names it)."""


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _encode_array(x, key: str) -> dict:
    x = np.asarray(x)
    if x.dtype.name not in _ALLOWED_DTYPES:
        raise ValueError(f"{key}: dtype {x.dtype} not supported; use one of {_ALLOWED_DTYPES}")
    return {"dtype": x.dtype.name, "shape": list(x.shape),
            "data": np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes()}


def _decode_array(d: Mapping, key: str) -> np.ndarray:
    dtype = _dtype(d["dtype"]).newbyteorder("<")
    shape = tuple(int(s) for s in d["shape"])
    arr = np.frombuffer(d["data"], dtype=dtype)
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{key}: {arr.size} values for shape {shape}")
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def encode_sample(sample: Mapping[str, Any]) -> bytes:
    """Serialise one sample (``latents`` (F, H, W, C), ``context`` (L, D), optional ``caption``
    str and ``label`` int) to the record bytes described in the module docstring."""
    from flax import serialization
    missing = [k for k in ARRAY_KEYS if k not in sample]
    if missing:
        raise ValueError(f"sample is missing {missing}; got keys {sorted(sample)}")
    unknown = sorted(set(sample) - set(ARRAY_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"sample has unknown keys {unknown}; allowed: {ARRAY_KEYS + OPTIONAL_KEYS}")
    lat, ctx = np.asarray(sample["latents"]), np.asarray(sample["context"])
    if lat.ndim != 4:
        raise ValueError(f"latents must be (F, H, W, C), got shape {lat.shape}")
    if ctx.ndim != 2:
        raise ValueError(f"context must be (L, text_dim), got shape {ctx.shape}")
    rec: dict[str, Any] = {"format": FORMAT, "latents": _encode_array(lat, "latents"),
                           "context": _encode_array(ctx, "context")}
    for k in STRING_KEYS:
        if sample.get(k) is not None:
            if not isinstance(sample[k], str):
                raise ValueError(f"{k} must be a str, got {type(sample[k]).__name__}")
            rec[k] = sample[k]
    for k in ("label", "context_length"):
        if sample.get(k) is not None:
            rec[k] = int(sample[k])
    return serialization.msgpack_serialize(rec)


def decode_sample(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_sample` (arrays keep their stored dtype)."""
    from flax import serialization
    if not data:
        raise ValueError("empty record")
    rec = serialization.msgpack_restore(data)
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        got = rec.get("format") if isinstance(rec, dict) else type(rec).__name__
        raise ValueError(f"not an {FORMAT!r} record (format={got!r})")
    out: dict[str, Any] = {k: _decode_array(rec[k], k) for k in ARRAY_KEYS}
    for k in STRING_KEYS:
        if k in rec:
            out[k] = str(rec[k])
    for k in ("label", "context_length"):
        if k in rec:
            out[k] = np.asarray(rec[k], dtype=np.int32)
    return out


def _spec(sample: Mapping[str, Any]) -> dict:
    """What must agree between records: array shapes/dtypes and which optional keys exist."""
    spec = {k: (tuple(sample[k].shape), sample[k].dtype.name) for k in ARRAY_KEYS}
    spec.update({k: k in sample for k in OPTIONAL_KEYS})
    return spec


def _spec_diff(a: dict, b: dict, a_name: str = "this", b_name: str = "expected") -> str:
    """Describe how spec ``a`` differs from spec ``b`` (each entry: (shape, dtype) or presence)."""
    return "; ".join(f"{k}: {a_name} {a[k]}, {b_name} {b[k]}" for k in a if a[k] != b[k])


def write_latent_records(path, samples: Iterable[Mapping[str, Any]]) -> int:
    """Write ``samples`` to the ArrayRecord file ``path`` atomically; return the record count.

    Every sample is a mapping with ``latents`` (F, H, W, C) and ``context`` (L, text_dim) arrays
    (float32, bfloat16 or float16; kept as given) and optionally ``caption`` and ``key`` (str),
    ``label`` and ``context_length`` (int). All samples of a file must agree in shapes, dtypes and optional keys. The file is
    written to a temporary sibling and renamed into place (an existing file is replaced).
    """
    from array_record.python import array_record_module
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{path}: directory {parent} does not exist")
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    count, first = 0, None
    try:
        if not writer.ok():
            raise OSError(f"{path}: cannot open {tmp} for writing")
        for i, sample in enumerate(samples):
            try:
                data = encode_sample(sample)
            except ValueError as e:
                raise ValueError(f"{path}: sample {i}: {e}") from None
            spec = _spec({**{k: np.asarray(sample[k]) for k in ARRAY_KEYS},
                          **{k: True for k in OPTIONAL_KEYS if sample.get(k) is not None}})
            if first is None:
                first = spec
            elif spec != first:
                raise ValueError(f"{path}: sample {i} does not match sample 0 "
                                 f"({_spec_diff(spec, first, f'sample {i}', 'sample 0')})")
            writer.write(data)
            count += 1
        writer.close()
        if count == 0:
            raise ValueError(f"{path}: no samples to write")
        os.replace(tmp, path)
    except BaseException:
        if writer.is_open():
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


#: what ``python -m anyflow_jax.prepare`` writes next to its shards
MANIFEST_FILE = "manifest.json"
NEGATIVE_FILE = "negative_embedding.npy"


def resolve_record_paths(paths) -> tuple[list[str], str | None]:
    """Record files named by ``paths``: each entry is an ArrayRecord file or a ``prepare`` output
    folder (its ``manifest.json`` lists the shards). Returns ``(files, negative)`` where
    ``negative`` is the folder's negative-prompt embedding file when exactly one folder was given
    and it has one, else None."""
    import json
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    negatives: list[str] = []
    for p in (os.fspath(x) for x in paths):
        if not os.path.isdir(p):
            files.append(p)
            continue
        manifest = os.path.join(p, MANIFEST_FILE)
        if not os.path.isfile(manifest):
            raise RecordFormatError(f"{p} is a folder without {MANIFEST_FILE}: not a finished "
                                    f"`python -m anyflow_jax.prepare` output (name the .array_record files instead)")
        try:
            with open(manifest) as fh:
                listed = json.load(fh)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RecordFormatError(f"{manifest}: unreadable manifest ({type(e).__name__}: {e})") from None
        if not listed:
            raise RecordFormatError(f"{manifest} lists no record files (every input was skipped?)")
        files.extend(os.path.join(p, f) for f in listed)
        neg = os.path.join(p, NEGATIVE_FILE)
        if os.path.isfile(neg):
            negatives.append(neg)
    return files, (negatives[0] if len(negatives) == 1 else None)


def _open_reader(path: str):
    from array_record.python import array_record_module
    if "://" not in path and not os.path.exists(path):
        raise RecordFormatError(f"{path}: no such ArrayRecord file")
    reader = array_record_module.ArrayRecordReader(
        path, "readahead_buffer_size:0,max_parallelism:0")
    if not reader.ok():
        # The reader does not raise; reading surfaces the underlying status message.
        try:
            reader.read([0])
            detail = "reader status not ok"
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            detail = str(e)
        try:
            reader.close()
        except Exception:  # noqa: BLE001 - closing a failed reader reports the same status
            pass
        raise RecordFormatError(f"{path}: not a readable ArrayRecord file ({detail})")
    return reader


class ArrayRecordLatentSource:
    """Grain random-access source over one or more :func:`write_latent_records` files.

    ``src[i]`` is ``dict(latents=(F, H, W, C), context=(L, D))`` in the stored dtypes (or
    ``dtype`` if given), plus ``label`` (int32) when the records have one, and ``caption``,
    ``key`` (str) and ``context_length`` (int32) when ``include_caption`` (strings cannot become
    jax arrays, so it is off by default).
    Indices run over the files in order. Opening checks every file (exists, readable, not
    empty) and that the first record of every file has the same shapes, dtypes and optional keys;
    every read re-checks its record. Errors name the file. Picklable (readers reopen lazily), so
    it works with Grain worker processes.
    """

    def __init__(self, paths, *, dtype=None, include_caption: bool = False):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("ArrayRecordLatentSource needs at least one file")
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.include_caption = bool(include_caption)
        counts, self.spec = [], None
        for path in self.paths:
            reader = _open_reader(path)
            try:
                n = reader.num_records()
                if n == 0:
                    raise RecordFormatError(f"{path}: no records (empty or truncated file)")
                spec = _spec(self._decode(reader.read([0])[0], path, 0))
            finally:
                reader.close()
            if self.spec is None:
                self.spec, self._spec_path = spec, path
            elif spec != self.spec:
                diff = _spec_diff(spec, self.spec, os.path.basename(path),
                                  os.path.basename(self._spec_path))
                raise RecordFormatError(f"{path}: records do not match {self._spec_path} ({diff})")
            counts.append(n)
        self.counts = counts
        self._ends = list(np.cumsum(counts).tolist())
        self._readers: list = [None] * len(self.paths)
        self._lock = threading.Lock()

    @property
    def latent_shape(self) -> tuple:
        return self.spec["latents"][0]

    @property
    def context_shape(self) -> tuple:
        return self.spec["context"][0]

    def __len__(self) -> int:
        return self._ends[-1]

    @property
    def fingerprint(self) -> str:
        """File names and record counts (checked when an iterator state is restored)."""
        return ";".join(f"{os.path.basename(p)}:{n}" for p, n in zip(self.paths, self.counts))

    def __repr__(self) -> str:
        return f"ArrayRecordLatentSource({len(self.paths)} files, {len(self)} records)"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = [None] * len(self.paths)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @staticmethod
    def _decode(data: bytes, path: str, position: int) -> dict:
        try:
            return decode_sample(data)
        except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt record
            raise RecordFormatError(f"{path}: record {position} is corrupt or not in the "
                                    f"{FORMAT!r} format ({e})") from None

    def _reader(self, f: int):
        if self._readers[f] is None:
            with self._lock:
                if self._readers[f] is None:
                    self._readers[f] = _open_reader(self.paths[f])
        return self._readers[f]

    def __getitem__(self, index) -> dict[str, Any]:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"index must be an integer, got {index!r}") from None
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self!r} (valid: 0..{n - 1})")
        i %= n
        f = bisect.bisect_right(self._ends, i)
        pos = i - (self._ends[f - 1] if f else 0)
        path = self.paths[f]
        try:
            data = self._reader(f).read([pos])[0]
        except RecordFormatError:
            raise
        except Exception as e:  # noqa: BLE001
            raise RecordFormatError(f"{path}: cannot read record {pos} ({e})") from None
        sample = self._decode(data, path, pos)
        spec = _spec(sample)
        if spec != self.spec:
            raise RecordFormatError(
                f"{path}: record {pos} does not match {self._spec_path} "
                f"({_spec_diff(spec, self.spec, f'record {pos}', os.path.basename(self._spec_path))})")
        if not self.include_caption:
            for k in DESCRIPTIVE_KEYS:
                sample.pop(k, None)
        if self.dtype is not None:
            for k in ARRAY_KEYS:
                sample[k] = sample[k].astype(self.dtype)
        return sample

    def close(self) -> None:
        for r in self._readers:
            if r is not None:
                r.close()
        self._readers = [None] * len(self.paths)


def read_latent_records(path) -> list[dict[str, Any]]:
    """All samples of one file (captions included), in order; for inspection and tests."""
    src = ArrayRecordLatentSource(path, include_caption=True)
    try:
        return [src[i] for i in range(len(src))]
    finally:
        src.close()
