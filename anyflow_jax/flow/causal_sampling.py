"""Any-step causal sampling: the chunk-autoregressive flow-map sampler of the FAR network
(reference spec sections 6.3 and 7, the causal pipeline).

The video is generated chunk by chunk along the model's ``chunk_partition``. For chunk ``c``:

1. the KV cache is encoded **from scratch** from every frame before the chunk (the given context
   frames and the chunks generated so far) at ``t = r = 0``, with the chunk-causal mask and the
   cache's full window ``full_chunk_limit - 1`` (older chunks compressed); chunk 0 runs on the
   empty cache;
2. the chunk's slice of the initial noise takes ``N`` flow-map jumps on the shifted ``N``-step
   grid (the same grid for every chunk), each a cached forward of the chunk's tokens only
   (``z <- z - (t_i - t_{i+1}) u(z, t_i, t_{i+1})``, per-frame times ``(B, chunk_len)``).

Context (image-to-video: the first latent frame; video-to-video: the first ``k`` latent frames)
fills the first chunks: those chunks are not generated but copied into the output unchanged and
serve as the cache of the later chunks. A context length must end on a chunk boundary (the
reference silently leaves the rest of a partly given chunk as zeros; here it is an error).

Guidance as the reference's causal pipeline: with ``guidance_scale`` g > 1 every model call,
the cache encoding included, runs on the batch ``[uncond; cond]`` (the uncond half's cache is
encoded with the negative context), and ``u = u_u + g (u_c - u_u)``. The released students fuse
guidance, so the default is 1 (one batch, no negative context).

Compilation (``chunk_loop="scan"``, the default): the chunks are one ``lax.scan`` over the chunk
index in the network's scanned layout (fixed-size cache, chunks padded to the largest; see
``docs/far.md``), one jitted program per task (the first generated chunk, i.e. the context
length) shared by every step count up to the grid capacity (the step loop runs over a padded
grid with a traced step count, :func:`anyflow_jax.flow.sampling.padded_step_grid`) and every
guidance scale > 1 (g is traced; g = 1 and g > 1 differ in batch and are two programs). With
``chunk_loop="unrolled"`` each chunk (cache encoding plus its step loop) is its own program with
a static layout (one per chunk index, shared by every task). :func:`causal_sample` may itself be
called inside ``jax.jit``; a traced step count then needs ``grid``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.flow import apply as C
from anyflow_jax.flow import sampling as S
from anyflow_jax.flow import schedule

__all__ = ["causal_sample", "context_lengths", "check_context_length", "chunk_bounds"]


def chunk_bounds(chunk_partition: Sequence[int]) -> tuple[int, ...]:
    """Frame index where each chunk starts, then the total: ``(0, c0, c0 + c1, ...)``."""
    return tuple(int(x) for x in np.cumsum([0] + [int(c) for c in chunk_partition]))


def context_lengths(chunk_partition: Sequence[int], frames: Optional[int] = None) -> tuple[int, ...]:
    """The context lengths (latent frames) a causal sample of ``frames`` latent frames accepts:
    every chunk boundary before the last chunk (at least one chunk is generated)."""
    bounds = chunk_bounds(chunk_partition)
    frames = bounds[-1] if frames is None else int(frames)
    return tuple(x for x in bounds[1:] if x < frames)


def check_context_length(chunk_partition: Sequence[int], n_context: int, frames: Optional[int] = None) -> int:
    """The number of context chunks of ``n_context`` given latent frames (0 for none), or a
    ``ValueError`` naming the lengths allowed (context must end on a chunk boundary)."""
    n = int(n_context)
    if n == 0:
        return 0
    allowed = context_lengths(chunk_partition, frames)
    if n not in allowed:
        raise ValueError(f"context of {n} latent frames does not end on a chunk boundary before the last chunk of "
                         f"chunk_partition={tuple(int(c) for c in chunk_partition)}: a context must have one of "
                         f"{list(allowed)} latent frames (1 = image-to-video)")
    return chunk_bounds(chunk_partition).index(n)


def _check_video_frames(model, frames: int) -> tuple[int, ...]:
    bounds = chunk_bounds(model.chunk_partition)
    if frames not in bounds[1:]:
        raise ValueError(f"noise has {frames} latent frames; a causal sample covers whole chunks of chunk_partition="
                         f"{tuple(model.chunk_partition)}: one of {list(bounds[1:])} latent frames "
                         f"(the reference: all {bounds[-1]})")
    return tuple(model.chunk_partition[:bounds.index(frames)])


def _double(x, guided: bool):
    """The batch ``[x; x]`` of a guided call (uncond and cond halves), else ``x``."""
    return jnp.concatenate([x, x], axis=0) if guided else x


def _encode(model, guided, params, frames, context, **layout):
    """The cache of ``frames`` at t = r = 0 (both guidance halves), detached: the reference
    encodes it under no_grad. ``layout``: ``chunk_index=`` for the scanned layout."""
    zeros = jnp.zeros((frames.shape[0] * (2 if guided else 1), frames.shape[1]), jnp.float32)
    cache = model.apply({"params": params}, _double(frames, guided), zeros, zeros, context, encode_cache=True,
                        **layout)
    return jax.lax.stop_gradient(cache)


def _chunk_steps(model, guided, use_mean_velocity, params, z, context, cache, guidance, grid, count):
    """``count`` flow-map jumps of the chunk ``z`` (B, F_c, H, W, C) on ``grid`` given ``cache``
    (``context``: ``[neg; cond]`` (2B) when ``guided``, else the (B) conditioning)."""
    b, f = z.shape[:2]

    def step(i, z):
        t_i, r_i = grid[i], grid[i + 1]
        tt = jnp.full((b, f), t_i, jnp.float32)
        rr = jnp.full((b, f), r_i, jnp.float32)
        u = model.apply({"params": params}, _double(z, guided), _double(tt, guided),
                        _double(rr if use_mean_velocity else tt, guided), context, kv_cache=cache)
        if guided:
            u_u, u_c = jnp.split(u, 2, axis=0)
            u = u_u + guidance * (u_c - u_u)
        return schedule.flow_map_step(z, u.astype(z.dtype), tt, rr)

    # Deviation from the reference (as in sampling.sample): an interval with t == r is evaluated
    # (it moves z by 0 * u) rather than skipped.
    return jax.lax.fori_loop(0, count, step, z)


def _generate_chunk(model, guided: bool, use_mean_velocity: bool, params, prev, noise, context, guidance, grid,
                    count):
    """Chunk ``c`` (``c`` = the chunks held by ``prev``, static through its shape): encode the
    cache from ``prev`` (the frames before the chunk, (B, F_prev, H, W, C)), then ``count``
    flow-map jumps of the chunk's ``noise`` on ``grid``."""
    b, _, h, w, _ = noise.shape
    if prev.shape[1]:
        cache = _encode(model, guided, params, prev, context)
    else:
        cache = model.empty_cache(2 * b if guided else b, h, w)
    return _chunk_steps(model, guided, use_mean_velocity, params, noise, context, cache, guidance, grid, count)


