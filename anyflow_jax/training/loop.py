"""The training loop behind ``python -m anyflow_jax.train``, in four named phases.

1. :func:`build_run`: the config is read once into a typed :class:`~anyflow_jax.config.RunConfig`
   (every mistake is reported before anything is loaded or compiled), the mesh is built, the
   networks come from their starting checkpoints (or, when resuming, from the workdir's
   ``run.json``), and the optimizers, step functions and shardings are derived from the stage's
   registry record.
2. :func:`restore_or_init`: the train state is restored from the workdir's latest checkpoint
   (onto the current mesh, whatever device count it was saved on) or initialised directly
   sharded (``jax.jit(init, out_shardings=...)``).
3. :func:`compile_steps`: each step is one ``jax.jit`` with explicit in/out shardings and the
   state donated, compiled ahead of time with its memory analysis logged.
4. :func:`run_loop`: periodic metrics, checkpoints, a stop on a non-finite loss (checked one step
   late, so the host never waits for the device except at log and checkpoint steps) and a clean
   save on SIGTERM.

Nothing here depends on which stage runs: the stage's record (:mod:`anyflow_jax.stages`) says
which networks it needs and supplies the objective.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from anyflow_jax import config as config_lib
from anyflow_jax import data as data_lib
from anyflow_jax import fileio, parallel
from anyflow_jax import lora as lora_lib
from anyflow_jax.checkpoints import runs as run_files
from anyflow_jax.config import RunConfig
from anyflow_jax.errors import Preempted, RunError
from anyflow_jax.models import far_wan
from anyflow_jax.models.wan import WanTransformer3D, make_flow_map_student
from anyflow_jax.stages import Stage
from anyflow_jax.training import evaluators as evaluators_lib
from anyflow_jax.training import far_student, optim, steps
from anyflow_jax.training import writers as writers_lib
from anyflow_jax.training.run_checkpoints import RunCheckpointer, save_base
from anyflow_jax.training.state import LoraFrozen, TrainState, new_rng, opt_state_shardings

log = logging.getLogger("anyflow_jax.train")

_RUNTIME = ("dtype", "attention_impl", "scan_layers", "remat_policy")
_FLOW_MAP_FIELDS = ("gate_value", "deltatime_type")
PARAMETERS_FILE = "parameters.txt"


class NonFiniteLoss(RuntimeError):
    pass


def host_value(x) -> np.ndarray:
    """A replicated (or single-device) array on the host, also in multi-process runs."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


# ----------------------------------------------------------------------------------- config
def validate_config(config, *, process_count: int | None = None) -> RunConfig:
    """Read ``config`` into a :class:`RunConfig` and check it against the devices; fail before
    any compilation, naming the field."""
    cfg = config if isinstance(config, RunConfig) else config_lib.parse(config)
    pc = process_count or jax.process_count()
    data_axes, _ = _mesh_sizes(cfg, pc)
    gbs = cfg.data.global_batch_size
    if gbs % data_axes:
        raise RunError(f"config.data.global_batch_size={gbs} is not divisible by the data axes "
                       f"(data x fsdp = {data_axes})")
    if gbs % pc:
        raise RunError(f"config.data.global_batch_size={gbs} is not divisible by the {pc} processes")
    return cfg


def _mesh_sizes(cfg: RunConfig, process_count: int, num_devices: int | None = None,
                allow_subset: bool | None = None) -> tuple[int, tuple[int, int, int]]:
    m = cfg.mesh
    allow_subset = process_count == 1 if allow_subset is None else allow_subset
    try:
        sizes = parallel.resolve_mesh_shape(m.data, m.fsdp, m.tensor,
                                            jax.device_count() if num_devices is None else num_devices,
                                            allow_subset=allow_subset)
    except ValueError as e:
        raise RunError(f"config.mesh: {e}") from None
    return sizes[0] * sizes[1], sizes


def make_run_mesh(cfg: RunConfig, devices=None, *, allow_subset: bool | None = None):
    """The ``(data, fsdp, tensor)`` mesh of ``config.mesh`` over ``devices`` (default: every
    device; a fully specified smaller mesh uses the first ones in a single-process run)."""
    pcount = jax.process_count()
    allow_subset = pcount == 1 if allow_subset is None else allow_subset
    devs = None if devices is None else list(devices)
    _, sizes = _mesh_sizes(cfg, pcount, None if devs is None else len(devs), allow_subset)
    return parallel.make_mesh(*sizes, devices=devs, allow_subset=allow_subset)


def _runtime(cfg: RunConfig) -> dict[str, Any]:
    out = {k: cfg.model[k] for k in _RUNTIME if k in cfg.model}
    if isinstance(out.get("dtype"), str):
        out["dtype"] = jnp.dtype(out["dtype"])
    return out


def _architecture(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.model.items()
            if k not in _RUNTIME and k != "flow_map" and k not in far_student.FAR_FIELDS}


def _check_architecture(cfg: RunConfig, model: WanTransformer3D | dict, what: str) -> None:
    """Architecture fields set in config.model must equal the loaded checkpoint's (a model or
    its ``to_config()`` dict)."""
    have = model if isinstance(model, dict) else model.to_config()
    for k, v in cfg.model.items():
        if k in _RUNTIME or k in _FLOW_MAP_FIELDS or k not in have:
            continue
        want = list(v) if isinstance(v, (tuple, list)) else v
        if have[k] != want:
            raise RunError(f"incompatible checkpoint: {what} has {k}={have[k]!r} but config.model.{k}={want!r}")


# ----------------------------------------------------------------------------------- networks
@dataclasses.dataclass
class Networks:
    """The networks of a run before they are placed on the mesh.

    ``student_params`` is a host/single-device tree, or ``None`` with ``student_init`` (a
    function of no arguments returning fresh parameters, run sharded) or when resuming.

    With LoRA (``config.lora.enabled``) ``student_params`` and ``critic_params`` are the frozen
    *bases* (restored from the workdir when resuming) and ``adapters``/``critic_adapters`` the
    adapters carried over from the starting checkpoints (``None``: fresh ones); the teacher is
    always whole (a LoRA teacher run's adapters merged once).
    """
    student: WanTransformer3D
    student_params: Any = None
    student_init: Callable[[], Any] | None = None
    teacher: WanTransformer3D | None = None
    teacher_params: Any = None
    critic_params: Any = None  # start of the critic (None when resuming)
    adapters: Any = None
    critic_adapters: Any = None
    notes: list[str] = dataclasses.field(default_factory=list)


