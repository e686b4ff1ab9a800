"""Stage 2 composed: on-policy generator and critic losses (reference spec section 5; docs/losses.md).

The generator loss = DMD on a Flow Map Backward Simulation rollout (+ the co-trained stage-1
loss on the real batch); the critic loss = flow matching on a stop-gradient rollout. Both compile
to one XLA program whatever N and k the key draws.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax

from anyflow_jax.flow import schedule
from anyflow_jax.losses import _common as C
from anyflow_jax.losses.backward_simulation import DEFAULT_STEPS_LIST, backward_simulation
from anyflow_jax.losses.dmd import critic_loss, dmd_loss
from anyflow_jax.losses.flow_map import flow_map_loss


def _rollout(student_apply, student_params, batch, key, steps_list, shift, stop_prefix_grad, num_steps, grad_step):
    batch = C.check_batch(batch, ("x0",))
    x0 = C.check_latents(batch["x0"], "batch['x0']")
    k_noise, k_sim = jax.random.split(key)
    # The rollout starts from fresh Gaussian noise shaped like the data batch (fp32 draw, see
    # standard_normal for the deviation from the reference's bf16 randn).
    noise = C.standard_normal(k_noise, x0)
    return backward_simulation(student_apply, student_params, {"noise": noise, "context": batch.get("context")},
                               k_sim, steps_list=steps_list, shift=shift, stop_prefix_grad=stop_prefix_grad,
                               num_steps=num_steps, grad_step=grad_step)


def onpolicy_generator_loss(
    student_apply: C.ApplyFn,
    student_params: Any,
    teacher_apply: C.ApplyFn,
    teacher_params: Any,
    critic_apply: C.ApplyFn,
    critic_params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    steps_list: Sequence[int] = DEFAULT_STEPS_LIST,
    shift: float = schedule.DEFAULT_SHIFT,
    stop_prefix_grad: bool = False,
    real_guidance_scale: float = 3.0,
    dmd_weight: float = 1.0,
    dmd_num_samples: Optional[int] = None,
    cotrain_forward: bool = True,
    flow_map_options: Optional[Mapping[str, Any]] = None,
    num_steps: Any = None,
    grad_step: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-2 generator objective: ``dmd_loss(backward_simulation(noise)) [+ flow_map_loss(batch)]``.

    batch: ``x0`` (real latents: they set the rollout shape and feed the co-trained stage-1 loss),
    ``context``, ``neg_context``. The rollout draws N from ``steps_list`` and k in [0, N) from
    ``key`` inside the program (``num_steps``/``grad_step`` force them); it uses no guidance.
    ``flow_map_options`` are keyword options of :func:`flow_map_loss` (reference defaults if
    None). ``dmd_num_samples`` is passed to :func:`dmd_loss`: the number of samples of the *global*
    batch DMD uses (None = all, what the reference's per-GPU ``dmd_batch_size`` values amount to).
    The two terms add with weight 1:1. metrics: ``loss``, ``dmd/*``, ``rollout/*``,
    ``forward/*``.
    """
    k_roll, k_dmd, k_fwd = jax.random.split(key, 3)
    x_hat, roll_metrics = _rollout(student_apply, student_params, batch, k_roll, steps_list, shift,
                                   stop_prefix_grad, num_steps, grad_step)
    dmd_batch = {"sample": x_hat, "context": batch.get("context"), "neg_context": batch.get("neg_context")}
    loss_dmd, dmd_metrics = dmd_loss(teacher_apply, teacher_params, critic_apply, critic_params, dmd_batch, k_dmd,
                                     real_guidance_scale=real_guidance_scale, dmd_weight=dmd_weight, shift=shift,
                                     dmd_num_samples=dmd_num_samples)
    metrics = {f"dmd/{k}": v for k, v in dmd_metrics.items()}
    metrics.update({f"rollout/{k}": v for k, v in roll_metrics.items()})
    loss = loss_dmd
    if cotrain_forward:
        opts = dict(flow_map_options or {})
        loss_fwd, fwd_metrics = flow_map_loss(student_apply, student_params, batch, k_fwd, **opts)
        metrics.update({f"forward/{k}": v for k, v in fwd_metrics.items()})
        loss = loss + loss_fwd
    metrics["loss"] = loss
    return loss, metrics


def onpolicy_critic_loss(
    student_apply: C.ApplyFn,
    student_params: Any,
    critic_apply: C.ApplyFn,
    critic_params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    steps_list: Sequence[int] = DEFAULT_STEPS_LIST,
    shift: float = schedule.DEFAULT_SHIFT,
    num_steps: Any = None,
    grad_step: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-2 critic objective: :func:`critic_loss` on a stop-gradient backward-simulation rollout.

    batch: ``x0`` (sets the rollout shape) and ``context``. The rollout draws its own N and k.
    """
    k_roll, k_fm = jax.random.split(key)
    x_hat, roll_metrics = _rollout(student_apply, jax.lax.stop_gradient(student_params), batch, k_roll, steps_list,
                                   shift, False, num_steps, grad_step)
    loss, metrics = critic_loss(critic_apply, critic_params,
                                {"sample": jax.lax.stop_gradient(x_hat), "context": batch.get("context")}, k_fm,
                                shift=shift)
    metrics = dict(metrics)
    metrics.update({f"rollout/{k}": v for k, v in roll_metrics.items()})
    return loss, metrics
