"""Time convention, step grids, loss weights, noising and the flow-map Euler step.

Public time convention (the whole package): ``tau`` in [0, 1], 1 = pure noise, 0 = data.
The reference (``FlowMapDiscreteScheduler``, reference spec section 1; see docs/losses.md) works in
model units ``t = 1000 * tau``; every function here takes and returns tau.

- noising:        ``z_tau = tau * eps + (1 - tau) * x0``
- velocity:       ``v = eps - x0``
- flow-map step:  ``z_r = z_t - (t - r) * u`` (``r = 0`` gives the x0 prediction ``z_t - t * u``)

Latents carry leading axes ``(B, F)`` (batch, frames); per-frame times have shape ``(B, F)`` and
broadcast over the remaining axes, whatever they are (``(H, W, C)`` for video latents, ``(D,)`` for
toy data).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DEFAULT_SHIFT",
    "NUM_TRAIN_TIMESTEPS",
    "WEIGHTINGS",
    "shift_time",
    "step_grid",
    "grid_time",
    "weight_table",
    "loss_weight",
    "expand_time",
    "add_noise",
    "velocity_target",
    "flow_map_step",
    "logit_normal_time",
    "is_concrete",
]

DEFAULT_SHIFT = 5.0
"""Time shift k used by every AnyFlow config (``shift=5.0``)."""

NUM_TRAIN_TIMESTEPS = 1000
"""Model units per unit of tau; the loss-weight table lives on a 1001-point grid of this size."""

WEIGHTINGS = ("beta08", "gaussian", "uniform")
"""Loss-weight tables the reference defines (``weight_type``)."""


def is_concrete(x) -> bool:
    """True when ``x`` holds concrete values (not a tracer), so value checks can run now."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def _check_shift(shift) -> float:
    if not isinstance(shift, (int, float, np.floating, np.integer)) or not shift > 0:
        raise ValueError(f"shift must be a positive number (static), got {shift!r}")
    return float(shift)


def shift_time(s, shift: float = DEFAULT_SHIFT):
    """Time shift ``k s / (1 + (k - 1) s)``; monotone on [0, 1], fixes 0 and 1, identity for k = 1."""
    shift = _check_shift(shift)
    if shift == 1.0:
        return s
    return shift * s / (1.0 + (shift - 1.0) * s)


def _check_num_steps(num_steps, name: str = "num_steps") -> None:
    if is_concrete(num_steps):
        n = np.asarray(num_steps)
        if n.dtype.kind not in "iu":
            raise ValueError(f"{name} must be an integer, got {num_steps!r}")
        if np.any(n < 1):
            raise ValueError(f"{name} must be >= 1, got {num_steps!r}")


def step_grid(num_steps: int, shift: float = DEFAULT_SHIFT, dtype=jnp.float32) -> jax.Array:
    """The N-step sampling grid: ``N + 1`` shifted points from 1 down to 0 (inclusive).

    Like the reference ``set_timesteps``: linspace(1, 0, N + 1) in float64, shifted, then cast.
    ``num_steps`` must be a static Python int; inside jit with a traced N use :func:`grid_time`.
    With shift 5: N=2 -> [1, 0.8333, 0]; N=4 -> [1, 0.9375, 0.8333, 0.625, 0].
    """
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool):
        raise ValueError(f"num_steps must be a static Python int (use grid_time for traced N), got {num_steps!r}")
    _check_num_steps(num_steps)
    s = np.linspace(1.0, 0.0, int(num_steps) + 1, dtype=np.float64)
    return jnp.asarray(shift_time(s, shift), dtype=dtype)


def grid_time(i, num_steps, shift: float = DEFAULT_SHIFT) -> jax.Array:
    """Point ``i`` of the N-step grid, ``shift(1 - i / N)``, for integer (possibly traced) i and N.

    Usable inside jit with a traced N (the step count of backward simulation is drawn from a PRNG
    key inside the compiled program). Computed in fp32; agrees with :func:`step_grid` to ~1e-7.
    """
    _check_num_steps(num_steps)
    i = jnp.asarray(i, jnp.float32)
    n = jnp.asarray(num_steps, jnp.float32)
    return shift_time(1.0 - i / n, shift)


def _check_weighting(weighting) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return weighting


@functools.lru_cache(maxsize=None)
def _weight_table_np(weighting: str, shift: float) -> tuple[np.ndarray, np.ndarray]:
    # The reference builds its table at scheduler construction: set_timesteps(1000) gives the
    # 1001-point shifted grid T_i (model units, float64), then a weight per grid point.
    grid = shift_time(np.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=np.float64), shift)
    if weighting == "gaussian":
        # exp(-2 ((T - 500) / 1000)^2), minus its minimum, rescaled to sum to 1000.
        y = np.exp(-2.0 * (grid - 0.5) ** 2)
        y = y - y.min()
        w = y * (NUM_TRAIN_TIMESTEPS / y.sum())
    elif weighting == "beta08":
        # s (1 - s)^0.5 with s = T / 1000, rescaled to sum to 1000.
        y = grid * (1.0 - grid) ** 0.5
        w = y * (NUM_TRAIN_TIMESTEPS / y.sum())
    else:  # uniform
        w = np.ones_like(grid)
    return grid, w


