"""Optimiser, learning-rate schedule, trainable-subset filter and EMA, with the reference's semantics.

The reference (AnyFlow ``far/main.py``, reference doc §0, §3, §4.6, §5.5) does per update:
``clip_grad_norm_(max_norm)`` -> ``AdamW.step()`` -> ``lr_scheduler.step()`` -> EMA step, with
``get_constant_schedule_with_warmup`` as the schedule. This module reproduces that in optax:

* :func:`lr_schedule` -- transformers' ``get_constant_schedule_with_warmup``. PyTorch's
  ``LambdaLR`` sets ``lr = base_lr * f(0)`` at construction and the scheduler is stepped *after*
  each optimiser step, so update ``k`` (0-based) uses ``f(k) = k / max(1, warmup)`` for
  ``k < warmup`` and ``1`` after. In particular **the first update uses lr 0** (Adam moments
  still accumulate, exactly as in PyTorch). optax evaluates a schedule at its internal count,
  which is also the 0-based index of the update, so the schedule is used as is.
* :func:`make_optimizer` -- global-norm clipping with ``torch.nn.utils.clip_grad_norm_``'s
  formula (``coef = min(1, max_norm / (norm + 1e-6))``; optax's own ``clip_by_global_norm``
  omits the 1e-6), computed over the trainable gradients only, then ``optax.adamw``.
  ``optax.adamw`` equals ``torch.optim.AdamW``: ``m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps)`` with
  ``eps`` added *outside* the square root (optax's ``eps_root`` stays 0), and decoupled weight
  decay ``lr_t * wd * p`` using the scheduled lr (PyTorch: ``p *= 1 - lr_t*wd`` before the Adam
  step, which is the same update). The only differences are float rounding
  (``sqrt(v/bc2)`` vs ``sqrt(v)/sqrt(bc2)``). Frozen leaves get exactly zero updates and no
  Adam moments (``optax.multi_transform`` with ``set_to_zero``).
* :func:`ema_decay` / :func:`ema_update` -- "The EMA decay is 0 (plain copy) before the warmup
  step, and EMA covers only trainable params" (reference §3, §9 item 13). See
  :func:`ema_decay` for the exact boundary.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from anyflow_jax.config import LR_SCHEDULES

TRAINABLE = "trainable"
FROZEN = "frozen"
# torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6).
_TORCH_CLIP_EPS = 1e-6


# ----------------------------------------------------------------------------- schedule
SCHEDULES = LR_SCHEDULES


def lr_schedule(lr: float, warmup_steps: int, schedule: str = "constant",
                decay_steps: int = 0) -> Callable[[Any], jax.Array]:
    """``count -> learning rate``; ``"constant"`` is ``get_constant_schedule_with_warmup(optimizer, warmup)``.

    ``count`` is the 0-based index of the update (the number of updates already applied, i.e.
    optax's internal count and the train state's step *before* the update). The warmup factor is
    ``count / max(1, warmup)`` for ``count < warmup`` and 1 afterwards, so update 0 uses lr 0,
    update ``warmup - 1`` uses ``lr * (warmup-1)/warmup`` and update ``warmup`` the full lr.
    ``warmup_steps == 0`` gives no warmup. Works with Python ints and traced arrays.

    ``schedule`` picks what follows the warmup: ``"constant"`` (the reference's), or a decay to 0
    at update ``decay_steps`` (``"cosine"``: ``(1 + cos(pi p)) / 2``, ``"linear"``: ``1 - p``, with
    ``p = (count - warmup) / (decay_steps - warmup)`` clipped to [0, 1]; transformers'
    ``get_cosine_schedule_with_warmup`` / ``get_linear_schedule_with_warmup``). Not in the
    reference: ours, for the toy's study (docs/results.md).
    """
    warmup_steps = int(warmup_steps)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    decay_steps = int(decay_steps)
    if schedule != "constant" and decay_steps <= warmup_steps:
        raise ValueError(f"a {schedule} schedule needs decay_steps > warmup_steps; got decay_steps={decay_steps}, "
                         f"warmup_steps={warmup_steps}")
    lr = float(lr)

    def fn(count):
        count = jnp.asarray(count)
        if warmup_steps == 0 and schedule == "constant":
            return jnp.full(count.shape, lr, jnp.float32)
        c = count.astype(jnp.float32)
        after = jnp.ones_like(c)
        if schedule != "constant":
            p = jnp.clip((c - warmup_steps) / float(decay_steps - warmup_steps), 0.0, 1.0)
            after = 0.5 * (1.0 + jnp.cos(jnp.pi * p)) if schedule == "cosine" else 1.0 - p
        factor = jnp.where(count < warmup_steps, c / float(max(1, warmup_steps)), after) if warmup_steps else after
        return (lr * factor).astype(jnp.float32)

    return fn


# ----------------------------------------------------------------------------- trainable subset
def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def param_path(path) -> str:
    """A key path from ``jax.tree_util`` joined by '/', e.g. ``'blocks/attn1/to_q/kernel'``."""
    return "/".join(_key_name(p) for p in path)


def _is_box(x) -> bool:
    from flax.core import meta
    return isinstance(x, meta.AxisMetadata)


def trainable_mask(params, patterns: str | Iterable[str] | None) -> Any:
    """Pytree of Python bools, True where a parameter is trained.

    Each pattern is a regular expression matched with ``re.search`` against the parameter's
    path joined by '/' (``'blocks/attn1/to_q/kernel'``); a parameter is trainable if any pattern
    matches. ``None`` or an empty list makes everything trainable. A pattern that matches no
    parameter raises ``ValueError`` naming it (a typo must not silently freeze the network).
    Flax metadata boxes (``nn.Partitioned``) count as leaves, so boxed trees work too.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = [p for p in (patterns or ()) if p]
    if not patterns:
        return jax.tree_util.tree_map(lambda _: True, params, is_leaf=_is_box)
    compiled = []
    for p in patterns:
        try:
            compiled.append((p, re.compile(p)))
        except re.error as e:
            raise ValueError(f"trainable pattern {p!r} is not a valid regular expression: {e}") from e
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
    names = [param_path(path) for path, _ in leaves]
    for p, rx in compiled:
        if not any(rx.search(n) for n in names):
            example = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ValueError(f"trainable pattern {p!r} matches no parameter "
                             f"({len(names)} parameters, e.g. {example})")
    mask = [any(rx.search(n) for _, rx in compiled) for n in names]
    return jax.tree_util.tree_unflatten(treedef, mask)


def _static_mask_leaves(mask, tree) -> list[bool]:
    """Mask leaves (Python bools) aligned with ``tree``'s leaves."""
    flat = jax.tree_util.tree_leaves(mask)
    n = len(jax.tree_util.tree_leaves(tree))
    if len(flat) != n:
        raise ValueError(f"mask has {len(flat)} leaves but the tree has {n}")
    return [bool(m) for m in flat]


# ----------------------------------------------------------------------------- optimizer
def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max_norm / (norm + 1e-6))``.

    The norm is taken over the leaves this transformation sees (inside ``make_optimizer`` the
    trainable ones only: ``multi_transform`` hides frozen leaves as empty ``MaskedNode``s).
    """
    max_norm = float(max_norm)

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(1.0, max_norm / (norm + _TORCH_CLIP_EPS))
        return jax.tree_util.tree_map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(*, lr: float, b1: float, b2: float, weight_decay: float, eps: float = 1e-8,
                   warmup_steps: int, grad_clip: float | None, schedule: str = "constant",
                   decay_steps: int = 0, mask: Any = None) -> optax.GradientTransformation:
    """AdamW (PyTorch semantics) with the lr of :func:`lr_schedule`, after global-norm clipping.

    ``mask`` (from :func:`trainable_mask`; ``None`` = all trainable) selects the trained leaves.
    Clipping sees only their gradients; frozen leaves get exactly zero updates and carry no
    optimizer state (their slots in the state are empty ``MaskedNode``s). ``grad_clip`` of
    ``None`` or ``<= 0`` disables clipping. The state holds two counters (Adam's and the
    schedule's), both equal to the number of updates applied.
    """
    parts = []
    if grad_clip is not None and float(grad_clip) > 0:
        parts.append(clip_by_global_norm_torch(grad_clip))
    parts.append(optax.adamw(learning_rate=lr_schedule(lr, warmup_steps, schedule, decay_steps), b1=b1, b2=b2, eps=eps,
                             eps_root=0.0, weight_decay=weight_decay))
    inner = optax.chain(*parts)
    if mask is None:
        return inner
    labels = jax.tree_util.tree_map(lambda m: TRAINABLE if m else FROZEN, mask)
    return optax.multi_transform({TRAINABLE: inner, FROZEN: optax.set_to_zero()}, labels)


def grad_norm(grads, mask: Any = None) -> jax.Array:
    """Global L2 norm (fp32) of the trainable gradients (before clipping), for metrics."""
    leaves = jax.tree_util.tree_leaves(grads)
    if mask is not None:
        keep = _static_mask_leaves(mask, grads)
        leaves = [g for g, k in zip(leaves, keep) if k]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))


# ----------------------------------------------------------------------------- EMA
def ema_decay(step, decay: float, warmup_steps: int) -> jax.Array:
    """EMA decay for the EMA update that follows optimiser update number ``step`` (0-based).

    ``step`` is the same index the lr schedule sees for that update: the number of updates
    applied *before* it (the train state's step before incrementing). Returns 0.0 (plain copy)
    while ``step < warmup_steps`` and ``decay`` from then on, so with warmup W the first W EMA
    updates are copies and update W (the (W+1)-th) is the first one that averages.

    Reference reading: "The EMA decay is 0 (plain copy) before the warmup step" (§3, §5.5
    ``ema_warmup_step``). The reference loop (like FAR's ``train.py`` it derives from) runs the
    EMA step after ``optimizer.step(); lr_scheduler.step()`` and *before* ``global_step += 1``,
    so it compares the pre-increment global step with the warmup step. The trainer source with
    the exact comparison is not available; at worst this is one step off (1 in 1000 / 200).
    """
    step = jnp.asarray(step)
    if int(warmup_steps) <= 0:
        return jnp.full(step.shape, float(decay), jnp.float32)
    return jnp.where(step < int(warmup_steps), 0.0, float(decay)).astype(jnp.float32)


def ema_update(ema_params, params, step, *, decay: float, warmup_steps: int, mask: Any = None):
    """``ema = d * ema + (1 - d) * params`` on trainable leaves, ``d = ema_decay(step, ...)``.

    Before the warmup step the result is an exact copy of ``params``. Frozen leaves (mask False)
    simply track ``params``. Pure and jit-able; ``step`` may be traced (``mask`` is static).
    """
    d = ema_decay(step, decay, warmup_steps)
    copy = jnp.asarray(step) < int(warmup_steps)

    def avg(e, p):
        mixed = d.astype(jnp.float32) * e.astype(jnp.float32) + (1.0 - d.astype(jnp.float32)) * p.astype(jnp.float32)
        return jnp.where(copy, p.astype(e.dtype), mixed.astype(e.dtype))

    if mask is None:
        return jax.tree_util.tree_map(avg, ema_params, params)
    e_leaves, treedef = jax.tree_util.tree_flatten(ema_params)
    p_leaves = treedef.flatten_up_to(params)
    keep = _static_mask_leaves(mask, ema_params)
    out = [avg(e, p) if k else p.astype(e.dtype) for e, p, k in zip(e_leaves, p_leaves, keep)]
    return jax.tree_util.tree_unflatten(treedef, out)


__all__ = [
    "lr_schedule",
    "trainable_mask",
    "param_path",
    "clip_by_global_norm_torch",
    "make_optimizer",
    "grad_norm",
    "ema_decay",
    "ema_update",
]
