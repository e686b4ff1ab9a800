"""Training workdirs read as starting points (read-only): ``run.json``, kinds, the EMA item.

A training workdir holds ``run.json`` (stage, model config and the full run config) and
``checkpoints/<step>/`` with one Orbax item per train-state field (``meta`` = step and RNG,
``params``, ``ema_params``, ``opt_state``, ``critic_params``, ``critic_opt_state``) plus the Grain
iterator state (``data``). A LoRA run (``run.json`` has a ``lora`` entry: rank, alpha, adapted
kernel paths) checkpoints the adapters in those items and its frozen base once, in
``base/params`` (and ``base/critic_params`` for a stage-2 critic); readers merge the two
(:func:`load_start`), or take them apart (:func:`load_start_parts`). The trainer writes them
(``anyflow_jax.training.run_checkpoints``); this module only reads: a later stage, the sampler or
the evaluation load one item (the EMA weights by default) of a workdir's latest checkpoint,
without any training code.

:func:`load_start` also reads the two other checkpoint kinds, an Orbax model checkpoint
(:mod:`anyflow_jax.checkpoints.model`) and a diffusers transformer folder
(:mod:`anyflow_jax.checkpoints.diffusers`), so every command accepts all three.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

import jax

from anyflow_jax.checkpoints import diffusers as dif
from anyflow_jax.checkpoints import model as model_ckpt
from anyflow_jax.errors import RunError
from anyflow_jax.models import far_wan
from anyflow_jax.models.wan import WanTransformer3D

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CKPT_DIR = "checkpoints"
STATE_ITEMS = ("meta", "params", "ema_params", "opt_state", "critic_params", "critic_opt_state")
ITEMS = STATE_ITEMS + ("data",)
PARAM_ITEMS = ("params", "ema_params", "critic_params")
KINDS = ("workdir", "model", "diffusers")
BASE_DIR = "base"  # <workdir>/base/<item>: the frozen base of a LoRA run, written once per run


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
PIPELINE_INDEX = "model_index.json"


def pipeline_transformer(path: str) -> str | None:
    """``<path>/transformer`` when ``path`` is a diffusers pipeline folder (``model_index.json``
    and a ``transformer/`` folder with its ``config.json``), else None."""
    sub = os.path.join(path, "transformer")
    if os.path.isfile(os.path.join(path, PIPELINE_INDEX)) and os.path.isfile(os.path.join(sub, dif.CONFIG_NAME)):
        return sub
    return None


def checkpoint_kind(path: str) -> str:
    """``'workdir'``, ``'model'`` or ``'diffusers'`` (a transformer folder, or a pipeline folder
    whose ``transformer/`` is read); anything else is a :class:`RunError`."""
    if os.path.isfile(os.path.join(path, RUN_FILE)):
        return "workdir"
    if model_ckpt.is_model_checkpoint(path):
        return "model"
    if os.path.isfile(os.path.join(path, dif.CONFIG_NAME)) or pipeline_transformer(path):
        return "diffusers"
    raise RunError(f"{path}: not a starting checkpoint; expected a training workdir ({RUN_FILE}), an Orbax model "
                   f"checkpoint ({model_ckpt.MODEL_FILE}) or a diffusers transformer folder ({dif.CONFIG_NAME})")


def not_a_checkpoint(path: str) -> str:
    """The one-line reason a command refuses ``path`` (as the user wrote it) that :func:`checkpoint_kind`
    does not recognise; callers prefix their own label (a flag, a model name)."""
    return (f"{path} is not a checkpoint (expected a training workdir with {RUN_FILE}, an Orbax model checkpoint "
            f"with {model_ckpt.MODEL_FILE} or a diffusers transformer folder with {dif.CONFIG_NAME})")


def workdir_sampler(path: str) -> tuple[str | None, str | None]:
    """``(stage, sampler kind)`` of the training workdir ``path`` as its ``run.json`` names them
    (``(None, None)`` when it names no stage); an unreadable file or unknown stage raises."""
    from anyflow_jax import stages as stage_registry
    stage = (read_run_file(path) or {}).get("stage")
    return stage, (stage_registry.get(stage).sampler if stage is not None else None)


class DamagedCheckpoint(RunError):
    """A checkpoint step whose files are missing or unreadable (as opposed to one that does not fit
    the current config, which is an "incompatible checkpoint" error)."""

    def __init__(self, directory: str, step: int, item: str, reason: str):
        self.directory, self.step, self.item, self.reason = directory, step, item, reason
        super().__init__(f"checkpoint step {step} in {directory} is damaged: item {item!r} {reason}")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes(tree) -> dict[str, tuple]:
    """``{path: shape}``; paths join key names with '/', so a dataclass node (LoRA factors) and
    the dict Orbax's metadata shows for it compare equal."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    return {"/".join(_key_name(e) for e in k): tuple(v.shape) for k, v in leaves if hasattr(v, "shape")}


