"""Flow Map Backward Simulation (reference spec section 5.1; API in docs/losses.md).

From pure noise, three shortcut transitions of the flow-map model on the N-step shifted grid
``T_0 = 1 > T_1 > ... > T_N = 0``:

1. prefix   ``T_0 -> T_k``      (skipped when k = 0),
2. current  ``T_k -> T_{k+1}``  (exactly the step the N-step sampler takes),
3. suffix   ``T_{k+1} -> 0``    (skipped when k + 1 = N).

N is drawn from ``steps_list`` and k from [0, N) *inside* the compiled program from a PRNG key,
and the transitions are one ``jax.lax.scan`` whose body runs the model under ``jax.lax.cond`` on
the "active" flag, so every (N, k) runs the same XLA program (no recompilation) and a skipped
transition costs no model call (1 to 3 NFEs, as in the reference).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.flow import schedule
from anyflow_jax.losses import _common as C

DEFAULT_STEPS_LIST = (2, 4, 8, 16, 50)
"""Rollout step counts of the reference configs (``num_inference_steps_list``)."""


def check_steps_list(steps_list: Sequence[int]) -> tuple[int, ...]:
    try:
        steps = tuple(int(n) for n in steps_list)
    except TypeError:
        raise ValueError(f"steps_list must be a non-empty sequence of ints >= 1, got {steps_list!r}") from None
    if not steps or any(n < 1 for n in steps) or any(int(n) != n for n in steps_list):
        raise ValueError(f"steps_list must be a non-empty sequence of ints >= 1 (N >= 1), got {steps_list!r}")
    return steps


def draw_steps(key: jax.Array, steps_list: Sequence[int] = DEFAULT_STEPS_LIST) -> tuple[jax.Array, jax.Array]:
    """Draw ``N ~ Uniform(steps_list)`` and ``k ~ Uniform{0, ..., N - 1}`` (int32 scalars, traceable)."""
    steps = check_steps_list(steps_list)
    # Deviation from the reference: N and k come from a JAX key inside the compiled program; the
    # reference draws them with Python `random` on rank 0 and broadcasts them. Under jit both are
    # the same on every device, as in the reference, but the random streams differ.
    k_n, k_k = jax.random.split(key)
    n = jnp.asarray(steps, jnp.int32)[jax.random.randint(k_n, (), 0, len(steps))]
    k = jax.random.randint(k_k, (), 0, n)
    return n, k


def resolve_steps(key, steps, num_steps=None, grad_step=None) -> tuple[jax.Array, jax.Array]:
    """The rollout's ``(N, k)`` as int32 arrays: drawn from ``key`` over ``steps`` (a checked
    steps list) unless forced; a forced ``N`` without ``k`` draws ``k`` uniform in [0, N).
    Concrete values are checked (``0 <= k < N``)."""
    if (num_steps is None or grad_step is None) and key is None:
        raise ValueError("key is required unless num_steps and grad_step are both given")
    if num_steps is None:
        n, drawn_k = draw_steps(key, steps)
        k = drawn_k if grad_step is None else grad_step
    else:
        n, k = num_steps, grad_step
        if k is None:
            k = jax.random.randint(key, (), 0, jnp.asarray(num_steps, jnp.int32))
    schedule._check_num_steps(n, "num_steps")
    if is_concrete_int(n) and is_concrete_int(k) and not 0 <= int(k) < int(n):
        raise ValueError(f"grad_step must be in [0, num_steps), got grad_step={k!r}, num_steps={n!r}")
    return jnp.asarray(n, jnp.int32), jnp.asarray(k, jnp.int32)


def backward_simulation(
    apply_fn: C.ApplyFn,
    params: Any,
    batch: Mapping[str, Any],
    key: Optional[jax.Array] = None,
    *,
    steps_list: Sequence[int] = DEFAULT_STEPS_LIST,
    shift: float = schedule.DEFAULT_SHIFT,
    stop_prefix_grad: bool = False,
    num_steps: Any = None,
    grad_step: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Roll noise to a sample with <= 3 flow-map transitions; returns ``(sample, metrics)``.

    batch: ``noise`` (B, F, ...) (the state at tau = 1) and optional ``context``. The rollout uses
    no guidance and no negative context (as the reference's training rollouts).

    ``num_steps`` / ``grad_step`` force N and k (Python ints or traced int scalars); otherwise
    both are drawn from ``key`` (N uniform over ``steps_list``, k uniform in [0, N)).
    Gradients flow through every active transition (the reference default);
    ``stop_prefix_grad=True`` stops them at the prefix transition (neither its model call nor the
    noise receives gradient). metrics: ``num_steps`` and ``grad_step`` (int32) and ``nfe``.
    """
    batch = C.check_batch(batch, ("noise",))
    noise = C.check_latents(batch["noise"], "batch['noise']")
    b, f = noise.shape[:2]
    context = batch.get("context")
    if context is not None:
        C.check_context(context, b, "batch['context']")
    steps = check_steps_list(steps_list)
    if not isinstance(stop_prefix_grad, bool):
        raise ValueError(f"stop_prefix_grad must be a bool, got {stop_prefix_grad!r}")

    n, k = resolve_steps(key, steps, num_steps, grad_step)

    t_k = schedule.grid_time(k, n, shift)
    t_k1 = schedule.grid_time(k + 1, n, shift)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    xs = {
        "t": jnp.stack([one, t_k, t_k1]),
        "r": jnp.stack([t_k, t_k1, zero]),
        "active": jnp.stack([k > 0, jnp.asarray(True), k + 1 < n]),
        "index": jnp.arange(3, dtype=jnp.int32),
    }

    def transition(z, x):
        def step(z_):
            tt = jnp.full((b, f), x["t"], jnp.float32)
            rr = jnp.full((b, f), x["r"], jnp.float32)
            u = C.call_model(apply_fn, params, z_, tt, rr, context)
            z_new = schedule.flow_map_step(z_, u, tt, rr)
            if stop_prefix_grad:
                z_new = jnp.where(x["index"] == 0, jax.lax.stop_gradient(z_new), z_new)
            return z_new

        return jax.lax.cond(x["active"], step, lambda z_: z_, z), None

    sample, _ = jax.lax.scan(transition, noise, xs)
    metrics = {"num_steps": n, "grad_step": k, "nfe": jnp.sum(xs["active"].astype(jnp.int32))}
    return sample, metrics


def is_concrete_int(x) -> bool:
    return schedule.is_concrete(x) and np.ndim(x) == 0
