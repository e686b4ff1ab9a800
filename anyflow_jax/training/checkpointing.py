"""Run checkpoints (Orbax ``CheckpointManager``) and starting checkpoints of a stage.

A training workdir holds ``run.json`` (stage, model config and the full run config) and
``checkpoints/<step>/`` with one Orbax item per train-state field (``meta`` = step and RNG,
``params``, ``ema_params``, ``opt_state``, ``critic_params``, ``critic_opt_state``) plus the
Grain iterator state (``data``). Items are restored into abstract targets built from the
*current* mesh, so a run saved on one device count resumes on another, and a later stage can
read a single item (the EMA weights) of an earlier stage's workdir.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax import checkpoint as model_ckpt
from anyflow_jax.interop import diffusers as dif
from anyflow_jax.models.wan import WanTransformer3D
from anyflow_jax.training.state import TrainState

RUN_FILE = "run.json"
CKPT_DIR = "checkpoints"
_STATE_ITEMS = ("meta", "params", "ema_params", "opt_state", "critic_params", "critic_opt_state")
_ITEMS = _STATE_ITEMS + ("data",)


class RunError(ValueError):
    """A configuration or checkpoint problem that stops a run before it starts."""


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


# ----------------------------------------------------------------------------------- run.json
def write_run_file(workdir: str, meta: dict) -> None:
    path = os.path.join(workdir, RUN_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def read_run_file(workdir: str) -> dict | None:
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------------- starting points
def make_flow_map_student(model: WanTransformer3D, params, *, gate_value: float = 0.25,
                          deltatime_type: str = "r") -> tuple[WanTransformer3D, Any]:
    """A teacher as a new flow-map student: the delta embedder starts as a copy of the time
    embedder (the reference's ``setup_flowmap_model``), so the student equals the teacher on the
    diagonal r = t."""
    if model.flow_map:
        return model, params
    student = model.clone(flow_map=True, gate_value=gate_value, deltatime_type=deltatime_type)
    params = dict(params)
    ce = dict(params["condition_embedder"])
    ce["delta_embedder"] = jax.tree_util.tree_map(jnp.copy, ce["time_embedder"])
    params["condition_embedder"] = ce
    return student, params


def checkpoint_kind(path: str) -> str:
    if os.path.isfile(os.path.join(path, RUN_FILE)):
        return "workdir"
    if model_ckpt.is_model_checkpoint(path):
        return "model"
    if os.path.isfile(os.path.join(path, dif.CONFIG_NAME)):
        return "diffusers"
    raise RunError(f"{path}: not a starting checkpoint; expected a training workdir ({RUN_FILE}), an Orbax model "
                   f"checkpoint ({model_ckpt.MODEL_FILE}) or a diffusers transformer folder ({dif.CONFIG_NAME})")


def load_start(path: str, *, runtime: dict, use_ema: bool = True, field: str = "config.init") -> tuple[WanTransformer3D, Any, str]:
    """Load ``(model, params, description)`` from a workdir (its latest checkpoint, EMA weights
    by default), an Orbax model checkpoint or a diffusers folder."""
    if not path:
        raise RunError(f"{field} is empty: this stage needs a starting checkpoint")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise RunError(f"{field}={path}: no such checkpoint")
    kind = checkpoint_kind(path)
    if kind == "diffusers":
        model, params = dif.load_transformer(path, model_kwargs=runtime)
        return model, params, f"diffusers transformer {path}"
    if kind == "model":
        model, params = model_ckpt.load_model(path, model_kwargs={k: v for k, v in runtime.items() if k != "scan_layers"})
        if model.scan_layers != runtime.get("scan_layers", model.scan_layers):
            raise RunError(f"{field}={path}: stored with scan_layers={model.scan_layers}, config wants the other layout")
        return model, params, f"model checkpoint {path}"
    meta = read_run_file(path)
    model = WanTransformer3D.from_config(meta["model"], **runtime)
    ckpt = RunCheckpointer(path, read_only=True)
    step = ckpt.latest_step()
    if step is None:
        raise RunError(f"{field}={path}: the workdir has no checkpoint yet")
    from flax import linen as nn
    abstract = nn.meta.unbox(model.abstract_params())
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
    item = "ema_params" if use_ema else "params"
    try:
        params = ckpt.restore_item(step, item, abstract)
    finally:
        ckpt.close()
    return model, params, f"{meta.get('stage', '?')} workdir {path} step {step} ({item})"
