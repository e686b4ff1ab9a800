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

The chunk loop is a Python loop inside the caller's program (each chunk index has its own static
token layout), so one compiled program serves every N and k; each chunk's rollout (its cache
encoding included) is wrapped in ``jax.checkpoint``, so the backward pass holds one chunk's
activations at a time and re-runs that chunk's forward (encoding included) when it gets there.
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

__all__ = ["EncodeFn", "ChunkApplyFn", "causal_backward_simulation", "chunk_starts"]


def chunk_starts(chunk_partition: Sequence[int]) -> tuple[int, ...]:
    """Frame index where each chunk starts, then the total: ``(0, c0, c0 + c1, ...)``."""
    try:
        cp = tuple(int(c) for c in chunk_partition)
    except (TypeError, ValueError):
        raise ValueError(f"chunk_partition must be a sequence of frame counts, got {chunk_partition!r}") from None
    if not cp or min(cp) < 1:
        raise ValueError(f"chunk_partition must be positive frame counts, got {list(cp)}")
    return tuple(int(x) for x in np.cumsum((0,) + cp))


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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Roll one noise draw to a video chunk by chunk (module docstring); returns ``(video, metrics)``.

    batch: ``noise`` ``(B, F, H, W, C)`` with ``F = sum(chunk_partition)`` (the state at tau = 1;
    chunk ``c`` starts from its slice) and ``context`` (passed to ``encode`` and ``chunk_apply``).
    No guidance, no negative context (as the reference's training rollouts).

    N ~ ``steps_list`` and k ~ [0, N) are drawn once from ``key`` (``num_steps`` / ``grad_step``
    force them: Python ints or traced int32 scalars) and used by every chunk.
    ``stop_prefix_grad`` as in :func:`~anyflow_jax.losses.backward_simulation.backward_simulation`.
    ``remat_chunks=False`` drops the per-chunk ``jax.checkpoint`` (same values and gradients, more
    memory). metrics: ``num_steps``, ``grad_step`` (int32), ``nfe`` (model calls of the rollout
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

    def chunk_rollout(p, prev, z, ctx, n_, k_):
        # the cache of the student's own earlier chunks, detached (no gradient into the context
        # or through the encoding's parameters)
        cache = encode(jax.lax.stop_gradient(p), jax.lax.stop_gradient(prev), ctx)
        cache = jax.lax.stop_gradient(cache)

        def apply_fn(p_, z_, t_, r_, c_):
            return chunk_apply(p_, z_, t_, r_, c_, cache)
        out, m = backward_simulation(apply_fn, p, {"noise": z, "context": ctx}, None, steps_list=steps, shift=shift,
                                     stop_prefix_grad=stop_prefix_grad, num_steps=n_, grad_step=k_)
        return out, m["nfe"]

    rollout = jax.checkpoint(chunk_rollout) if remat_chunks else chunk_rollout
    parts, nfe = [], jnp.zeros((), jnp.int32)
    for c in range(len(starts) - 1):
        prev = jnp.concatenate(parts, axis=1) if parts else noise[:, :0]
        out, nfe_c = rollout(params, prev, noise[:, starts[c]:starts[c + 1]], context, n, k)
        parts.append(out)
        nfe = nfe + nfe_c
    video = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    metrics = {"num_steps": n, "grad_step": k, "nfe": nfe,
               "cache_encodings": jnp.asarray(len(starts) - 2, jnp.int32)}
    return video, metrics
