"""Stage 0: plain flow matching for the teacher (reference spec section 3; API in docs/losses.md)."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from anyflow_jax.flow import schedule
from anyflow_jax.losses import _common as C


def sample_flow_matching_time(key, batch_size: int, num_frames: int, *, shift: float = schedule.DEFAULT_SHIFT,
                              logit_mean: float = 0.0, logit_std: float = 1.0) -> jax.Array:
    """Teacher/critic times: tau ~ sigmoid(N(mean, std)), shifted, one per sample, repeated over frames.

    Returns fp32 (B, F). The reference also clamps to [0, 1000] model units, a no-op for these.
    """
    tau = schedule.shift_time(schedule.logit_normal_time(key, (batch_size,), logit_mean, logit_std), shift)
    return C.frames_time(jnp.clip(tau, 0.0, 1.0), num_frames)


def flow_matching_loss(
    apply_fn: C.ApplyFn,
    params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    shift: float = schedule.DEFAULT_SHIFT,
    text_dropout: float = 0.1,
    fuse_guidance_scale: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Flow-matching loss of a velocity model called as ``apply_fn(params, z_t, t, t, context)``.

    batch: ``x0`` (B, F, ...) clean latents; optional ``context`` (pytree, leading axis B),
    ``neg_context`` (leading axis 1 or B; needed for text dropout and guidance fusion),
    ``eps`` (noise, shape of x0) and ``t`` (B, F) to force the noise and the times.

    Per sample: replace the context by ``neg_context`` with probability ``text_dropout``; tau from
    a logit-normal, shifted, shared by the frames; ``z = tau eps + (1 - tau) x0``; loss = batch
    mean of the per-sample mean of ``(u - (eps - x0))^2``. With ``fuse_guidance_scale`` w > 1 the
    prediction is ``(u - (1 - w) sg(u_neg)) / w`` (the stage-1 guidance fusion, with r = t).
    """
    batch, x0, context, neg_context = C.unpack_data_batch(batch)
    b, f = x0.shape[:2]
    w = C.check_guidance(fuse_guidance_scale, "fuse_guidance_scale")
    if w != 1.0 and (neg_context is None or context is None):
        raise ValueError(f"fuse_guidance_scale={w} needs batch['context'] and batch['neg_context']")

    k_eps, k_t, k_drop = jax.random.split(key, 3)
    if batch.get("eps") is not None:
        C.check_same_shape(x0, batch["eps"], "batch['x0']", "batch['eps']")
        eps = jnp.asarray(batch["eps"], x0.dtype)
    else:
        eps = C.standard_normal(k_eps, x0)
    if batch.get("t") is not None:
        t = C.check_times(batch["t"], x0, "batch['t']")
    else:
        # Times are drawn in fp32 (the reference also does so for the teacher).
        t = sample_flow_matching_time(k_t, b, f, shift=shift, logit_mean=logit_mean, logit_std=logit_std)

    ctx, dropped = C.text_dropout(k_drop, context, neg_context, b, text_dropout)
    z = schedule.add_noise(x0, eps, t)
    v = schedule.velocity_target(x0, eps)
    u = C.call_model(apply_fn, params, z, t, t, ctx)
    if w != 1.0:
        neg_b = C.broadcast_negative(neg_context, context, b)
        u_neg = jax.lax.stop_gradient(C.call_model(apply_fn, params, z, t, t, neg_b))
        u = (u - (1.0 - w) * u_neg) / w
    per_sample = C.per_sample_mean(jnp.square(u.astype(jnp.float32) - v.astype(jnp.float32)))
    loss = jnp.mean(per_sample)
    metrics = {"loss": loss, "t_mean": jnp.mean(t), "text_dropped": jnp.mean(dropped.astype(jnp.float32))}
    return loss, metrics