def _load(path: str, cfg: RunConfig, field: str, mesh=None):
    return run_files.load_start(path, runtime=_runtime(cfg), use_ema=cfg.init.use_ema, field=field, mesh=mesh)


def _load_parts(path: str, cfg: RunConfig, field: str, mesh=None) -> run_files.StartParts:
    return run_files.load_start_parts(path, runtime=_runtime(cfg), use_ema=cfg.init.use_ema, field=field, mesh=mesh)


# ----------------------------------------------------------------------------------- LoRA
def _target_spec(value: tuple, default: str):
    if not value:
        return default
    if len(value) == 1 and value[0] in lora_lib.WAN_TARGETS:
        return value[0]
    return list(value)


def lora_targets(cfg: RunConfig, model: WanTransformer3D, *, critic: bool = False) -> list[tuple[str, ...]]:
    """The adapted kernel paths of the trained network (``critic``: of stage 2's critic) for
    ``config.lora``; a pattern that matches nothing names the field."""
    value = cfg.lora.critic_targets if critic else cfg.lora.targets
    default = "critic" if critic else ("student" if model.flow_map else "teacher")
    try:
        return [t.path for t in lora_lib.wan_targets(model, _target_spec(value, default))]
    except lora_lib.LoraError as e:
        raise RunError(f"config.lora.{'critic_targets' if critic else 'targets'}: {e}") from None


def lora_full_paths(cfg: RunConfig, model: WanTransformer3D, *, critic: bool = False) -> list[tuple[str, ...]]:
    """The student's leaves trained in full next to its adapters (``config.lora.train_in_full``;
    the critic has none)."""
    if critic or not cfg.lora.train_in_full:
        return []
    try:
        return lora_lib.full_paths(_unboxed_abstract(model), cfg.lora.train_in_full)
    except lora_lib.LoraError as e:
        raise RunError(f"config.lora.train_in_full: {e}") from None


def _carry_adapters(cfg: RunConfig, model: WanTransformer3D, base, adapters, *, critic: bool = False):
    """``(base, adapters, note)`` for a LoRA network starting from ``base`` + ``adapters``: the
    adapters the run trains (same target, rank and alpha) continue; any other is merged into the
    base, so the network starts exactly as its starting checkpoint."""
    if adapters is None:
        return base, None, "fresh adapters"
    targets = set(lora_targets(cfg, model, critic=critic))
    full = set(lora_full_paths(cfg, model, critic=critic))
    rank, alpha = cfg.lora.rank, cfg.lora.scale_alpha
    keep: dict = {}
    fold: dict = {}
    for path, lw in lora_lib._flat_adapters(adapters):
        if isinstance(lw, lora_lib.DenseDelta):
            ok = path in full
        else:
            ok = path in targets and lw.rank == rank and float(lw.alpha) == alpha
        lora_lib._set_new(keep if ok else fold, path, lw)
    if fold:
        base = lora_lib.merge(base, fold)
    note = f"{len(lora_lib.adapter_paths(keep)) if keep else 0} adapters continued"
    if fold:
        note += f", {len(lora_lib.adapter_paths(fold))} merged into the base"
    return base, keep or None, note


@dataclasses.dataclass(frozen=True)
class LoraLayout:
    """A LoRA run's adapter shapes and the shardings of its frozen bases (see :func:`derive_layout`)."""
    rank: int
    alpha: float
    targets: tuple
    critic_targets: tuple | None
    abstract: Any  # the student's adapters as ShapeDtypeStructs
    critic_abstract: Any
    base_shardings: Any
    critic_base_shardings: Any
    full: tuple = ()  # the student's leaves trained in full (DenseDelta nodes)

    def info(self) -> dict:
        """The ``lora`` entry of ``run.json`` (what readers need to rebuild the adapters)."""
        info = {"rank": self.rank, "alpha": self.alpha, "targets": ["/".join(p) for p in self.targets],
                "critic_targets": ["/".join(p) for p in self.critic_targets] if self.critic_targets else []}
        if self.full:
            info["full"] = ["/".join(p) for p in self.full]
        return info


