"""Run checkpoints: the train state and data iterator of a workdir (Orbax ``CheckpointManager``).

Layout (shared with the read-only side, :mod:`anyflow_jax.checkpoints.runs`): ``run.json`` and
``checkpoints/<step>/`` with one Orbax item per train-state field (``meta`` = step and RNG,
``params``, ``ema_params``, ``opt_state``, ``critic_params``, ``critic_opt_state``) plus the Grain
iterator state (``data``). Items are restored into abstract targets built from the *current*
mesh, so a run saved on one device count resumes on another.

A LoRA run's items hold adapters; its frozen base is written once, at the start of the run, by
:func:`save_base` (``<workdir>/base/<item>``), never in a step.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np

from anyflow_jax.checkpoints import runs as run_files
from anyflow_jax.checkpoints.runs import BASE_DIR, CKPT_DIR, ITEMS as _ITEMS, STATE_ITEMS as _STATE_ITEMS
from anyflow_jax.training.state import TrainState

log = logging.getLogger(__name__)


class _ItemError(Exception):
    """Reading one item of a step failed (the message names the item for the damage report)."""

    def __init__(self, item: str, cause: BaseException):
        super().__init__(f"'{item}': {type(cause).__name__}: {cause}")
        self.item = item
DAMAGED_DIR = "damaged"  # <workdir>/damaged/<step>-<unix time>: damaged steps set aside on resume


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_base(workdir: str, items: dict[str, Any]) -> None:
    """Write a LoRA run's frozen base(s) once: ``items`` ``{name: params}`` go to
    ``<workdir>/base/<name>``. The folder is built beside (``base.tmp``) and renamed into place,
    so a reader sees all of it or none; what an interrupted start left is replaced. Every process
    calls this (Orbax writes each process's shards)."""
    import orbax.checkpoint as ocp
    workdir = os.path.abspath(workdir)
    final, tmp = os.path.join(workdir, BASE_DIR), os.path.join(workdir, BASE_DIR + ".tmp")
    primary = jax.process_index() == 0
    if primary:
        for d in (tmp, final):
            if os.path.isdir(d):
                shutil.rmtree(d)
    _barrier("anyflow_jax_base_cleared")
    checkpointer = ocp.StandardCheckpointer()
    try:
        for name, tree in items.items():
            checkpointer.save(os.path.join(tmp, name), tree)
            checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    _barrier("anyflow_jax_base_written")
    if primary:
        os.replace(tmp, final)
    _barrier("anyflow_jax_base_renamed")


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class RunCheckpointer:
    """Save and restore :class:`TrainState` + data iterator state in ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True, read_only: bool = False):
        import orbax.checkpoint as ocp
        self._ocp = ocp
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CKPT_DIR)
        self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                                     enable_async_checkpointing=async_save, read_only=read_only)
        self.read_only = read_only
        self.manager = ocp.CheckpointManager(self.directory, options=self._options, item_names=_ITEMS)

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
        ``jax.ShapeDtypeStruct``); the data iterator, if given, is restored in place.

        Each item is read on its own (the layout ``CheckpointManager`` writes), so a damaged item
        fails alone and cleanly, naming itself."""
        ocp = self._ocp
        step_dir = os.path.join(self.directory, str(step))
        targets = {"meta": {"step": abstract_state.step, "rng": abstract_state.rng}}
        targets.update({n: getattr(abstract_state, n) for n in _STATE_ITEMS[1:] if getattr(abstract_state, n) is not None})
        restored = {}
        checkpointer = ocp.StandardCheckpointer()
        try:
            for name, target in targets.items():
                try:
                    restored[name] = checkpointer.restore(os.path.join(step_dir, name), target)
                except Exception as e:  # noqa: BLE001 - named for the caller (damage or misfit)
                    raise _ItemError(name, e) from e
        finally:
            checkpointer.close()
        if data_iterator is not None:
            try:
                with open(os.path.join(step_dir, "data", "metadata")) as fh:
                    data_state = json.load(fh)
                data_iterator.set_state(data_state)
            except Exception as e:  # noqa: BLE001
                raise _ItemError("data", e) from e
        fields = {name: restored[name] for name in _STATE_ITEMS[1:] if name in restored}
        return abstract_state.replace(step=restored["meta"]["step"], rng=restored["meta"]["rng"], **fields)

    def restore_latest(self, abstract_state: TrainState, data_iterator=None) -> tuple[TrainState, int]:
        """Restore the newest intact step (see :meth:`restore`). A damaged step (an item missing,
        unreadable or truncated) is logged, set aside in ``<workdir>/damaged/`` (never deleted) and
        the next older one is tried; a step that does not fit the config is an "incompatible
        checkpoint" :class:`~anyflow_jax.errors.RunError`, and so is having no intact step."""
        items = ["meta"] + [n for n in _STATE_ITEMS[1:] if getattr(abstract_state, n) is not None]
        if data_iterator is not None:
            items.append("data")
        targets = {n: getattr(abstract_state, n) for n in items if n not in ("meta", "data")}
        damaged = []
        result = run_files.restore_newest_intact(
            self.directory, self.all_steps(), items, lambda s: self.restore(s, abstract_state, data_iterator),
            targets=targets, on_damaged=damaged.append)
        # only once an intact step was found (with none, nothing is touched: the error says why)
        if damaged and not self.read_only and jax.process_index() == 0:
            for d in damaged:
                dest = os.path.join(self.workdir, DAMAGED_DIR, f"{d.step}-{int(time.time())}")
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.rename(os.path.join(self.directory, str(d.step)), dest)
                log.warning("set the damaged checkpoint step %d aside in %s", d.step, dest)
            self.manager.close()  # the manager caches the step list
            self.manager = self._ocp.CheckpointManager(self.directory, options=self._options, item_names=_ITEMS)
        return result

    def restore_item(self, step: int, name: str, abstract: Any) -> Any:
        ocp = self._ocp
        return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(abstract)}))[name]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
