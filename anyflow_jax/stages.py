"""The stage registry: one record per training stage, and the samplers the stages' models use.

Everything stage-specific lives in a :class:`Stage` record: its objective (an adapter around a
model-agnostic loss of :mod:`anyflow_jax.losses`), the networks it needs, whether the student is
a flow map, its sampler and default guidance, its name in evaluations, the checkpoints it starts
from, and its default options. The trainer, the configs, the sampler, the evaluation and the toy
pipeline read records; none of them compares stage names. Adding a stage means adding one record
(:func:`register`) and, when no existing loss fits, one objective adapter.

==============  ==========================================  =====================================
stage           objective (``anyflow_jax.losses``)          networks
==============  ==========================================  =====================================
``teacher``     ``flow_matching_loss``                      trained teacher (one time input)
``flow_map``    ``flow_map_loss`` (stage 1)                 trained flow-map student
``on_policy``   ``onpolicy_generator_loss`` (stage 2:       trained student, frozen teacher (real
                backward simulation + DMD + stage-1 loss)   score), trained critic (fake score)
                and ``onpolicy_critic_loss``
``consistency`` ``consistency_distillation_loss``           trained student, its EMA as target
                (baseline; discrete or continuous time)     (discrete time), frozen teacher
``far_flow_map`` ``causal_flow_map_loss`` (causal stage 1:  trained FAR (chunk-causal) flow-map
                teacher forcing with the clean copy,        student, made from the teacher
                chunk-count sampling, 10% bidirectional)    (``student_is_far``)
``far_on_policy`` ``causal_onpolicy_generator_loss``        trained FAR student (from
                (causal stage 2: chunk-by-chunk backward    ``far_flow_map``), frozen bidirectional
                simulation on the KV cache + DMD + causal   teacher, trained bidirectional critic
                stage-1 loss) and ``causal_onpolicy_critic_loss``
==============  ==========================================  =====================================

A FAR stage (``student_is_far``) trains the chunk-causal network of
:mod:`anyflow_jax.models.far_wan`: the trainer turns its starting point into one with
``make_far_model`` (FAR fields from ``config.model``), and its models sample chunk by chunk
(the ``causal_flow_map`` sampler, :mod:`anyflow_jax.flow.causal_sampling`).

This module imports the losses and the flow math only: sampling and inference use it without
the trainer, and the configs use it without importing any training code.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from anyflow_jax import losses
from anyflow_jax.errors import RunError
from anyflow_jax.flow import sampling

# ------------------------------------------------------------------------------------ samplers


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How a kind of model generates: ``run(apply_fn, params, noise, context, *, num_steps, shift,
    guidance, neg_context, keys, grid=None)`` returns the sample at tau = 0. ``keys`` are per-sample
    PRNG keys (B,), used only by samplers with ``stochastic=True``; with ``grid`` (a padded step
    grid, :func:`anyflow_jax.flow.sampling.padded_step_grid`) ``num_steps`` may be traced."""
    name: str
    run: Callable[..., Any]
    default_guidance: float
    supports_guidance: bool = True
    flow_map_model: bool = False  # the sampler needs a two-time (flow-map) model
    stochastic: bool = False
    description: str = ""
    # the sampler needs a FAR (chunk-causal) network: ``run``'s first argument is then the FAR
    # module itself (the chunk loop calls its cache paths), not an apply function; ``run`` also
    # takes ``context_latents`` (given first latent frames: image- and video-to-video)
    causal: bool = False


def _ode(apply_fn, params, noise, context, *, num_steps, shift, guidance, neg_context, keys, grid=None):
    del keys
    return sampling.ode_sample(apply_fn, params, noise, context, num_steps=num_steps, shift=shift,
                               guidance_scale=guidance, neg_context=neg_context if guidance != 1.0 else None,
                               grid=grid)


