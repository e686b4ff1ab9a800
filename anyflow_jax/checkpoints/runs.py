"""Training workdirs read as starting points (read-only): ``run.json``, kinds, the EMA item.

A training workdir holds ``run.json`` (stage, model config and the full run config) and
``checkpoints/<step>/`` with one Orbax item per train-state field (``meta`` = step and RNG,
``params``, ``ema_params``, ``opt_state``, ``critic_params``, ``critic_opt_state``) plus the Grain
iterator state (``data``). The trainer writes them (``anyflow_jax.training.run_checkpoints``);
this module only reads: a later stage, the sampler or the evaluation load one item (the EMA
weights by default) of a workdir's latest checkpoint, without any training code.

:func:`load_start` also reads the two other checkpoint kinds, an Orbax model checkpoint
(:mod:`anyflow_jax.checkpoints.model`) and a diffusers transformer folder
(:mod:`anyflow_jax.checkpoints.diffusers`), so every command accepts all three.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax

from anyflow_jax.checkpoints import diffusers as dif
from anyflow_jax.checkpoints import model as model_ckpt
from anyflow_jax.errors import RunError
from anyflow_jax.models.wan import WanTransformer3D

RUN_FILE = "run.json"
CKPT_DIR = "checkpoints"
STATE_ITEMS = ("meta", "params", "ema_params", "opt_state", "critic_params", "critic_opt_state")
ITEMS = STATE_ITEMS + ("data",)
KINDS = ("workdir", "model", "diffusers")


# ----------------------------------------------------------------------------------- run.json
def write_run_file(workdir: str, meta: dict) -> None:
    """Write ``<workdir>/run.json`` atomically."""
    path = os.path.join(workdir, RUN_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def read_run_file(workdir: str) -> dict | None:
    """``run.json`` of ``workdir`` as a dict, or None when there is none."""
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------------- kinds
def checkpoint_kind(path: str) -> str:
    """``'workdir'``, ``'model'`` or ``'diffusers'``; anything else is a :class:`RunError`."""
    if os.path.isfile(os.path.join(path, RUN_FILE)):
        return "workdir"
    if model_ckpt.is_model_checkpoint(path):
        return "model"
    if os.path.isfile(os.path.join(path, dif.CONFIG_NAME)):
        return "diffusers"
    raise RunError(f"{path}: not a starting checkpoint; expected a training workdir ({RUN_FILE}), an Orbax model "
                   f"checkpoint ({model_ckpt.MODEL_FILE}) or a diffusers transformer folder ({dif.CONFIG_NAME})")


def restore_run_item(workdir: str, item: str, abstract: Any, step: int | None = None) -> tuple[Any, int]:
    """Restore one item of a workdir's checkpoint (the latest unless ``step``) into ``abstract``
    (a tree of ``jax.ShapeDtypeStruct`` with shardings); returns ``(tree, step)``."""
    import orbax.checkpoint as ocp
    directory = os.path.join(os.path.abspath(workdir), CKPT_DIR)
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise RunError(f"{workdir}: the workdir has no checkpoint yet")
        tree = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))[item]
    finally:
        manager.close()
    return tree, step


def load_start(path: str, *, runtime: dict, use_ema: bool = True,
               field: str = "config.init") -> tuple[WanTransformer3D, Any, str]:
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
    from flax import linen as nn
    abstract = nn.meta.unbox(model.abstract_params())
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
    item = "ema_params" if use_ema else "params"
    try:
        params, step = restore_run_item(path, item, abstract)
    except RunError as e:
        raise RunError(f"{field}={e}") from None
    return model, params, f"{meta.get('stage', '?')} workdir {path} step {step} ({item})"
