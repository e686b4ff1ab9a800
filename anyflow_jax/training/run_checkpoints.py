"""Run checkpoints: the train state and data iterator of a workdir (Orbax ``CheckpointManager``).

Layout (shared with the read-only side, :mod:`anyflow_jax.checkpoints.runs`): ``run.json`` and
``checkpoints/<step>/`` with one Orbax item per train-state field (``meta`` = step and RNG,
``params``, ``ema_params``, ``opt_state``, ``critic_params``, ``critic_opt_state``) plus the Grain
iterator state (``data``). Items are restored into abstract targets built from the *current*
mesh, so a run saved on one device count resumes on another.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from anyflow_jax.checkpoints.runs import CKPT_DIR, ITEMS as _ITEMS, STATE_ITEMS as _STATE_ITEMS
from anyflow_jax.training.state import TrainState


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class RunCheckpointer:
    """Save and restore :class:`TrainState` + data iterator state in ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True, read_only: bool = False):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.directory = os.path.join(os.path.abspath(workdir), CKPT_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                               enable_async_checkpointing=async_save, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, data_iterator=None, *, force: bool = True) -> bool:
        ocp = self._ocp
        step = int(np.asarray(state.step.addressable_data(0)))
        items = {"meta": ocp.args.StandardSave({"step": state.step, "rng": state.rng})}
        for name in _STATE_ITEMS[1:]:
            value = getattr(state, name)
            if value is not None:
                items[name] = ocp.args.StandardSave(value)
        if data_iterator is not None:
            # The iterator state is the same on every process (see docs/data.md), so a JSON item
            # restores on any process count (grain's own handler writes one file per process).
            items["data"] = ocp.args.JsonSave(data_iterator.get_state())
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: TrainState, data_iterator=None) -> TrainState:
        """Restore ``step`` into the shapes/dtypes/shardings of ``abstract_state`` (a TrainState of
        ``jax.ShapeDtypeStruct``); the data iterator, if given, is restored in place."""
        ocp = self._ocp
        items = {"meta": ocp.args.StandardRestore({"step": abstract_state.step, "rng": abstract_state.rng})}
        for name in _STATE_ITEMS[1:]:
            value = getattr(abstract_state, name)
            if value is not None:
                items[name] = ocp.args.StandardRestore(value)
        if data_iterator is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            data_iterator.set_state(restored["data"])
        fields = {name: restored[name] for name in _STATE_ITEMS[1:] if getattr(abstract_state, name) is not None}
        return abstract_state.replace(step=restored["meta"]["step"], rng=restored["meta"]["rng"], **fields)

    def restore_item(self, step: int, name: str, abstract: Any) -> Any:
        ocp = self._ocp
        return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(abstract)}))[name]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
