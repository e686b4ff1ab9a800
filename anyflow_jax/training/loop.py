"""The training loop behind ``python -m anyflow_jax.train``: validate, build, resume, run.

Order of work: the config is validated before anything is compiled; networks are loaded from
their named starting checkpoints; the train state is restored from the workdir when it has a
checkpoint (onto the current mesh, whatever device count it was saved on) or initialised
directly sharded; each stage's step is one ``jax.jit`` with explicit in/out shardings and the
state donated, compiled ahead of time with its memory analysis logged; then the loop runs with
periodic metrics, checkpoints, a stop on a non-finite loss and a clean save on SIGTERM.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from anyflow_jax import data as data_lib
from anyflow_jax import fileio
from anyflow_jax import metrics as metrics_lib
from anyflow_jax import parallel
from anyflow_jax.losses import onpolicy_critic_loss
from anyflow_jax.models.wan import WanTransformer3D
from anyflow_jax.training import checkpointing as ckpt_lib
from anyflow_jax.training import optim, stages
from anyflow_jax.training.checkpointing import RunError
from anyflow_jax.training.state import TrainState, new_rng, opt_state_shardings

log = logging.getLogger("anyflow_jax.train")

_RUNTIME = ("dtype", "attention_impl", "scan_layers", "remat_policy")
_FLOW_MAP_FIELDS = ("gate_value", "deltatime_type")


class NonFiniteLoss(RuntimeError):
    pass


def host_value(x) -> np.ndarray:
    """A replicated (or single-device) array on the host, also in multi-process runs."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


# ----------------------------------------------------------------------------------- config
def _get(cfg, dotted, default=None):
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


def validate_config(config: ml_collections.ConfigDict, *, process_count: int | None = None) -> None:
    """Fail before any compilation, naming the field, on a config that cannot run."""
    stage = stages.check_stage(config.get("stage"))
    for field in ("train.steps", "data.global_batch_size", "optim.lr"):
        if _get(config, field) is None:
            raise RunError(f"config.{field} is required")
    if int(config.train.steps) < 1:
        raise RunError(f"config.train.steps must be >= 1, got {config.train.steps}")
    gbs = int(config.data.global_batch_size)
    pc = process_count or jax.process_count()
    data_axes, _ = _mesh_sizes(config, pc)
    if gbs < 1 or gbs % data_axes:
        raise RunError(f"config.data.global_batch_size={gbs} is not divisible by the data axes "
                       f"(data x fsdp = {data_axes})")
    pc = process_count or jax.process_count()
    if gbs % pc:
        raise RunError(f"config.data.global_batch_size={gbs} is not divisible by the {pc} processes")
    stages.check_loss_options(stage, config.get("loss") or {})
    if stage == "on_policy":
        stages.check_loss_options(stage, config.get("critic_loss") or {}, "config.critic_loss", onpolicy_critic_loss)
        if int(_get(config, "train.critic_update_ratio", 1)) < 1:
            raise RunError("config.train.critic_update_ratio must be >= 1")
    if stage != "teacher" and not _get(config, "init.student"):
        raise RunError(f"config.init.student is empty: stage {stage!r} starts from a checkpoint "
                       "(a previous stage's workdir, an Orbax model checkpoint or a diffusers folder)")
    if stages.NEEDS_TEACHER[stage] and not _get(config, "init.teacher"):
        raise RunError(f"config.init.teacher is empty: stage {stage!r} needs a frozen teacher checkpoint")
    src = _get(config, "data.source", "moving_digits")
    if src not in ("moving_digits", "array_record"):
        raise RunError(f"config.data.source={src!r}: expected 'moving_digits' or 'array_record'")
    for name in ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints"):
        if int(_get(config, name, 1)) < 1:
            raise RunError(f"config.{name} must be >= 1")


def _mesh_sizes(config, process_count: int) -> tuple[int, tuple[int, int, int]]:
    m = config.get("mesh") or {}
    try:
        sizes = parallel.resolve_mesh_shape(int(m.get("data", 1)), int(m.get("fsdp", -1)), int(m.get("tensor", 1)),
                                            jax.device_count(), allow_subset=process_count == 1)
    except ValueError as e:
        raise RunError(f"config.mesh: {e}") from None
    return sizes[0] * sizes[1], sizes


def _runtime(config) -> dict[str, Any]:
    m = config.get("model") or {}
    out = {k: m[k] for k in _RUNTIME if k in m}
    if isinstance(out.get("dtype"), str):
        out["dtype"] = jnp.dtype(out["dtype"])
    return out


