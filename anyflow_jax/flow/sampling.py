"""Samplers: the any-step flow-map sampler, the teacher ODE sampler and the consistency sampler.

All take an apply function ``apply_fn(params, z, t, r, context) -> u`` (the losses' convention,
times (B, F) in tau, 1 = noise), parameters, the initial noise ``(B, F, ...)`` (the state at
tau = 1) and return the sample at tau = 0. The steps run as one loop (the model is traced once,
whatever the step count): a ``jax.lax.scan`` over a static grid, or, with a padded ``grid``
array (:func:`padded_step_grid`), a loop whose step count is a traced value, so one compiled
program serves every step count up to the grid's capacity. API: docs/losses.md; deviations: docs/deviations.md.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.flow import schedule
from anyflow_jax.flow import apply as C

__all__ = ["sample", "ode_sample", "consistency_sample", "resolve_timesteps", "padded_step_grid", "grid_capacity"]

# The smallest grid capacity of :func:`grid_capacity`: every step count up to 32 shares a program.
MIN_GRID_CAPACITY = 32


def grid_capacity(num_steps: int) -> int:
    """The grid capacity ``K`` one compiled sampler serves ``num_steps`` with: the next power of two
    at or above it, at least :data:`MIN_GRID_CAPACITY` (1..32 steps -> 32, 33..64 -> 64, ...)."""
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps!r}")
    return max(MIN_GRID_CAPACITY, 1 << (n - 1).bit_length())


def padded_step_grid(num_steps: int, capacity: int, shift: float = schedule.DEFAULT_SHIFT) -> np.ndarray:
    """The ``num_steps``-step grid of :func:`schedule.step_grid` (the same float32 values) followed
    by zeros up to length ``capacity + 1``: the ``grid`` argument of the samplers, which then run
    ``num_steps`` (a traced integer allowed) steps of it, so one compiled program serves every step
    count up to ``capacity``."""
    n, k = int(num_steps), int(capacity)
    if not 1 <= n <= k:
        raise ValueError(f"num_steps must be in [1, capacity = {k}], got {num_steps!r}")
    out = np.zeros(k + 1, np.float32)
    out[:n + 1] = np.asarray(schedule.step_grid(n, shift), np.float32)
    return out


def resolve_timesteps(num_steps: Optional[int], timesteps: Optional[Sequence[float]], shift: float) -> jax.Array:
    """The time grid of a sampler: ``timesteps`` if given (concrete, from 1-ish down, t >= r for
    every interval), else the shifted ``num_steps``-step grid of :func:`schedule.step_grid`."""
    if timesteps is None:
        if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a static int >= 1 (N >= 1), got {num_steps!r}")
        return schedule.step_grid(int(num_steps), shift)
    if not schedule.is_concrete(timesteps):
        raise ValueError("timesteps must be concrete (a Python/NumPy sequence), not a traced array")
    ts = np.asarray(timesteps, np.float64)
    if ts.ndim != 1 or ts.size < 2:
        raise ValueError(f"timesteps must be a 1-D sequence of at least 2 times, got shape {ts.shape}")
    if np.any(ts < 0) or np.any(ts > 1):
        raise ValueError("timesteps must lie in [0, 1] (tau, 1 = noise)")
    if np.any(np.diff(ts) > 0):
        raise ValueError("timesteps must be non-increasing: each step jumps from t to r <= t (got t < r)")
    return jnp.asarray(ts, jnp.float32)


def _guided_model(apply_fn, params, context, neg_context, guidance_scale, batch_size):
    g = C.check_guidance(guidance_scale, "guidance_scale")
    if context is not None:
        C.check_context(context, batch_size, "context")
    if g == 1.0:
        return lambda z, t, r: C.call_model(apply_fn, params, z, t, r, context)
    if neg_context is None or context is None:
        raise ValueError(f"guidance_scale={g} needs context and neg_context")
    neg_b = C.broadcast_negative(neg_context, context, batch_size)
    ctx2 = jax.tree_util.tree_map(lambda n, c: jnp.concatenate([n, c], axis=0), neg_b, context)

    def guided(z, t, r):
        # One call on the batch [uncond; cond], then u = u_u + g (u_c - u_u), as the reference.
        u2 = C.call_model(apply_fn, params, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                          jnp.concatenate([r, r]), ctx2)
        u_u, u_c = jnp.split(u2, 2, axis=0)
        return u_u + g * (u_c - u_u)

    return guided


def _check_context_latents(context_latents, noise):
    if context_latents is None:
        return None, 0
    cl = C.check_latents(context_latents, "context_latents")
    if cl.shape[0] != noise.shape[0] or cl.shape[1] > noise.shape[1] or cl.shape[2:] != noise.shape[2:]:
        raise ValueError(f"context_latents must have shape (B, Fc, ...) with B = {noise.shape[0]}, Fc <= "
                         f"{noise.shape[1]} and trailing shape {noise.shape[2:]}, got {cl.shape}")
    return cl.astype(noise.dtype), cl.shape[1]


def _check_grid(grid, num_steps, timesteps):
    """``(grid, count)`` of the traced-step-count path (see :func:`padded_step_grid`)."""
    if timesteps is not None:
        raise ValueError("give either timesteps or grid, not both")
    grid = jnp.asarray(grid, jnp.float32)
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"grid must be a 1-D array of at least 2 times (capacity + 1), got shape {grid.shape}")
    if schedule.is_concrete(num_steps):
        n = np.asarray(num_steps)
        if n.shape != () or n.dtype.kind not in "iu" or not 1 <= int(n) <= grid.shape[0] - 1:
            raise ValueError(f"num_steps must be an integer in [1, {grid.shape[0] - 1}] (the grid's capacity), "
                             f"got {num_steps!r}")
    return grid, jnp.asarray(num_steps, jnp.int32)


def _loop(body, init, grid, count, xs_extra=None):
    """``body(carry, (t_i, t_{i+1}[, extra_i]))`` over the grid's intervals: a ``lax.scan`` over the
    whole grid (``count`` None: a static step count), or a ``fori_loop`` over its first ``count``
    intervals (a traced step count: one program for every count up to the grid's capacity)."""
    if count is None:
        xs = (grid[:-1], grid[1:]) + ((xs_extra,) if xs_extra is not None else ())
        return jax.lax.scan(lambda z, x: (body(z, x), None), init, xs)[0]

    def step(i, z):
        x = (grid[i], grid[i + 1]) + ((i.astype(jnp.uint32),) if xs_extra is not None else ())
        return body(z, x)
    return jax.lax.fori_loop(0, count, step, init)


def _run(apply_fn, params, noise, context, *, num_steps, shift, guidance_scale, neg_context, context_latents,
         timesteps, use_mean_velocity: bool, grid=None):
    noise = C.check_latents(noise, "noise")
    b, f = noise.shape[:2]
    if grid is None:
        grid, count = resolve_timesteps(num_steps, timesteps, shift), None
    else:
        grid, count = _check_grid(grid, num_steps, timesteps)
    model = _guided_model(apply_fn, params, context, neg_context, guidance_scale, b)
    ctx_lat, fc = _check_context_latents(context_latents, noise)

    def body(z, x):
        t_i, r_i = x
        tt = jnp.full((b, f), t_i, jnp.float32)
        rr = jnp.full((b, f), r_i, jnp.float32)
        if fc:
            # Context frames are held clean with t = r = 0.
            # Deviation from the reference: the reference sets t = 0 but leaves r unchanged on
            # context frames; here r = 0 too, so they never move (docs/deviations.md).
            z = z.at[:, :fc].set(ctx_lat)
            tt = tt.at[:, :fc].set(0.0)
            rr = rr.at[:, :fc].set(0.0)
        u = model(z, tt, rr if use_mean_velocity else tt)
        return schedule.flow_map_step(z, u, tt, rr)

    # Deviation from the reference: the reference skips an interval with t == r (`continue`);
    # the loop evaluates it, and the step moves z by 0 * u (identical for finite u).
    z = _loop(body, noise, grid, count)
    if fc:
        z = z.at[:, :fc].set(ctx_lat)
    return z


def sample(
    apply_fn: C.ApplyFn,
    params: Any,
    noise: jax.Array,
    context: Any = None,
    *,
    num_steps: int = 4,
    shift: float = schedule.DEFAULT_SHIFT,
    guidance_scale: float = 1.0,
    neg_context: Any = None,
    context_latents: Optional[jax.Array] = None,
    timesteps: Optional[Sequence[float]] = None,
    grid: Optional[jax.Array] = None,
) -> jax.Array:
    """Any-step flow-map sampler: N jumps ``z <- z - (t_i - t_{i+1}) u(z, t_i, t_{i+1})``.

    The grid is the shifted N-step grid from 1 to 0 (``timesteps`` overrides it). With
    ``guidance_scale`` g > 1: ``u = u(neg) + g (u(c) - u(neg))`` (the AnyFlow student fuses CFG,
    so its default is 1). ``context_latents`` (B, Fc, ...) are held clean as the first Fc frames
    with t = r = 0.

    ``grid`` (``(K + 1,)``, may be traced; :func:`padded_step_grid`) replaces the grid: the first
    ``num_steps`` intervals of it are run, and ``num_steps`` may then be a traced integer <= K, so
    one compiled program serves every step count up to K (same values as the static path).
    """
    return _run(apply_fn, params, noise, context, num_steps=num_steps, shift=shift, guidance_scale=guidance_scale,
                neg_context=neg_context, context_latents=context_latents, timesteps=timesteps, use_mean_velocity=True,
                grid=grid)


def ode_sample(
    apply_fn: C.ApplyFn,
    params: Any,
    noise: jax.Array,
    context: Any = None,
    *,
    num_steps: int = 50,
    shift: float = schedule.DEFAULT_SHIFT,
    guidance_scale: float = 1.0,
    neg_context: Any = None,
    context_latents: Optional[jax.Array] = None,
    timesteps: Optional[Sequence[float]] = None,
    grid: Optional[jax.Array] = None,
) -> jax.Array:
    """Teacher ODE sampler (Euler): the model is called with r = t (instantaneous velocity), and
    the state steps ``z <- z - (t_i - t_{i+1}) v(z, t_i)`` on the same grid as :func:`sample`
    (the reference pipeline with ``use_mean_velocity=False``). Many steps give reference solutions.
    ``grid``: a traced step count, as in :func:`sample`.
    """
    return _run(apply_fn, params, noise, context, num_steps=num_steps, shift=shift, guidance_scale=guidance_scale,
                neg_context=neg_context, context_latents=context_latents, timesteps=timesteps, use_mean_velocity=False,
                grid=grid)


def _per_sample_keys(key, batch_size: int) -> jax.Array:
    """``key`` as a (B,) array of typed keys, one per sample.

    A (B,) batch of keys is used as given; a single key is split into B keys (so each sample's
    stream then depends on its position in the batch). Raw ``uint32`` keys (``jax.random.PRNGKey``)
    are wrapped into typed keys first.
    """
    if not hasattr(key, "dtype") or not hasattr(key, "shape"):
        raise ValueError(f"key must be a JAX PRNG key or a (B,) array of keys, got {type(key).__name__}")
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        try:
            key = jax.random.wrap_key_data(key)
        except Exception:  # any failure means: not key data of the default PRNG implementation
            raise ValueError(f"key must be a JAX PRNG key (jax.random.key) or a (B,) array of keys, got an array "
                             f"of dtype {key.dtype} and shape {tuple(key.shape)}") from None
    if key.shape == ():
        return jax.random.split(key, batch_size)
    if key.shape != (batch_size,):
        raise ValueError(f"key must be a single PRNG key or a (B,) = ({batch_size},) array of per-sample keys "
                         f"(e.g. jax.random.split(key, {batch_size})), got key shape {tuple(key.shape)}")
    return key


def consistency_sample(
    apply_fn: C.ApplyFn,
    params: Any,
    noise: jax.Array,
    context: Any = None,
    *,
    key: jax.Array,
    num_steps: int = 4,
    shift: float = schedule.DEFAULT_SHIFT,
    timesteps: Optional[Sequence[float]] = None,
    grid: Optional[jax.Array] = None,
) -> jax.Array:
    """Multistep consistency sampler: predict x0 = z - t u(z, t, 0), re-noise it to the next grid
    time with fresh noise, repeat; the last step returns the x0 prediction.

    ``key`` is either a (B,) array of typed keys, one per sample (recommended: sample i's result
    then depends only on its noise, context and key, not on the rest of the batch or its position
    in it), or a single key, which is split into B per-sample keys (a convenience whose result for
    a sample depends on its position in the batch). At step i a sample re-noises with
    ``jax.random.fold_in(sample_key, i)``. ``grid``: a traced step count, as in :func:`sample`.
    """
    noise = C.check_latents(noise, "noise")
    b, f = noise.shape[:2]
    if context is not None:
        C.check_context(context, b, "context")
    if grid is None:
        grid, count = resolve_timesteps(num_steps, timesteps, shift), None
    else:
        grid, count = _check_grid(grid, num_steps, timesteps)
    keys = _per_sample_keys(key, b)

    def draw(k, step, like):
        # Noise drawn in fp32 and cast, as C.standard_normal (one stream per sample).
        return jax.random.normal(jax.random.fold_in(k, step), like.shape[1:], jnp.float32).astype(like.dtype)

    def body(z, x):
        t_i, t_next, step = x
        tt = jnp.full((b, f), t_i, jnp.float32)
        zero = jnp.zeros_like(tt)
        x0 = schedule.flow_map_step(z, C.call_model(apply_fn, params, z, tt, zero, context), tt, zero)
        eps = jax.vmap(draw, in_axes=(0, None, None))(keys, step, x0)
        # At the last step t_next = 0, so this returns x0 itself.
        return schedule.add_noise(x0, eps, jnp.full((b, f), t_next, jnp.float32))

    return _loop(body, noise, grid, count, xs_extra=jnp.arange(grid.shape[0] - 1, dtype=jnp.uint32))
