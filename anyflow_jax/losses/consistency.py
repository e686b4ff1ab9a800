"""Consistency-distillation baseline (not part of AnyFlow; the kind of method the paper compares with).

Discrete-time consistency distillation (Song et al., 2023) of a flow-matching teacher, in the
package's conventions. The consistency function is parameterised through the flow-map model with
``r = 0``: ``f(z, t) = z - t * u(z, t, 0, c)`` (the x0 prediction), so ``f(z, 0) = z`` holds by
construction. On the shifted M-step grid ``T_0 = 1 > ... > T_M = 0`` a sample picks an interval
``(t, s) = (T_n, T_{n+1})``; the teacher takes one Euler ODE step ``z_s = z_t - (t - s) v(z_t, t)``
and the student's prediction at ``(z_t, t)`` is pulled to the target network's prediction at
``(z_s, s)``. Sampling: :func:`anyflow_jax.flow.sampling.consistency_sample`.

:func:`continuous_consistency_loss` is the continuous-time form (sCM: Lu and Song, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models", 2024; the consistency part of rCM),
written for flow matching: the consistency condition ``df/dt = 0`` along the teacher's ODE, with
``f = z - t u(z, t, 0)``, is ``u = v - t du/dt``, the flow-map (MeanFlow) identity at ``r = 0``.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from anyflow_jax.flow import schedule
from anyflow_jax.losses import _common as C
from anyflow_jax.losses.flow_map import _value_and_derivative


def _teacher_guidance(teacher_guidance_scale, context, neg_context) -> float:
    """The teacher's CFG scale, checked (g > 1 needs both contexts)."""
    g = C.check_guidance(teacher_guidance_scale, "teacher_guidance_scale")
    if g != 1.0 and (neg_context is None or context is None):
        raise ValueError(f"teacher_guidance_scale={g} needs batch['context'] and batch['neg_context']")
    return g


def _noise(key, batch, x0):
    """``batch['eps']`` when given (checked), else standard normal noise shaped like ``x0``."""
    if batch.get("eps") is not None:
        C.check_same_shape(x0, batch["eps"], "batch['x0']", "batch['eps']")
        return jnp.asarray(batch["eps"], x0.dtype)
    return C.standard_normal(key, x0)


def _teacher_velocity(teacher_apply, teacher_params, z, t, context, neg_context, g, b):
    v = C.call_model(teacher_apply, teacher_params, z, t, t, context, "teacher_apply")
    if g != 1.0:
        neg_b = C.broadcast_negative(neg_context, context, b)
        v_u = C.call_model(teacher_apply, teacher_params, z, t, t, neg_b, "teacher_apply")
        v = v_u + g * (v - v_u)
    return jax.lax.stop_gradient(v)