def _check_architecture(config, model: WanTransformer3D, what: str) -> None:
    """Architecture fields set in config.model must equal the loaded checkpoint's."""
    m = (config.get("model") or {})
    have = model.to_config()
    for k, v in m.items():
        if k in _RUNTIME or k in _FLOW_MAP_FIELDS or k not in have:
            continue
        want = list(v) if isinstance(v, (tuple, list)) else v
        if have[k] != want:
            raise RunError(f"incompatible checkpoint: {what} has {k}={have[k]!r} but config.model.{k}={want!r}")


# ----------------------------------------------------------------------------------- networks
def build_networks(config):
    """(student, student_params, teacher, teacher_params, critic_params, notes)."""
    stage = config.stage
    runtime = _runtime(config)
    notes = []
    init_path = _get(config, "init.student", "")
    use_ema = bool(_get(config, "init.use_ema", True))
    if stage == "teacher" and not init_path:
        arch = {k: v for k, v in (config.get("model") or {}).items() if k not in _RUNTIME}
        arch.pop("flow_map", None)
        student = WanTransformer3D.from_config(arch, **runtime)
        params = student.init_params(jax.random.key(int(config.get("seed", 0))))
        notes.append("student: random init")
    else:
        student, params, desc = ckpt_lib.load_start(init_path, runtime=runtime, use_ema=use_ema,
                                                     field="config.init.student")
        _check_architecture(config, student, "config.init.student")
        notes.append(f"student: {desc}")
    want_fm = stages.STUDENT_IS_FLOW_MAP[stage]
    if want_fm and not student.flow_map:
        m = config.get("model") or {}
        student, params = ckpt_lib.make_flow_map_student(
            student, params, gate_value=float(m.get("gate_value", 0.25)), deltatime_type=m.get("deltatime_type", "r"))
        notes.append("student: new flow-map student (delta embedder copied from the time embedder)")
    if not want_fm and student.flow_map:
        raise RunError(f"incompatible checkpoint: stage {stage!r} trains a single-time model but "
                       f"config.init.student is a flow-map student")
    teacher = teacher_params = critic_params = None
    if stages.NEEDS_TEACHER[stage]:
        teacher, teacher_params, desc = ckpt_lib.load_start(_get(config, "init.teacher"), runtime=runtime,
                                                             use_ema=use_ema, field="config.init.teacher")
        if teacher.flow_map:
            raise RunError("incompatible checkpoint: config.init.teacher is a flow-map student, not a teacher")
        notes.append(f"teacher: {desc}")
        if stage == "on_policy":
            critic_path = _get(config, "init.critic", "")
            if critic_path:
                critic, critic_params, desc = ckpt_lib.load_start(critic_path, runtime=runtime, use_ema=use_ema,
                                                                   field="config.init.critic")
                if critic.to_config() != teacher.to_config():
                    raise RunError("incompatible checkpoint: config.init.critic differs from the teacher architecture")
                notes.append(f"critic: {desc}")
            else:
                critic_params = jax.tree_util.tree_map(jnp.copy, teacher_params)
                notes.append("critic: copy of the teacher")
    return student, params, teacher, teacher_params, critic_params, notes


# ----------------------------------------------------------------------------------- data
def build_data(config, *, process_index: int, process_count: int):
    d = config.data
    if d.get("source", "moving_digits") == "moving_digits":
        source = data_lib.MovingDigitsSource(
            int(d.get("num_samples", 8192)), seed=int(d.get("seed", 0)), split=d.get("split", "train"),
            video_shape=(int(d.num_frames), int(d.height), int(d.width), 1),
            context_length=int(d.context_length), text_dim=int(d.text_dim))
        neg = source.negative_context
    else:
        if not d.get("paths"):
            raise RunError("config.data.paths is empty for source 'array_record'")
        source = data_lib.ArrayRecordLatentSource(list(d.paths))
        if not d.get("negative_embedding"):
            raise RunError("config.data.negative_embedding (a .npy file of the negative prompt embedding) is required")
        neg = np.load(d.negative_embedding)
        if neg.ndim == 2:
            neg = neg[None]
    it = data_lib.make_train_iterator(source, global_batch_size=int(d.global_batch_size),
                                      seed=int(d.get("seed", config.get("seed", 0))), process_index=process_index,
                                      process_count=process_count, worker_count=int(d.get("worker_count", 0)))
    return source, it, np.asarray(neg, np.float32)


# ----------------------------------------------------------------------------------- main
def _writable(workdir: str) -> None:
    try:
        fileio.ensure_writable_dir(workdir)
    except OSError as e:
        raise RunError(f"workdir {e}") from None


def _run_meta(config, student, stage):
    return {"stage": stage, "model": student.to_config(), "scan_layers": student.scan_layers,
            "config": config.to_dict()}


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


def _opt_kwargs(cfg) -> dict:
    return dict(lr=float(cfg.lr), b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                weight_decay=float(cfg.get("weight_decay", 0.0)), eps=float(cfg.get("eps", 1e-8)),
                warmup_steps=int(cfg.get("warmup_steps", 0)), grad_clip=float(cfg.get("grad_clip", 1.0)))


