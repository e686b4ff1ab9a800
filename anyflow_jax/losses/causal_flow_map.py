"""Causal (FAR) stage 1: the teacher-forced chunk-causal flow-map loss (reference spec section 4.7;
docs/far.md).

One step of the reference's causal pretraining, as a pure function of two apply functions of the
same parameters:

- ``causal_apply(params, z, t, r, context, clean) -> u``: the chunk-causal forward of the first
  ``n`` chunks. ``z`` ``(B, F_n, H, W, C)`` holds the clean context frames followed by the noisy
  full frames, ``t``/``r`` ``(B, F_n)`` per-frame times (0 on the context frames), ``clean``
  ``(B, F_full, H, W, C)`` the clean copy of the full frames (teacher forcing, at time 0).
  Returns the average velocity of the full frames only, ``(B, F_full, H, W, C)``. For the FAR
  network of :mod:`anyflow_jax.models.far_wan` it is ``model.apply(..., clean=clean)``; the
  number of chunks follows from ``F_n``.
- ``bidirectional_apply(params, z, t, r, context) -> u``: the bidirectional path of the same
  weights over the whole clip (``causal=False``), called with ``r = t``.

What a step does (the reference's ``pixel_loss``):

1. text dropout to the negative context (shared by both branches);
2. the number of chunks ``n``: with probability ``long_context_ratio`` uniform in
   ``{full_chunk_limit, ..., len(chunk_partition)}``, else ``full_chunk_limit``; the clip is cut to
   its first ``sum(chunk_partition[:n])`` frames, the last ``full_chunk_limit`` chunks are "full"
   (noised), the earlier ones clean context (t = r = 0);
3. one stage-1 time pair per sample (diffusion / consistency / general split by global index,
   :func:`~anyflow_jax.losses.flow_map.sample_time_pairs`), shared by every full frame (so the
   per-frame times ``(B, F_n)`` are constant over the full chunks and 0 on the context);
4. the stage-1 objective of :func:`~anyflow_jax.losses.flow_map.flow_map_loss` (fused guidance,
   central difference or JVP, beta08 weighting, adaptive rescaling) on the full frames, every
   model call (the conditional, the two central-difference calls and the unconditional one) with
   the same context frames and clean copy;
5. with probability ``bidirectional_prob``, plus the plain flow-matching loss (``r = t``,
   logit-normal time, fused guidance, no weighting) of the bidirectional path on the whole clip
   with fresh noise; the reference back-propagates both losses into the same gradient, so the
   loss here is their sum.

The chunk count and the bidirectional coin are **traced** values drawn from ``key`` (the
reference draws them on rank 0 and broadcasts them; a replicated key gives every replica the same
draw), so one compiled step serves every chunk count and both coin sides. The chunk count runs
in one of two layouts (``chunk_layout``): ``"padded"``, one shape for every count (the full
chunks in fixed slots of the largest chunk, the compressed region holding every chunk that can be
context, validity traced; needs the network's padded forward, ``causal_apply_at``; the default
when it is given), or ``"switch"``, a ``jax.lax.switch`` with one branch per count in the
reference's exact shapes (every branch compiled into the program; only the drawn one runs). The
coin is a ``jax.lax.cond``. Forcing ``batch['num_chunks']`` / ``batch['bidirectional']`` with
Python values traces only that count's exact layout / that coin side. The padded layout is ours
(docs/deviations.md): the same loss up to float summation order, more tokens per step.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.flow import schedule
from anyflow_jax.losses import _common as C
from anyflow_jax.losses.causal_backward_simulation import chunk_starts
from anyflow_jax.losses.flow_map import DIFFUSION, flow_map_terms, sample_time_pairs, time_pair_kinds
from anyflow_jax.losses.flow_matching import flow_matching_loss

CausalApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, Any, jax.Array], jax.Array]
"""``causal_apply(params, z, t, r, context, clean) -> u`` of the full frames (module docstring)."""
PaddedApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, Any, jax.Array, jax.Array], jax.Array]
"""``causal_apply_at(params, z, t, r, context, clean, n) -> u``: the padded layout's training
forward at traced chunk count ``n`` (``chunk_layout``, :func:`causal_flow_map_loss`)."""

__all__ = ["CausalApplyFn", "PaddedApplyFn", "CHUNK_LAYOUTS", "resolve_chunk_layout", "causal_flow_map_loss", "chunk_counts", "check_partition", "sample_num_chunks",
           "chunk_frames"]


def check_partition(chunk_partition, full_chunk_limit) -> tuple[tuple[int, ...], int]:
    """``(chunk_partition, full_chunk_limit)`` as static ints, checked."""
    if chunk_partition is None or full_chunk_limit is None:
        raise ValueError("chunk_partition and full_chunk_limit are required (the FAR network's own; the stage's "
                         "objective takes them from the student network)")
    starts = chunk_starts(chunk_partition)  # validates the partition
    cp = tuple(b - a for a, b in zip(starts, starts[1:]))
    if isinstance(full_chunk_limit, bool) or not isinstance(full_chunk_limit, (int, np.integer)) \
            or not 1 <= full_chunk_limit <= len(cp):
        raise ValueError(f"full_chunk_limit must be an integer in [1, len(chunk_partition) = {len(cp)}], "
                         f"got {full_chunk_limit!r}")
    return cp, int(full_chunk_limit)


def chunk_counts(chunk_partition: Sequence[int], full_chunk_limit: int) -> tuple[int, ...]:
    """The chunk counts a step may train on: ``full_chunk_limit .. len(chunk_partition)``."""
    cp, fcl = check_partition(chunk_partition, full_chunk_limit)
    return tuple(range(fcl, len(cp) + 1))


def chunk_frames(chunk_partition: Sequence[int], full_chunk_limit: int, n: int) -> tuple[int, int]:
    """``(context frames, total frames)`` of a step on the first ``n`` chunks: the last
    ``full_chunk_limit`` chunks are full, the earlier ones context."""
    cp, fcl = check_partition(chunk_partition, full_chunk_limit)
    return sum(cp[:max(0, n - fcl)]), sum(cp[:n])


def sample_num_chunks(key: jax.Array, chunk_partition: Sequence[int], full_chunk_limit: int,
                      long_context_ratio: float = 0.5) -> jax.Array:
    """The number of chunks of a step (int32 scalar, traced): with probability
    ``long_context_ratio`` uniform in ``{full_chunk_limit, ..., len(chunk_partition)}``, else
    ``full_chunk_limit`` (the reference's ``sample_latents``)."""
    counts = chunk_counts(chunk_partition, full_chunk_limit)
    p = C.check_probability(long_context_ratio, "long_context_ratio")
    k_coin, k_n = jax.random.split(key)
    long = jax.random.uniform(k_coin, (), jnp.float32) < p
    n_long = jax.random.randint(k_n, (), counts[0], counts[-1] + 1, jnp.int32)
    return jnp.where(long, n_long, jnp.int32(counts[0]))


CHUNK_LAYOUTS = ("padded", "switch")


def resolve_chunk_layout(chunk_layout: Optional[str], have_padded: bool) -> str:
    """The causal stage-1 loss's layout for a traced chunk count: ``chunk_layout`` checked, or
    ``"padded"`` when the padded apply function is given, else ``"switch"``."""
    return C.resolve_choice("chunk_layout", chunk_layout, CHUNK_LAYOUTS, available=have_padded, preferred="padded",
                            fallback="switch", needs="causal_apply_at (the network's padded training forward, "
                                                  "num_chunks traced)")


def _is_static_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def causal_flow_map_loss(
    causal_apply: CausalApplyFn,
    bidirectional_apply: Optional[C.ApplyFn],
    params: Any,
    batch: Mapping[str, Any],
    key: jax.Array,
    *,
    chunk_partition: Optional[Sequence[int]] = None,
    full_chunk_limit: Optional[int] = None,
    long_context_ratio: float = 0.5,
    bidirectional_prob: float = 0.1,
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
    bidirectional_logit_mean: float = 0.0,
    bidirectional_logit_std: float = 1.0,
    chunk_layout: Optional[str] = None,
    causal_apply_at: Optional[PaddedApplyFn] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal stage-1 loss (module docstring); defaults are the reference's FAR pretraining.

    batch: ``x0`` (B, F, ...) clean latents with ``F = sum(chunk_partition)``; ``context``
    (leading axis B); ``neg_context`` (leading axis 1 or B; needed when ``text_dropout > 0`` or
    ``fuse_guidance_scale > 1``). Optional forcing (tests): ``eps`` (noise shaped like ``x0``; the
    causal branch uses its full frames' slice), ``t``/``r`` ((B,) per-sample tau pair shared by the
    full frames; the pair kinds of the split still decide the rescaling), ``num_chunks`` (a Python
    int traces that count only; a traced int32 picks a branch of the switch),
    ``bidirectional`` (bool: the coin), ``bidirectional_eps`` (noise shaped like ``x0``) and
    ``bidirectional_t`` ((B, F) tau) for the bidirectional branch.

    ``chunk_layout``: how a traced chunk count runs. ``"padded"`` (the default when
    ``causal_apply_at`` is given): one layout for every count, ``causal_apply_at(params, z, t, r,
    context, clean, n)`` over [the clip's first ``CF`` frames, the compressed region][the
    ``full_chunk_limit`` full chunks, each in a slot of ``max(chunk_partition)`` frames], its
    padding frames left out of the loss (``CF`` = the frames of all chunks but the last
    ``full_chunk_limit``; :meth:`~anyflow_jax.models.far_wan.FarWanTransformer3D.train_slots`).
    ``"switch"``: a ``lax.switch`` over the counts, each branch in its exact layout (the
    reference's shapes; every branch is compiled, so the program grows with the counts). A forced
    Python ``num_chunks`` and a partition with one count always run the exact layout.

    Returns ``(loss, metrics)``: ``loss`` = causal loss + (coin ? bidirectional loss : 0);
    metrics ``causal_loss``, ``bidirectional_loss`` (0 when not drawn), ``bidirectional`` (0/1),
    ``num_chunks``, ``text_dropped`` and the causal loss per pair kind (``loss_diffusion`` ...).
    """
    batch, x0, context, neg_context = C.unpack_data_batch(batch)
    cp, fcl = check_partition(chunk_partition, full_chunk_limit)
    b, f = x0.shape[:2]
    if f != sum(cp):
        raise ValueError(f"batch['x0'] has {f} frames but chunk_partition={list(cp)} covers {sum(cp)}: the clip must "
                         "hold every chunk (the reference cuts each step's clip to its first n chunks)")
    counts = chunk_counts(cp, fcl)
    layout = resolve_chunk_layout(chunk_layout, causal_apply_at is not None)
    w = C.check_guidance(fuse_guidance_scale, "fuse_guidance_scale")
    if w != 1.0 and (neg_context is None or context is None):
        raise ValueError(f"fuse_guidance_scale={w} needs batch['context'] and batch['neg_context'] "
                         "(pass fuse_guidance_scale=1.0 for an unconditional model)")
    schedule._check_weighting(weighting)
    C.check_derivative(derivative)
    p_bi = C.check_probability(bidirectional_prob, "bidirectional_prob")
    C.check_probability(long_context_ratio, "long_context_ratio")
    kinds = time_pair_kinds(b, diffusion_ratio, consistency_ratio)
    if adaptive_rescale and not np.any(kinds == DIFFUSION):
        # as flow_map_loss: the reference's rescale would be NaN; refused at trace time
        raise ValueError(f"adaptive_rescale needs at least one diffusion sample: diffusion_ratio={diffusion_ratio} "
                         f"gives none for batch size {b}")

    k_drop, k_n, k_eps, k_t, k_coin, k_bi = jax.random.split(key, 6)
    ctx, dropped = C.text_dropout(k_drop, context, neg_context, b, text_dropout)
    neg_b = C.broadcast_negative(neg_context, context, b) if w != 1.0 else None

    if batch.get("eps") is not None:
        C.check_same_shape(x0, batch["eps"], "batch['x0']", "batch['eps']")
        eps = jnp.asarray(batch["eps"], x0.dtype)
    else:
        eps = C.standard_normal(k_eps, x0)
    if (batch.get("t") is None) != (batch.get("r") is None):
        raise ValueError("batch['t'] and batch['r'] must be forced together")
    if batch.get("t") is not None:
        t = jnp.asarray(batch["t"], jnp.float32)
        r = jnp.asarray(batch["r"], jnp.float32)
        if t.shape != (b,) or r.shape != (b,):
            raise ValueError(f"batch['t'] and batch['r'] are per-sample times (B,) = ({b},), got {t.shape}, {r.shape}")
        C.check_t_ge_r(t, r, "batch['t']", "batch['r']")
    else:
        t, r = sample_time_pairs(k_t, b, 1, shift=shift, diffusion_ratio=diffusion_ratio,
                                 consistency_ratio=consistency_ratio)
        t, r = t[:, 0], r[:, 0]

    def causal_branch(n: int):
        n_ctx, end = chunk_frames(cp, fcl, n)
        nf = end - n_ctx
        x_ctx, x_full, eps_full = x0[:, :n_ctx], x0[:, n_ctx:end], eps[:, n_ctx:end]
        zeros = jnp.zeros((b, n_ctx), jnp.float32)

        def apply_fn(p, z, t_, r_, c):  # the full frames' velocity, context and clean copy fixed
            if n_ctx:
                z, t_, r_ = (jnp.concatenate([x_ctx.astype(z.dtype), z], axis=1),
                             jnp.concatenate([zeros, t_], axis=1), jnp.concatenate([zeros, r_], axis=1))
            return causal_apply(p, z, t_, r_, c, x_full)

        def branch(p):
            loss, m = flow_map_terms(apply_fn, p, x_full, eps_full, C.frames_time(t, nf), C.frames_time(r, nf), ctx,
                                     neg_b, kinds, fuse_guidance_scale=w, derivative=derivative, delta=delta,
                                     weighting=weighting, shift=shift, adaptive_rescale=adaptive_rescale,
                                     rescale_eps=rescale_eps)
            return loss, m
        return branch

    def padded_branch(n):
        starts = np.cumsum((0,) + cp)
        s, cf = max(cp), int(starts[len(cp) - fcl])
        sizes = jnp.asarray(cp, jnp.int32)
        nn = jnp.clip(n, counts[0], counts[-1])
        j = nn - fcl + jnp.arange(fcl, dtype=jnp.int32)  # the chunk in each slot
        frame = jnp.arange(s, dtype=jnp.int32)
        valid = (frame[None, :] < sizes[j][:, None]).reshape(-1)
        pos = (jnp.asarray(starts[:-1], jnp.int32)[j][:, None] + frame[None, :]).reshape(-1)
        pos = jnp.where(valid, pos, 0)

        def slots(a):  # (B, F, ...) -> the slots (B, fcl * S, ...), padding frames zero
            keep = valid.reshape((1, -1) + (1,) * (a.ndim - 2))
            return jnp.where(keep, jnp.take(a, pos, axis=1), jnp.zeros((), a.dtype))
        x_full, eps_full = slots(x0), slots(eps)
        ctx_valid = jnp.arange(cf, dtype=jnp.int32) < jnp.asarray(starts, jnp.int32)[jnp.maximum(nn - fcl, 0)]
        x_ctx = jnp.where(ctx_valid.reshape((1, -1) + (1,) * (x0.ndim - 2)), x0[:, :cf], jnp.zeros((), x0.dtype))
        zeros = jnp.zeros((b, cf), jnp.float32)
        nf = fcl * s

        def apply_fn(p, z, t_, r_, c):
            if cf:
                z, t_, r_ = (jnp.concatenate([x_ctx.astype(z.dtype), z], axis=1),
                             jnp.concatenate([zeros, t_], axis=1), jnp.concatenate([zeros, r_], axis=1))
            return causal_apply_at(p, z, t_, r_, c, x_full, nn)

        def branch(p):
            return flow_map_terms(apply_fn, p, x_full, eps_full, C.frames_time(t, nf), C.frames_time(r, nf), ctx,
                                  neg_b, kinds, fuse_guidance_scale=w, derivative=derivative, delta=delta,
                                  weighting=weighting, shift=shift, adaptive_rescale=adaptive_rescale,
                                  rescale_eps=rescale_eps, frame_valid=valid)
        return branch

    forced_n = batch.get("num_chunks")
    if forced_n is not None and _is_static_int(forced_n):
        if int(forced_n) not in counts:
            raise ValueError(f"batch['num_chunks']={forced_n}: a step trains on one of {list(counts)} chunks "
                             f"(full_chunk_limit={fcl} .. len(chunk_partition)={len(cp)})")
        n = jnp.int32(forced_n)
        causal_loss, metrics = causal_branch(int(forced_n))(params)
    else:
        n = (sample_num_chunks(k_n, cp, fcl, long_context_ratio) if forced_n is None
             else jnp.asarray(forced_n, jnp.int32))
        if len(counts) == 1:
            causal_loss, metrics = causal_branch(counts[0])(params)
        elif layout == "padded":
            causal_loss, metrics = padded_branch(n)(params)
        else:
            causal_loss, metrics = jax.lax.switch(jnp.clip(n - counts[0], 0, len(counts) - 1),
                                                  [causal_branch(c) for c in counts], params)

    def bidirectional_loss():
        if bidirectional_apply is None:
            raise ValueError("bidirectional_prob > 0 needs bidirectional_apply (the same weights' bidirectional path)")
        bi_batch = {"x0": x0, "context": ctx, "neg_context": neg_context, "eps": batch.get("bidirectional_eps"),
                    "t": batch.get("bidirectional_t")}
        loss, _ = flow_matching_loss(bidirectional_apply, params, bi_batch, k_bi, shift=shift, text_dropout=0.0,
                                     fuse_guidance_scale=w, logit_mean=bidirectional_logit_mean,
                                     logit_std=bidirectional_logit_std)
        return loss

    coin = batch.get("bidirectional")
    zero = jnp.zeros((), jnp.float32)
    if isinstance(coin, (bool, np.bool_)):
        bi_on = jnp.asarray(bool(coin))
        bi_loss = bidirectional_loss() if coin else zero
    elif coin is None and p_bi == 0.0:
        bi_on, bi_loss = jnp.asarray(False), zero
    else:
        bi_on = (jax.random.uniform(k_coin, (), jnp.float32) < p_bi) if coin is None else jnp.asarray(coin, bool)
        bi_loss = jax.lax.cond(bi_on, lambda: bidirectional_loss().astype(jnp.float32), lambda: zero)

    loss = causal_loss + bi_loss
    out = {"loss": loss, "causal_loss": causal_loss, "bidirectional_loss": bi_loss,
           "bidirectional": bi_on.astype(jnp.float32), "num_chunks": n.astype(jnp.float32),
           "text_dropped": jnp.mean(dropped.astype(jnp.float32))}
    out.update(metrics)
    return loss, out
