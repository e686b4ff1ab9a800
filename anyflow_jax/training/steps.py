"""Train steps, generic over the stage registry (:mod:`anyflow_jax.stages`).

A step takes ``(state, frozen_params, batch)`` and returns ``(state, metrics)``; networks are
closed over only as module definitions, parameters are always explicit arguments. The stage's
record supplies the objective; nothing here depends on which stage runs. Keys are
``fold_in(state.rng, 2 * step)`` for the generator and ``... + 1`` for the critic, so a resumed
run draws exactly the keys of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from anyflow_jax import lora as lora_lib
from anyflow_jax.models.wan import WanTransformer3D, make_apply_fn
from anyflow_jax.stages import Networks, Stage
from anyflow_jax.training import optim
from anyflow_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a step needs besides parameters: the stage record, static modules, options and
    optimizers."""
    stage: Stage
    student: WanTransformer3D
    teacher: WanTransformer3D | None  # frozen teacher; also the critic's module
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
    lora: bool = False  # the state's networks are adapters on the bases in LoraFrozen


def _student(spec: StepSpec, frozen_params, params):
    """The trained network's parameters as its apply function takes them: with LoRA the adapters
    on their frozen base, ``LoraParams(adapters, base)``, merged inside the network layer by layer
    (:func:`anyflow_jax.lora.network_apply`; docs/lora.md)."""
    if not spec.lora or params is None:
        return params
    return lora_lib.LoraParams(params, frozen_params.base)


def _critic(spec: StepSpec, frozen_params, params):
    if not spec.lora or params is None:
        return params
    return lora_lib.LoraParams(params, frozen_params.critic_base)


def _networks(spec: StepSpec, state: TrainState, frozen_params, *, merge_student: bool = True) -> Networks:
    teacher_apply = make_apply_fn(spec.teacher) if spec.teacher is not None else None
    if spec.lora:
        # student, its EMA and the critic are adapters on their base, merged by each layer of the
        # network where it is used (so inside the layer scan, one layer's merged kernel at a
        # time); the frozen teacher (real score) was merged once, outside the steps
        student = _student(spec, frozen_params, state.params) if merge_student else None
        critic_apply = lora_lib.network_apply(spec.teacher) if spec.teacher is not None else None
        return Networks(student_apply=lora_lib.network_apply(spec.student), student_params=student,
                        student_model=spec.student,
                        ema_params=_student(spec, frozen_params, state.ema_params),
                        teacher_apply=teacher_apply if spec.stage.needs_teacher else None,
                        teacher_params=frozen_params.teacher if spec.stage.needs_teacher else None,
                        critic_apply=critic_apply if spec.stage.has_critic else None,
                        critic_params=_critic(spec, frozen_params, state.critic_params))
    return Networks(student_apply=make_apply_fn(spec.student), student_params=state.params,
                    student_model=spec.student,
                    ema_params=state.ema_params,
                    teacher_apply=teacher_apply if spec.stage.needs_teacher else None,
                    teacher_params=frozen_params if spec.stage.needs_teacher else None,
                    critic_apply=teacher_apply if spec.stage.has_critic else None,
                    critic_params=state.critic_params)


def _descend(objective: Callable, params, opt_state, tx: optax.GradientTransformation, mask):
    """One optimizer step on ``objective(params) -> (loss, metrics)``: ``(params, opt_state, loss,
    metrics, grad_norm)``, the gradient norm over the leaves of ``mask``."""
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics, optim.grad_norm(grads, mask)


def make_generator_step(spec: StepSpec) -> Callable:
    """``step(state, frozen_params, batch) -> (state, metrics)`` for the trained network."""
    opts = dict(spec.loss_options)
    # A stage with a critic counts a global step per critic update (the generator runs every
    # `critic_update_ratio` steps); every other stage counts generator updates.
    increments = spec.stage.steps_per_update == "generator"

    def step(state: TrainState, frozen_params, batch):
        key = jax.random.fold_in(state.key(), 2 * state.step)
        nets = _networks(spec, state, frozen_params, merge_student=False)

        def objective(p):
            p = _student(spec, frozen_params, p)  # LoRA: the adapters (differentiated) on the base
            return spec.stage.objective(dataclasses.replace(nets, student_params=p), batch, key, opts)

        params, opt_state, loss, metrics, grad_norm = _descend(objective, state.params, state.opt_state, spec.tx,
                                                               spec.trainable_mask)
        new_step = state.step + 1 if increments else state.step
        ema = optim.ema_update(state.ema_params, params, state.step, decay=spec.ema_decay,
                               warmup_steps=spec.ema_warmup_steps, mask=spec.trainable_mask)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = jnp.asarray(spec.lr_fn(state.step), jnp.float32)
        return state.replace(step=new_step, params=params, ema_params=ema, opt_state=opt_state), metrics

    return step


def make_critic_step(spec: StepSpec) -> Callable:
    """Critic update on a stop-gradient rollout: ``step(state, frozen_params, batch)``; advances
    the step."""
    opts = dict(spec.critic_loss_options)

    def step(state: TrainState, frozen_params, batch):
        key = jax.random.fold_in(state.key(), 2 * state.step + 1)
        nets = _networks(spec, state, frozen_params)

        def objective(cp):
            cp = _critic(spec, frozen_params, cp)
            return spec.stage.critic_objective(dataclasses.replace(nets, critic_params=cp), batch, key, opts)

        critic_params, opt_state, loss, metrics, grad_norm = _descend(
            objective, state.critic_params, state.critic_opt_state, spec.critic_tx, spec.critic_mask)
        metrics = {f"critic/{k}": v for k, v in metrics.items()}
        metrics["critic/loss"] = loss
        metrics["critic/grad_norm"] = grad_norm
        return state.replace(step=state.step + 1, critic_params=critic_params, critic_opt_state=opt_state), metrics

    return step
