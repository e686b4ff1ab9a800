"""Causal (FAR) Flow Map Backward Simulation: the chunk-by-chunk training rollout of causal stage 2
(reference spec section 6.4 with 5.1 per chunk; docs/far.md).

The student is given as two functions of the same parameters (nothing here knows about Wan):

- ``encode(params, frames, context) -> cache``: the cache of the chunks held by ``frames``
  ``(B, F_prev, H, W, C)`` (the video so far, at t = r = 0); called with ``F_prev = 0`` for the
  first chunk, where it returns the empty cache. For the FAR network: the ``encode_cache=True``
  path, and ``empty_cache`` for no frames. The cache is any pytree.
- ``chunk_apply(params, z, t, r, context, cache) -> u``: the average velocity of the next
  chunk's frames ``z`` ``(B, F_c, H, W, C)`` given the cache, per-frame times ``(B, F_c)``. For
  the FAR network: the ``kv_cache=cache`` path.

For each chunk ``c`` of ``chunk_partition`` (text-to-video: every chunk is generated):

1. ``cache = encode(sg(params), sg(video[:, :start_c]), context)``: the student's own earlier
   chunks, detached (the reference encodes them under ``no_grad`` from detached outputs), so no
   gradient reaches the earlier chunks through the cache;
2. the <= 3-transition backward simulation of
   :func:`~anyflow_jax.losses.backward_simulation.backward_simulation` from the chunk's slice of
   one noise draw for the whole video, with ``chunk_apply`` closed over the cache and the
   **same** N and k for every chunk (one draw per call, traced);
3. the result is the chunk's part of the video; gradients flow through its <= 3 transitions.

The chunk loop has two forms with the same values and gradients (``chunk_loop``):

- ``"scan"`` (used when the student gives the scanned layout's two functions, ``encode_at`` and
  ``chunk_apply_at`` below): a ``jax.lax.scan`` over the chunk index, so the program holds one
  chunk's rollout (and one backward) whatever the chunk count. Every chunk uses one layout: its
  noise padded to the largest chunk ``S``, the video so far in a fixed-size buffer, and a
  fixed-size cache whose valid part follows from the (traced) chunk index.

  - ``encode_at(params, video, c, context) -> cache``: the cache of chunks ``0..c-1`` read from
    the buffer ``video`` ``(B, F + S, H, W, C)`` (frames from chunk ``c`` on must be ignored);
  - ``chunk_apply_at(params, z, t, r, context, cache) -> u``: the velocity of chunk ``c``'s
    frames padded to ``S`` (``z`` ``(B, S, H, W, C)``, times ``(B, S)``); frames past the chunk's
    length must not influence the others (their outputs are dropped).
- ``"unrolled"``: a Python loop inside the caller's program (each chunk index with its own
  static token layout, so the program grows with the chunk count), with ``encode`` and
  ``chunk_apply`` above.

Both draw one N and k, traced, so one compiled program serves every N and k; each chunk's
rollout (its cache encoding included) is wrapped in ``jax.checkpoint``, so the backward pass
holds one chunk's activations at a time and re-runs that chunk's forward (encoding included)
when it gets there.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.flow import schedule
from anyflow_jax.losses import _common as C
from anyflow_jax.losses.backward_simulation import (
    DEFAULT_STEPS_LIST, backward_simulation, check_steps_list, resolve_steps)

EncodeFn = Callable[[Any, jax.Array, Any], Any]
"""``encode(params, frames, context) -> cache`` (module docstring)."""
ChunkApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, Any, Any], jax.Array]
"""``chunk_apply(params, z, t, r, context, cache) -> u`` of the chunk's frames (module docstring)."""

EncodeAtFn = Callable[[Any, jax.Array, jax.Array, Any], Any]
"""``encode_at(params, video, c, context) -> cache`` of the scanned loop (module docstring)."""

CHUNK_LOOPS = ("scan", "unrolled")