def check_step(directory: str, step: int, items: Sequence[str], targets: dict[str, Any] | None = None) -> None:
    """Check that every item of ``step`` is present and its metadata readable; raise
    :class:`DamagedCheckpoint` naming the first bad item. For items in ``targets`` (abstract trees
    of parameters), stored shapes must equal the target's, else a :class:`RunError` "incompatible
    checkpoint" (nothing is damaged then: the config changed)."""
    import orbax.checkpoint as ocp
    step_dir = os.path.join(directory, str(step))
    for item in items:
        path = os.path.join(step_dir, item)
        if not os.path.isdir(path):
            raise DamagedCheckpoint(directory, step, item, "is missing")
        if item == "data":
            continue
        try:
            stored = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
        except Exception as e:  # noqa: BLE001 - any failure to read the metadata is damage
            raise DamagedCheckpoint(directory, step, item, f"has unreadable metadata ({_one_line(e)})") from None
        if targets and targets.get(item) is not None:
            have, want = _shapes(stored), _shapes(targets[item])
            if item in PARAM_ITEMS and have != want:
                diff = sorted(set(have) ^ set(want)) or [k for k in sorted(want) if have[k] != want[k]]
                raise RunError(f"incompatible checkpoint: step {step} in {directory} has {item} that do not fit this "
                               f"config (first difference: {diff[0]})")
            # other items (optimizer states) may differ in container types: compare the shapes
            if sorted(have.values()) != sorted(want.values()):
                raise RunError(f"incompatible checkpoint: step {step} in {directory} has an {item} that does not fit "
                               f"this config ({len(have)} arrays stored, {len(want)} expected; trainable "
                               f"parameters changed?)")


def restore_newest_intact(directory: str, steps: Sequence[int], items: Sequence[str],
                          restore: Callable[[int], Any], *, targets: dict[str, Any] | None = None,
                          on_damaged: Callable[[DamagedCheckpoint], None] | None = None) -> tuple[Any, int]:
    """``restore(step)`` for the newest of ``steps`` whose ``items`` are intact; returns
    ``(result, step)``. Each damaged step (missing item, unreadable metadata or data) is logged,
    passed to ``on_damaged`` and skipped; with no intact step, one :class:`RunError` lists them."""
    damaged: list[DamagedCheckpoint] = []
    with _quiet_failed_reads() as quiet:
        result, step = _restore_newest(directory, steps, items, restore, targets, on_damaged, damaged, quiet)
    return result, step


def _restore_newest(directory, steps, items, restore, targets, on_damaged, damaged, quiet):
    for step in sorted(steps, reverse=True):
        try:
            check_step(directory, step, items, targets)
            try:
                result = restore(step)
            except DamagedCheckpoint:
                raise
            except RunError:
                raise
            except Exception as e:  # noqa: BLE001 - shapes fit (checked above): a read failure is damage
                item = getattr(e, "item", None) or _failed_item(e, items)
                cause = e.__cause__ if getattr(e, "item", None) and e.__cause__ is not None else e
                raise DamagedCheckpoint(directory, step, item, f"cannot be read ({_one_line(cause)})") from None
        except DamagedCheckpoint as d:
            quiet.failed = True
            damaged.append(d)
            log.warning("%s", d)
            if on_damaged is not None:
                on_damaged(d)
            continue
        if damaged:
            log.warning("using step %d, the newest intact checkpoint in %s", step, directory)
        return result, step
    if damaged:
        raise RunError(f"no intact checkpoint in {directory}: " + "; ".join(
            f"step {d.step}: item {d.item!r} {d.reason}" for d in damaged))
    raise RunError(f"{directory}: no checkpoint yet")


class _quiet_failed_reads:
    """While a step is read: when a read fails, TensorStore leaves its sibling reads' coroutines
    unfinished, and Python prints each one's exception as "Exception ignored in ..." when they
    are collected. The failure itself is reported (once, naming the step and item). Inside the
    window every such echo is dropped; after a failed read, the echoes of the unfinished read
    coroutines only (:func:`_is_failed_read_echo`) stay dropped for the rest of the process,
    since Orbax's event-loop thread may release them later; any other unraisable is printed."""
    failed = False

    def __enter__(self):
        self._old = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: None
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if exc_type is not None or self.failed:
                gc.collect()
        finally:
            sys.unraisablehook = self._old
            if exc_type is not None or self.failed:
                _drop_failed_read_echoes()


