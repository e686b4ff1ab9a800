"""Causal (FAR) stage 2 composed: the on-policy generator and critic losses of the chunk-causal
student (reference spec section 6.4; docs/far.md).

As the bidirectional stage 2 (:mod:`anyflow_jax.losses.onpolicy`), with the rollout of
:func:`~anyflow_jax.losses.causal_backward_simulation.causal_backward_simulation` (chunk by chunk,
each chunk conditioned on the student's own detached earlier chunks through its cache, the same
N and k for every chunk) and the co-trained loss of causal stage 1
(:func:`~anyflow_jax.losses.causal_flow_map.causal_flow_map_loss`, the reference's on-policy
setting ``bidirectional_prob = 0``). DMD and the critic see the **whole** video with the
bidirectional teacher and critic: exactly :func:`~anyflow_jax.losses.dmd.dmd_loss` and
:func:`~anyflow_jax.losses.dmd.critic_loss`.

The student is a :class:`CausalStudent` of functions of the same parameters.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax

from anyflow_jax.flow import schedule
from anyflow_jax.losses import _common as C
from anyflow_jax.losses.backward_simulation import DEFAULT_STEPS_LIST
from anyflow_jax.losses.causal_backward_simulation import (
    ChunkApplyFn, EncodeAtFn, EncodeFn, causal_backward_simulation, resolve_chunk_loop)
from anyflow_jax.losses.causal_flow_map import CausalApplyFn, PaddedApplyFn, causal_flow_map_loss, check_partition
from anyflow_jax.losses.dmd import critic_loss, dmd_loss

__all__ = ["CausalStudent", "causal_onpolicy_generator_loss", "causal_onpolicy_critic_loss"]


class CausalStudent(NamedTuple):
    """The chunk-causal student as functions of one parameter pytree.

    - ``encode(params, frames, context) -> cache`` and ``chunk_apply(params, z, t, r, context,
      cache) -> u``: the rollout's paths
      (:mod:`anyflow_jax.losses.causal_backward_simulation`);
    - ``causal_apply(params, z, t, r, context, clean) -> u``: the teacher-forced training forward
      of the co-trained stage-1 loss; ``bidirectional_apply(params, z, t, r, context) -> u``
      (optional): only needed when the co-trained loss has ``bidirectional_prob > 0``;
    - ``encode_at(params, video, c, context) -> cache`` and ``chunk_apply_at(params, z, t, r,
      context, cache) -> u`` (optional): the scanned layout's paths; given both, the rollout is a
      ``lax.scan`` over chunks (``chunk_loop``,
      :mod:`anyflow_jax.losses.causal_backward_simulation`);
    - ``causal_apply_at(params, z, t, r, context, clean, n) -> u`` (optional): the padded
      teacher-forced forward at a traced chunk count; given, the co-trained loss runs every chunk
      count in one layout (``chunk_layout``, :func:`~anyflow_jax.losses.causal_flow_map.causal_flow_map_loss`).
    """
    encode: EncodeFn
    chunk_apply: ChunkApplyFn
    causal_apply: Optional[CausalApplyFn] = None
    bidirectional_apply: Optional[Callable] = None
    encode_at: Optional[EncodeAtFn] = None
    chunk_apply_at: Optional[ChunkApplyFn] = None
    causal_apply_at: Optional[PaddedApplyFn] = None


# the reference's on-policy co-trained loss: the causal teacher-forcing loss only
_COTRAIN_DEFAULTS = {"bidirectional_prob": 0.0}


def _rollout(student: CausalStudent, params, batch, key, chunk_partition, steps_list, shift, stop_prefix_grad,
             num_steps, grad_step, remat_chunks=True, chunk_loop=None):
    batch = C.check_batch(batch, ("x0",))
    x0 = C.check_latents(batch["x0"], "batch['x0']")
    k_noise, k_sim = jax.random.split(key)
    # one noise draw for the whole video, shaped like the data batch; chunk c starts from its slice
    noise = C.standard_normal(k_noise, x0)
    return causal_backward_simulation(student.encode, student.chunk_apply, params,
                                      {"noise": noise, "context": batch.get("context")}, k_sim,
                                      chunk_partition=chunk_partition, steps_list=steps_list, shift=shift,
                                      stop_prefix_grad=stop_prefix_grad, num_steps=num_steps, grad_step=grad_step,
                                      remat_chunks=remat_chunks, encode_at=student.encode_at,
                                      chunk_apply_at=student.chunk_apply_at, chunk_loop=chunk_loop)


def _cotrain_options(flow_map_options, chunk_partition, full_chunk_limit) -> dict:
    opts = dict(_COTRAIN_DEFAULTS)
    opts.update(dict(flow_map_options or {}))
    for name, value in (("chunk_partition", chunk_partition), ("full_chunk_limit", full_chunk_limit)):
        given = opts.get(name)
        if given is not None and (tuple(given) if name == "chunk_partition" else given) != value:
            raise ValueError(f"flow_map_options[{name!r}]={given!r} differs from the loss's {name}={value!r}")
        opts[name] = value
    return opts


def causal_onpolicy_generator_loss(
    student: CausalStudent,
    student_params: Any,
    teacher_apply: C.ApplyFn,
    teacher_params: Any,
    critic_apply: C.ApplyFn,
    critic_params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    chunk_partition: Optional[Sequence[int]] = None,
    full_chunk_limit: Optional[int] = None,
    steps_list: Sequence[int] = DEFAULT_STEPS_LIST,
    shift: float = schedule.DEFAULT_SHIFT,
    stop_prefix_grad: bool = False,
    real_guidance_scale: float = 3.0,
    dmd_weight: float = 1.0,
    dmd_num_samples: Optional[int] = None,
    cotrain_forward: bool = True,
    flow_map_options: Optional[Mapping[str, Any]] = None,
    remat_chunks: bool = True,
    chunk_loop: Optional[str] = None,
    num_steps: Any = None,
    grad_step: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal stage-2 generator objective: ``dmd_loss(causal rollout) [+ causal_flow_map_loss(batch)]``.

    batch: ``x0`` (B, F, ...) real latents with ``F = sum(chunk_partition)`` (they set the rollout
    shape and feed the co-trained loss), ``context``, ``neg_context``. The rollout draws one N
    from ``steps_list`` and k in [0, N) from ``key`` for all chunks (``num_steps``/``grad_step``
    force them); no guidance. DMD (``real_guidance_scale``, ``dmd_weight``, ``dmd_num_samples``
    as :func:`~anyflow_jax.losses.dmd.dmd_loss`) runs on the whole video with the bidirectional
    teacher and critic (apply functions called with ``r = t``). ``flow_map_options``: keyword
    options of :func:`~anyflow_jax.losses.causal_flow_map.causal_flow_map_loss` (its defaults,
    with ``bidirectional_prob = 0``, if unset; ``chunk_partition``/``full_chunk_limit`` come from
    this loss). ``remat_chunks``: each chunk's rollout under ``jax.checkpoint`` (the backward
    pass holds one chunk's activations at a time; ``False``: same values, more memory, a smaller
    program). ``chunk_loop``: ``"scan"`` (the default when the student gives ``encode_at`` and
    ``chunk_apply_at``) or ``"unrolled"``. The two terms add 1:1. metrics: ``loss``, ``dmd/*``, ``rollout/*``,
    ``forward/*``.
    """
    cp, fcl = check_partition(chunk_partition, full_chunk_limit)
    if not isinstance(student, CausalStudent):
        raise ValueError(f"student must be a CausalStudent (encode, chunk_apply, causal_apply, ...), "
                         f"got {type(student).__name__}")
    resolve_chunk_loop(chunk_loop, student.encode_at is not None and student.chunk_apply_at is not None)
    k_roll, k_dmd, k_fwd = jax.random.split(key, 3)
    x_hat, roll_metrics = _rollout(student, student_params, batch, k_roll, cp, steps_list, shift, stop_prefix_grad,
                                   num_steps, grad_step, remat_chunks, chunk_loop)
    dmd_batch = {"sample": x_hat, "context": batch.get("context"), "neg_context": batch.get("neg_context")}
    loss_dmd, dmd_metrics = dmd_loss(teacher_apply, teacher_params, critic_apply, critic_params, dmd_batch, k_dmd,
                                     real_guidance_scale=real_guidance_scale, dmd_weight=dmd_weight, shift=shift,
                                     dmd_num_samples=dmd_num_samples)
    metrics = {f"dmd/{k}": v for k, v in dmd_metrics.items()}
    metrics.update({f"rollout/{k}": v for k, v in roll_metrics.items()})
    loss = loss_dmd
    if cotrain_forward:
        if student.causal_apply is None:
            raise ValueError("cotrain_forward=True needs student.causal_apply (the teacher-forced training forward)")
        opts = _cotrain_options(flow_map_options, cp, fcl)
        loss_fwd, fwd_metrics = causal_flow_map_loss(student.causal_apply, student.bidirectional_apply,
                                                     student_params, batch, k_fwd,
                                                     causal_apply_at=student.causal_apply_at, **opts)
        metrics.update({f"forward/{k}": v for k, v in fwd_metrics.items()})
        loss = loss + loss_fwd
    metrics["loss"] = loss
    return loss, metrics


