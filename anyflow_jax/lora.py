"""LoRA adapters on a frozen base, as pure functions on parameter pytrees (docs/lora.md).

The reference trains every network of every stage as PEFT LoRA adapters (rank 256, alpha 256,
no bias, dropout 0) on a frozen Wan2.1 base (reference spec sections 3-5). Here an adapter set is
its own pytree, next to the base parameters and never inside them, so that an optimizer, an EMA
or a checkpoint sees the adapters alone:

- :func:`init_adapters` ``(key, base_params, targets, rank, alpha)``: one :class:`LoraWeights`
  per target kernel, initialised as PEFT does (``lora_A`` Kaiming-uniform with ``a = sqrt(5)``,
  torch ``nn.Linear``'s default, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``; ``lora_B`` zero), so a fresh
  adapter leaves the network exactly the base.
- :func:`merge` ``(base_params, adapters)``: the effective parameters, each target kernel
  ``W + (alpha / r) * A @ B`` in our ``(in, out)`` layout; every other leaf is the base leaf
  itself. Differentiable in the adapters; differentiate w.r.t. the adapters only and the base
  gets no gradient (it is just an input).
- :func:`lora_apply` ``(apply_fn)``: turns a network's ``apply_fn(params, z, t, r, context)``
  (what :mod:`anyflow_jax.losses` take) into one whose ``params`` is ``LoraParams(adapters,
  base)``.
- Sharding: :func:`box_adapters` gives each factor the logical axis names of the weight it adapts
  (``A``: ``(*lead, in_name, 'lora_rank')``, ``B``: ``(*lead, 'lora_rank', out_name)``; the rank
  axis is replicated), so ``parallel.param_shardings`` places ``A @ B`` exactly where the kernel
  lives and the merge needs no communication; :func:`adapter_shardings` does both steps.

A target is the path of a kernel leaf in the base pytree (a tuple of keys, or a ``'/'``-joined
string). A kernel's last two axes are ``(in, out)``; any axes before them (the layer axis of
``nn.scan``-stacked blocks) are batch axes: an adapter on a stacked kernel ``(L, in, out)`` is
``A (L, in, r)``, ``B (L, r, out)``, one independent adapter per layer. The core knows nothing
about Wan; the Wan target table (the reference's module names mapped to our parameter paths
through the diffusers name table) is :func:`wan_targets` at the end of this file, and the
PEFT / diffusers file formats are in :mod:`anyflow_jax.checkpoints.lora`.

Merged, not unmerged (``y = x W + (alpha/r) (x A) B`` inside the network): the merge is a pure
function of parameter pytrees that works with any Flax model and apply function, costs
``6 r in out`` FLOPs per kernel per step however many tokens and network calls the step makes,
and leaves the frozen forwards (rollouts, guidance, targets) at the base model's cost. The
numbers at Wan 1.3B/14B, and where the unmerged form would win, are in docs/lora.md.
:func:`network_apply` is the same merge run inside the network, each layer merging its own
kernel (one scanned layer at a time instead of the whole stacked base: what the trainer uses,
for memory; it needs layers that read the ``lora`` collection, as the Wan ``Dense`` does).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

__all__ = [
    "RANK_AXIS", "LoraWeights", "DenseDelta", "LoraParams", "Target", "LoraError",
    "target_paths", "init_adapters", "abstract_adapters", "full_paths", "split_full", "merge", "lora_apply", "COLLECTION", "network_apply",
    "as_adapters", "adapter_paths", "count_params", "box_adapters", "adapter_logical_names", "adapter_shardings",
    "REFERENCE_RANK", "REFERENCE_ALPHA", "WAN_ATTN_FFN_TARGETS", "WAN_EMBEDDER_TARGETS", "WAN_TARGETS",
    "wan_targets", "wan_linear_modules",
]

RANK_AXIS = "lora_rank"
"""Logical axis name of the rank axis of ``lora_A`` / ``lora_B`` (replicated by
``parallel.DEFAULT_RULES``)."""

Path = tuple[str, ...]


class LoraError(ValueError):
    """Adapters that do not fit the base parameters (names every offending path)."""


@struct.dataclass
class LoraWeights:
    """One adapter: ``lora_A`` ``(*lead, in, r)``, ``lora_B`` ``(*lead, r, out)`` (our kernel
    layout; PEFT stores the transposes, ``(r, in)`` and ``(out, r)``) and the static ``alpha``.
    The delta is ``(alpha / r) * lora_A @ lora_B``. ``alpha`` is not a pytree leaf: gradients,
    optimizer states and EMAs see only the two factors."""
    lora_A: jax.Array
    lora_B: jax.Array
    alpha: float = struct.field(pytree_node=False, default=1.0)

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[-1])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self, precision=None) -> jax.Array:
        """``(alpha / r) * A @ B``, shaped like the adapted kernel."""
        return self.scale * jnp.matmul(self.lora_A, self.lora_B, precision=precision)


@struct.dataclass
class DenseDelta:
    """A base leaf trained in full next to the adapters (the reference's FAR stages train
    ``far_patch_embedding`` so, its ``param_names_to_optimize``; PEFT's ``modules_to_save``),
    held as an offset from the frozen base: ``delta`` is shaped like the leaf, zero at the start,
    and the merged leaf is ``base + delta``. So a fresh one needs only the base's shapes and
    leaves the network exactly the base, and the base stays frozen. With weight decay 0 (every
    reference stage) training the offset is training the leaf; a nonzero decay would pull it
    towards the base rather than towards 0."""
    delta: jax.Array


class LoraParams(NamedTuple):
    """The ``params`` argument of a :func:`lora_apply` function: the trainable adapters and the
    frozen base they apply to."""
    adapters: Any
    base: Any


@dataclasses.dataclass(frozen=True)
class Target:
    """A kernel to adapt: its ``path`` in the base pytree and (optionally) the reference module
    name of each layer it holds (one name, or one per layer of a scan-stacked kernel); the
    names are what PEFT files use."""
    path: Path
    modules: tuple[str, ...] = ()


def _is_lora(x) -> bool:
    return isinstance(x, LoraWeights)


def _is_node(x) -> bool:
    return isinstance(x, (LoraWeights, DenseDelta))


def _norm_path(t) -> Path:
    if isinstance(t, Target):
        t = t.path
    if isinstance(t, str):
        return tuple(p for p in t.split("/") if p)
    if isinstance(t, (tuple, list)) and t and all(isinstance(p, str) for p in t):
        return tuple(t)
    raise LoraError(f"a LoRA target is a kernel path (tuple of keys or 'a/b/kernel' string), got {t!r}")


def target_paths(targets: Iterable) -> list[Path]:
    """The kernel paths of ``targets`` (paths, ``'/'``-joined strings or :class:`Target`),
    checked for duplicates."""
    paths = [_norm_path(t) for t in targets]
    seen, dup = set(), []
    for p in paths:
        if p in seen:
            dup.append("/".join(p))
        seen.add(p)
    if dup:
        raise LoraError(f"LoRA targets listed twice: {sorted(set(dup))}")
    if not paths:
        raise LoraError("no LoRA targets given")
    return paths


def _get(tree, path: Path):
    node = tree
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError("/".join(path[:i + 1]))
        node = node[key]
    return node


def _with_leaf(tree, path: Path, value):
    """A copy of the nested mapping ``tree`` with ``path`` set to ``value`` (only the mappings on
    the path are copied; every other leaf is shared)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _with_leaf(tree[path[0]], path[1:], value)
    return out


def _set_new(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _unboxed(tree):
    return nn.meta.unbox(tree)


def _array_leaf(base, path: Path, what: str):
    """The array leaf of ``base`` at ``path``; :class:`LoraError` naming ``what`` otherwise."""
    try:
        w = _get(base, path)
    except KeyError as e:
        raise LoraError(f"{what} is not a parameter of the base (no {e.args[0]!r})") from None
    if isinstance(w, Mapping) or not hasattr(w, "shape"):
        raise LoraError(f"{what} is not an array leaf of the base")
    return w


def _kernel(base, path: Path):
    w = _array_leaf(base, path, f"LoRA target {'/'.join(path)!r}")
    if len(w.shape) < 2:
        raise LoraError(f"LoRA target {'/'.join(path)!r} has shape {tuple(w.shape)}; a kernel needs "
                        f"at least 2 axes (..., in, out)")
    return w


# ----------------------------------------------------------------------------------- core
def init_adapters(key: jax.Array, base_params, targets: Iterable, rank: int, alpha: float | None = None,
                  *, dtype=jnp.float32, full: Iterable = ()):
    """Fresh adapters for ``targets`` of ``base_params``, as PEFT initialises LoRA.

    ``lora_A`` is Kaiming-uniform with ``a = sqrt(5)`` over its fan-in ``in`` (torch
    ``nn.Linear``'s default and PEFT's ``init_lora_weights=True``: ``U(-1/sqrt(in), 1/sqrt(in))``),
    ``lora_B`` is zero, so ``merge(base, init_adapters(...))`` is the base exactly. ``alpha``
    defaults to ``rank`` (scale 1, the reference's 256/256). Only the shapes of ``base_params``
    are read (``jax.ShapeDtypeStruct`` leaves, boxed or not, are fine), so this can run under
    ``jax.jit`` with ``out_shardings`` to create the adapters directly sharded. Each target draws
    from ``fold_in(key, i)``, ``i`` its position in ``targets``.

    ``full``: base leaves (paths, any shape) trained in full, each a zero :class:`DenseDelta`
    (not a LoRA target too).

    Returns a nested dict mirroring the base, with a :class:`LoraWeights` at each target path
    and a :class:`DenseDelta` at each ``full`` path.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoraError(f"rank must be a positive int, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise LoraError(f"alpha must be positive, got {alpha!r}")
    base = _unboxed(base_params)
    out: dict = {}
    for i, path in enumerate(target_paths(targets)):
        shape = tuple(_kernel(base, path).shape)
        *lead, fan_in, fan_out = shape
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, fan_in, rank), dtype, -bound, bound)
        b = jnp.zeros((*lead, rank, fan_out), dtype)
        _set_new(out, path, LoraWeights(a, b, alpha))
    full_paths = [_norm_path(t) for t in full]
    clash = sorted({"/".join(p) for p in full_paths} & {"/".join(p) for p in target_paths(targets)})
    if clash:
        raise LoraError(f"leaves both LoRA targets and trained in full: {clash}")
    if len(set(full_paths)) != len(full_paths):
        raise LoraError(f"leaves listed twice as trained in full: {['/'.join(p) for p in full_paths]}")
    for path in full_paths:
        leaf = _array_leaf(base, path, f"{'/'.join(path)!r} (trained in full)")
        _set_new(out, path, DenseDelta(jnp.zeros(tuple(leaf.shape), dtype)))
    return out


def abstract_adapters(base_params, targets: Iterable, rank: int, alpha: float | None = None, *, dtype=jnp.float32,
                      full: Iterable = ()):
    """Shapes and dtypes of :func:`init_adapters` (no computation)."""
    return jax.eval_shape(lambda k: init_adapters(k, base_params, targets, rank, alpha, dtype=dtype, full=full),
                          jax.random.key(0))


def full_paths(base_params, prefixes: Iterable[str]) -> list[Path]:
    """The array leaves of ``base_params`` under the module paths ``prefixes`` (``'/'``-joined,
    e.g. ``'far_patch_embedding'``: its kernel and bias), in tree order; a prefix that names
    nothing is an error."""
    leaves = jax.tree_util.tree_flatten_with_path(_unboxed(base_params))[0]
    paths = [tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in kp) for kp, _ in leaves]
    out = []
    for prefix in prefixes:
        pp = _norm_path(prefix)
        hit = [p for p in paths if p[:len(pp)] == pp]
        if not hit:
            raise LoraError(f"{prefix!r} names no parameter of the base (trained in full)")
        out += [p for p in hit if p not in out]
    return out


def _flat_adapters(adapters) -> list[tuple[Path, LoraWeights | DenseDelta]]:
    """``(path, node)`` of every adapter: :class:`LoraWeights` and :class:`DenseDelta` nodes."""
    leaves = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_node)[0]
    out = []
    for kp, leaf in leaves:
        path = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)
        if not _is_node(leaf):
            raise LoraError(f"adapters/{'/'.join(path)}: expected LoraWeights or DenseDelta, got "
                            f"{type(leaf).__name__} (build adapters with init_adapters)")
        out.append((path, leaf))
    return out


def split_full(adapters) -> tuple[Any, Any]:
    """``(lora, full)``: the :class:`LoraWeights` nodes and the :class:`DenseDelta` nodes of
    ``adapters`` as two trees (``{}`` where a kind is absent)."""
    lo: dict = {}
    full: dict = {}
    for path, node in _flat_adapters(adapters):
        _set_new(full if isinstance(node, DenseDelta) else lo, path, node)
    return lo, full


def as_adapters(tree, alpha: float):
    """Adapters from a plain nested dict whose adapted kernels are ``{'lora_A': A, 'lora_B': B}``
    and whose leaves trained in full are ``{'delta': d}`` (what a checkpoint restored without a
    target, or a hand-made tree, holds), all with ``alpha``.
    :class:`LoraWeights` already in ``tree`` are kept as they are."""
    if _is_node(tree):
        return tree
    if isinstance(tree, Mapping):
        if set(tree) == {"lora_A", "lora_B"}:
            return LoraWeights(tree["lora_A"], tree["lora_B"], float(alpha))
        if set(tree) == {"delta"}:
            return DenseDelta(tree["delta"])
        return {k: as_adapters(v, alpha) for k, v in tree.items()}
    raise LoraError(f"expected a nested dict of {{'lora_A', 'lora_B'}} pairs, found a {type(tree).__name__} leaf")


def adapter_paths(adapters) -> list[Path]:
    """The base kernel paths that ``adapters`` adapt."""
    return [p for p, _ in _flat_adapters(adapters)]


def count_params(adapters) -> int:
    """Number of trainable adapter elements (``A`` and ``B`` of every target, every element of a
    leaf trained in full)."""
    return sum(math.prod(l.delta.shape) if isinstance(l, DenseDelta) else
               math.prod(l.lora_A.shape) + math.prod(l.lora_B.shape) for _, l in _flat_adapters(adapters))


def _check_fit(path: Path, w, lw: LoraWeights | DenseDelta) -> str | None:
    name = "/".join(path)
    if isinstance(lw, DenseDelta):
        if tuple(lw.delta.shape) != tuple(w.shape):
            return f"{name}: the delta {tuple(lw.delta.shape)} is not shaped like the leaf {tuple(w.shape)}"
        return None
    ws, a, b = tuple(w.shape), tuple(lw.lora_A.shape), tuple(lw.lora_B.shape)
    if len(a) != len(ws) or len(b) != len(ws):
        return f"{name}: lora_A {a} / lora_B {b} do not have the kernel's {len(ws)} axes {ws}"
    if a[:-1] != ws[:-1] or b[:-2] != ws[:-2] or b[-1] != ws[-1] or a[-1] != b[-2]:
        return (f"{name}: lora_A {a} @ lora_B {b} does not give the kernel's shape {ws} "
                f"(expected lora_A {ws[:-1] + (a[-1],)}, lora_B {ws[:-2] + (a[-1], ws[-1])})")
    return None


def _check_adapters(base_params, adapters) -> list[tuple[Path, LoraWeights]]:
    """The flat adapters; :class:`LoraError` naming every one that is not a kernel of the base or
    does not fit it."""
    flat = _flat_adapters(adapters)
    problems = []
    for path, lw in flat:
        try:
            w = _get(base_params, path)
        except KeyError:
            problems.append(f"{'/'.join(path)}: not a parameter of the base")
            continue
        msg = _check_fit(path, w, lw)
        if msg:
            problems.append(msg)
    if problems:
        raise LoraError("adapters do not fit the base parameters: " + "; ".join(problems))
    return flat


def merge(base_params, adapters, *, dtype=None, precision=None):
    """The effective parameters: every adapted kernel ``W + (alpha / r) * A @ B``, every leaf
    trained in full ``W + delta`` (:class:`DenseDelta`), every other leaf the base leaf itself
    (the same array, untouched).

    Differentiable in ``adapters``; the base is only read, so when the caller differentiates
    w.r.t. the adapters alone the base gets no gradient, no optimizer state and stays bit for bit
    as it was. With ``B = 0`` (a fresh adapter) each merged kernel equals ``W`` exactly.

    ``dtype``: cast the merged kernels to it (e.g. the compute dtype, halving the merged copy's
    memory; default: the kernel's own dtype). ``precision``: of the ``A @ B`` matmul (default:
    JAX's ``jax_default_matmul_precision``).

    Raises :class:`LoraError` naming every adapter whose path is not in the base or whose
    factors do not fit the kernel.
    """
    flat = _check_adapters(base_params, adapters)
    out = base_params
    for path, lw in flat:
        w = _get(base_params, path)
        if isinstance(lw, DenseDelta):  # a leaf trained in full: base + its offset
            out = _with_leaf(out, path, w + lw.delta.astype(w.dtype))
            continue
        merged = w + lw.delta(precision).astype(w.dtype)
        if dtype is not None:
            merged = merged.astype(dtype)
        out = _with_leaf(out, path, merged)
    return out


def lora_apply(apply_fn: Callable, *, dtype=None, precision=None) -> Callable:
    """``apply_fn(params, z, t, r, context)`` -> ``fn(LoraParams(adapters, base), z, t, r, context)``
    that merges the adapters into the base and calls ``apply_fn`` (any network, any loss of
    :mod:`anyflow_jax.losses`). A plain ``(adapters, base)`` tuple works too.

    Each call merges once; a loss that calls its network several times per step (guidance,
    central differences, rollouts) repeats the merge inside the one jitted step unless XLA
    shares it. One can instead merge once per step, ``params = merge(base, adapters)`` inside the
    differentiated function, and hand ``params`` to the loss with the plain ``apply_fn``; both
    give the same values and gradients. Either way the merged kernels of all layers exist at
    once; :func:`network_apply` merges layer by layer inside the network instead.
    """
    def fn(params, z, t, r, context):
        adapters, base = params
        return apply_fn(merge(base, adapters, dtype=dtype, precision=precision), z, t, r, context)
    return fn


COLLECTION = "lora"
"""The Flax variable collection :func:`network_apply` passes the adapters in."""


def network_apply(model, *, method=None) -> Callable:
    """Like :func:`lora_apply`, but merging inside the network: ``fn(LoraParams(adapters, base),
    z, t, r, context, **kwargs)`` calls ``model.apply({'params': base, 'lora': adapters}, ...)``
    and each adapted linear layer merges its own kernel, ``W + (alpha / r) A @ B``, where it is
    used (the Wan ``Dense`` does; ``models/wan.py``). The adapters mirror the base, so a
    scan-stacked adapter ``(L, in, r)`` is scanned with its stacked kernel and each layer of the
    scan merges one layer's kernel: one merged kernel (and, differentiated, one ``dW``) alive at a
    time instead of all layers' at once, and under remat the merge is recomputed per layer in the
    backward. Values and adapter gradients equal :func:`lora_apply`'s up to float rounding
    (``tests/test_lora.py``). The price is the merge per network call (``2 r in out`` FLOPs per
    kernel, about 0.3% of a Wan forward at 1.3B and 14B) instead of once per step.

    Only for models whose every adapted layer reads the ``lora`` collection: the adapters are
    checked against the base (a path that is not a kernel of the base is an error), not against
    the layers that read them."""
    def fn(params, z, t, r, context, **kwargs):
        adapters, base = params
        _check_adapters(base, adapters)
        adapters, full = split_full(adapters)
        if full:  # leaves trained in full are merged up front (W + delta), the LoRA kernels per layer
            base = merge(base, full)
        variables = {"params": base, COLLECTION: adapters}
        if method is not None:
            kwargs["method"] = method
        return model.apply(variables, z, t, r, context, **kwargs)
    return fn


# ----------------------------------------------------------------------------------- sharding
def _names_of(leaf, path: Path) -> tuple:
    if not isinstance(leaf, nn.LogicallyPartitioned):
        raise LoraError(f"base parameter {'/'.join(path)} has no logical axis names (pass the boxed "
                        f"parameters, e.g. model.abstract_params())")
    return tuple(leaf.names)


def adapter_logical_names(base_boxed, adapters):
    """Tree shaped like ``adapters`` whose ``lora_A`` / ``lora_B`` are logical-name tuples: the
    adapted kernel's names ``(*lead, in_name, out_name)`` give ``A`` ``(*lead, in_name,
    'lora_rank')`` and ``B`` ``(*lead, 'lora_rank', out_name)``."""
    def one(path, lw):
        names = _names_of(_get(base_boxed, path), path)
        if isinstance(lw, DenseDelta):
            return DenseDelta(names)
        return LoraWeights(names[:-1] + (RANK_AXIS,), names[:-2] + (RANK_AXIS, names[-1]), lw.alpha)
    flat = _flat_adapters(adapters)
    out: dict = {}
    for path, lw in flat:
        _set_new(out, path, one(path, lw))
    return out


def box_adapters(adapters, base_boxed):
    """``adapters`` (arrays or ``ShapeDtypeStruct``s) with each factor wrapped in
    ``nn.LogicallyPartitioned`` carrying the names of :func:`adapter_logical_names`, ready for
    ``parallel.param_shardings``."""
    names = adapter_logical_names(base_boxed, adapters)
    out: dict = {}
    for path, lw in _flat_adapters(adapters):
        n = _get(names, path)
        if isinstance(lw, DenseDelta):
            _set_new(out, path, DenseDelta(nn.LogicallyPartitioned(lw.delta, n.delta)))
            continue
        _set_new(out, path, LoraWeights(nn.LogicallyPartitioned(lw.lora_A, n.lora_A),
                                        nn.LogicallyPartitioned(lw.lora_B, n.lora_B), lw.alpha))
    return out


def adapter_shardings(adapters, base_boxed, mesh, rules=None):
    """``NamedSharding`` tree shaped like ``adapters``: each factor sharded like the weight it
    adapts (see :func:`adapter_logical_names`); the rank axis is replicated. ``rules`` default to
    ``parallel.DEFAULT_RULES``; a ``'lora_rank'`` rule (replicated) is added when missing."""
    from anyflow_jax import parallel
    rules = tuple(parallel.DEFAULT_RULES if rules is None else (rules.items() if isinstance(rules, Mapping) else rules))
    if RANK_AXIS not in dict(rules):
        rules = rules + ((RANK_AXIS, None),)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters)
    return parallel.param_shardings(box_adapters(abstract, base_boxed), mesh, rules)


# ----------------------------------------------------------------------------------- Wan2.1 targets
# The reference's PEFT target patterns (reference spec sections 3-5): every nn.Linear whose module
# name contains one of these. Teacher (stage 0) and critic (stage 2): self-attention and FFN;
# students (stage 1 and 2): those plus the time and delta embedders (their linear_1 / linear_2).
# Cross-attention (attn2), time_proj, text_embedder, patch_embedding and proj_out stay frozen.
REFERENCE_RANK = 256
REFERENCE_ALPHA = 256.0
WAN_ATTN_FFN_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2")
WAN_EMBEDDER_TARGETS = ("time_embedder", "delta_embedder")
WAN_TARGETS = {
    "teacher": WAN_ATTN_FFN_TARGETS,
    "critic": WAN_ATTN_FFN_TARGETS,
    "student": WAN_ATTN_FFN_TARGETS + WAN_EMBEDDER_TARGETS,
}


def wan_linear_modules(model) -> dict[str, tuple[Path, int | None]]:
    """Every linear layer of a :class:`~anyflow_jax.models.wan.WanTransformer3D`: reference
    (diffusers) module name -> (our kernel path, layer index along a scan-stacked kernel's
    leading axis, or None). Derived from the diffusers name table
    (:func:`anyflow_jax.checkpoints.diffusers.param_table`)."""
    from anyflow_jax.checkpoints.diffusers import LINEAR, param_table  # Wan-specific, imported on use
    out = {}
    for e in param_table(model):
        if e.transform is not LINEAR or not e.diffusers_name.endswith(".weight"):
            continue
        module = e.diffusers_name[: -len(".weight")]
        if e.layer is None:
            out[module] = (e.flax_path, None)
        elif model.scan_layers:
            out[module] = (("blocks",) + e.flax_path, e.layer)
        else:
            out[module] = ((f"blocks_{e.layer}",) + e.flax_path, None)
    return out


def wan_targets(model, patterns: str | Sequence[str] | None = None) -> list[Target]:
    """The :class:`Target`s of ``model`` for the reference's module-name ``patterns``.

    ``patterns``: ``'teacher'``, ``'critic'`` or ``'student'`` (:data:`WAN_TARGETS`), or a list of
    substrings matched against the linear layers' diffusers module names (PEFT-style, e.g.
    ``'attn1.to_q'``, ``'time_embedder'``). Default: ``'student'`` for a flow-map model, else
    ``'teacher'``. Scan-stacked blocks give one target per kernel with all layers' module names;
    unrolled blocks one target per layer. A pattern that matches no linear layer is an error (e.g.
    ``'delta_embedder'`` on a teacher).
    """
    if patterns is None:
        patterns = "student" if model.flow_map else "teacher"
    if isinstance(patterns, str):
        if patterns not in WAN_TARGETS:
            raise LoraError(f"unknown LoRA target set {patterns!r}; known: {sorted(WAN_TARGETS)} "
                            f"(or pass a list of module-name patterns)")
        patterns = WAN_TARGETS[patterns]
    patterns = tuple(patterns)
    modules = wan_linear_modules(model)
    unmatched = [p for p in patterns if not any(p in m for m in modules)]
    if unmatched:
        kind = "flow-map student" if model.flow_map else "teacher"
        raise LoraError(f"LoRA target patterns {unmatched} match no linear layer of this {kind} Wan model")
    by_path: dict[Path, list[tuple[int, str]]] = {}
    for module, (path, layer) in modules.items():
        if any(p in module for p in patterns):
            by_path.setdefault(path, []).append((layer or 0, module))
    return [Target(path, tuple(m for _, m in sorted(items))) for path, items in by_path.items()]
