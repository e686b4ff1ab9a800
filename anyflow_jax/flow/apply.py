"""Apply-function helpers shared by the objectives and the samplers.

Everything in :mod:`anyflow_jax.flow` and :mod:`anyflow_jax.losses` talks to a network through an
*apply function* ``apply_fn(params, z, t, r, context) -> u`` (see :data:`ApplyFn`). The helpers
here validate its inputs at trace time (shapes and static options, raising a ``ValueError`` that
names the offending argument), handle (negative) contexts and draw noise. Value checks (t >= r)
run only when the values are concrete.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.flow import schedule

__all__ = ["ApplyFn", "check_latents", "check_same_shape", "check_times", "check_t_ge_r", "check_guidance", "check_context", "broadcast_negative", "select_context", "call_model", "standard_normal"]

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, Any], jax.Array]
"""``apply_fn(params, z, t, r, context) -> u``: average velocity, same shape as ``z``.

``t`` and ``r`` have shape (B, F) (tau units). A teacher or critic is called with ``r = t``.
"""


def check_latents(x, name: str) -> jax.Array:
    if not hasattr(x, "shape") or np.ndim(x) < 2:
        raise ValueError(f"{name} must be an array with leading axes (B, F, ...), got {type(x).__name__} "
                         f"of shape {tuple(np.shape(x))}")
    return jnp.asarray(x)


def check_same_shape(a, b, name_a: str, name_b: str) -> None:
    if tuple(np.shape(a)) != tuple(np.shape(b)):
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(np.shape(a))}, got {tuple(np.shape(b))}")


def check_times(t, like, name: str) -> jax.Array:
    """Per-frame times: shape (B, F) matching ``like``'s leading axes; cast to fp32."""
    want = tuple(np.shape(like)[:2])
    if tuple(np.shape(t)) != want:
        raise ValueError(f"{name} must have shape (B, F) = {want}, got {tuple(np.shape(t))}")
    return jnp.asarray(t, jnp.float32)


def check_t_ge_r(t, r, name_t: str, name_r: str) -> None:
    schedule._check_t_ge_r(t, r, name_t, name_r)


def check_guidance(value, name: str, minimum: float = 1.0) -> float:
    if not isinstance(value, (int, float, np.floating, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a static number, got {value!r}")
    if not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def check_context(context, batch_size: int, name: str = "context") -> None:
    """Every leaf of a (pytree) context must have leading axis B."""
    for leaf in jax.tree_util.tree_leaves(context):
        if np.ndim(leaf) < 1 or np.shape(leaf)[0] != batch_size:
            raise ValueError(f"{name} leaves must have leading batch axis {batch_size}, "
                             f"got shape {tuple(np.shape(leaf))}")


def broadcast_negative(neg_context, context, batch_size: int, name: str = "neg_context"):
    """Broadcast a batch-1 (or batch-B) negative context explicitly to batch B.

    """
    # Deviation from the reference: the reference passes the batch-1 negative embedding and
    # relies on broadcasting inside attention; we broadcast it explicitly (docs/deviations.md).
    if context is not None:
        ctx_def = jax.tree_util.tree_structure(context)
        neg_def = jax.tree_util.tree_structure(neg_context)
        if ctx_def != neg_def:
            raise ValueError(f"{name} must have the same pytree structure as context, got {neg_def} vs {ctx_def}")

    def _one(neg, ctx):
        if np.ndim(neg) < 1 or np.shape(neg)[0] not in (1, batch_size):
            raise ValueError(f"{name} leaves must have leading axis 1 or {batch_size}, "
                             f"got shape {tuple(np.shape(neg))}")
        if ctx is not None and tuple(np.shape(neg)[1:]) != tuple(np.shape(ctx)[1:]):
            raise ValueError(f"{name} leaves must match context's trailing shape {tuple(np.shape(ctx)[1:])}, "
                             f"got {tuple(np.shape(neg)[1:])}")
        neg = jnp.asarray(neg)
        dtype = ctx.dtype if ctx is not None else neg.dtype
        return jnp.broadcast_to(neg, (batch_size,) + neg.shape[1:]).astype(dtype)

    if context is None:
        return jax.tree_util.tree_map(lambda n: _one(n, None), neg_context)
    return jax.tree_util.tree_map(_one, neg_context, context)


def select_context(use_neg, neg_b, context):
    """Per-sample choice: ``neg_b`` where ``use_neg`` (B,) is true, else ``context``."""

    def _one(n, c):
        m = use_neg.reshape((-1,) + (1,) * (np.ndim(c) - 1))
        return jnp.where(m, n, c)

    return jax.tree_util.tree_map(_one, neg_b, context)


def call_model(apply_fn: ApplyFn, params, z, t, r, context, name: str = "apply_fn") -> jax.Array:
    """Call ``apply_fn`` and check (at trace time) that it returns an array shaped like ``z``."""
    u = apply_fn(params, z, t, r, context)
    if tuple(np.shape(u)) != tuple(np.shape(z)):
        raise ValueError(f"{name} must return an average velocity shaped like z {tuple(np.shape(z))}, "
                         f"got {tuple(np.shape(u))}")
    return u


def standard_normal(key, like) -> jax.Array:
    """Gaussian noise shaped like ``like``: drawn in fp32, cast to its dtype."""
    # Deviation from the reference: noise is drawn in fp32 (the reference draws it in the bf16
    # trainer dtype); identical in distribution, and equal for fp32 latents.
    return jax.random.normal(key, like.shape, jnp.float32).astype(like.dtype)
