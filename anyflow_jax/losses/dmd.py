"""Stage 2: DMD generator loss and the critic's flow-matching loss (reference spec sections 5.2 and 5.4;
API in docs/losses.md)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from anyflow_jax.flow import schedule
from anyflow_jax.losses import _common as C
from anyflow_jax.losses.flow_matching import flow_matching_loss


def sample_dmd_time(key, batch_size: int, num_frames: int, *, shift: float = schedule.DEFAULT_SHIFT,
                    min_t: float = 0.0, max_t: float = 1.0) -> jax.Array:
    """DMD noise level: tau ~ U(0, 1) per sample, shifted, clamped to [min_t, max_t], fp32 (B, F)."""
    tau = schedule.shift_time(jax.random.uniform(key, (batch_size,), jnp.float32), shift)
    return C.frames_time(jnp.clip(tau, min_t, max_t), num_frames)


def dmd_loss(
    teacher_apply: C.ApplyFn,
    teacher_params: Any,
    critic_apply: C.ApplyFn,
    critic_params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    real_guidance_scale: float = 3.0,
    dmd_weight: float = 1.0,
    shift: float = schedule.DEFAULT_SHIFT,
    min_t: float = 0.0,
    max_t: float = 1.0,
    dmd_num_samples: Optional[int] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DMD generator loss on a generated sample ``batch["sample"]`` (it carries the gradient).

    batch: ``sample`` x_hat (B, F, ...); ``context``; ``neg_context`` (needed when
    ``real_guidance_scale != 0``); optional ``eps`` and ``t`` (B, F) to force noise and time.
    Teacher (real score) and critic (fake score) are velocity models called with r = t.

    Everything but the final square is under stop-gradient:
      tau ~ U(0,1) per sample, shifted, clamped; ``z = tau eps + (1 - tau) x_hat``;
      ``x_fake = z - tau critic(z, c)``; ``x_real_c = z - tau teacher(z, c)``,
      ``x_real_u = z - tau teacher(z, c_neg)``, ``x_real = x_real_c + s (x_real_c - x_real_u)``
      (s = ``real_guidance_scale``: CFG weight 1 + s);
      ``grad = nan_to_num((x_fake - x_real) / mean_{non-batch}|x_hat - x_real|)``;
      ``loss = dmd_weight * mean((x_hat - sg(x_hat - grad))^2)``.
    Its gradient w.r.t. x_hat is ``2 * dmd_weight * grad / x_hat.size``.

    ``dmd_num_samples``: how many samples of the *global* batch DMD uses (the first n; None =
    all). This is not the reference's ``dmd_batch_size``, which counts per GPU (the first n
    samples of each GPU's local batch; 2 for 1.3B and 1 for 14B, i.e. the whole per-GPU batch).
    Those reference values amount to None here; copying them would cut the DMD samples by the
    device count.
    """
    batch = C.check_batch(batch, ("sample",))
    x_hat = C.check_latents(batch["sample"], "batch['sample']")
    context, neg_context = batch.get("context"), batch.get("neg_context")
    s = C.check_guidance(real_guidance_scale, "real_guidance_scale", minimum=0.0)
    if context is not None:
        C.check_context(context, x_hat.shape[0], "batch['context']")
    if dmd_num_samples is not None:
        if (not isinstance(dmd_num_samples, int) or isinstance(dmd_num_samples, bool)
                or not 1 <= dmd_num_samples <= x_hat.shape[0]):
            raise ValueError(f"dmd_num_samples must be an int in [1, {x_hat.shape[0]}] (samples of the global "
                             f"batch), got {dmd_num_samples!r}")
        n = dmd_num_samples
        x_hat = x_hat[:n]
        context = jax.tree_util.tree_map(lambda c: c[:n], context)
        if neg_context is not None:
            neg_context = jax.tree_util.tree_map(lambda c: c[:n] if c.shape[0] != 1 else c, neg_context)
        batch = {k: (v[:n] if k in ("eps", "t") and v is not None else v) for k, v in batch.items()}
    b, f = x_hat.shape[:2]
    if s != 0.0 and (neg_context is None or context is None):
        raise ValueError(f"real_guidance_scale={s} needs batch['context'] and batch['neg_context']")

    k_eps, k_t = jax.random.split(key)
    x = jax.lax.stop_gradient(x_hat)
    if batch.get("eps") is not None:
        C.check_same_shape(x_hat, batch["eps"], "batch['sample']", "batch['eps']")
        eps = jnp.asarray(batch["eps"], x.dtype)
    else:
        eps = C.standard_normal(k_eps, x)
    if batch.get("t") is not None:
        t = C.check_times(batch["t"], x_hat, "batch['t']")
    else:
        t = sample_dmd_time(k_t, b, f, shift=shift, min_t=min_t, max_t=max_t)

    z = schedule.add_noise(x, eps, t)
    zero = jnp.zeros_like(t)

    def x0_pred(apply_fn, params, ctx, name):
        u = C.call_model(apply_fn, params, z, t, t, ctx, name)
        return schedule.flow_map_step(z, u, t, zero).astype(jnp.float32)

    x_fake = x0_pred(critic_apply, critic_params, context, "critic_apply")
    x_real = x0_pred(teacher_apply, teacher_params, context, "teacher_apply")
    if s != 0.0:
        neg_b = C.broadcast_negative(neg_context, context, b)
        x_real_u = x0_pred(teacher_apply, teacher_params, neg_b, "teacher_apply")
        x_real = x_real + s * (x_real - x_real_u)
    x32 = x.astype(jnp.float32)
    normaliser = C.per_sample_mean(jnp.abs(x32 - x_real)).reshape((b,) + (1,) * (x.ndim - 1))
    grad = jax.lax.stop_gradient(jnp.nan_to_num((x_fake - x_real) / normaliser))
    # Deviation from the reference: the reference forms this MSE in float64; JAX runs with x64
    # off, so we use fp32 (the gradient w.r.t. the sample is the same expression).
    # As the reference's generator_loss (reference spec section 5.2):
    # L_DMD = dmd_weight * mean((x_hat - sg(x_hat - grad))^2), with no 0.5 factor.
    x_hat32 = x_hat.astype(jnp.float32)
    loss = dmd_weight * jnp.mean(jnp.square(x_hat32 - jax.lax.stop_gradient(x_hat32 - grad)))
    metrics = {
        "loss": loss,
        "dmd_time_mean": jnp.mean(t),
        "normaliser_mean": jnp.mean(normaliser),
        "grad_abs_mean": jnp.mean(jnp.abs(grad)),
    }
    return loss, metrics


def critic_loss(
    critic_apply: C.ApplyFn,
    critic_params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    shift: float = schedule.DEFAULT_SHIFT,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The critic (fake score) flow-matching loss on student samples ``batch["sample"]``.

    tau logit-normal, shifted, shared by the frames; ``mean((critic(z_t, t, t, c) - (eps - sg(x_hat)))^2)``;
    no text dropout, no weighting. Optional ``eps`` / ``t`` force the noise and time.
    """
    batch = C.check_batch(batch, ("sample",))
    sample = C.check_latents(batch["sample"], "batch['sample']")
    fm_batch = {"x0": jax.lax.stop_gradient(sample), "context": batch.get("context")}
    for k in ("eps", "t"):
        if batch.get(k) is not None:
            fm_batch[k] = batch[k]
    return flow_matching_loss(critic_apply, critic_params, fm_batch, key, shift=shift, text_dropout=0.0,
                              fuse_guidance_scale=1.0)