__all__ = ["EncodeFn", "ChunkApplyFn", "EncodeAtFn", "CHUNK_LOOPS", "causal_backward_simulation", "chunk_starts",
           "resolve_chunk_loop"]


def chunk_starts(chunk_partition: Sequence[int]) -> tuple[int, ...]:
    """Frame index where each chunk starts, then the total: ``(0, c0, c0 + c1, ...)``."""
    try:
        cp = tuple(int(c) for c in chunk_partition)
    except (TypeError, ValueError):
        raise ValueError(f"chunk_partition must be a sequence of frame counts, got {chunk_partition!r}") from None
    if not cp or min(cp) < 1:
        raise ValueError(f"chunk_partition must be positive frame counts, got {list(cp)}")
    return tuple(int(x) for x in np.cumsum((0,) + cp))


def resolve_chunk_loop(chunk_loop: Optional[str], has_scan: bool) -> str:
    """``chunk_loop`` checked: ``None`` means ``"scan"`` when the student gives the scanned
    layout's functions, else ``"unrolled"``."""
    return C.resolve_choice("chunk_loop", chunk_loop, CHUNK_LOOPS, available=has_scan, preferred="scan",
                            fallback="unrolled", needs="the student's scanned-layout functions (encode_at, "
                                                       "chunk_apply_at)")