def build_networks(cfg: RunConfig, *, resume_meta: dict | None = None, mesh=None, workdir: str | None = None) -> Networks:
    """The student (from its starting point, random init, or the resumed run's ``run.json``),
    the frozen teacher and the critic's starting point, as the stage's record asks. With a
    ``mesh``, starting checkpoints are read straight onto it (each host reads only the slices
    its devices own). With LoRA, resuming reads the frozen bases from ``workdir``."""
    cfg = cfg if isinstance(cfg, RunConfig) else config_lib.parse(cfg)
    record = cfg.record
    runtime = _runtime(cfg)
    use_lora = cfg.lora.enabled
    if resume_meta is not None:
        student = far_wan.model_from_config(resume_meta["model"], **runtime)
        _check_architecture(cfg, student, "the workdir's run")
        nets = Networks(student=student)
        if use_lora:
            nets.student_params = run_files.restore_base(workdir, student, "params", mesh)
    elif not cfg.init.student:
        student = WanTransformer3D.from_config(_architecture(cfg), **runtime)
        key = jax.random.key(cfg.seed)
        nets = Networks(student=student, student_init=lambda: student.init_params(key), notes=["student: random init"])
    elif use_lora:
        parts = _load_parts(cfg.init.student, cfg, "config.init.student", mesh)
        _check_architecture(cfg, parts.model, "config.init.student")
        nets = Networks(student=parts.model, student_params=parts.base, adapters=parts.adapters,
                        notes=[f"student: {parts.description}"])
    else:
        student, params, desc = _load(cfg.init.student, cfg, "config.init.student", mesh)
        _check_architecture(cfg, student, "config.init.student")
        nets = Networks(student=student, student_params=params, notes=[f"student: {desc}"])
    if record.student_is_flow_map and not nets.student.flow_map:
        if resume_meta is not None or nets.student_params is None:
            raise RunError(f"incompatible checkpoint: stage {record.name!r} trains a flow-map student")
        if nets.adapters is not None and "condition_embedder" in nets.adapters:
            # the delta embedder starts as a copy of the time embedder as the start computes it
            ce = {"condition_embedder": nets.adapters["condition_embedder"]}
            nets.student_params = lora_lib.merge(nets.student_params, ce)
            nets.adapters = {k: v for k, v in nets.adapters.items() if k != "condition_embedder"} or None
        nets.student, nets.student_params = make_flow_map_student(
            nets.student, nets.student_params, gate_value=float(cfg.model.get("gate_value", 0.25)),
            deltatime_type=cfg.model.get("deltatime_type", "r"))
        nets.notes.append("student: new flow-map student (delta embedder copied from the time embedder)")
    if not record.student_is_flow_map and nets.student.flow_map:
        raise RunError(f"incompatible checkpoint: stage {record.name!r} trains a single-time model but "
                       f"config.init.student is a flow-map student")
    nets.student, nets.student_params, far_note = far_student.to_far(record, cfg, nets.student, nets.student_params)
    nets.notes += [far_note] if far_note else []
    if use_lora and resume_meta is None:
        lora_targets(cfg, nets.student)  # a bad target pattern fails before anything is placed
        if nets.student_params is not None:
            nets.student_params, nets.adapters, note = _carry_adapters(cfg, nets.student, nets.student_params,
                                                                       nets.adapters)
            nets.notes.append(f"student LoRA: {note}")
    if record.needs_teacher or record.has_critic:
        if use_lora:
            parts = _load_parts(cfg.init.teacher, cfg, "config.init.teacher", mesh)
            teacher, teacher_params, desc = parts.model, parts.merged(), parts.description
        else:
            teacher, teacher_params, desc = _load(cfg.init.teacher, cfg, "config.init.teacher", mesh)
        if teacher.flow_map:
            raise RunError("incompatible checkpoint: config.init.teacher is a flow-map student, not a teacher")
        nets.teacher, nets.teacher_params = teacher, teacher_params
        nets.notes.append(f"teacher: {desc}")
        if record.has_critic and use_lora and resume_meta is not None:
            nets.critic_params = run_files.restore_base(workdir, teacher, "critic_params", mesh)
        elif record.has_critic and use_lora:
            if cfg.init.critic:
                cparts = _load_parts(cfg.init.critic, cfg, "config.init.critic", mesh)
                if cparts.model.to_config() != teacher.to_config():
                    raise RunError("incompatible checkpoint: config.init.critic differs from the teacher architecture")
                nets.notes.append(f"critic: {cparts.description}")
            else:
                cparts = parts  # the teacher's base and (EMA) adapters
                nets.notes.append("critic: the teacher's base and adapters")
            nets.critic_params, nets.critic_adapters, note = _carry_adapters(cfg, teacher, cparts.base, cparts.adapters,
                                                                             critic=True)
            nets.notes.append(f"critic LoRA: {note}")
        elif record.has_critic and resume_meta is None:
            if cfg.init.critic:
                critic, nets.critic_params, desc = _load(cfg.init.critic, cfg, "config.init.critic", mesh)
                if critic.to_config() != teacher.to_config():
                    raise RunError("incompatible checkpoint: config.init.critic differs from the teacher architecture")
                nets.notes.append(f"critic: {desc}")
            else:
                nets.critic_params = jax.tree_util.tree_map(jnp.copy, teacher_params)
                nets.notes.append("critic: copy of the teacher")
    return nets


# ----------------------------------------------------------------------------------- data
def build_data(cfg: RunConfig, *, process_index: int, process_count: int):
    """``(source, iterator, negative context)`` of the run's data config."""
    d = cfg.data
    if d.source == "moving_digits":
        source = data_lib.MovingDigitsSource(
            d.num_samples, seed=d.seed, split=d.split, video_shape=(d.num_frames, d.height, d.width, 1),
            context_length=d.context_length, text_dim=d.text_dim)
        neg = source.negative_context
    else:
        if not d.paths:
            raise RunError("config.data.paths is empty for source 'array_record'")
        from anyflow_jax.data.records import resolve_record_paths
        files, folder_negative = resolve_record_paths(list(d.paths))
        negative = d.negative_embedding or folder_negative
        if not negative:
            raise RunError("config.data.negative_embedding (a .npy file of the negative prompt embedding) is required")
        source = data_lib.ArrayRecordLatentSource(files)
        neg = np.load(negative)
        if neg.ndim == 2:
            neg = neg[None]
    it = data_lib.make_train_iterator(source, global_batch_size=d.global_batch_size, seed=d.seed,
                                      process_index=process_index, process_count=process_count,
                                      worker_count=d.worker_count)
    return source, it, np.asarray(neg, np.float32)


# ----------------------------------------------------------------------------------- the run
def _run_meta(cfg: RunConfig, config: Any, student: WanTransformer3D, lora: dict | None = None) -> dict:
    raw = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(cfg)
    meta = {"stage": cfg.stage, "model": student.to_config(), "scan_layers": student.scan_layers, "config": raw}
    if lora is not None:
        meta["lora"] = lora
    return meta


def _check_resume_compatible(existing: dict, new: dict, workdir: str) -> None:
    if existing.get("stage") != new["stage"]:
        raise RunError(f"incompatible checkpoint: workdir {workdir} holds a {existing.get('stage')!r} run, "
                       f"config.stage is {new['stage']!r}")
    old_m, new_m = existing.get("model", {}), new["model"]
    for k in sorted(set(old_m) | set(new_m)):
        if k.startswith("_"):
            continue
        if old_m.get(k) != new_m.get(k):
            raise RunError(f"incompatible checkpoint: workdir {workdir} was trained with model {k}={old_m.get(k)!r}, "
                           f"the config gives {new_m.get(k)!r}")
    if existing.get("scan_layers") != new["scan_layers"]:
        raise RunError(f"incompatible checkpoint: workdir {workdir} was trained with scan_layers="
                       f"{existing.get('scan_layers')}, the config gives {new['scan_layers']}")


@dataclasses.dataclass
class Run:
    """Everything a run needs besides its train state: config, mesh, networks, step spec,
    shardings, data, checkpointer and metric writer."""
    cfg: RunConfig
    record: Stage
    workdir: str
    mesh: Any
    nets: Networks
    spec: steps.StepSpec
    state_shardings: TrainState
    teacher_shardings: Any
    replicated: Any
    ckpt: RunCheckpointer
    writer: Any
    data_iterator: Any
    negative: Any
    latest_step: int | None
    frozen_shardings: Any = None  # of the steps' frozen argument (the teacher, or LoraFrozen)
    lora: Any = None  # LoraLayout of a LoRA run

    def next_batch(self):
        local = next(self.data_iterator)
        g = data_lib.global_batch({"x0": local["latents"], "context": local["context"]}, self.mesh)
        g["neg_context"] = self.negative
        return g

    def close(self):
        self.ckpt.close()
        self.writer.flush()
        self.writer.close()


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _unboxed_abstract(model: WanTransformer3D):
    from flax import linen as nn
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                  nn.meta.unbox(run_files.boxed_abstract_params(model)))