def _is_failed_read_echo(unraisable) -> bool:
    obj = getattr(unraisable, "object", None)
    code = getattr(obj, "cr_code", None)
    return code is not None and "orbax" in code.co_filename and "read" in code.co_name


def _drop_failed_read_echoes() -> None:
    """Install (once) an unraisable hook that drops :func:`_is_failed_read_echo` and passes
    everything else to the hook it replaces."""
    if getattr(sys.unraisablehook, "_drops_failed_read_echoes", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_failed_read_echo(unraisable):
            previous(unraisable)
    hook._drops_failed_read_echoes = True
    sys.unraisablehook = hook


def _failed_item(e: BaseException, items: Sequence[str]) -> str:
    text = str(e)
    for item in sorted(items, key=len, reverse=True):
        if f"/{item}/" in text or f"'{item}'" in text or f'"{item}"' in text:
            return item
    return "/".join(items)


def run_steps(workdir: str) -> list[int]:
    """Committed checkpoint steps of a workdir (folders ``checkpoints/<int>``), ascending."""
    directory = os.path.join(os.path.abspath(workdir), CKPT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()
                  and os.path.isfile(os.path.join(directory, n, "_CHECKPOINT_METADATA")))


def restore_run_item(workdir: str, item: str, abstract: Any, step: int | None = None) -> tuple[Any, int]:
    """Restore one item of a workdir's checkpoint into ``abstract`` (a tree of
    ``jax.ShapeDtypeStruct`` with shardings): the newest intact step, or exactly ``step``.
    Damaged steps are skipped with a warning (this reader changes nothing on disk). Returns
    ``(tree, step)``."""
    import orbax.checkpoint as ocp
    directory = os.path.join(os.path.abspath(workdir), CKPT_DIR)
    steps = [step] if step is not None else run_steps(workdir)
    if not steps:
        raise RunError("the workdir has no checkpoint yet")
    checkpointer = ocp.StandardCheckpointer()  # one item, read directly: no manager, nothing written

    def restore(s):
        return checkpointer.restore(os.path.join(directory, str(s), item), abstract)
    try:
        return restore_newest_intact(directory, steps, [item], restore, targets={item: abstract})
    finally:
        checkpointer.close()


@dataclasses.dataclass
class StartParts:
    """A starting checkpoint taken apart: ``base`` parameters and, for a LoRA workdir, its
    ``adapters`` (``None`` otherwise: ``base`` is then the whole network)."""
    model: WanTransformer3D
    base: Any
    adapters: Any
    description: str

    def merged(self):
        """The network's effective parameters (the adapters merged once; the base itself when
        there are none)."""
        if self.adapters is None:
            return self.base
        from anyflow_jax import lora
        return lora.merge(self.base, self.adapters)


def lora_info(meta: dict | None) -> dict | None:
    """The ``lora`` entry of a ``run.json`` (``None`` for a full fine-tune)."""
    return (meta or {}).get("lora") or None


def lora_target_paths(info: dict, which: str = "params") -> list[tuple[str, ...]]:
    """Adapted kernel paths of a LoRA run's ``params`` (student) or ``critic_params``."""
    key = "critic_targets" if which == "critic_params" else "targets"
    return [tuple(p.split("/")) for p in info[key]]


def boxed_abstract_params(model: WanTransformer3D):
    """``model.abstract_params()`` (shapes with logical-axis boxes), computed once per model
    configuration (a module is equal to another with the same fields; tracing the init takes a
    noticeable fraction of a second even for a tiny model)."""
    try:
        return _cached_abstract_params(model)
    except TypeError:  # a field that cannot be hashed
        return model.abstract_params()


@functools.lru_cache(maxsize=32)
def _cached_abstract_params(model):
    return model.abstract_params()


def _placed(abstract, mesh, shardings_of):
    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                                  shardings_of())


def abstract_params(model: WanTransformer3D, mesh=None):
    """The model's parameters as ``ShapeDtypeStruct``s placed on ``mesh`` (sharded by
    ``parallel.DEFAULT_RULES``) or on the default device."""
    from flax import linen as nn
    from anyflow_jax import parallel
    return _placed(nn.meta.unbox(boxed_abstract_params(model)), mesh,
                   lambda: parallel.param_shardings(boxed_abstract_params(model), mesh))