class _Sigterm:
    def __init__(self):
        self.received = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.received = True
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Run (or resume) the stage in ``config`` in ``workdir``; returns the last metrics."""
    validate_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    _writable(workdir)
    stage = config.stage
    pid, pcount = jax.process_index(), jax.process_count()
    writer = metrics_lib.create_writer(workdir, process_index=pid,
                                       tensorboard=bool(_get(config, "train.tensorboard", True)))

    _, sizes = _mesh_sizes(config, pcount)
    mesh = parallel.make_mesh(*sizes, allow_subset=pcount == 1)
    if mesh.devices.size < jax.device_count():
        log.warning("the mesh %s uses %d of %d devices", dict(mesh.shape), mesh.devices.size, jax.device_count())
    rules = parallel.DEFAULT_RULES

    student, student_params, teacher, teacher_params, critic_params, notes = build_networks(config)
    meta = _run_meta(config, student, stage)
    existing = ckpt_lib.read_run_file(workdir)
    if existing is not None:
        _check_resume_compatible(existing, meta, workdir)
    if pid == 0:
        ckpt_lib.write_run_file(workdir, meta)
    for n in notes:
        log.info(n)

    # optimizers and masks
    mask = optim.trainable_mask(student_params, list(_get(config, "optim.trainable_patterns", []) or []))
    opt_kw = _opt_kwargs(config.optim)
    tx = optim.make_optimizer(**opt_kw, mask=mask)
    lr_fn = optim.lr_schedule(opt_kw["lr"], opt_kw["warmup_steps"])
    critic_tx = critic_mask = None
    if stage == "on_policy":
        ccfg = config.get("critic_optim") or config.optim
        critic_mask = optim.trainable_mask(critic_params, list(ccfg.get("trainable_patterns", []) or []))
        critic_tx = optim.make_optimizer(**_opt_kwargs(ccfg), mask=critic_mask)
    spec = stages.StageSpec(
        stage=stage, student=student, teacher=teacher,
        loss_options=stages.check_loss_options(stage, config.get("loss") or {}),
        critic_loss_options=(stages.check_loss_options(stage, config.get("critic_loss") or {}, "config.critic_loss",
                                                       onpolicy_critic_loss) if stage == "on_policy" else {}),
        tx=tx, critic_tx=critic_tx, trainable_mask=mask, critic_mask=critic_mask,
        ema_decay=float(_get(config, "ema.decay", 0.999)), ema_warmup_steps=int(_get(config, "ema.warmup_steps", 0)),
        lr_fn=lr_fn, critic_update_ratio=int(_get(config, "train.critic_update_ratio", 1)))

    # shardings
    rep = parallel.replicated(mesh)
    p_sh = parallel.param_shardings(student.abstract_params(), mesh, rules)
    t_sh = parallel.param_shardings(teacher.abstract_params(), mesh, rules) if teacher is not None else None
    abstract_opt = jax.eval_shape(tx.init, student_params)
    abstract_copt = jax.eval_shape(critic_tx.init, critic_params) if critic_tx is not None else None
    state_sh = TrainState(
        step=rep, rng=rep, params=p_sh, ema_params=p_sh, opt_state=opt_state_shardings(abstract_opt, p_sh, mesh),
        critic_params=t_sh if stage == "on_policy" else None,
        critic_opt_state=opt_state_shardings(abstract_copt, t_sh, mesh) if abstract_copt is not None else None)

    # data
    source, data_it, neg = build_data(config, process_index=pid, process_count=pcount)

    def next_batch():
        local = next(data_it)
        g = data_lib.global_batch({"x0": local["latents"], "context": local["context"]}, mesh)
        g["neg_context"] = neg_global
        return g

    neg_global = jax.device_put(jnp.asarray(neg), rep)

    # state: resume or init
    ckpt = ckpt_lib.RunCheckpointer(workdir, max_to_keep=int(_get(config, "train.keep_checkpoints", 3)),
                                    async_save=bool(_get(config, "train.async_checkpointing", True)))
    params_dtype = jnp.float32

    def to_abstract(tree, sh):
        return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)

    abstract_params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, params_dtype), student_params)
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
        params=to_abstract(abstract_params, p_sh), ema_params=to_abstract(abstract_params, p_sh),
        opt_state=to_abstract(abstract_opt, state_sh.opt_state),
        critic_params=to_abstract(critic_params, t_sh) if stage == "on_policy" else None,
        critic_opt_state=to_abstract(abstract_copt, state_sh.critic_opt_state) if abstract_copt is not None else None)
    latest = ckpt.latest_step()
    if latest is not None and latest >= int(config.train.steps):
        log.info("nothing to do: %s is already at step %d of %d", workdir, latest, int(config.train.steps))
        ckpt.close()
        writer.close()
        return {"step": latest}
    if latest is not None:
        try:
            state = ckpt.restore(latest, abstract_state, data_it)
        except (ValueError, KeyError, TypeError) as e:
            raise RunError(f"incompatible checkpoint: cannot restore {ckpt.directory}/{latest} into this config's "
                           f"train state: {e}") from None
        log.info("resumed from %s step %d on %d devices", ckpt.directory, latest, jax.device_count())
    else:
        params = jax.device_put(jax.tree_util.tree_map(lambda x: jnp.asarray(x, params_dtype), student_params), p_sh)
        ema = jax.tree_util.tree_map(jnp.copy, params)
        opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
        cparams = copt = None
        if stage == "on_policy":
            cparams = jax.device_put(jax.tree_util.tree_map(lambda x: jnp.asarray(x, params_dtype), critic_params), t_sh)
            copt = jax.jit(critic_tx.init, out_shardings=state_sh.critic_opt_state)(cparams)
        state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep),
                           rng=jax.device_put(new_rng(int(config.get("seed", 0))), rep),
                           params=params, ema_params=ema, opt_state=opt_state, critic_params=cparams,
                           critic_opt_state=copt)
    frozen = jax.device_put(teacher_params, t_sh) if stage in ("on_policy", "consistency") else None
    del student_params, teacher_params, critic_params

    if pid == 0:
        log.info("parameters of the trained network:\n%s", metrics_lib.parameter_overview(state.params, mask=mask))

    # jit + AOT compile
    probe = next_batch()
    batch_sh = jax.tree_util.tree_map(lambda x: x.sharding, probe)
    abstract_batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), probe)
    abstract_frozen = to_abstract(frozen, t_sh) if frozen is not None else None
    gen_jit = jax.jit(stages.make_generator_step(spec), in_shardings=(state_sh, t_sh if frozen is not None else None, batch_sh),
                      out_shardings=(state_sh, rep), donate_argnums=(0,))
    abstract_state_sh = to_abstract(state, state_sh)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        gen_step = gen_jit.lower(abstract_state_sh, abstract_frozen, abstract_batch).compile()
        log.info("compiled the %s step in %.1fs; memory: %s", stage, time.perf_counter() - t0,
                 _memory_summary(gen_step))
        critic_step = None
        if stage == "on_policy":
            critic_jit = jax.jit(stages.make_critic_step(spec), in_shardings=(state_sh, batch_sh),
                                 out_shardings=(state_sh, rep), donate_argnums=(0,))
            critic_step = critic_jit.lower(abstract_state_sh, abstract_batch).compile()
            log.info("compiled the critic step; memory: %s", _memory_summary(critic_step))

    total = int(config.train.steps)
    log_every = int(_get(config, "train.log_every", 10))
    ckpt_every = int(_get(config, "train.checkpoint_every", 1000))
    ratio = spec.critic_update_ratio
    step = int(host_value(state.step))
    progress = metrics_lib.Progress(total, start_step=step)
    pending = [probe]
    last: dict[str, float] = {}

    def take():
        return pending.pop() if pending else next_batch()

    with _Sigterm() as sig, jax.set_mesh(mesh):
        while step < total:
            t_step = time.perf_counter()
            out: dict[str, Any] = {}
            if stage != "on_policy" or step % ratio == 0:
                state, gm = gen_step(state, frozen, take())
                out.update(gm)
            if critic_step is not None:
                state, cm = critic_step(state, take())
                out.update(cm)
            step += 1
            loss_key = "loss" if "loss" in out else "critic/loss"
            loss = float(host_value(out[loss_key]))
            if not math.isfinite(loss):
                ckpt.wait()
                good = ckpt.latest_step()
                raise NonFiniteLoss(f"non-finite {loss_key} ({loss}) at step {step}; stopping. "
                                    f"The last good checkpoint is step {good} in {ckpt.directory}"
                                    if good is not None else
                                    f"non-finite {loss_key} ({loss}) at step {step}; stopping (no checkpoint yet)")
            progress(step)
            if step % log_every == 0 or step == total:
                scalars = {k: float(host_value(v)) for k, v in out.items() if np.ndim(v) == 0}
                scalars["step_time_sec"] = time.perf_counter() - t_step
                scalars.update(progress.summary(step))
                writer.write_scalars(step, scalars)
                last = dict(scalars, step=step)
            if step % ckpt_every == 0 or step == total or sig.received:
                ckpt.save(state, data_it)
            if sig.received:
                ckpt.wait()
                log.warning("stopped by SIGTERM at step %d; checkpoint saved", step)
                break
    ckpt.close()
    writer.flush()
    writer.close()
    return last


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