def _check_unsharded(cfg: RunConfig, abstract_params, shardings, mesh) -> None:
    """Fail when more than ``train.max_unsharded_fraction`` of the parameters would be
    replicated over a mesh that shards parameters (a forgotten logical rule)."""
    if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
        return
    total = rep = 0
    for leaf, s in zip(jax.tree_util.tree_leaves(abstract_params), jax.tree_util.tree_leaves(shardings)):
        n = int(np.prod(leaf.shape))
        total += n
        rep += n if all(a is None for a in s.spec) else 0
    frac = rep / max(total, 1)
    log.info("parameters replicated on every device: %.2f%% of %s", 100 * frac, f"{total:,}")
    if frac > cfg.train.max_unsharded_fraction:
        raise RunError(f"{100 * frac:.1f}% of the parameters are replicated on the mesh {dict(mesh.shape)}, more "
                       f"than config.train.max_unsharded_fraction={cfg.train.max_unsharded_fraction} "
                       f"(a logical axis without a sharding rule?)")


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """What a run derives from its config, mesh and networks alone (no files, no parameters):
    the step spec (optimizers, trainable masks, schedules) and the shardings of the train state
    and the frozen teacher. The trainer (:func:`build_run`) and deviceless compilation
    (:func:`anyflow_jax.parallel.aot.abstract_run`) both build it with :func:`derive_layout`."""
    mesh: Any
    spec: steps.StepSpec
    state_shardings: TrainState
    teacher_shardings: Any
    replicated: Any
    frozen_shardings: Any = None
    lora: LoraLayout | None = None

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _step_spec(cfg, record, student, teacher, tx, critic_tx, mask, critic_mask, *, lora: bool = False):
    """The steps' static description (:class:`steps.StepSpec`), the same for full and LoRA runs but
    for what ``tx`` / ``mask`` cover (full parameters or adapter factors)."""
    return steps.StepSpec(
        stage=record, student=student, teacher=teacher, loss_options=cfg.loss,
        critic_loss_options=cfg.critic_loss, tx=tx, critic_tx=critic_tx, trainable_mask=mask, critic_mask=critic_mask,
        ema_decay=cfg.ema.decay, ema_warmup_steps=cfg.ema.warmup_steps,
        lr_fn=optim.lr_schedule(cfg.optim.lr, cfg.optim.warmup_steps, **cfg.optim.schedule_kwargs()),
        critic_update_ratio=cfg.train.critic_update_ratio, lora=lora)


def derive_layout(cfg: RunConfig, mesh, nets: Networks) -> RunLayout:
    """The step spec and shardings of ``cfg``'s stage for ``nets`` on ``mesh`` (fails when the
    parameters would mostly be replicated, see :func:`_check_unsharded`). With LoRA the trained
    trees are adapters (sharded like the kernels they adapt) and the frozen argument a
    :class:`~anyflow_jax.training.state.LoraFrozen` of the bases (and teacher)."""
    if cfg.lora.enabled:
        return _derive_lora_layout(cfg, mesh, nets)
    record, student, teacher = cfg.record, nets.student, nets.teacher
    rules = parallel.DEFAULT_RULES
    abstract_params = _unboxed_abstract(student)
    mask = optim.trainable_mask(abstract_params, list(cfg.optim.trainable_patterns))
    tx = optim.make_optimizer(**cfg.optim.optimizer_kwargs(), mask=mask)
    critic_tx = critic_mask = None
    if record.has_critic:
        critic_mask = optim.trainable_mask(_unboxed_abstract(teacher), list(cfg.critic_optim.trainable_patterns))
        critic_tx = optim.make_optimizer(**cfg.critic_optim.optimizer_kwargs(), mask=critic_mask)
    spec = _step_spec(cfg, record, student, teacher, tx, critic_tx, mask, critic_mask)

    rep = parallel.replicated(mesh)
    p_sh = parallel.param_shardings(run_files.boxed_abstract_params(student), mesh, rules)
    _check_unsharded(cfg, abstract_params, p_sh, mesh)
    t_sh = (parallel.param_shardings(run_files.boxed_abstract_params(teacher), mesh, rules)
            if teacher is not None else None)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    abstract_copt = jax.eval_shape(critic_tx.init, _unboxed_abstract(teacher)) if critic_tx is not None else None
    state_sh = TrainState(
        step=rep, rng=rep, params=p_sh, ema_params=p_sh, opt_state=opt_state_shardings(abstract_opt, p_sh, mesh),
        critic_params=t_sh if record.has_critic else None,
        critic_opt_state=opt_state_shardings(abstract_copt, t_sh, mesh) if abstract_copt is not None else None)
    return RunLayout(mesh=mesh, spec=spec, state_shardings=state_sh, teacher_shardings=t_sh, replicated=rep,
                     frozen_shardings=t_sh if record.needs_teacher else None)


def _trainable_mask(tree, patterns, field: str):
    try:
        return optim.trainable_mask(tree, list(patterns))
    except ValueError as e:
        raise RunError(f"{field}: {e}") from None


