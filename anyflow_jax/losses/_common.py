"""Loss-private helpers: batch validation, text dropout, reductions.

The helpers shared with the samplers (apply-function calls, context handling, checks of
latents and times) live in :mod:`anyflow_jax.flow.apply` and are re-exported here for the
objectives' convenience.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.flow.apply import (  # noqa: F401  (re-exported for the objectives)
    ApplyFn,
    broadcast_negative,
    call_model,
    check_context,
    check_guidance,
    check_latents,
    check_same_shape,
    check_t_ge_r,
    check_times,
    select_context,
    standard_normal,
)

__all__ = ["ApplyFn", "broadcast_negative", "call_model", "check_context", "check_guidance", "check_latents",
           "check_same_shape", "check_t_ge_r", "check_times", "select_context", "standard_normal", "DERIVATIVES",
           "check_probability", "check_derivative", "check_batch", "text_dropout", "per_sample_mean", "frames_time",
           "unpack_data_batch"]

DERIVATIVES = ("central", "jvp")


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


def resolve_choice(name: str, value, choices, *, available: bool, preferred: str, fallback: str,
                   needs: str) -> str:
    """A layout option checked: ``None`` means ``preferred`` when the functions it needs are
    ``available``, else ``fallback``; ``preferred`` without them is an error naming ``needs``."""
    if value is None:
        return preferred if available else fallback
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if value == preferred and not available:
        raise ValueError(f"{name}={preferred!r} needs {needs}")
    return value