def _flow_map(apply_fn, params, noise, context, *, num_steps, shift, guidance, neg_context, keys, grid=None):
    del keys
    return sampling.sample(apply_fn, params, noise, context, num_steps=num_steps, shift=shift,
                           guidance_scale=guidance, neg_context=neg_context if guidance != 1.0 else None, grid=grid)


def _causal(model, params, noise, context, *, num_steps, shift, guidance, neg_context, keys, grid=None,
            context_latents=None, use_mean_velocity=True):
    del keys
    from anyflow_jax.flow import causal_sampling  # the sampler of FAR networks (imports no model code)
    return causal_sampling.causal_sample(model, params, noise, context, num_steps=num_steps, shift=shift,
                                         guidance_scale=guidance, neg_context=neg_context if guidance != 1.0 else None,
                                         grid=grid, context_latents=context_latents,
                                         use_mean_velocity=use_mean_velocity)


def _consistency(apply_fn, params, noise, context, *, num_steps, shift, guidance, neg_context, keys, grid=None):
    del guidance, neg_context
    return sampling.consistency_sample(apply_fn, params, noise, context, key=keys, num_steps=num_steps, shift=shift,
                                       grid=grid)


SAMPLERS: dict[str, Sampler] = {
    s.name: s for s in (
        # teacher validation in the reference: Euler ODE with CFG 3
        Sampler("teacher", _ode, 3.0, description="Euler ODE sampler (r = t), CFG"),
        # the AnyFlow student fuses CFG during stage 1, so it samples with guidance 1
        Sampler("flow_map", _flow_map, 1.0, flow_map_model=True, description="any-step flow-map jumps"),
        Sampler("consistency", _consistency, 1.0, supports_guidance=False, stochastic=True,
                description="multistep consistency sampling (re-noising)"),
        # the FAR student: chunk by chunk, each chunk's any-step jumps against the KV cache of the
        # chunks before it (re-encoded per chunk); guidance fused, as the bidirectional student
        Sampler("causal_flow_map", _causal, 1.0, flow_map_model=True, causal=True,
                description="chunk-by-chunk any-step flow-map jumps with the KV cache (FAR)"),
        # a single-time FAR network: the same chunk loop with Euler steps (r = t) and CFG
        Sampler("causal_teacher", functools.partial(_causal, use_mean_velocity=False), 3.0, causal=True,
                description="chunk-by-chunk Euler ODE steps with the KV cache (a single-time FAR network), CFG"),
    )
}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise RunError(f"unknown sampler kind {name!r}; expected one of {tuple(SAMPLERS)}")
    return SAMPLERS[name]


def kind_matches(found: str, declared: str) -> bool:
    """Whether a checkpoint of sampler kind ``found`` may be loaded as ``declared``: the same kind,
    or the bidirectional kind declared for a causal checkpoint (``flow_map`` for a FAR student,
    ``teacher`` for a single-time FAR network: a FAR network always samples chunk by chunk)."""
    if found == declared:
        return True
    s = SAMPLERS.get(found)
    return s is not None and s.causal and declared == ("flow_map" if s.flow_map_model else "teacher")


# ------------------------------------------------------------------------------------ objectives


@dataclasses.dataclass(frozen=True)
class Networks:
    """What an objective adapter is given: apply functions and parameter pytrees.

    ``student_apply``/``student_params`` are the student (the network a stage trains; a teacher
    stage's "student" is the teacher being trained), ``ema_params`` its EMA;
    ``teacher_apply``/``teacher_params`` the frozen teacher (``None`` when the stage needs none);
    ``critic_apply``/``critic_params`` the stage-2 critic (``None`` otherwise). The step puts the
    tree being differentiated into its field: ``student_params`` for the generator objective,
    ``critic_params`` for the critic objective. ``student_model`` is the student's module, for
    adapters that need its static layout (the FAR chunk partition); ``None`` where unknown.
    """
    student_apply: Callable
    student_params: Any
    ema_params: Any = None
    teacher_apply: Callable | None = None
    teacher_params: Any = None
    critic_apply: Callable | None = None
    critic_params: Any = None
    student_model: Any = None