def _derive_lora_layout(cfg: RunConfig, mesh, nets: Networks) -> RunLayout:
    record, student, teacher = cfg.record, nets.student, nets.teacher
    rules = parallel.DEFAULT_RULES
    rank, alpha = cfg.lora.rank, cfg.lora.scale_alpha
    abstract_base = _unboxed_abstract(student)
    targets = tuple(lora_targets(cfg, student))
    full = tuple(lora_full_paths(cfg, student))
    try:
        adapters = lora_lib.abstract_adapters(abstract_base, targets, rank, alpha, full=full)
    except lora_lib.LoraError as e:
        raise RunError(f"config.lora: {e}") from None
    # optim.trainable_patterns select among the adapter factors (empty: all of them)
    mask = _trainable_mask(adapters, cfg.optim.trainable_patterns, "config.optim.trainable_patterns")
    frozen_full = [p for p in full if not all(jax.tree_util.tree_leaves(lora_lib._get(mask, p)))]
    if frozen_full:
        raise RunError(f"config.lora.train_in_full trains {', '.join('/'.join(p) for p in frozen_full)} but "
                       "config.optim.trainable_patterns leaves it out (add a pattern such as "
                       f"'^{frozen_full[0][0]}/', or drop it from config.lora.train_in_full)")
    tx = optim.make_optimizer(**cfg.optim.optimizer_kwargs(), mask=mask)
    critic_tx = critic_mask = critic_adapters = critic_targets = None
    if record.has_critic:
        critic_targets = tuple(lora_targets(cfg, teacher, critic=True))
        critic_adapters = lora_lib.abstract_adapters(_unboxed_abstract(teacher), critic_targets, rank, alpha)
        critic_mask = _trainable_mask(critic_adapters, cfg.critic_optim.trainable_patterns,
                                      "config.critic_optim.trainable_patterns")
        critic_tx = optim.make_optimizer(**cfg.critic_optim.optimizer_kwargs(), mask=critic_mask)
    spec = _step_spec(cfg, record, student, teacher, tx, critic_tx, mask, critic_mask, lora=True)

    rep = parallel.replicated(mesh)
    base_sh = parallel.param_shardings(run_files.boxed_abstract_params(student), mesh, rules)
    _check_unsharded(cfg, abstract_base, base_sh, mesh)
    t_sh = (parallel.param_shardings(run_files.boxed_abstract_params(teacher), mesh, rules)
            if teacher is not None else None)
    a_sh = lora_lib.adapter_shardings(adapters, run_files.boxed_abstract_params(student), mesh, rules)
    ca_sh = lora_lib.adapter_shardings(critic_adapters, run_files.boxed_abstract_params(teacher), mesh, rules) \
        if critic_adapters is not None else None
    abstract_opt = jax.eval_shape(tx.init, adapters)
    abstract_copt = jax.eval_shape(critic_tx.init, critic_adapters) if critic_tx is not None else None
    state_sh = TrainState(
        step=rep, rng=rep, params=a_sh, ema_params=a_sh, opt_state=opt_state_shardings(abstract_opt, a_sh, mesh),
        critic_params=ca_sh, critic_opt_state=opt_state_shardings(abstract_copt, ca_sh, mesh) if ca_sh else None)
    frozen_sh = LoraFrozen(base=base_sh, teacher=t_sh if record.needs_teacher else None,
                           critic_base=t_sh if record.has_critic else None)
    layout = LoraLayout(rank=rank, alpha=alpha, targets=targets, critic_targets=critic_targets, abstract=adapters,
                        critic_abstract=critic_adapters, base_shardings=base_sh,
                        critic_base_shardings=t_sh if record.has_critic else None, full=full)
    return RunLayout(mesh=mesh, spec=spec, state_shardings=state_sh, teacher_shardings=t_sh, replicated=rep,
                     frozen_shardings=frozen_sh, lora=layout)


def abstract_networks(cfg: RunConfig, notes: Sequence[str] = ()) -> Networks:
    """The stage's networks as the config describes them, with no parameters and nothing read:
    the student (a flow map when the stage trains one, as :func:`build_networks` makes it from a
    teacher) and the teacher/critic architecture when the stage needs one."""
    base = WanTransformer3D.from_config(_architecture(cfg), **_runtime(cfg))
    record, student = cfg.record, base
    if record.student_is_flow_map and not base.flow_map:
        student = base.clone(flow_map=True, gate_value=float(cfg.model.get("gate_value", 0.25)),
                             deltatime_type=cfg.model.get("deltatime_type", "r"))
    student = far_student.abstract_student(record, cfg, student)
    teacher = base.clone(flow_map=False) if (record.needs_teacher or record.has_critic) else None
    return Networks(student=student, teacher=teacher, notes=list(notes))


def build_run(config, workdir: str) -> Run:
    """Phase 1: validate, build the mesh and networks, derive the step spec and shardings."""
    cfg = validate_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        fileio.ensure_writable_dir(workdir)
    except OSError as e:
        raise RunError(f"workdir {e}") from None
    ckpt = RunCheckpointer(workdir, max_to_keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpointing)
    try:
        return _build_run(cfg, config, workdir, ckpt)
    except BaseException:
        ckpt.close()
        raise


def _build_run(cfg: RunConfig, config, workdir: str, ckpt: RunCheckpointer) -> Run:
    record = cfg.record
    pid, pcount = jax.process_index(), jax.process_count()
    latest = ckpt.latest_step()
    existing = run_files.read_run_file(workdir)
    resume_meta = existing if (latest is not None and existing is not None) else None
    if resume_meta is not None:
        if resume_meta.get("stage") != cfg.stage:
            raise RunError(f"incompatible checkpoint: workdir {workdir} holds a {resume_meta.get('stage')!r} run, "
                           f"config.stage is {cfg.stage!r}")
        _check_architecture(cfg, resume_meta.get("model", {}), "the workdir's run")
    # a run stopped by a signal at its last step still owes that step's evaluation: built in full
    if latest is not None and latest >= cfg.train.steps and not (
            latest == cfg.train.steps and _evaluation_missing(cfg, workdir, latest)):
        return Run(cfg=cfg, record=record, workdir=workdir, mesh=None, nets=None, spec=None, state_shardings=None,
                   teacher_shardings=None, replicated=None, ckpt=ckpt, writer=writers_lib.NullWriter(),
                   data_iterator=None, negative=None, latest_step=latest)

    mesh = make_run_mesh(cfg)
    if mesh.devices.size < jax.device_count():
        log.warning("the mesh %s uses %d of %d devices", dict(mesh.shape), mesh.devices.size, jax.device_count())

    def describe(info):
        return f"a LoRA (rank {info['rank']}, alpha {info['alpha']:g})" if info else "a full fine-tune"
    if resume_meta is not None and bool(run_files.lora_info(resume_meta)) != cfg.lora.enabled:
        raise RunError(f"incompatible checkpoint: workdir {workdir} holds {describe(run_files.lora_info(resume_meta))} "
                       f"run, config.lora.enabled={cfg.lora.enabled}")
    nets = build_networks(cfg, resume_meta=resume_meta, mesh=mesh, workdir=workdir)
    layout = derive_layout(cfg, mesh, nets)
    meta = _run_meta(cfg, config, nets.student, layout.lora.info() if layout.lora is not None else None)
    if existing is not None and resume_meta is None:
        _check_resume_compatible(existing, meta, workdir)
    if resume_meta is not None and run_files.lora_info(resume_meta) != meta.get("lora"):
        raise RunError(f"incompatible checkpoint: workdir {workdir} holds {describe(run_files.lora_info(resume_meta))} "
                       f"run, the config asks for {describe(meta.get('lora'))} (config.lora; same targets too)")
    if resume_meta is not None and resume_meta.get("scan_layers") != nets.student.scan_layers:
        raise RunError(f"incompatible checkpoint: workdir {workdir} was trained with scan_layers="
                       f"{resume_meta.get('scan_layers')}, the config gives {nets.student.scan_layers}")
    if pid == 0:
        run_files.write_run_file(workdir, meta)

    _, data_it, neg = build_data(cfg, process_index=pid, process_count=pcount)
    writer = writers_lib.create_writer(workdir, process_index=pid, tensorboard=cfg.train.tensorboard)
    return Run(cfg=cfg, record=record, workdir=workdir, nets=nets, **layout.fields(), ckpt=ckpt, writer=writer,
               data_iterator=data_it, negative=jax.device_put(jnp.asarray(neg), layout.replicated), latest_step=latest)