def causal_backward_simulation(
    encode: EncodeFn,
    chunk_apply: ChunkApplyFn,
    params: Any,
    batch: Mapping[str, Any],
    key: Optional[jax.Array] = None,
    *,
    chunk_partition: Sequence[int],
    steps_list: Sequence[int] = DEFAULT_STEPS_LIST,
    shift: float = schedule.DEFAULT_SHIFT,
    stop_prefix_grad: bool = False,
    num_steps: Any = None,
    grad_step: Any = None,
    remat_chunks: bool = True,
    encode_at: Optional[EncodeAtFn] = None,
    chunk_apply_at: Optional[ChunkApplyFn] = None,
    chunk_loop: Optional[str] = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Roll one noise draw to a video chunk by chunk (module docstring); returns ``(video, metrics)``.

    batch: ``noise`` ``(B, F, H, W, C)`` with ``F = sum(chunk_partition)`` (the state at tau = 1;
    chunk ``c`` starts from its slice) and ``context`` (passed to ``encode`` and ``chunk_apply``).
    No guidance, no negative context (as the reference's training rollouts).

    N ~ ``steps_list`` and k ~ [0, N) are drawn once from ``key`` (``num_steps`` / ``grad_step``
    force them: Python ints or traced int32 scalars) and used by every chunk.
    ``stop_prefix_grad`` as in :func:`~anyflow_jax.losses.backward_simulation.backward_simulation`.
    ``remat_chunks=False`` drops the per-chunk ``jax.checkpoint`` (same values and gradients, more
    memory). ``encode_at``/``chunk_apply_at``: the scanned layout's functions; ``chunk_loop``
    ``"scan"`` (the default when they are given) or ``"unrolled"`` (module docstring).
    metrics: ``num_steps``, ``grad_step`` (int32), ``nfe`` (model calls of the rollout
    over all chunks, cache encodings not counted) and ``cache_encodings``.
    """
    batch = C.check_batch(batch, ("noise",))
    noise = C.check_latents(batch["noise"], "batch['noise']")
    starts = chunk_starts(chunk_partition)
    b, f = noise.shape[:2]
    if f != starts[-1]:
        raise ValueError(f"batch['noise'] has {f} frames but chunk_partition={list(chunk_partition)} covers "
                         f"{starts[-1]}: the rollout generates every chunk (text-to-video)")
    context = batch.get("context")
    if context is not None:
        C.check_context(context, b, "batch['context']")
    steps = check_steps_list(steps_list)
    if not isinstance(stop_prefix_grad, bool):
        raise ValueError(f"stop_prefix_grad must be a bool, got {stop_prefix_grad!r}")

    # one (N, k) for the whole video, as the reference's rollout (the same for every chunk)
    n, k = resolve_steps(key, steps, num_steps, grad_step)

    loop = resolve_chunk_loop(chunk_loop, encode_at is not None and chunk_apply_at is not None)
    n_chunks = len(starts) - 1
    if loop == "scan":
        rollout = _chunk_rollout(encode_at, chunk_apply_at, steps, shift, stop_prefix_grad, remat_chunks)
        video, nfe = _scanned_chunks(rollout, params, noise, context, starts, n, k)
    else:
        rollout = _chunk_rollout(encode, chunk_apply, steps, shift, stop_prefix_grad, remat_chunks)
        parts, nfe = [], jnp.zeros((), jnp.int32)
        for c in range(n_chunks):
            prev = jnp.concatenate(parts, axis=1) if parts else noise[:, :0]
            out, nfe_c = rollout(params, prev, noise[:, starts[c]:starts[c + 1]], context, n, k)
            parts.append(out)
            nfe = nfe + nfe_c
        video = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    metrics = {"num_steps": n, "grad_step": k, "nfe": nfe,
               "cache_encodings": jnp.asarray(n_chunks - 1, jnp.int32)}
    return video, metrics


def _chunk_rollout(encode, chunk_apply, steps, shift, stop_prefix_grad, remat_chunks):
    """``rollout(p, frames, z, ctx, n, k, *index) -> (chunk, nfe)`` of one chunk, for both loops:
    the cache of the student's own earlier chunks ``encode(sg(p), sg(frames), *index, ctx)``,
    detached (no gradient into the earlier chunks or through the encoding's parameters), then the
    <= 3-transition backward simulation of ``z`` on it; under ``jax.checkpoint`` with
    ``remat_chunks``."""
    def rollout(p, frames, z, ctx, n_, k_, *index):
        cache = encode(jax.lax.stop_gradient(p), jax.lax.stop_gradient(frames), *index, ctx)
        cache = jax.lax.stop_gradient(cache)

        def apply_fn(p_, z_, t_, r_, c_):
            return chunk_apply(p_, z_, t_, r_, c_, cache)
        out, m = backward_simulation(apply_fn, p, {"noise": z, "context": ctx}, None, steps_list=steps, shift=shift,
                                     stop_prefix_grad=stop_prefix_grad, num_steps=n_, grad_step=k_)
        return out, m["nfe"]
    return jax.checkpoint(rollout) if remat_chunks else rollout


def _scanned_chunks(rollout, params, noise, context, starts, n, k):
    """The chunk loop as a ``lax.scan`` over the chunk index (module docstring): the carry is the
    video buffer ``(B, F + S, ...)``; chunk ``c`` reads its noise from ``starts[c]`` (``S``
    frames), and its ``S`` output frames are written there (a shorter chunk's padding frames are
    overwritten by the next chunk, the last one's fall past ``F``)."""
    f = starts[-1]
    s = int(max(b - a for a, b in zip(starts[:-1], starts[1:])))
    pad = ((0, 0), (0, s)) + ((0, 0),) * (noise.ndim - 2)
    noise_buf = jnp.pad(noise, pad)
    chunk_start = jnp.asarray(np.asarray(starts[:-1], np.int32))

    def body(video, c):
        start = chunk_start[c]
        z = jax.lax.dynamic_slice_in_dim(noise_buf, start, s, axis=1)
        out, nfe_c = rollout(params, video, z, context, n, k, c)
        return jax.lax.dynamic_update_slice_in_dim(video, out.astype(video.dtype), start, axis=1), nfe_c

    video, nfes = jax.lax.scan(body, jnp.zeros_like(noise_buf), jnp.arange(len(starts) - 1, dtype=jnp.int32))
    return video[:, :f], jnp.sum(nfes)