def abstract_run_adapters(model: WanTransformer3D, info: dict, which: str = "params", mesh=None):
    """The adapters of a LoRA run's item ``which`` (``params``/``ema_params``/``critic_params``)
    as placed ``ShapeDtypeStruct``s with their :class:`~anyflow_jax.lora.LoraWeights` nodes."""
    from flax import linen as nn
    from anyflow_jax import lora
    base = nn.meta.unbox(boxed_abstract_params(model))
    full = [tuple(p.split("/")) for p in info.get("full", [])] if which != "critic_params" else []
    abstract = lora.abstract_adapters(base, lora_target_paths(info, which), int(info["rank"]), float(info["alpha"]),
                                      full=full)
    return _placed(abstract, mesh, lambda: lora.adapter_shardings(abstract, boxed_abstract_params(model), mesh))


def restore_base(workdir: str, model: WanTransformer3D, item: str = "params", mesh=None):
    """The frozen base of a LoRA run (``<workdir>/base/<item>``), placed like :func:`abstract_params`."""
    import orbax.checkpoint as ocp
    path = os.path.join(os.path.abspath(workdir), BASE_DIR, item)
    if not os.path.isdir(path):
        raise RunError(f"{workdir} is a LoRA run without its frozen base ({BASE_DIR}/{item} is missing)")
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(path, abstract_params(model, mesh))
    except Exception as e:  # noqa: BLE001
        raise RunError(f"{workdir}: the frozen base {BASE_DIR}/{item} cannot be read ({_one_line(e)})") from None
    finally:
        checkpointer.close()


def load_start_parts(path: str, *, runtime: dict, use_ema: bool = True, field: str = "config.init",
                     mesh=None, critic: bool = False) -> StartParts:
    """Like :func:`load_start`, with a LoRA workdir's base and adapters apart (the EMA adapters by
    default; ``critic``: its stage-2 critic's base and adapters). Every other kind gives its
    parameters as ``base`` and no adapters."""
    if not path:
        raise RunError(f"{field} is empty: this stage needs a starting checkpoint")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise RunError(f"{field}={path}: no such checkpoint")
    kind = checkpoint_kind(path)
    if kind == "diffusers":
        path = pipeline_transformer(path) or path
        model, params = dif.load_transformer(path, model_kwargs=runtime, mesh=mesh)
        return StartParts(model, params, None, f"diffusers transformer {path}")
    if kind == "model":
        model, params = model_ckpt.load_model(path, model_kwargs={k: v for k, v in runtime.items() if k != "scan_layers"},
                                              mesh=mesh)
        if model.scan_layers != runtime.get("scan_layers", model.scan_layers):
            raise RunError(f"{field}={path}: stored with scan_layers={model.scan_layers}, config wants the other layout")
        return StartParts(model, params, None, f"model checkpoint {path}")
    meta = read_run_file(path)
    model = far_wan.model_from_config(meta["model"], **runtime)  # a FAR run's config names its class
    info = lora_info(meta)
    if critic:
        if info is None or not info.get("critic_targets"):
            raise RunError(f"{field}={path}: not a LoRA run with a critic")
        item = "critic_params"
    else:
        item = "ema_params" if use_ema else "params"
    try:
        if info is None:
            params, step = restore_run_item(path, item, abstract_params(model, mesh))
            return StartParts(model, params, None, f"{meta.get('stage', '?')} workdir {path} step {step} ({item})")
        adapters, step = restore_run_item(path, item, abstract_run_adapters(model, info, item, mesh))
        base = restore_base(path, model, "critic_params" if critic else "params", mesh)
    except RunError as e:
        raise RunError(f"{field}={path}: {e}") from None
    return StartParts(model, base, adapters, f"{meta.get('stage', '?')} LoRA workdir {path} step {step} ({item}, "
                                             f"rank {info['rank']})")


def load_start(path: str, *, runtime: dict, use_ema: bool = True,
               field: str = "config.init", mesh=None) -> tuple[WanTransformer3D, Any, str]:
    """Load ``(model, params, description)`` from a workdir (its latest checkpoint, EMA weights
    by default), an Orbax model checkpoint or a diffusers folder.

    A LoRA workdir gives its base with the adapters merged once (``W + (alpha/r) A @ B``).
    With a ``mesh`` the params come back on it, sharded by ``parallel.DEFAULT_RULES``, each
    device's shards read on their own (no whole host copy); without one, on the default device."""
    parts = load_start_parts(path, runtime=runtime, use_ema=use_ema, field=field, mesh=mesh)
    params = parts.merged()
    parts.base = parts.adapters = None
    return parts.model, params, parts.description
