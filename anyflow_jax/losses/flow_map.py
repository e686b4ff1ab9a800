"""Stage 1: the forward flow-map (MeanFlow-style) loss (reference spec section 4; API in docs/losses.md).

The model ``u(z_t, t, r)`` is regressed onto ``v - (t - r) dF/dt``, where ``dF/dt`` is the total
derivative of the model output along the conditional path, i.e. the JVP with tangent ``(v, 1, 0)``
in ``(z, t, r)``. It is either the reference's central difference (delta = 5 model units =
0.005 in tau) or an exact ``jax.jvp``. In tau units ``dF/dtau = (u+ - u-) / (2 * 0.005)`` and
``t - r`` is in tau, so the target is unit-consistent (the reference uses model units for both).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.flow import schedule
from anyflow_jax.losses import _common as C

DIFFUSION, CONSISTENCY, GENERAL = 0, 1, 2
"""Kinds of (t, r) pairs: r = t, r = 0, and a random pair."""


def time_pair_kinds(batch_size: int, diffusion_ratio: float = 0.5, consistency_ratio: float = 0.25) -> np.ndarray:
    """Kind of each *global* batch index (static numpy int array of shape (B,)).

    The first ``round(diffusion_ratio * B)`` indices are diffusion pairs (r = t), the next
    ``round(consistency_ratio * B)`` consistency pairs (r = 0), the rest general pairs. Python's
    ``round`` (half to even) as in the reference. Under jit the batch is the global batch, so this
    is the reference's split by global index whatever the sharding.
    """
    dr = C.check_probability(diffusion_ratio, "diffusion_ratio")
    cr = C.check_probability(consistency_ratio, "consistency_ratio")
    if dr + cr > 1.0 + 1e-9:
        raise ValueError(f"diffusion_ratio + consistency_ratio must be <= 1, got {dr} + {cr}")
    n_diff = int(round(dr * batch_size))
    n_cons = min(int(round(cr * batch_size)), batch_size - n_diff)
    kinds = np.full((batch_size,), GENERAL, np.int32)
    kinds[:n_diff] = DIFFUSION
    kinds[n_diff:n_diff + n_cons] = CONSISTENCY
    return kinds


def sample_time_pairs(
    key: jax.Array,
    batch_size: int,
    num_frames: int,
    *,
    shift: float = schedule.DEFAULT_SHIFT,
    diffusion_ratio: float = 0.5,
    consistency_ratio: float = 0.25,
) -> tuple[jax.Array, jax.Array]:
    """Stage-1 time pairs ``(t, r)``, each fp32 (B, F), shared by the frames of a sample.

    u1, u2 ~ U(0, 1); t = max, r = min; r = t for diffusion indices, r = 0 for consistency
    indices (see :func:`time_pair_kinds`); repeated over frames, then t and r shifted separately.
    """
    # Deviation from the reference: times are sampled in fp32. The reference draws, shifts and
    # scales them in bf16 (model units t = 1000 tau), so t, r and the offsets t +/- 5 are bf16
    # values; for t >= 512 (97% of draws) t +/- 5 rounds to t +/- 4 while the denominator stays
    # 10, a systematic 0.8 factor on the time part of the central difference (docs/deviations.md).
    kinds = time_pair_kinds(batch_size, diffusion_ratio, consistency_ratio)
    uu = jax.random.uniform(key, (2, batch_size), jnp.float32)
    t = jnp.maximum(uu[0], uu[1])
    r = jnp.minimum(uu[0], uu[1])
    r = jnp.where(kinds == DIFFUSION, t, r)
    r = jnp.where(kinds == CONSISTENCY, 0.0, r)
    t = schedule.shift_time(C.frames_time(t, num_frames), shift)
    r = schedule.shift_time(C.frames_time(r, num_frames), shift)
    return t, r


def _value_and_derivative(apply_fn, params, z, t, r, v, context, derivative: str, delta: float):
    """Model output F (differentiable) and sg(dF/dt) along the tangent (v, 1, 0) in (z, t, r)."""
    derivative = C.check_derivative(derivative)
    if derivative == "jvp":
        def fn(z_, t_, r_):
            return C.call_model(apply_fn, params, z_, t_, r_, context)

        out, dfdt = jax.jvp(fn, (z, t, r), (v.astype(z.dtype), jnp.ones_like(t), jnp.zeros_like(r)))
        return out, jax.lax.stop_gradient(dfdt)
    if not isinstance(delta, (int, float, np.floating)) or not delta > 0:
        raise ValueError(f"delta must be a positive number (tau units), got {delta!r}")
    out = C.call_model(apply_fn, params, z, t, r, context)
    sg_params = jax.lax.stop_gradient(params)
    dv = (delta * v).astype(z.dtype)
    # t +/- delta is not clamped, as in the reference (it may leave [0, 1] slightly).
    u_plus = C.call_model(apply_fn, sg_params, z + dv, t + delta, r, context)
    u_minus = C.call_model(apply_fn, sg_params, z - dv, t - delta, r, context)
    dfdt = (u_plus.astype(jnp.float32) - u_minus.astype(jnp.float32)) / (2.0 * delta)
    return out, jax.lax.stop_gradient(dfdt)


def flow_map_target(
    apply_fn: C.ApplyFn,
    params: Any,
    z: jax.Array,
    t: jax.Array,
    r: jax.Array,
    velocity: jax.Array,
    context: Any = None,
    *,
    derivative: str = "central",
    delta: float = 0.005,
    guidance_scale: float = 1.0,
) -> jax.Array:
    """The (stop-gradient) MeanFlow target ``v - (t - r) * dF/dt / w`` at ``(z, t, r)``.

    ``dF/dt`` is the total derivative of ``apply_fn`` along the tangent ``(velocity, 1, 0)``:
    central difference with half-gap ``delta`` (tau) or exact ``jax.jvp``. For the exact flow map
    of a distribution and its exact marginal velocity the target equals the flow map's own average
    velocity (the MeanFlow identity ``u = v - (t - r) du/dt``).
    """
    z = C.check_latents(z, "z")
    C.check_same_shape(z, velocity, "z", "velocity")
    t = C.check_times(t, z, "t")
    r = C.check_times(r, z, "r")
    C.check_t_ge_r(t, r, "t", "r")
    w = C.check_guidance(guidance_scale, "guidance_scale")
    _, dfdt = _value_and_derivative(apply_fn, params, z, t, r, velocity, context, derivative, delta)
    gap = schedule.expand_time(t - r, z)
    return jax.lax.stop_gradient(velocity.astype(jnp.float32) - gap * dfdt.astype(jnp.float32) / w)


def flow_map_loss(
    apply_fn: C.ApplyFn,
    params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    shift: float = schedule.DEFAULT_SHIFT,
    diffusion_ratio: float = 0.5,
    consistency_ratio: float = 0.25,
    derivative: str = "central",
    delta: float = 0.005,
    fuse_guidance_scale: float = 3.0,
    text_dropout: float = 0.1,
    weighting: str = "beta08",
    adaptive_rescale: bool = True,
    rescale_eps: float = 1e-5,
    velocity_fn: Optional[Callable[[jax.Array, jax.Array, Any], jax.Array]] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Stage-1 forward flow-map loss; defaults are the reference's student configs.

    batch: ``x0`` (B, F, ...) clean latents; ``context`` (pytree with leading axis B, or None);
    ``neg_context`` (leading axis 1 or B; needed when ``text_dropout > 0`` or
    ``fuse_guidance_scale > 1``). Optional: ``eps`` (noise, shape of x0), ``t`` and ``r``
    ((B, F) tau) to force noise and times (the pair kinds of the split still decide the
    rescaling).

    Steps (reference spec sections 4.2-4.5; docs/losses.md):
      1. time pairs by global index (diffusion r = t / consistency r = 0 / general), shift, fp32;
      2. text dropout to ``neg_context``; ``z = t eps + (1 - t) x0``; ``v = eps - x0``;
      3. ``F = u(z, t, r, c)`` and ``dF/dt`` along (v, 1, 0) (``derivative="central"``: the
         reference's central difference with ``delta``; ``"jvp"``: exact forward-mode);
      4. guidance fusion ``w``: ``u_hat = (F - (1 - w) sg(u(z, t, r, c_neg))) / w`` and target
         ``sg(v - (t - r) dF/dt / w)``;
      5. per-sample mean squared error (fp32), times the mean over frames of the loss weight;
      6. adaptive rescaling: every non-diffusion sample is multiplied by the detached factor
         ``D / (l_i + rescale_eps)`` where D is the mean loss of the diffusion samples of the
         *global* batch; the loss is the batch mean.

    ``velocity_fn(z_t, t, context) -> v`` optionally replaces the data velocity ``eps - x0`` in
    the tangent and the target (e.g. a frozen teacher's or an exact marginal velocity); None (the
    default) is the reference.
    """
    batch, x0, context, neg_context = C.unpack_data_batch(batch)
    b, f = x0.shape[:2]
    w = C.check_guidance(fuse_guidance_scale, "fuse_guidance_scale")
    if w != 1.0 and (neg_context is None or context is None):
        raise ValueError(f"fuse_guidance_scale={w} needs batch['context'] and batch['neg_context'] "
                         "(pass fuse_guidance_scale=1.0 for an unconditional model)")
    schedule._check_weighting(weighting)
    C.check_derivative(derivative)
    kinds = time_pair_kinds(b, diffusion_ratio, consistency_ratio)
    n_diff = int(np.sum(kinds == DIFFUSION))
    if adaptive_rescale and n_diff == 0:
        # Deviation from the reference: with no diffusion sample the reference's rescale is NaN
        # (docs/deviations.md); we refuse at trace time instead.
        raise ValueError(f"adaptive_rescale needs at least one diffusion sample: diffusion_ratio={diffusion_ratio} "
                         f"gives none for batch size {b}")

    k_eps, k_t, k_drop = jax.random.split(key, 3)
    if batch.get("eps") is not None:
        C.check_same_shape(x0, batch["eps"], "batch['x0']", "batch['eps']")
        eps = jnp.asarray(batch["eps"], x0.dtype)
    else:
        eps = C.standard_normal(k_eps, x0)
    if (batch.get("t") is None) != (batch.get("r") is None):
        raise ValueError("batch['t'] and batch['r'] must be forced together")
    if batch.get("t") is not None:
        t = C.check_times(batch["t"], x0, "batch['t']")
        r = C.check_times(batch["r"], x0, "batch['r']")
        C.check_t_ge_r(t, r, "batch['t']", "batch['r']")
    else:
        t, r = sample_time_pairs(k_t, b, f, shift=shift, diffusion_ratio=diffusion_ratio,
                                 consistency_ratio=consistency_ratio)

    ctx, dropped = C.text_dropout(k_drop, context, neg_context, b, text_dropout)
    neg_b = C.broadcast_negative(neg_context, context, b) if w != 1.0 else None
    loss, metrics = flow_map_terms(apply_fn, params, x0, eps, t, r, ctx, neg_b, kinds, fuse_guidance_scale=w,
                                   derivative=derivative, delta=delta, weighting=weighting, shift=shift,
                                   adaptive_rescale=adaptive_rescale, rescale_eps=rescale_eps, velocity_fn=velocity_fn)
    metrics = {"loss": loss, "text_dropped": jnp.mean(dropped.astype(jnp.float32)), **metrics}
    return loss, metrics