def abstract_state(run: Run) -> TrainState:
    """The train state as ``jax.ShapeDtypeStruct``s with the run's shardings."""
    sh, rep = run.state_shardings, run.replicated
    params = _unboxed_abstract(run.nets.student) if run.lora is None else run.lora.abstract
    abstract_opt = jax.eval_shape(run.spec.tx.init, params)
    critic = copt = None
    if run.record.has_critic:
        critic = _unboxed_abstract(run.nets.teacher) if run.lora is None else run.lora.critic_abstract
        copt = _abstract(jax.eval_shape(run.spec.critic_tx.init, critic), sh.critic_opt_state)
        critic = _abstract(critic, sh.critic_params)
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                      rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
                      params=_abstract(params, sh.params), ema_params=_abstract(params, sh.ema_params),
                      opt_state=_abstract(abstract_opt, sh.opt_state), critic_params=critic, critic_opt_state=copt)


def restore_or_init(run: Run) -> TrainState:
    """Phase 2: the workdir's latest checkpoint on the current mesh, or a new state created
    directly sharded."""
    target = abstract_state(run)
    if run.latest_step is not None:
        state, step = run.ckpt.restore_latest(target, run.data_iterator)
        log.info("resumed from %s step %d on %d devices", run.ckpt.directory, step, jax.device_count())
        return state
    if run.lora is not None:
        return _init_lora_state(run)
    sh, nets = run.state_shardings, run.nets
    f32 = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)  # noqa: E731
    if nets.student_init is not None:
        init = nets.student_init
        params = jax.jit(lambda: f32(init()), out_shardings=sh.params)()
    else:
        params = jax.device_put(f32(nets.student_params), sh.params)
    ema = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=sh.ema_params)(params)
    opt_state = jax.jit(run.spec.tx.init, out_shardings=sh.opt_state)(params)
    cparams = copt = None
    if run.record.has_critic:
        cparams = jax.device_put(f32(nets.critic_params), sh.critic_params)
        copt = jax.jit(run.spec.critic_tx.init, out_shardings=sh.critic_opt_state)(cparams)
    nets.student_params = nets.critic_params = None  # the state owns them now
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
                      rng=jax.device_put(new_rng(run.cfg.seed), run.replicated),
                      params=params, ema_params=ema, opt_state=opt_state, critic_params=cparams, critic_opt_state=copt)


def _f32(tree):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _start_adapters(key, model: WanTransformer3D, lo: LoraLayout, abstract, targets, shardings, carried, full=()):
    """Fresh adapters (PEFT's init, created sharded; zero offsets for the leaves trained in full)
    with the carried-over ones in their places."""
    base = _unboxed_abstract(model)
    fresh = jax.jit(lambda k: lora_lib.init_adapters(k, base, targets, lo.rank, lo.alpha, full=full),
                    out_shardings=shardings)(key)
    if carried is not None:
        for path, lw in lora_lib._flat_adapters(carried):
            fresh = lora_lib._with_leaf(fresh, path, jax.device_put(_f32(lw), lora_lib._get(shardings, path)))
    return fresh


def _init_lora_state(run: Run) -> TrainState:
    """A LoRA run's first state: the bases placed (and written once to ``<workdir>/base``), the
    adapters carried over from the starting checkpoints or fresh, EMA copies and optimizer states
    of the adapters."""
    sh, nets, lo = run.state_shardings, run.nets, run.lora
    key = jax.random.key(run.cfg.seed)
    if nets.student_init is not None:
        init = nets.student_init
        base = jax.jit(lambda: _f32(init()), out_shardings=lo.base_shardings)()
    else:
        base = jax.device_put(_f32(nets.student_params), lo.base_shardings)
    params = _start_adapters(jax.random.fold_in(key, 1), nets.student, lo, lo.abstract, lo.targets, sh.params,
                             nets.adapters, lo.full)
    ema = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=sh.ema_params)(params)
    opt_state = jax.jit(run.spec.tx.init, out_shardings=sh.opt_state)(params)
    bases = {"params": base}
    cparams = copt = None
    if run.record.has_critic:
        bases["critic_params"] = jax.device_put(_f32(nets.critic_params), lo.critic_base_shardings)
        cparams = _start_adapters(jax.random.fold_in(key, 2), nets.teacher, lo, lo.critic_abstract, lo.critic_targets,
                                  sh.critic_params, nets.critic_adapters)
        copt = jax.jit(run.spec.critic_tx.init, out_shardings=sh.critic_opt_state)(cparams)
    save_base(run.workdir, bases)
    log.info("wrote the frozen base once: %s", os.path.join(run.workdir, run_files.BASE_DIR))
    nets.student_params, nets.critic_params = base, bases.get("critic_params")  # frozen arguments now
    nets.student_init = nets.adapters = nets.critic_adapters = None
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), run.replicated),
                      rng=jax.device_put(new_rng(run.cfg.seed), run.replicated),
                      params=params, ema_params=ema, opt_state=opt_state, critic_params=cparams, critic_opt_state=copt)


