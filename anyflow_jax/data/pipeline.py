"""Training input pipeline (Grain Dataset API) and its checkpointable iterator state.

``source -> shuffle(seed) -> repeat(num_epochs) -> batch(local, drop_remainder) ->
[process_index::process_count] -> to_iter_dataset() [-> mp_prefetch(worker_count)]``

Batching happens *before* the per-process slice, at the granularity of local batches: global
step ``k`` consists of the local batches ``k * P + p`` (``p < P`` processes), i.e. exactly the
elements ``[k * G, (k + 1) * G)`` of the shuffled stream, with process ``p`` holding the
contiguous chunk ``p``. Hence

* each process reads only its own samples, and the processes' shares are disjoint;
* concatenating the local batches in process order gives, bit for bit, the batch a single
  process would build with ``global_batch_size=G`` and the same seed;
* the iterator state (``{"next_index": k}``, the number of steps taken) does not depend on the
  process count: a state saved with ``P`` processes restores with any other ``P'`` (as long as
  the source, seed and global batch size are unchanged, which :func:`make_train_iterator`'s
  iterator checks on ``set_state``).
"""
from __future__ import annotations

import json
from typing import Any

import grain

_STATE_VERSION = 1


class TrainIterator(grain.DatasetIterator):
    """The iterator :func:`make_train_iterator` returns: a Grain ``DatasetIterator`` whose state
    also records the pipeline settings, so that restoring a state into a differently configured
    pipeline (other source length or ``source.fingerprint`` where the source has one, seed,
    global batch size, epochs, shuffling or worker count) fails loudly
    instead of silently changing the data order. The process index and count are not part of
    it (see the module docstring). ``grain.checkpoint.CheckpointSave/Restore`` accept it."""

    def __init__(self, parent: grain.DatasetIterator, pipeline: dict[str, Any]):
        super().__init__(parent)
        self.pipeline = dict(pipeline)

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "pipeline": dict(self.pipeline),
                "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "grain" not in state or "pipeline" not in state:
            raise ValueError("not a TrainIterator state (expected keys 'version', 'pipeline', "
                             f"'grain'); got {type(state).__name__} "
                             f"{sorted(state) if isinstance(state, dict) else ''}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"iterator state version {state.get('version')!r} is not "
                             f"{_STATE_VERSION}")
        saved = state["pipeline"]
        diff = {k: (saved.get(k), v) for k, v in self.pipeline.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"iterator state is from a different data pipeline ({detail})")
        self._parent.set_state(state["grain"])

    def close(self) -> None:
        self._parent.close()

    def __str__(self) -> str:
        return f"TrainIterator({self.pipeline})"


def make_train_iterator(source, *, global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, shuffle: bool = True, num_epochs: int | None = None,
                        worker_count: int = 0, read_threads: int = 4,
                        prefetch_batches: int = 4) -> TrainIterator:
    """Build the training iterator over a random-access ``source`` (``__len__``/``__getitem__``).

    Yields dicts of numpy arrays with a leading local batch dimension
    ``global_batch_size // process_count`` (incomplete batches are dropped). ``num_epochs=None``
    repeats forever (each epoch reshuffled, deterministically from ``seed``). ``worker_count > 0``
    prefetches in that many worker processes (``mp_prefetch``; the source must be picklable);
    ``read_threads``/``prefetch_batches`` configure the in-process reader threads and buffer.

    In a multi-process job pass ``process_index=jax.process_index()``,
    ``process_count=jax.process_count()`` and turn the local batches into global arrays with
    :func:`anyflow_jax.data.global_batch`.
    """
    global_batch_size, process_count, process_index = (int(global_batch_size), int(process_count),
                                                        int(process_index))
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                         f"process_count={process_count}: every process loads an equal share")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and int(num_epochs) < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if int(worker_count) < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    n = len(source)
    if n < 1:
        raise ValueError(f"source {source!r} is empty")
    local = global_batch_size // process_count
    if num_epochs is not None and n * int(num_epochs) < global_batch_size:
        raise ValueError(f"{num_epochs} epoch(s) of {n} samples do not fill one global batch of "
                         f"{global_batch_size}")

    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=int(seed))
    ds = ds.repeat(None if num_epochs is None else int(num_epochs))
    ds = ds.batch(local, drop_remainder=True)
    if num_epochs is not None:
        # Every process must see the same number of steps: drop the last partial global batch.
        ds = ds[: (len(ds) // process_count) * process_count]
    ds = ds[process_index::process_count]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(read_threads),
                                                 prefetch_buffer_size=int(prefetch_batches)))
    if worker_count:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
    fingerprint = getattr(source, "fingerprint", None)
    pipeline = dict(source=str(fingerprint) if fingerprint is not None else type(source).__name__,
                    num_records=n, global_batch_size=global_batch_size,
                    seed=int(seed), shuffle=bool(shuffle),
                    num_epochs=None if num_epochs is None else int(num_epochs),
                    worker_count=int(worker_count))
    return TrainIterator(iter(it_ds), pipeline)


def _ensure_absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags (e.g. --grain_enable_multiprocess_worker_profiling)
    # and fail with UnparsedFlagAccessError outside absl.app.run (notebooks, tests, libraries).
    # Under app.run the flags are parsed already and this does nothing.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# --------------------------------------------------------------------------- checkpointing

def iterator_state_to_bytes(it: grain.DatasetIterator) -> bytes:
    """``it.get_state()`` as UTF-8 JSON bytes (Grain's own checkpoint encoding)."""
    return json.dumps(it.get_state(), sort_keys=True).encode("utf-8")


def restore_iterator_state(it: grain.DatasetIterator, data) -> grain.DatasetIterator:
    """Set ``it``'s state from :func:`iterator_state_to_bytes` output (bytes, str or the dict
    itself) and return ``it``; the next batch is the one after the saved point."""
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8")
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"iterator state is not valid JSON: {e}") from None
    it.set_state(data)
    return it


def orbax_save_args(it: grain.DatasetIterator):
    """Orbax ``CheckpointArgs`` saving ``it`` with Grain's handler (one
    ``process_<i>-of-<n>.json`` per process): ``ocp.args.Composite(data=orbax_save_args(it))``."""
    return grain.checkpoint.CheckpointSave(it)


def orbax_restore_args(it: grain.DatasetIterator):
    """Orbax ``CheckpointArgs`` restoring into ``it`` in place (Grain's handler; needs the same
    process count as the save, since the file is ``process_<i>-of-<n>.json``)."""
    return grain.checkpoint.CheckpointRestore(it)