Objective = Callable[[Networks, Mapping[str, Any], Any, Mapping[str, Any]], tuple[Any, dict]]
"""``objective(nets, batch, key, options) -> (loss, metrics)``."""


def single_network(loss_fn) -> Objective:
    """Adapter for a loss of one network: ``loss_fn(apply, params, batch, key, **options)``."""
    def objective(nets, batch, key, options):
        return loss_fn(nets.student_apply, nets.student_params, batch, key, **options)
    objective.loss_fn = loss_fn
    return objective


def _consistency_objective(nets, batch, key, options):
    return losses.consistency_distillation_loss(nets.student_apply, nets.student_params, nets.ema_params,
                                                nets.teacher_apply, nets.teacher_params, batch, key, **options)


def _onpolicy_objective(nets, batch, key, options):
    return losses.onpolicy_generator_loss(nets.student_apply, nets.student_params, nets.teacher_apply, nets.teacher_params,
                                          nets.critic_apply, nets.critic_params, batch, key, **options)


def far_loss_options(model, options: Mapping[str, Any],
                     names: tuple[str, ...] = ("chunk_partition", "full_chunk_limit")) -> dict[str, Any]:
    """``options`` with the FAR network's ``chunk_partition``/``full_chunk_limit`` (or just
    ``names``) filled in (a value set in ``config.loss`` must equal the network's)."""
    opts = dict(options)
    for name in names:
        have = getattr(model, name, None) if model is not None else None
        given = opts.get(name)
        if given is None:
            if have is None:
                raise RunError(f"config.loss.{name} is unset and the student is not a FAR network")
            opts[name] = have
        elif have is not None and (tuple(given) if name == "chunk_partition" else given) != have:
            raise RunError(f"config.loss.{name}={given!r} differs from the FAR student's {name}={have!r} "
                           "(leave it unset: the objective takes the network's)")
    return opts


def _causal_flow_map_objective(nets, batch, key, options):
    apply = nets.student_apply

    def causal(p, z, t, r, c, clean):  # the chunk-causal forward with the clean copy
        return apply(p, z, t, r, c, clean=clean)

    def bidirectional(p, z, t, r, c):  # the same weights' bidirectional path
        return apply(p, z, t, r, c, causal=False)

    def causal_at(p, z, t, r, c, clean, n):  # the padded layout: one shape for every chunk count
        return apply(p, z, t, r, c, clean=clean, num_chunks=n)
    return losses.causal_flow_map_loss(causal, bidirectional, nets.student_params, batch, key,
                                       causal_apply_at=causal_at, **far_loss_options(nets.student_model, options))


def far_student_fns(apply, model) -> "losses.CausalStudent":
    """The FAR student's paths as the functions the causal losses take: the cache encoding at
    t = r = 0 (``empty_cache`` before the first chunk), the cached chunk, the teacher-forced
    training forward, the bidirectional path, the scanned layout's encoding and chunk and the
    padded training forward, all of ``apply``'s parameters."""
    def encode(p, frames, c):
        b, f, h, w, _ = frames.shape
        if f == 0:
            return model.empty_cache(b, h, w)
        zeros = jnp.zeros((b, f), jnp.float32)
        return apply(p, frames, zeros, zeros, c, encode_cache=True)

    def chunk_apply(p, z, t, r, c, cache):
        return apply(p, z, t, r, c, kv_cache=cache)

    def causal(p, z, t, r, c, clean):
        return apply(p, z, t, r, c, clean=clean)

    def bidirectional(p, z, t, r, c):
        return apply(p, z, t, r, c, causal=False)

    def encode_at(p, video, index, c):  # the scanned layout (a lax.scan over chunks)
        zeros = jnp.zeros(video.shape[:2], jnp.float32)
        return apply(p, video, zeros, zeros, c, encode_cache=True, chunk_index=index)

    def chunk_apply_at(p, z, t, r, c, cache):
        return apply(p, z, t, r, c, kv_cache=cache)

    def causal_at(p, z, t, r, c, clean, n):  # the co-trained loss's padded layout
        return apply(p, z, t, r, c, clean=clean, num_chunks=n)
    return losses.CausalStudent(encode, chunk_apply, causal, bidirectional, encode_at, chunk_apply_at, causal_at)


