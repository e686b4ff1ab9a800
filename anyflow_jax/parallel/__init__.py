"""Device meshes and the logical-axis rules that place parameters and batches on them.

Every parameter carries logical axis names (``nn.with_logical_partitioning``). One rule table
maps logical names to mesh axes; :func:`param_shardings` turns the abstract (boxed) parameter
tree of a model into ``NamedSharding``s for ``jax.jit`` / ``jax.device_put``.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded parameters and
optimizer state) and ``tensor`` (tensor parallel over heads and MLP features). The batch is
split over ``('data', 'fsdp')``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("mod", "tensor"),
    ("text_embed", None),
    ("freq", None),
    ("patch", None),
    ("patch_out", None),
    ("norm", None),
    ("layers", None),
    # the rank axis of LoRA factors (anyflow_jax/lora.py): small, replicated; the factors' other
    # axis is named like the adapted kernel's, so A @ B lands where the kernel lives
    ("lora_rank", None),
    # the Wan VAE's conv kernels (models/wan_vae.py): small weights, replicated
    ("conv_in", None),
    ("conv_out", None),
    # activations (models/wan.py ``constrain``): the batch as above, the residual stream's tokens
    # over ``tensor`` (sequence parallelism between the tensor-parallel attention and MLP),
    # heads / MLP features over ``tensor`` like their weights, the rest replicated
    ("seq", "tensor"),
    ("act_len", None),
    ("act_embed", None),
    ("head_dim", None),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int, *,
                       allow_subset: bool = False) -> tuple[int, int, int]:
    """Mesh sizes for ``num_devices``; one size may be -1 (the rest). With ``allow_subset`` a
    fully specified mesh may use fewer devices than there are (single-process runs only)."""
    sizes = [int(data), int(fsdp), int(tensor)]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot be split into mesh data={data}, fsdp={fsdp}, tensor={tensor}")
        sizes[sizes.index(-1)] = num_devices // known
    n = math.prod(sizes)
    if n > num_devices or (n < num_devices and not allow_subset):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {n} "
                         f"devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None,
              *, allow_subset: bool = False) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axis types. One size may be -1 (the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(data, fsdp, tensor, len(devices), allow_subset=allow_subset)
    devices = devices[:math.prod(sizes)]
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _rules_dict(rules) -> dict[str, Any]:
    return dict(rules) if not isinstance(rules, Mapping) else dict(rules)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for one array. A dimension that its mesh axes do not divide, or whose axes
    are already used by an earlier dimension, stays replicated."""
    rules = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule (known: {sorted(rules)})")
        axes = rules[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def logical_names(boxed_params) -> Any:
    """Tree of logical-name tuples; fails naming any parameter that has none."""
    def names(path, leaf):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise ValueError(f"parameter {jax.tree_util.keystr(path)} has no logical axis names")
        return tuple(leaf.names)
    return jax.tree_util.tree_map_with_path(names, boxed_params,
                                            is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def param_shardings(boxed_abstract_params, mesh: Mesh, rules=DEFAULT_RULES):
    """``NamedSharding`` tree (unboxed structure) for a boxed abstract parameter tree."""
    def one(leaf):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            raise ValueError("parameter without logical axis names; build params with the model's init")
        return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules))
    return jax.tree_util.tree_map(one, boxed_abstract_params,
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def shard_params(params, shardings):
    """Place an (unboxed) parameter tree on the mesh."""
    return jax.device_put(params, shardings)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ``('data', 'fsdp')``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def unsharded_fraction(params) -> float:
    """Share of parameter elements that are fully replicated (a guard against forgotten rules)."""
    total = rep = 0
    for leaf in jax.tree_util.tree_leaves(params):
        n = int(np.prod(leaf.shape))
        total += n
        if all(s is None for s in leaf.sharding.spec):
            rep += n
    return rep / max(total, 1)
