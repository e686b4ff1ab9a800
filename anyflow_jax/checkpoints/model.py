"""Model checkpoints in Orbax format: a directory with ``model.json`` + ``params/``.

``model.json`` holds the network's diffusers-style config (so the model can be rebuilt without
the original checkpoint); ``params/`` is an Orbax ``StandardCheckpointer`` tree. This is what
``tools/convert_checkpoint.py`` writes from a diffusers folder, and what a training stage can
start from. Directories appear atomically (written to a temporary sibling, then renamed).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from anyflow_jax.checkpoints.diffusers import CheckpointError, atomic_directory, check_params
from anyflow_jax.models.far_wan import model_from_config
from anyflow_jax.models.wan import WanTransformer3D

MODEL_FILE = "model.json"
PARAMS_DIR = "params"
FORMAT = "anyflow-jax-model/1"
_RUNTIME_FIELDS = ("dtype", "attention_impl", "scan_layers", "remat_policy")


def save_model(path, model: WanTransformer3D, params, *, overwrite: bool = False) -> None:
    """Write ``model``'s config and ``params`` (dtypes kept) as an Orbax model checkpoint."""
    import orbax.checkpoint as ocp
    check_params(model, params)
    meta = {"format": FORMAT, "config": model.to_config(), "scan_layers": model.scan_layers}

    def write(tmp):
        with open(os.path.join(tmp, MODEL_FILE), "w") as fh:
            json.dump(meta, fh, indent=2)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
        ckptr.wait_until_finished()
        ckptr.close()

    atomic_directory(path, write, overwrite=overwrite)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def is_model_checkpoint(path) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MODEL_FILE))


def load_model(path, *, dtype=jnp.float32, model_kwargs: Mapping[str, Any] | None = None,
               shardings=None, mesh=None, rules=None):
    """Rebuild ``(model, params)`` from :func:`save_model` output.

    ``dtype=None`` keeps stored dtypes. ``shardings`` (a tree of ``jax.sharding.Sharding`` for
    the params), or ``mesh`` with logical ``rules`` (default ``parallel.DEFAULT_RULES``; the
    shardings :func:`parallel.param_shardings` gives for the model), restores each array
    directly onto a mesh, whatever device count it was saved on: Orbax reads only each device's
    shards, so no whole host copy of the params is made.
    The stored layer layout (scanned or not) is used; ``model_kwargs`` may set other runtime
    fields (compute ``dtype``, ``attention_impl``, ``remat_policy``).
    """
    import orbax.checkpoint as ocp
    if shardings is not None and (mesh is not None or rules is not None):
        raise ValueError("pass either shardings or mesh (with rules), not both")
    if rules is not None and mesh is None:
        raise ValueError("rules need a mesh")
    path = os.path.abspath(os.fspath(path))
    meta_path = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path}: not an anyflow-jax model checkpoint (no {MODEL_FILE})")
    with open(meta_path) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    runtime = dict(model_kwargs or {})
    unknown = sorted(set(runtime) - set(_RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"model_kwargs may only set {_RUNTIME_FIELDS}; got {unknown}")
    if runtime.get("scan_layers", meta["scan_layers"]) != meta["scan_layers"]:
        raise ValueError("scan_layers differs from the stored layout; convert via the diffusers format instead")
    runtime["scan_layers"] = meta["scan_layers"]
    if dtype is not None:
        runtime.setdefault("dtype", jnp.dtype(dtype))
    model = model_from_config(meta["config"], **runtime)  # a FAR config builds the FAR network
    if mesh is not None:
        from anyflow_jax import parallel
        shardings = parallel.param_shardings(model.abstract_params(), mesh,
                                             parallel.DEFAULT_RULES if rules is None else rules)
    ckptr = ocp.StandardCheckpointer()
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path}: the model checkpoint is damaged: {PARAMS_DIR}/ is missing")
    try:
        stored = ckptr.metadata(params_dir).item_metadata.tree
    except Exception as e:  # noqa: BLE001 - unreadable metadata
        raise CheckpointError(f"{path}: the model checkpoint is damaged: unreadable metadata ({_one_line(e)})") from None

    def target(leaf, sharding=None):
        dt = leaf.dtype if dtype is None else jnp.dtype(dtype)
        sharding = sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(tuple(leaf.shape), dt, sharding=sharding)

    is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    if shardings is None:
        abstract = jax.tree_util.tree_map(target, stored, is_leaf=is_meta)
    else:
        try:
            abstract = jax.tree_util.tree_map(target, stored, shardings, is_leaf=is_meta)
        except (ValueError, TypeError, KeyError) as e:
            if mesh is None:
                raise
            raise CheckpointError(f"{path}: the stored parameters do not match the model of {MODEL_FILE} "
                                  f"({_one_line(e)})") from None
    try:
        params = ckptr.restore(params_dir, abstract)
    except Exception as e:  # noqa: BLE001 - the shapes come from the metadata: a failure is damage
        raise CheckpointError(f"{path}: the model checkpoint is damaged: its parameters cannot be read "
                              f"({_one_line(e)})") from None
    finally:
        ckptr.close()
    check_params(model, params)
    return model, params