def _far_student_model(nets):
    if nets.student_model is None or not hasattr(nets.student_model, "empty_cache"):
        raise RunError("the causal stage-2 objective needs the FAR student network (Networks.student_model)")
    return nets.student_model


def _causal_onpolicy_objective(nets, batch, key, options):
    model = _far_student_model(nets)
    return losses.causal_onpolicy_generator_loss(
        far_student_fns(nets.student_apply, model), nets.student_params, nets.teacher_apply, nets.teacher_params,
        nets.critic_apply, nets.critic_params, batch, key, **far_loss_options(model, options))


def _causal_onpolicy_critic_objective(nets, batch, key, options):
    # the student's causal rollout (stop-gradient); the bidirectional critic is differentiated
    model = _far_student_model(nets)
    return losses.causal_onpolicy_critic_loss(
        far_student_fns(nets.student_apply, model), nets.student_params, nets.critic_apply, nets.critic_params,
        batch, key, **far_loss_options(model, options, names=("chunk_partition",)))


def _onpolicy_critic_objective(nets, batch, key, options):
    # the student generates the (stop-gradient) rollout; the critic is differentiated
    return losses.onpolicy_critic_loss(nets.student_apply, nets.student_params, nets.critic_apply, nets.critic_params,
                                       batch, key, **options)


