"""Per-process numpy batches -> global ``jax.Array`` batches sharded over the mesh."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DEFAULT_BATCH_AXES = ("data", "fsdp")


def _axes(mesh: Mesh, batch_axes) -> tuple[str, ...]:
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown or not axes:
        raise ValueError(f"batch axes {unknown or axes} are not mesh axes {tuple(mesh.axis_names)}")
    return axes


def batch_sharding(mesh: Mesh, batch_axes: str | Sequence[str] = DEFAULT_BATCH_AXES) -> NamedSharding:
    """``NamedSharding`` with the leading (batch) axis split over ``batch_axes``, rest replicated."""
    return NamedSharding(mesh, P(_axes(mesh, batch_axes)))


def _local_batch_shards(mesh: Mesh, axes: tuple[str, ...]) -> int:
    """How many distinct batch shards live on this process's devices."""
    names = list(mesh.axis_names)
    me = jax.process_index()
    shards = set()
    for pos, dev in np.ndenumerate(mesh.devices):
        if dev.process_index == me:
            shards.add(tuple(pos[names.index(a)] for a in axes))
    return max(len(shards), 1)


def global_batch(local_batch: Any, mesh: Mesh,
                 batch_axes: str | Sequence[str] = DEFAULT_BATCH_AXES) -> Any:
    """Assemble a global batch from this process's share, leaf by leaf.

    Every leaf of ``local_batch`` (a pytree of numpy arrays with a leading local batch
    dimension, as :func:`make_train_iterator` yields) becomes
    ``jax.make_array_from_process_local_data(NamedSharding(mesh, P(batch_axes)), leaf)``:
    the global leading dimension is the concatenation of all processes' local batches in process
    order, sharded over ``batch_axes``; other dimensions are replicated. The local batch must
    split evenly over this process's batch shards.
    """
    axes = _axes(mesh, batch_axes)
    sharding = NamedSharding(mesh, P(axes))
    n_local = _local_batch_shards(mesh, axes)
    n_total = int(np.prod([mesh.shape[a] for a in axes]))

    def convert(path, leaf):
        name = jax.tree_util.keystr(path) or "batch"
        arr = np.asarray(leaf)
        if arr.dtype.kind in "OUS":
            raise TypeError(f"{name}: dtype {arr.dtype} cannot become a jax.Array; drop it from "
                            "the batch (e.g. captions)")
        if arr.ndim == 0:
            raise ValueError(f"{name}: scalar leaf has no batch dimension")
        if arr.shape[0] % n_local:
            raise ValueError(f"{name}: local batch of {arr.shape[0]} does not split over the "
                             f"{n_local} batch shards of this process (mesh axes {axes} of total "
                             f"size {n_total}); make the global batch a multiple of {n_total}")
        return jax.make_array_from_process_local_data(sharding, arr)

    return jax.tree_util.tree_map_with_path(convert, local_batch)