def causal_onpolicy_critic_loss(
    student: CausalStudent,
    student_params: Any,
    critic_apply: C.ApplyFn,
    critic_params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    chunk_partition: Optional[Sequence[int]] = None,
    steps_list: Sequence[int] = DEFAULT_STEPS_LIST,
    shift: float = schedule.DEFAULT_SHIFT,
    chunk_loop: Optional[str] = None,
    num_steps: Any = None,
    grad_step: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal stage-2 critic objective: :func:`~anyflow_jax.losses.dmd.critic_loss` (the
    bidirectional critic) on the whole video of a stop-gradient causal rollout with its own N and k.

    batch: ``x0`` (sets the rollout shape) and ``context``. ``chunk_loop`` as the generator's.
    """
    if chunk_partition is None:
        raise ValueError("chunk_partition is required (the FAR network's; the stage's objective takes it from the "
                         "student network)")
    k_roll, k_fm = jax.random.split(key)
    x_hat, roll_metrics = _rollout(student, jax.lax.stop_gradient(student_params), batch, k_roll, chunk_partition,
                                   steps_list, shift, False, num_steps, grad_step, chunk_loop=chunk_loop)
    loss, metrics = critic_loss(critic_apply, critic_params,
                                {"sample": jax.lax.stop_gradient(x_hat), "context": batch.get("context")}, k_fm,
                                shift=shift)
    metrics = dict(metrics)
    metrics.update({f"rollout/{k}": v for k, v in roll_metrics.items()})
    return loss, metrics
