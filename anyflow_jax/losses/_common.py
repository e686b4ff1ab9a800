"""Shared helpers for the objectives: argument validation, context handling, model calls.

Every check here runs at trace time (on shapes and static options) and raises a ValueError that
names the offending argument. Value checks (t >= r) run only when the values are concrete.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax import schedule

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, Any], jax.Array]
"""``apply_fn(params, z, t, r, context) -> u``: average velocity, same shape as ``z``.

``t`` and ``r`` have shape (B, F) (tau units). A teacher or critic is called with ``r = t``.
"""

DERIVATIVES = ("central", "jvp")


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


def check_probability(value, name: str) -> float:
    if not isinstance(value, (int, float, np.floating, np.integer)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a static number in [0, 1], got {value!r}")
    return float(value)


def check_derivative(derivative) -> str:
    if derivative not in DERIVATIVES:
        raise ValueError(f"derivative must be one of {DERIVATIVES}, got {derivative!r}")
    return derivative


def check_batch(batch, required: tuple[str, ...], name: str = "batch") -> Mapping[str, Any]:
    if not isinstance(batch, Mapping):
        raise ValueError(f"{name} must be a mapping (dict) with keys {required}, got {type(batch).__name__}")
    missing = [k for k in required if k not in batch]
    if missing:
        raise ValueError(f"{name} is missing key(s) {missing}; required: {required}")
    return batch


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
    # relies on broadcasting inside attention; we broadcast it explicitly (section 9, item 21).
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


def text_dropout(key, context, neg_context, batch_size: int, prob: float, name: str = "text_dropout"):
    """Replace each sample's context by the negative context with probability ``prob``.

    Returns ``(context, dropped mask (B,))``. Needs ``neg_context`` when ``prob > 0``.
    """
    prob = check_probability(prob, name)
    if prob == 0.0:
        return context, jnp.zeros((batch_size,), bool)
    if neg_context is None or context is None:
        raise ValueError(f"{name}={prob} needs batch['context'] and batch['neg_context'] "
                         f"(pass {name}=0.0 for an unconditional model)")
    neg_b = broadcast_negative(neg_context, context, batch_size)
    drop = jax.random.bernoulli(key, prob, (batch_size,))
    return select_context(drop, neg_b, context), drop


def call_model(apply_fn: ApplyFn, params, z, t, r, context, name: str = "apply_fn") -> jax.Array:
    """Call ``apply_fn`` and check (at trace time) that it returns an array shaped like ``z``."""
    u = apply_fn(params, z, t, r, context)
    if tuple(np.shape(u)) != tuple(np.shape(z)):
        raise ValueError(f"{name} must return an average velocity shaped like z {tuple(np.shape(z))}, "
                         f"got {tuple(np.shape(u))}")
    return u


def per_sample_mean(x) -> jax.Array:
    """Mean over every axis but the batch axis, in fp32."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def frames_time(tau, num_frames: int) -> jax.Array:
    """Repeat a per-sample time (B,) over frames: (B, F)."""
    return jnp.repeat(tau[:, None], num_frames, axis=1)


def unpack_data_batch(batch) -> tuple[Any, jax.Array, Any, Any]:
    """Validate a data batch: ``(batch, x0, context, neg_context)`` with x0 (B, F, ...) and an
    optional context whose leading axis is B."""
    batch = check_batch(batch, ("x0",))
    x0 = check_latents(batch["x0"], "batch['x0']")
    context, neg_context = batch.get("context"), batch.get("neg_context")
    if context is not None:
        check_context(context, x0.shape[0], "batch['context']")
    return batch, x0, context, neg_context


def standard_normal(key, like) -> jax.Array:
    """Gaussian noise shaped like ``like``: drawn in fp32, cast to its dtype."""
    # Deviation from the reference: noise is drawn in fp32 (the reference draws it in the bf16
    # trainer dtype); identical in distribution, and equal for fp32 latents.
    return jax.random.normal(key, like.shape, jnp.float32).astype(like.dtype)
