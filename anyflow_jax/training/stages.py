"""The four training stages as pure step functions.

==============  ==========================================  =====================================
stage           objective (``anyflow_jax.losses``)          networks
==============  ==========================================  =====================================
``teacher``     ``flow_matching_loss``                      trained teacher (one time input)
``flow_map``    ``flow_map_loss`` (stage 1)                 trained flow-map student
``on_policy``   ``onpolicy_generator_loss`` (stage 2:       trained student, frozen teacher (real
                backward simulation + DMD + stage-1 loss)   score), trained critic (fake score)
                and ``onpolicy_critic_loss``
``consistency`` ``consistency_loss`` (baseline)             trained student, its EMA as target,
                                                            frozen teacher
==============  ==========================================  =====================================

A step takes ``(state, frozen_params, batch)`` and returns ``(state, metrics)``; networks are
closed over only as module definitions, parameters are always explicit arguments. Keys are
``fold_in(state.rng, 2 * step)`` for the generator and ``... + 1`` for the critic, so a resumed
run draws exactly the keys of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from anyflow_jax import losses
from anyflow_jax.models.wan import WanTransformer3D, make_apply_fn
from anyflow_jax.training import optim
from anyflow_jax.training.state import TrainState

STAGES = ("teacher", "flow_map", "on_policy", "consistency")

# stage -> (generator loss, whether the student is a flow-map model, whether a frozen teacher is needed)
_GEN_LOSS = {
    "teacher": losses.flow_matching_loss,
    "flow_map": losses.flow_map_loss,
    "on_policy": losses.onpolicy_generator_loss,
    "consistency": losses.consistency_loss,
}
STUDENT_IS_FLOW_MAP = {"teacher": False, "flow_map": True, "on_policy": True, "consistency": False}
NEEDS_TEACHER = {"teacher": False, "flow_map": False, "on_policy": True, "consistency": True}


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"config.stage={stage!r} is not a known stage; expected one of {STAGES}")
    return stage


def check_loss_options(stage: str, options: Mapping[str, Any], field: str = "config.loss",
                       fn: Callable | None = None) -> dict[str, Any]:
    """The keyword options a stage's loss accepts; unknown names fail naming the field."""
    fn = fn or _GEN_LOSS[check_stage(stage)]
    params = inspect.signature(fn).parameters
    allowed = {n for n, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY}
    allowed -= {"num_steps", "grad_step"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{field} has options {unknown} that {fn.__name__} does not take; allowed: {sorted(allowed)}")
    out = {}
    for k, v in options.items():
        out[k] = tuple(v) if isinstance(v, list) else (dict(v) if hasattr(v, "items") else v)
    return out


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What a step needs besides parameters: static modules, options and optimizers."""
    stage: str
    student: WanTransformer3D
    teacher: WanTransformer3D | None  # frozen real score / consistency teacher; also the critic's module
    loss_options: Mapping[str, Any]
    critic_loss_options: Mapping[str, Any]
    tx: optax.GradientTransformation
    critic_tx: optax.GradientTransformation | None
    trainable_mask: Any
    critic_mask: Any
    ema_decay: float
    ema_warmup_steps: int
    lr_fn: Callable[[Any], Any]
    critic_update_ratio: int = 1


def _grad_metrics(grads, mask, lr):
    return {"grad_norm": optim.grad_norm(grads, mask), "lr": jnp.asarray(lr, jnp.float32)}


def make_generator_step(spec: StageSpec) -> Callable:
    """``step(state, frozen_params, batch) -> (state, metrics)`` for the trained network."""
    student_apply = make_apply_fn(spec.student)
    teacher_apply = make_apply_fn(spec.teacher) if spec.teacher is not None else None
    loss_fn = _GEN_LOSS[spec.stage]
    opts = dict(spec.loss_options)
    # Stage 2 counts a global step per critic update (the generator runs every
    # `critic_update_ratio` steps); every other stage counts generator updates.
    increments = spec.stage != "on_policy"

    def step(state: TrainState, frozen_params, batch):
        key = jax.random.fold_in(state.key(), 2 * state.step)

        def objective(p):
            if spec.stage in ("teacher", "flow_map"):
                return loss_fn(student_apply, p, batch, key, **opts)
            if spec.stage == "consistency":
                return loss_fn(student_apply, p, state.ema_params, teacher_apply, frozen_params, batch, key, **opts)
            return loss_fn(student_apply, p, teacher_apply, frozen_params, teacher_apply, state.critic_params,
                           batch, key, **opts)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_step = state.step + 1 if increments else state.step
        ema = optim.ema_update(state.ema_params, params, state.step, decay=spec.ema_decay,
                               warmup_steps=spec.ema_warmup_steps, mask=spec.trainable_mask)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics.update(_grad_metrics(grads, spec.trainable_mask, spec.lr_fn(state.step)))
        return state.replace(step=new_step, params=params, ema_params=ema, opt_state=opt_state), metrics

    return step


def make_critic_step(spec: StageSpec) -> Callable:
    """Stage-2 critic update on a stop-gradient rollout: ``step(state, batch)``; advances the step."""
    student_apply = make_apply_fn(spec.student)
    critic_apply = make_apply_fn(spec.teacher)
    opts = dict(spec.critic_loss_options)

    def step(state: TrainState, batch):
        key = jax.random.fold_in(state.key(), 2 * state.step + 1)

        def objective(cp):
            return losses.onpolicy_critic_loss(student_apply, state.params, critic_apply, cp, batch, key, **opts)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.critic_params)
        updates, opt_state = spec.critic_tx.update(grads, state.critic_opt_state, state.critic_params)
        critic_params = optax.apply_updates(state.critic_params, updates)
        metrics = {f"critic/{k}": v for k, v in metrics.items()}
        metrics["critic/loss"] = loss
        metrics["critic/grad_norm"] = optim.grad_norm(grads, spec.critic_mask)
        return state.replace(step=state.step + 1, critic_params=critic_params, critic_opt_state=opt_state), metrics

    return step