_generate_chunk_jit = jax.jit(_generate_chunk, static_argnums=(0, 1, 2))


def _generate_scanned(model, guided: bool, use_mean_velocity: bool, first: int, n_chunks: int, params, video, noise,
                      context, guidance, grid, count):
    """Chunks ``first .. n_chunks - 1`` as one ``lax.scan`` over the chunk index in the network's
    scanned layout (``chunk_index=``): ``video`` and ``noise`` are buffers ``(B, F + S, ...)`` (``S``
    the largest chunk) holding the given frames / the initial noise; each chunk encodes its cache
    from the buffer (frames from the chunk on are ignored), takes ``count`` jumps of its noise
    padded to ``S`` frames and writes them back (a shorter chunk's padding is overwritten by the
    next chunk, or falls past the video)."""
    s = model.slot_frames()
    starts = jnp.asarray(np.cumsum((0,) + tuple(int(c) for c in model.chunk_partition)), jnp.int32)

    def body(buf, c):
        start = starts[c]
        cache = _encode(model, guided, params, buf, context, chunk_index=c)
        z = jax.lax.dynamic_slice_in_dim(noise, start, s, axis=1)
        z = _chunk_steps(model, guided, use_mean_velocity, params, z, context, cache, guidance, grid, count)
        return jax.lax.dynamic_update_slice_in_dim(buf, z.astype(buf.dtype), start, axis=1), None

    video, _ = jax.lax.scan(body, video, jnp.arange(first, n_chunks, dtype=jnp.int32))
    return video


_generate_scanned_jit = jax.jit(_generate_scanned, static_argnums=(0, 1, 2, 3, 4))