def flow_map_terms(apply_fn: C.ApplyFn, params: Any, x0: jax.Array, eps: jax.Array, t: jax.Array, r: jax.Array,
                   ctx: Any, neg_b: Any, kinds: np.ndarray, *, fuse_guidance_scale: float, derivative: str,
                   delta: float, weighting: str, shift: float, adaptive_rescale: bool, rescale_eps: float,
                   velocity_fn=None, frame_valid=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Steps 3-6 of :func:`flow_map_loss` for given clean latents, noise, times, (dropped) context
    ``ctx``, broadcast negative context ``neg_b`` (used when ``fuse_guidance_scale`` != 1) and pair
    kinds (:func:`time_pair_kinds`): ``(loss, {"loss_<kind>": ...})``. Shared with the causal
    stage-1 loss (:mod:`anyflow_jax.losses.causal_flow_map`), whose ``apply_fn`` closes over the
    context frames and the clean copy. ``frame_valid`` (optional, ``(F,)`` bool, traced allowed):
    only these frames count, the per-sample mean taken over them (the causal loss's padded
    layout; the other frames' values are ignored, whatever they hold)."""
    w = fuse_guidance_scale
    is_diff = jnp.asarray(kinds == DIFFUSION)
    n_diff = int(np.sum(kinds == DIFFUSION))
    z = schedule.add_noise(x0, eps, t)
    if velocity_fn is None:
        v = schedule.velocity_target(x0, eps)
    else:
        v = jax.lax.stop_gradient(velocity_fn(z, t, ctx))
        C.check_same_shape(z, v, "z", "velocity_fn(z, t, context)")

    out, dfdt = _value_and_derivative(apply_fn, params, z, t, r, v, ctx, derivative, delta)
    out = out.astype(jnp.float32)
    gap = schedule.expand_time(t - r, z)
    target = jax.lax.stop_gradient(v.astype(jnp.float32) - gap * dfdt / w)
    if w != 1.0:
        u_neg = jax.lax.stop_gradient(C.call_model(apply_fn, params, z, t, r, neg_b)).astype(jnp.float32)
        u_hat = (out - (1.0 - w) * u_neg) / w
    else:
        u_hat = out

    if frame_valid is None:
        raw = C.per_sample_mean(jnp.square(u_hat - target))
    else:
        keep = jnp.reshape(frame_valid, (1, -1) + (1,) * (u_hat.ndim - 2))
        sq = jnp.where(keep, jnp.square(u_hat - target), 0.0)
        per_frame = int(np.prod(u_hat.shape[2:]))
        raw = jnp.sum(sq.reshape(sq.shape[0], -1), axis=1) / (jnp.sum(frame_valid.astype(jnp.float32)) * per_frame)
    # As in the reference: the per-sample loss times the mean over frames of the per-frame weight.
    weighted = raw * jnp.mean(schedule.loss_weight(t, weighting, shift), axis=1)
    diff_mean = jnp.sum(jnp.where(is_diff, weighted, 0.0)) / max(n_diff, 1)
    if adaptive_rescale:
        # A plain mean over the global (possibly sharded) batch under jit is already global.
        factor = jax.lax.stop_gradient(diff_mean / (weighted + rescale_eps))
        per_sample = jnp.where(is_diff, weighted, weighted * factor)
    else:
        per_sample = weighted
    loss = jnp.mean(per_sample)

    metrics = {}
    for name, kind in (("diffusion", DIFFUSION), ("consistency", CONSISTENCY), ("general", GENERAL)):
        n = int(np.sum(kinds == kind))
        if n:
            total = jnp.sum(jnp.where(jnp.asarray(kinds == kind), weighted, 0.0))
            metrics[f"loss_{name}"] = jax.lax.stop_gradient(total / n)
    return loss, metrics
