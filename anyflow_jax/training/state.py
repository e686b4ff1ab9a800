"""Train state: one pytree holding everything that changes during training.

Frozen networks (the stage-2 real score, the consistency teacher) are *not* part of the state:
they are loaded from their named checkpoints, passed to the step as explicit jit arguments with
their own shardings, and carry no optimizer state. In a LoRA run (``config.lora.enabled``) the
state's ``params``/``ema_params``/``critic_params`` are adapter pytrees
(:class:`anyflow_jax.lora.LoraWeights` nodes) and the frozen bases they adapt travel with the
frozen teacher in a :class:`LoraFrozen`.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of completed (generator) updates
    rng: jax.Array  # uint32 key data (jax.random.key_data), so it checkpoints as a plain array
    params: Any  # trained network (teacher, flow-map student or consistency student)
    ema_params: Any
    opt_state: Any
    critic_params: Any = None  # stage 2 only
    critic_opt_state: Any = None

    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)

    @property
    def items(self) -> tuple[str, ...]:
        """Names of the non-empty fields (checkpoint items)."""
        names = ["step", "rng", "params", "ema_params", "opt_state"]
        if self.critic_params is not None:
            names += ["critic_params", "critic_opt_state"]
        return tuple(names)


@flax.struct.dataclass
class LoraFrozen:
    """The frozen arguments of a LoRA run's steps: the trained network's ``base``, the frozen
    ``teacher`` (merged once, stages that need one) and the critic's ``critic_base`` (stage 2)."""
    base: Any
    teacher: Any = None
    critic_base: Any = None


def _key_name(entry) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    return str(entry.name)


def _dict_suffix(path) -> tuple[str, ...]:
    """Trailing run of dict keys (and dataclass fields, e.g. LoRA factors) of a key path (the
    parameter path inside an optimizer state)."""
    out = []
    for entry in reversed(path):
        if isinstance(entry, (jax.tree_util.DictKey, jax.tree_util.GetAttrKey)):
            out.append(_key_name(entry))
        else:
            break
    return tuple(reversed(out))


def opt_state_shardings(abstract_opt_state, params_shardings, mesh) -> Any:
    """Shard optimizer-state leaves like the parameter they belong to (matched by path and
    shape); scalars (counters) and anything unmatched are replicated."""
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        by_path[tuple(_key_name(p) for p in path)] = s

    def fits(sharding, shape):
        if len(sharding.spec) > len(shape):
            return False
        for dim, axes in zip(shape, sharding.spec):
            axes = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
            size = 1
            for a in axes:
                size *= mesh.shape[a]
            if dim % size:
                return False
        return True

    def one(path, leaf):
        suffix = _dict_suffix(path)
        for start in range(len(suffix)):
            s = by_path.get(suffix[start:])
            if s is not None and fits(s, tuple(getattr(leaf, "shape", ()))):
                return s
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def replicated_like(tree, mesh):
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), tree)


def new_rng(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)