def place_frozen(run: Run):
    """The steps' frozen argument on the mesh: the teacher (or ``None``), or for a LoRA run a
    :class:`~anyflow_jax.training.state.LoraFrozen` of the bases and the teacher. The run's
    networks let go of their host copies."""
    nets = run.nets
    teacher = None
    if run.record.needs_teacher:
        teacher = jax.device_put(nets.teacher_params, run.teacher_shardings)
    nets.teacher_params = None
    if run.lora is None:
        return teacher
    lo = run.lora
    frozen = LoraFrozen(
        base=jax.device_put(_f32(nets.student_params), lo.base_shardings), teacher=teacher,
        critic_base=jax.device_put(_f32(nets.critic_params), lo.critic_base_shardings) if run.record.has_critic else None)
    nets.student_params = nets.critic_params = None
    return frozen


def abstract_frozen(run: Run):
    """The steps' frozen argument as sharded ``jax.ShapeDtypeStruct``s (see :func:`place_frozen`)."""
    teacher = None
    if run.record.needs_teacher:
        teacher = _abstract(_unboxed_abstract(run.nets.teacher), run.teacher_shardings)
    if run.lora is None:
        return teacher
    critic_base = None
    if run.record.has_critic:
        critic_base = _abstract(_unboxed_abstract(run.nets.teacher), run.lora.critic_base_shardings)
    return LoraFrozen(base=_abstract(_unboxed_abstract(run.nets.student), run.lora.base_shardings), teacher=teacher,
                      critic_base=critic_base)


def frozen_teacher(frozen):
    """The frozen teacher inside the steps' frozen argument (``None`` when there is none)."""
    return frozen.teacher if isinstance(frozen, LoraFrozen) else frozen


def eval_view(run: Run, frozen) -> Callable[[TrainState], TrainState]:
    """What the evaluators see of the state: itself, or for a LoRA run the state with its EMA
    adapters merged into the base (once per evaluation; the other base leaves are shared)."""
    if run.lora is None:
        return lambda state: state
    return lambda state: state.replace(ema_params=lora_lib.merge(frozen.base, state.ema_params))


@dataclasses.dataclass
class CompiledSteps:
    generator: Any
    critic: Any = None