def consistency_loss(
    apply_fn: C.ApplyFn,
    params: Any,
    target_params: Any,
    teacher_apply: C.ApplyFn,
    teacher_params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    num_discretization_steps: int = 32,
    shift: float = schedule.DEFAULT_SHIFT,
    teacher_guidance_scale: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Discrete-time consistency-distillation loss against one teacher Euler ODE step.

    batch: ``x0`` (B, F, ...), ``context``, ``neg_context`` (needed when
    ``teacher_guidance_scale > 1``); optional ``eps`` (noise) and ``n`` (B,) int interval indices.
    ``params`` is trained; ``target_params`` (e.g. an EMA of ``params``) gives the stop-gradient
    target. Loss = batch mean of the per-sample mean of ``(f_params(z_t, t) - sg(f_target(z_s, s)))^2``
    with ``f(z, t) = z - t u(z, t, 0)``; the teacher velocity is ``teacher_apply(p, z, t, t, c)``
    (with CFG ``v_u + g (v_c - v_u)`` when ``teacher_guidance_scale`` g > 1).
    """
    batch, x0, context, neg_context = C.unpack_data_batch(batch)
    b, f = x0.shape[:2]
    if not isinstance(num_discretization_steps, int) or num_discretization_steps < 1:
        raise ValueError(f"num_discretization_steps must be an int >= 1 (N >= 1), got {num_discretization_steps!r}")
    g = _teacher_guidance(teacher_guidance_scale, context, neg_context)

    k_eps, k_n = jax.random.split(key)
    eps = _noise(k_eps, batch, x0)
    if batch.get("n") is not None:
        if tuple(jnp.shape(batch["n"])) != (b,):
            raise ValueError(f"batch['n'] must have shape (B,) = ({b},), got {tuple(jnp.shape(batch['n']))}")
        n = jnp.asarray(batch["n"], jnp.int32)
    else:
        n = jax.random.randint(k_n, (b,), 0, num_discretization_steps)
    grid = schedule.step_grid(num_discretization_steps, shift)
    t = C.frames_time(grid[n], f)
    s = C.frames_time(grid[n + 1], f)

    z_t = schedule.add_noise(x0, eps, t)
    v = _teacher_velocity(teacher_apply, teacher_params, z_t, t, context, neg_context, g, b)
    z_s = jax.lax.stop_gradient(schedule.flow_map_step(z_t, v, t, s))

    zero = jnp.zeros_like(t)
    pred = schedule.flow_map_step(z_t, C.call_model(apply_fn, params, z_t, t, zero, context), t, zero)
    u_tgt = C.call_model(apply_fn, jax.lax.stop_gradient(target_params), z_s, s, zero, context)
    target = jax.lax.stop_gradient(schedule.flow_map_step(z_s, u_tgt, s, zero))
    per_sample = C.per_sample_mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))
    loss = jnp.mean(per_sample)
    return loss, {"loss": loss, "t_mean": jnp.mean(t)}


def continuous_consistency_loss(
    apply_fn: C.ApplyFn,
    params: Any,
    teacher_apply: C.ApplyFn,
    teacher_params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    shift: float = schedule.DEFAULT_SHIFT,
    teacher_guidance_scale: float = 1.0,
    derivative: str = "jvp",
    delta: float = 0.005,
    tangent_normalization: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Continuous-time consistency distillation (sCM-style) of a flow-matching teacher.

    batch: ``x0`` (B, F, ...), ``context``, ``neg_context`` (when ``teacher_guidance_scale > 1``);
    optional ``eps`` and ``t`` ((B, F) tau). Per sample: ``t`` uniform then shifted (one time per
    sample, on every frame), ``z = t eps + (1 - t) x0``, the teacher's velocity ``v`` (CFG
    ``v_u + g (v_c - v_u)``), ``u = u(z, t, 0)`` and its total derivative ``du/dt`` along
    ``(v, 1)`` at the current parameters (``derivative``: ``"jvp"`` exact forward mode, or
    ``"central"`` differences with ``delta``). The tangent ``g = v - u - t du/dt`` is ``df/dt``
    for ``f = z - t u``; the target is ``sg(u + g_n)`` with ``g_n = g / (rms(g) + c)``, sCM's
    tangent normalisation (``c = tangent_normalization``; 0 turns it off, and the target is then
    the flow-map identity's ``sg(v - t du/dt)`` at ``r = 0``). The loss is the batch mean of the
    per-sample mean of ``(u - target)^2``, whose gradient is ``-2 E[g_n . grad u]``.

    Deviation from sCM: the tangent is normalised by its per-sample RMS (dimension-free) rather
    than its L2 norm, so ``c`` means the same at every video size; sCM's TrigFlow time
    parameterisation is replaced by the package's flow-matching times (docs/deviations.md).
    """
    batch, x0, context, neg_context = C.unpack_data_batch(batch)
    b, f = x0.shape[:2]
    g = _teacher_guidance(teacher_guidance_scale, context, neg_context)
    C.check_derivative(derivative)
    c = float(tangent_normalization)
    if not c >= 0.0:
        raise ValueError(f"tangent_normalization must be >= 0 (0: off), got {tangent_normalization!r}")

    k_eps, k_t = jax.random.split(key)
    eps = _noise(k_eps, batch, x0)
    if batch.get("t") is not None:
        t = C.check_times(batch["t"], x0, "batch['t']")
    else:
        t = C.frames_time(schedule.shift_time(jax.random.uniform(k_t, (b,), jnp.float32), shift), f)

    z = schedule.add_noise(x0, eps, t)
    v = _teacher_velocity(teacher_apply, teacher_params, z, t, context, neg_context, g, b)
    zero = jnp.zeros_like(t)
    out, dudt = _value_and_derivative(apply_fn, params, z, t, zero, v, context, derivative, delta)
    out = out.astype(jnp.float32)
    tangent = jax.lax.stop_gradient(v.astype(jnp.float32) - out - schedule.expand_time(t, z) * dudt)
    if c > 0.0:
        axes = tuple(range(1, tangent.ndim))
        rms = jnp.sqrt(jnp.mean(jnp.square(tangent), axis=axes, keepdims=True))
        tangent = tangent / (rms + c)
    target = jax.lax.stop_gradient(out + tangent)
    per_sample = C.per_sample_mean(jnp.square(out - target))
    loss = jnp.mean(per_sample)
    return loss, {"loss": loss, "t_mean": jnp.mean(t),
                  "tangent_rms": jnp.mean(jnp.sqrt(per_sample))}


def consistency_distillation_loss(
    apply_fn: C.ApplyFn,
    params: Any,
    target_params: Any,
    teacher_apply: C.ApplyFn,
    teacher_params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    continuous_time: bool = False,
    num_discretization_steps: int = 32,
    shift: float = schedule.DEFAULT_SHIFT,
    teacher_guidance_scale: float = 1.0,
    derivative: str = "jvp",
    delta: float = 0.005,
    tangent_normalization: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The consistency baseline's loss: :func:`consistency_loss` (discrete time, against
    ``target_params``; uses ``num_discretization_steps``) or, with ``continuous_time``,
    :func:`continuous_consistency_loss` (uses ``derivative``, ``delta``,
    ``tangent_normalization``; no target network)."""
    if continuous_time:
        return continuous_consistency_loss(apply_fn, params, teacher_apply, teacher_params, batch, key, shift=shift,
                                           teacher_guidance_scale=teacher_guidance_scale, derivative=derivative,
                                           delta=delta, tangent_normalization=tangent_normalization)
    return consistency_loss(apply_fn, params, target_params, teacher_apply, teacher_params, batch, key,
                            num_discretization_steps=num_discretization_steps, shift=shift,
                            teacher_guidance_scale=teacher_guidance_scale)