# ------------------------------------------------------------------------------------ stages
# Stage-1 objective with the reference's options (the reference spec, section 4).
REFERENCE_FLOW_MAP_LOSS = dict(
    shift=5.0, diffusion_ratio=0.5, consistency_ratio=0.25, derivative="central", delta=0.005,
    fuse_guidance_scale=3.0, text_dropout=0.1, weighting="beta08", adaptive_rescale=True)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage.

    - ``objective(nets, batch, key, options)``: the generator loss; ``loss_fn`` is the loss
      whose keyword-only options ``config.loss`` may set.
    - ``critic_objective``/``critic_loss_fn``: a second trained network (stage 2's critic),
      updated after every generator step group; ``None`` for single-network stages.
    - ``student_is_flow_map``: the trained network is a two-time flow-map model (a teacher
      starting point is converted, the delta embedder copied from the time embedder).
    - ``student_is_far``: the trained network is the FAR chunk-causal network (a bidirectional
      starting point is converted with ``make_far_model``, its FAR fields from ``config.model``);
      its sampler must be a causal one.
    - ``toy_pipeline``: the toy pipeline trains and evaluates it by default.
    - ``needs_teacher``: a frozen teacher (``config.init.teacher``) is an input of the objective.
    - ``sampler``: the :data:`SAMPLERS` kind its models sample with.
    - ``eval_name``: the model's name in evaluations of the toy pipeline.
    - ``starts_from``: ``{init field: stage}``: the workdirs the toy pipeline starts it from
      (``{}``: random init, allowed only with ``random_init``).
    - ``loss_defaults``/``critic_loss_defaults``: ``config.loss``/``config.critic_loss``.
    - ``config_defaults``: other config fields (dotted names) this stage's reference values set.
    - ``steps_per_update``: ``"generator"`` (one step per generator update) or ``"critic"`` (one
      step per critic update; the generator runs every ``train.critic_update_ratio`` steps).
    """
    name: str
    objective: Objective
    loss_fn: Callable
    sampler: str
    eval_name: str
    student_is_flow_map: bool = False
    student_is_far: bool = False
    needs_teacher: bool = False
    critic_objective: Objective | None = None
    critic_loss_fn: Callable | None = None
    random_init: bool = False
    starts_from: Mapping[str, str] = dataclasses.field(default_factory=dict)
    loss_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    critic_loss_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""
    toy_pipeline: bool = True

    @property
    def has_critic(self) -> bool:
        return self.critic_objective is not None

    @property
    def steps_per_update(self) -> str:
        return "critic" if self.has_critic else "generator"

    def loss_options(self, options: Mapping[str, Any] | None, *, critic: bool = False) -> dict[str, Any]:
        """Validate ``config.loss`` (or ``config.critic_loss``) against the loss's keyword-only
        options: unknown names fail naming the field; lists become tuples."""
        fn = self.critic_loss_fn if critic else self.loss_fn
        field = "config.critic_loss" if critic else "config.loss"
        return check_options(fn, options or {}, field)

    def validate(self) -> None:
        get_sampler(self.sampler)
        if self.student_is_flow_map != get_sampler(self.sampler).flow_map_model:
            raise ValueError(f"stage {self.name!r}: student_is_flow_map={self.student_is_flow_map} does not match "
                             f"sampler {self.sampler!r}")
        if self.student_is_far != get_sampler(self.sampler).causal:
            raise ValueError(f"stage {self.name!r}: student_is_far={self.student_is_far} does not match "
                             f"sampler {self.sampler!r}")
        if (self.critic_objective is None) != (self.critic_loss_fn is None):
            raise ValueError(f"stage {self.name!r}: critic_objective and critic_loss_fn go together")
        if not self.starts_from and not self.random_init:
            raise ValueError(f"stage {self.name!r}: starts_from is empty but random_init is False")
        bad = sorted(set(self.starts_from) - {"student", "teacher", "critic"})
        if bad:
            raise ValueError(f"stage {self.name!r}: starts_from has unknown init fields {bad}")
        if self.needs_teacher and "teacher" not in self.starts_from:
            raise ValueError(f"stage {self.name!r}: needs a teacher but starts_from names none")
        self.loss_options(self.loss_defaults)
        if self.has_critic:
            self.loss_options(self.critic_loss_defaults, critic=True)


# per-call forcing arguments and network functions of the losses, not config options
_NOT_OPTIONS = {"num_steps", "grad_step", "causal_apply_at"}
# options with a fixed set of values, checked with the config (not first when the step traces)
_CHOICES = {"chunk_loop": ("scan", "unrolled"), "chunk_layout": ("padded", "switch")}
_RENAMED = {"dmd_batch_size": "dmd_num_samples (a count of the global batch; the reference's value is per GPU)"}


def check_options(fn: Callable, options: Mapping[str, Any], field: str) -> dict[str, Any]:
    """The keyword-only options ``fn`` accepts, checked; unknown names fail naming the field."""
    params = inspect.signature(fn).parameters
    allowed = {n for n, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY} - _NOT_OPTIONS
    for name in sorted(set(options) - allowed):
        hint = f"; it was renamed {_RENAMED[name]}" if name in _RENAMED else ""
        close = difflib.get_close_matches(name, sorted(allowed), n=1)
        if not hint and close:
            hint = f"; did you mean {field}.{close[0]}?"
        raise RunError(f"{field}.{name} is not an option of {fn.__name__}{hint} (options: {', '.join(sorted(allowed))})")
    for name, choices in _CHOICES.items():
        if name in options and options[name] not in choices:
            raise RunError(f"{field}.{name} must be one of {', '.join(map(repr, choices))}, got {options[name]!r}")
    out = {}
    for k, v in options.items():
        out[k] = tuple(v) if isinstance(v, list) else (dict(v) if hasattr(v, "items") else v)
    return out


STAGES: dict[str, Stage] = {}


def register(stage: Stage, *, replace: bool = False) -> Stage:
    """Add ``stage`` to the registry (checked for consistency); returns it."""
    stage.validate()
    if stage.name in STAGES and not replace:
        raise ValueError(f"stage {stage.name!r} is already registered")
    STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    STAGES.pop(name, None)


def get(name: Any) -> Stage:
    """The record of stage ``name``; an unknown name is a :class:`RunError` naming the known ones."""
    if name not in STAGES:
        close = difflib.get_close_matches(str(name), list(STAGES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RunError(f"config.stage={name!r} is not a known stage{hint} (stages: {', '.join(STAGES)})")
    return STAGES[name]


def names() -> tuple[str, ...]:
    """Registered stages, in registration order (the toy pipeline's order)."""
    return tuple(STAGES)


def pipeline_names() -> tuple[str, ...]:
    """The stages the toy pipeline runs by default (``toy_pipeline``), in registration order."""
    return tuple(name for name, s in STAGES.items() if s.toy_pipeline)


def by_sampler(kind: str) -> tuple[Stage, ...]:
    return tuple(s for s in STAGES.values() if s.sampler == kind)


register(Stage(
    name="teacher", objective=single_network(losses.flow_matching_loss), loss_fn=losses.flow_matching_loss,
    sampler="teacher", eval_name="teacher", random_init=True,
    loss_defaults=dict(shift=5.0, text_dropout=0.1),
    description="flow matching (text dropout to the negative embedding)"))

register(Stage(
    name="flow_map", objective=single_network(losses.flow_map_loss), loss_fn=losses.flow_map_loss,
    sampler="flow_map", eval_name="anyflow_stage1", student_is_flow_map=True,
    starts_from={"student": "teacher"}, loss_defaults=dict(REFERENCE_FLOW_MAP_LOSS),
    description="stage 1: MeanFlow-style flow-map loss, fused CFG, beta08 weighting, adaptive rescaling"))

register(Stage(
    name="on_policy", objective=_onpolicy_objective, loss_fn=losses.onpolicy_generator_loss,
    critic_objective=_onpolicy_critic_objective, critic_loss_fn=losses.onpolicy_critic_loss,
    sampler="flow_map", eval_name="anyflow", student_is_flow_map=True, needs_teacher=True,
    starts_from={"student": "flow_map", "teacher": "teacher"},
    loss_defaults=dict(steps_list=[2, 4, 8, 16, 50], shift=5.0, stop_prefix_grad=False, real_guidance_scale=3.0,
                       dmd_weight=1.0, cotrain_forward=True, flow_map_options=dict(REFERENCE_FLOW_MAP_LOSS)),
    critic_loss_defaults=dict(steps_list=[2, 4, 8, 16, 50], shift=5.0),
    # the reference's stage-2 optimiser (AdamW betas (0, 0.999), no warm-up) and EMA
    config_defaults={"optim.lr": 2e-6, "optim.b1": 0.0, "optim.b2": 0.999, "optim.warmup_steps": 0,
                     "ema.decay": 0.99, "ema.warmup_steps": 200, "train.steps": 1200},
    description="stage 2: Flow Map Backward Simulation + DMD against the teacher, co-trained stage-1 loss; critic"))

register(Stage(
    name="consistency", objective=_consistency_objective, loss_fn=losses.consistency_distillation_loss,
    sampler="consistency", eval_name="consistency", needs_teacher=True,
    starts_from={"student": "teacher", "teacher": "teacher"},
    loss_defaults=dict(num_discretization_steps=32, shift=5.0, teacher_guidance_scale=3.0, continuous_time=False,
                       derivative="jvp", delta=0.005, tangent_normalization=0.1),
    # not part of the reference: an rCM-style comparison model, trained like stage 2
    config_defaults={"optim.lr": 2e-6, "optim.b1": 0.0, "optim.b2": 0.999, "optim.warmup_steps": 0,
                     "ema.decay": 0.99, "ema.warmup_steps": 200},
    description="consistency-distillation baseline with an EMA target"))

# Causal FAR stage 1 (the reference's FAR_Wan_AnyFlow_Pretrain_Trainer, spec section 4.7): the
# stage-1 options plus the chunk-count sampling and the bidirectional branch. The chunk partition
# and the full-chunk window are the FAR network's (config.model), filled in by the adapter.
REFERENCE_FAR_FLOW_MAP_LOSS = dict(REFERENCE_FLOW_MAP_LOSS, long_context_ratio=0.5, bidirectional_prob=0.1)

register(Stage(
    name="far_flow_map", objective=_causal_flow_map_objective, loss_fn=losses.causal_flow_map_loss,
    sampler="causal_flow_map", eval_name="anyflow_far_stage1", student_is_flow_map=True, student_is_far=True,
    # ours: every chunk count in one padded layout ("switch": a branch per count, the reference's shapes)
    starts_from={"student": "teacher"}, loss_defaults=dict(REFERENCE_FAR_FLOW_MAP_LOSS, chunk_layout="padded"),
    # the reference trains far_patch_embedding in full next to the LoRA adapters
    config_defaults={"lora.train_in_full": ("far_patch_embedding",)},
    # not in the toy pipeline's default stages: `python -m anyflow_jax.pipeline --causal` adds the pair
    toy_pipeline=False,
    description="causal stage 1 (FAR): teacher-forced chunk-causal flow-map loss with the clean copy, chunk-count "
                "sampling with the long-context ratio, 10% bidirectional flow matching"))


# Causal FAR stage 2 (the reference's FAR_Wan_AnyFlow_OnPolicy_Trainer, spec section 6.4): the
# on_policy options with the causal rollout; the co-trained loss is causal stage 1 without its
# bidirectional branch. The chunk partition and window are the FAR student's (filled in by the
# adapters). The teacher (real score) and critic are bidirectional networks.
REFERENCE_FAR_ON_POLICY_LOSS = dict(
    steps_list=[2, 4, 8, 16, 50], shift=5.0, stop_prefix_grad=False, real_guidance_scale=3.0, dmd_weight=1.0,
    cotrain_forward=True,
    flow_map_options=dict(REFERENCE_FAR_FLOW_MAP_LOSS, bidirectional_prob=0.0, chunk_layout="padded"),
    # ours: the chunk loop as a lax.scan over chunks ("unrolled": the reference's per-chunk layouts)
    chunk_loop="scan")

register(Stage(
    name="far_on_policy", objective=_causal_onpolicy_objective, loss_fn=losses.causal_onpolicy_generator_loss,
    critic_objective=_causal_onpolicy_critic_objective, critic_loss_fn=losses.causal_onpolicy_critic_loss,
    sampler="causal_flow_map", eval_name="anyflow_far", student_is_flow_map=True, student_is_far=True,
    needs_teacher=True, starts_from={"student": "far_flow_map", "teacher": "teacher"},
    loss_defaults=REFERENCE_FAR_ON_POLICY_LOSS, critic_loss_defaults=dict(steps_list=[2, 4, 8, 16, 50], shift=5.0, chunk_loop="scan"),
    config_defaults=dict(STAGES["on_policy"].config_defaults, **{"lora.train_in_full": ("far_patch_embedding",)}),
    # not in the toy pipeline's default stages: `python -m anyflow_jax.pipeline --causal` adds the pair
    toy_pipeline=False,
    description="causal stage 2 (FAR): chunk-by-chunk backward simulation on the student's own detached chunks "
                "(KV cache), DMD and critic on the whole video with the bidirectional teacher, co-trained causal "
                "stage-1 loss"))


__all__ = ["Stage", "Sampler", "Networks", "STAGES", "SAMPLERS", "register", "unregister", "get", "names",
           "pipeline_names", "get_sampler", "kind_matches", "by_sampler", "single_network", "check_options", "far_loss_options",
           "REFERENCE_FLOW_MAP_LOSS", "REFERENCE_FAR_FLOW_MAP_LOSS",
           "REFERENCE_FAR_ON_POLICY_LOSS", "far_student_fns"]