def compile_steps(run: Run, state: TrainState, frozen, probe) -> CompiledSteps:
    """Phase 3: every step of the stage as one ``jax.jit`` with explicit shardings and the state
    donated, compiled ahead of time (its memory analysis is logged)."""
    sh, rep = run.state_shardings, run.replicated
    batch_sh = jax.tree_util.tree_map(lambda x: x.sharding, probe)
    abstract_batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), probe)
    frozen_sh = run.frozen_shardings if frozen is not None else None
    abstract_frozen = _abstract(frozen, frozen_sh) if frozen is not None else None
    abstract = _abstract(state, sh)
    out = CompiledSteps(generator=None)
    with jax.set_mesh(run.mesh):
        t0 = time.perf_counter()
        out.generator = jax.jit(steps.make_generator_step(run.spec), in_shardings=(sh, frozen_sh, batch_sh),
                                out_shardings=(sh, rep), donate_argnums=(0,)
                                ).lower(abstract, abstract_frozen, abstract_batch).compile()
        log.info("compiled the %s step in %.1fs; memory: %s", run.record.name, time.perf_counter() - t0,
                 _memory_summary(out.generator))
        if run.record.has_critic:
            t0 = time.perf_counter()
            out.critic = jax.jit(steps.make_critic_step(run.spec), in_shardings=(sh, frozen_sh, batch_sh),
                                 out_shardings=(sh, rep), donate_argnums=(0,)
                                 ).lower(abstract, abstract_frozen, abstract_batch).compile()
            log.info("compiled the critic step in %.1fs; memory: %s", time.perf_counter() - t0,
                     _memory_summary(out.critic))
    return out


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) ask the run to save a checkpoint and stop after the current
    step; a second SIGINT stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or name
        log.warning("%s received: saving a checkpoint and stopping after this step (Ctrl-C again to stop at once)",
                    name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_loop(run: Run, state: TrainState, compiled: CompiledSteps, frozen, first_batch,
             signals: StopSignals | None = None, evaluators=None) -> dict[str, float]:
    """Phase 4: train to ``train.steps``; returns the last logged metrics. A stop signal saves the
    current step and raises :class:`~anyflow_jax.errors.Preempted`. ``evaluators``
    (:func:`anyflow_jax.training.evaluators.build`) run after each due step; their scalars are
    logged at that step."""
    cfg = run.cfg
    total, log_every, ckpt_every = cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every
    ratio = cfg.train.critic_update_ratio
    critic_counts = run.record.steps_per_update == "critic"
    view = eval_view(run, frozen)
    step = int(host_value(state.step))
    progress = writers_lib.Progress(total, start_step=step)
    pending_batches = [first_batch]
    last: dict[str, float] = {}
    unchecked: tuple[int, str, Any] | None = None  # (step, metric name, device scalar) not read yet

    def take():
        return pending_batches.pop() if pending_batches else run.next_batch()

    def check(item) -> None:
        at, name, value = item
        loss = float(host_value(value))
        if not math.isfinite(loss):
            run.ckpt.wait()
            good = run.ckpt.latest_step()
            where = (f"The last good checkpoint is step {good} in {run.ckpt.directory}" if good is not None
                     else "no checkpoint yet")
            raise NonFiniteLoss(f"non-finite {name} ({loss}) at step {at}; stopping. {where}")

    sig = signals or StopSignals()
    if sig.received:  # stopped while compiling: nothing new to save
        raise Preempted(step, sig.received, run.workdir)
    if step > 0 and evaluators is not None:  # a no-op unless the restored step's evaluation is missing
        record = _evaluate_skipped_step(run, step, lambda: view(state), evaluators)
        if record:
            last = dict(record, step=step)
    t_evaluated = time.perf_counter()
    with jax.set_mesh(run.mesh):
        while step < total:
            t_step = time.perf_counter()
            out: dict[str, Any] = {}
            if not critic_counts or step % ratio == 0:
                state, gm = compiled.generator(state, frozen, take())
                out.update(gm)
            if compiled.critic is not None:
                state, cm = compiled.critic(state, frozen, take())
                out.update(cm)
            step += 1
            # The loss of the previous step is read now, after this step was dispatched, so the
            # host does not wait for the device every step.
            if unchecked is not None:
                check(unchecked)
            loss_key = "loss" if "loss" in out else "critic/loss"
            unchecked = (step, loss_key, out[loss_key])
            stop = sig.received  # read once: a signal arriving later in this step is handled at the next
            must_save = step % ckpt_every == 0 or step == total or bool(stop)
            evaluate = evaluators is not None and evaluators.due(step) and not stop
            if step % log_every == 0 or step == total or must_save or evaluate:
                check(unchecked)  # never log, save or evaluate a non-finite step
                unchecked = None
            progress(step)
            step_time = time.perf_counter() - t_step
            evaluated: dict[str, float] = {}
            if evaluate:
                evaluated = evaluators(step, view(state), time.perf_counter() - t_evaluated)
                t_evaluated = time.perf_counter()
            if step % log_every == 0 or step == total:
                scalars = {k: float(host_value(v)) for k, v in out.items() if np.ndim(v) == 0}
                scalars["step_time_sec"] = step_time
                scalars.update(progress.summary(step))
                scalars.update(evaluated)
                run.writer.write_scalars(step, scalars)
                last = dict(scalars, step=step)
            elif evaluated:
                run.writer.write_scalars(step, evaluated)
            if must_save:
                run.ckpt.save(state, run.data_iterator)
                if not stop:
                    log.info("checkpoint of step %d %s", step,
                             "saving in the background" if run.cfg.train.async_checkpointing else "saved")
            if stop:
                run.ckpt.wait()
                raise Preempted(step, stop, run.workdir)
    return last


def _evaluation_missing(cfg: RunConfig, workdir: str, step: int) -> bool:
    """Whether ``step`` is due for the config's evaluators and ``<workdir>/metrics.jsonl`` has no
    evaluation of it (an evaluation logs ``eval/seconds``). Process 0 reads the file and tells the
    others."""
    if not evaluators_lib.due(step, cfg.eval.every, cfg.train.steps):
        return False
    missing = jax.process_index() != 0 or "eval/seconds" not in writers_lib.records_at(workdir, step)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
    return missing


def _evaluate_skipped_step(run: Run, step: int, evaluated_state, evaluators) -> dict[str, Any]:
    """A stop signal at an evaluation step saves that step without evaluating it (to exit within the
    scheduler's grace period); the resumed run evaluates it first, so that its evaluations are those
    of an uninterrupted run. The evaluation's scalars join the step's record, which is returned
    (``{}`` when nothing was missing). ``evaluated_state()``: the state the evaluators see, built
    only when needed (a LoRA run merges its adapters)."""
    if not _evaluation_missing(run.cfg, run.workdir, step):
        return {}
    log.info("step %d was saved without its evaluation (the run stopped there): evaluating it now", step)
    with jax.set_mesh(run.mesh):
        evaluated = evaluators(step, evaluated_state(), 0.0)
    record = dict(evaluated)
    if jax.process_index() == 0:
        record = {**writers_lib.pop_records_at(run.workdir, step), **evaluated}
        run.writer.write_scalars(step, record)
    return record


def _write_parameter_table(run: Run, state: TrainState, frozen=None) -> None:
    text = writers_lib.parameter_overview(state.params, mask=run.spec.trainable_mask)
    trained = writers_lib.count_params(state.params, run.spec.trainable_mask)
    total = writers_lib.count_params(state.params)
    if run.lora is not None:
        base = writers_lib.count_params(frozen.base)
        text = (f"LoRA adapters (rank {run.lora.rank}, alpha {run.lora.alpha:g}) on a frozen base of {base:,} "
                f"parameters\n" + text)
        log.info("trained network: LoRA adapters of %s parameters, %s trainable, on a frozen base of %s (table: %s)",
                 f"{total:,}", f"{trained:,}", f"{base:,}", os.path.join(run.workdir, PARAMETERS_FILE))
    else:
        log.info("trained network: %s parameters, %s trainable (table: %s)", f"{total:,}", f"{trained:,}",
                 os.path.join(run.workdir, PARAMETERS_FILE))
    fileio.atomic_write_bytes(os.path.join(run.workdir, PARAMETERS_FILE), (text + "\n").encode())


def train(config: ml_collections.ConfigDict | RunConfig, workdir: str) -> dict[str, float]:
    """Run (or resume) the stage in ``config`` in ``workdir``; returns the last logged metrics
    (``{"step": n, "already_done": True}`` when the workdir already holds a finished run).

    Raises :class:`~anyflow_jax.errors.RunError` on bad input (before anything is compiled),
    :class:`NonFiniteLoss`, and :class:`~anyflow_jax.errors.Preempted` after saving when SIGTERM or
    SIGINT stopped the run."""
    run = build_run(config, workdir)
    try:
        if run.latest_step is not None and run.latest_step >= run.cfg.train.steps and run.mesh is None:
            log.info("nothing to do: %s is already at step %d of %d", run.workdir, run.latest_step,
                     run.cfg.train.steps)
            return {"step": run.latest_step, "already_done": True}
        _log_summary(run)
        with StopSignals() as signals:
            state = restore_or_init(run)
            if jax.process_index() == 0:
                # metrics logged after the restored step are logged again: drop the old records
                writers_lib.drop_records_after(run.workdir, int(host_value(state.step)))
            frozen = place_frozen(run)
            if jax.process_index() == 0:
                _write_parameter_table(run, state, frozen)
            probe = run.next_batch()
            with jax.set_mesh(run.mesh):  # a bad eval config fails here, before the steps compile
                evaluators = evaluators_lib.build(run, run.writer, frozen=frozen_teacher(frozen),
                                                  video_shape=tuple(probe["x0"].shape[1:]))
            compiled = compile_steps(run, state, frozen, probe)
            return run_loop(run, state, compiled, frozen, probe, signals, evaluators)
    finally:
        run.close()


def _log_summary(run: Run) -> None:
    c = run.cfg
    log.info("stage %s (%s): %d steps, global batch %d, mesh %s, lr %g, %s -> %s", c.stage, run.record.description
             or run.record.name, c.train.steps, c.data.global_batch_size, dict(run.mesh.shape), c.optim.lr,
             c.data.source, run.workdir)
    for n in run.nets.notes:
        log.info("%s", n)


def _memory_summary(compiled) -> str:
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # some backends do not report it
        return f"unavailable ({e})"
    if m is None:
        return "unavailable"
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    parts = [f"{f.replace('_size_in_bytes', '')}={getattr(m, f, 0) / 2**20:.1f}MiB" for f in fields if hasattr(m, f)]
    return ", ".join(parts)