def causal_sample(
    model,
    params: Any,
    noise: jax.Array,
    context: jax.Array,
    *,
    num_steps: int = 4,
    shift: float = schedule.DEFAULT_SHIFT,
    guidance_scale: float = 1.0,
    neg_context: Optional[jax.Array] = None,
    context_latents: Optional[jax.Array] = None,
    timesteps: Optional[Sequence[float]] = None,
    grid: Optional[jax.Array] = None,
    use_mean_velocity: bool = True,
    chunk_loop: str = "scan",
) -> jax.Array:
    """Chunk-autoregressive any-step sample of a FAR network (module docstring).

    ``model``: a :class:`~anyflow_jax.models.far_wan.FarWanTransformer3D` (its ``chunk_partition``,
    ``empty_cache`` and the ``encode_cache`` / ``kv_cache`` paths); ``params`` its parameters.
    ``noise`` ``(B, F, H, W, C)``: the initial noise of the whole video, ``F`` a chunk boundary of
    the partition (the reference: all of it); chunk ``c`` starts from its slice. ``context``
    ``(B, L, text_dim)`` (batch 1 broadcasts). ``context_latents`` ``(B, Fc, H, W, C)``: the first
    ``Fc`` latent frames given (I2V: 1; V2V: a chunk boundary, :func:`context_lengths`), returned
    unchanged. ``num_steps`` steps per chunk on the shifted grid (``timesteps`` overrides it;
    ``grid`` + a traced ``num_steps`` as in :func:`anyflow_jax.flow.sampling.sample`).
    ``use_mean_velocity=False`` calls the model with ``r = t`` (a teacher's Euler steps).
    ``chunk_loop``: ``"scan"`` (one program for every chunk: a ``lax.scan`` over the chunk index
    in the network's scanned layout) or ``"unrolled"`` (one program per chunk index, each with its
    own static layout; the same values up to summation order).
    Returns the video ``(B, F, H, W, C)`` at tau = 0.
    """
    if chunk_loop not in ("scan", "unrolled"):
        raise ValueError(f"chunk_loop must be 'scan' or 'unrolled', got {chunk_loop!r}")
    noise = C.check_latents(noise, "noise")
    b, frames, h, w, c = noise.shape
    chunks = _check_video_frames(model, frames)
    bounds = chunk_bounds(chunks)
    if context is None:
        raise ValueError("context (text embeddings, (B, L, text_dim)) is required")
    context = jnp.asarray(context)
    if context.ndim != 3 or context.shape[0] not in (1, b):
        raise ValueError(f"context must be (B, L, text_dim) with batch 1 or B = {b}, got {tuple(context.shape)}")
    context = jnp.broadcast_to(context, (b,) + context.shape[1:])
    g = C.check_guidance(guidance_scale, "guidance_scale")
    guided = g != 1.0
    if guided:
        if neg_context is None:
            raise ValueError(f"guidance_scale={g} needs neg_context")
        neg = C.broadcast_negative(jnp.asarray(neg_context), context, b)
        context = jnp.concatenate([neg, context], axis=0)

    # the step grid: padded to a capacity with the step count as a (possibly traced) value
    if grid is None:
        ts = S.resolve_timesteps(num_steps, timesteps, shift)
        n = int(ts.shape[0]) - 1
        grid = jnp.zeros((S.grid_capacity(n) + 1,), jnp.float32).at[:n + 1].set(ts)
        count = jnp.asarray(n, jnp.int32)
    else:
        grid, count = S._check_grid(grid, num_steps, timesteps)

    n_ctx_chunks, ctx_lat = 0, None
    if context_latents is not None:
        ctx_lat = C.check_latents(context_latents, "context_latents")
        if ctx_lat.ndim != 5 or ctx_lat.shape[0] != b or ctx_lat.shape[2:] != (h, w, c):
            raise ValueError(f"context_latents must be (B, Fc, H, W, C) = ({b}, Fc, {h}, {w}, {c}), got "
                             f"{tuple(ctx_lat.shape)}")
        n_ctx_chunks = check_context_length(chunks, ctx_lat.shape[1], frames)
        ctx_lat = ctx_lat.astype(noise.dtype)

    if chunk_loop == "scan":
        s = model.slot_frames()
        total = int(np.sum(model.chunk_partition))
        pad = ((0, 0), (0, total + s - frames), (0, 0), (0, 0), (0, 0))
        video = jnp.zeros((b, total + s, h, w, c), noise.dtype)
        if n_ctx_chunks:
            video = video.at[:, :ctx_lat.shape[1]].set(ctx_lat)
        video = _generate_scanned_jit(model, guided, bool(use_mean_velocity), n_ctx_chunks, len(chunks), params,
                                      video, jnp.pad(noise, pad), context, jnp.float32(g), grid, count)
        out = video[:, :frames]
        # the given frames come back exactly as given
        return out if not n_ctx_chunks else out.at[:, :ctx_lat.shape[1]].set(ctx_lat)
    parts = [ctx_lat] if n_ctx_chunks else []
    for ci in range(n_ctx_chunks, len(chunks)):
        prev = jnp.concatenate(parts, axis=1) if len(parts) > 1 else (
            parts[0] if parts else jnp.zeros((b, 0, h, w, c), noise.dtype))
        parts.append(_generate_chunk_jit(model, guided, bool(use_mean_velocity), params, prev,
                                         noise[:, bounds[ci]:bounds[ci + 1]], context, jnp.float32(g), grid, count))
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