def weight_table(weighting: str = "beta08", shift: float = DEFAULT_SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """The reference's loss-weight table: ``(grid_tau, weights)``, 1001 float64 points each.

    ``grid_tau`` runs from 1 down to 0 (the shifted 1001-point grid divided by 1000).
    """
    _check_weighting(weighting)
    grid, w = _weight_table_np(weighting, _check_shift(shift))
    return grid.copy(), w.copy()


def loss_weight(t, weighting: str = "beta08", shift: float = DEFAULT_SHIFT) -> jax.Array:
    """Per-time loss weight by nearest-point lookup on the 1001-point shifted grid.

    Exactly the reference ``get_train_weight``: index of the nearest grid point (argmin of the
    absolute difference, first index on ties, i.e. the larger time), then that point's weight.
    ``t`` is tau (any shape); returns fp32 of the same shape.
    """
    _check_weighting(weighting)
    t = jnp.asarray(t, jnp.float32)
    if weighting == "uniform":
        return jnp.ones_like(t)
    grid, w = _weight_table_np(weighting, _check_shift(shift))
    grid_j = jnp.asarray(grid, jnp.float32)
    idx = jnp.argmin(jnp.abs(grid_j - t[..., None]), axis=-1)
    return jnp.asarray(w, jnp.float32)[idx]


def _shape_str(x) -> str:
    return str(tuple(np.shape(x)))


def expand_time(t, x, name: str = "t") -> jax.Array:
    """Reshape per-frame times ``(B, F)`` to broadcast against ``x`` of shape ``(B, F, ...)``."""
    t = jnp.asarray(t)
    if np.ndim(x) < 2:
        raise ValueError(f"expected an array with leading axes (B, F), got shape {_shape_str(x)}")
    if t.shape != tuple(np.shape(x)[:2]):
        raise ValueError(
            f"{name} must have shape (B, F) = {tuple(np.shape(x)[:2])} (per-frame times), got {tuple(t.shape)}"
        )
    return t.reshape(t.shape + (1,) * (np.ndim(x) - 2))


def _check_same_shape(a, b, name_a: str, name_b: str) -> None:
    if tuple(np.shape(a)) != tuple(np.shape(b)):
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {_shape_str(a)} and {_shape_str(b)}")


def add_noise(x0, eps, t) -> jax.Array:
    """Forward noising ``z_t = t * eps + (1 - t) * x0`` with per-frame ``t`` of shape (B, F).

    Computed in fp32 (at least) and cast to the dtype of ``x0``.
    """
    # Deviation from the reference: the reference casts tau to the latent dtype (bf16) before the
    # product; we form the product in fp32 and cast the result (identical for fp32 latents).
    _check_same_shape(x0, eps, "x0", "eps")
    x0 = jnp.asarray(x0)
    tt = expand_time(jnp.asarray(t, jnp.float32), x0)
    z = tt * eps + (1.0 - tt) * x0
    return z.astype(x0.dtype)


def velocity_target(x0, eps) -> jax.Array:
    """The conditional (data) velocity ``v = eps - x0``."""
    _check_same_shape(x0, eps, "x0", "eps")
    return jnp.asarray(eps) - jnp.asarray(x0)


def _check_t_ge_r(t, r, name_t: str = "t", name_r: str = "r") -> None:
    if is_concrete((t, r)):
        tn, rn = np.asarray(t, np.float64), np.asarray(r, np.float64)
        if np.any(tn < rn):
            raise ValueError(f"{name_r} must be <= {name_t} (flow maps jump from t to an earlier time r)")


def flow_map_step(z, u, t, r) -> jax.Array:
    """Flow-map Euler step ``z_r = z_t - (t - r) * u`` with per-frame t, r of shape (B, F).

    ``r = 0`` gives the x0 prediction. t >= r is checked when the values are concrete.
    The result keeps the dtype of ``z`` (the sampler state).
    """
    # Deviation from the reference: the reference casts the result to the model-output dtype;
    # we keep the state's dtype so scans carry a fixed dtype (identical when both are bf16/fp32).
    _check_same_shape(z, u, "z", "u")
    _check_t_ge_r(t, r)
    z = jnp.asarray(z)
    dt = expand_time(jnp.asarray(t, jnp.float32), z, "t") - expand_time(jnp.asarray(r, jnp.float32), z, "r")
    return (z - dt * u).astype(z.dtype)


def logit_normal_time(key, shape: Sequence[int], mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """tau ~ sigmoid(N(mean, std^2)) in fp32 (before any shift)."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, tuple(shape), jnp.float32))
