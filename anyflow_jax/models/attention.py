"""One attention entry point with a named implementation switch.

Every attention call in the networks goes through :func:`dot_product_attention`, so switching
kernels is a config change (``model.attention_impl``):

- ``"xla"`` (default): plain XLA (einsums, fp32 logits and softmax) over blocks of queries,
  each rematerialised in the backward pass, with a flash-attention derivative (see below).
  Runs everywhere, supports forward-mode AD (``jax.jvp``), which the exact-derivative stage-1
  loss needs.
- ``"jax"``: ``jax.nn.dot_product_attention`` with ``implementation=None`` (XLA's fused
  attention where available).
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` - flash attention on
  NVIDIA GPUs (bf16/fp16 inputs). Reverse-mode only (no ``jax.jvp``).
- ``"splash"``: the TPU splash (flash) attention Pallas kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``), run per device inside
  ``jax.shard_map`` (batch over ``('data', 'fsdp')``, heads over ``tensor``). Off TPU it runs
  through the Pallas interpreter (slow; for numerics tests). Reverse-mode only (custom VJP).

All implementations take an optional ``mask`` (an :class:`AttentionMask`, e.g.
:class:`ChunkCausalMask`); ``None`` is full attention, which is what Wan uses.
See ``docs/attention.md``.

Shapes follow ``jax.nn.dot_product_attention``: q ``(B, Lq, H, Dh)``, k/v ``(B, Lk, H, Dh)``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("xla", "jax", "cudnn", "splash")

# Mesh axes the batch / heads are split over (same names as anyflow_jax.parallel; repeated
# here so the model package does not import the parallel package).
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"

# Splash tiling: sequence lengths are padded to a multiple of these (after capping at the
# 128-rounded length, so short sequences use one block).
SPLASH_BLOCK = 512
_LANES = 128


# ----------------------------------------------------------------------------------- masks
class AttentionMask:
    """Which (query, key) pairs may attend, as an elementwise rule on token indices.

    Subclasses implement :meth:`allowed` with ``q_ids`` / ``kv_ids`` integer arrays that
    broadcast against each other. The rule must work on both ``numpy`` arrays (the splash
    kernel classifies its blocks with it at trace time) and ``jax.numpy`` int32 arrays (the
    ``xla`` path and, inside the splash kernel, each partial block), so use only elementwise
    arithmetic and comparisons with Python constants - no indexing into tables, no control
    flow on values. Masks must be hashable (frozen dataclasses): they are compile-time
    constants and key a kernel cache. Every query row must allow at least one key, otherwise
    its softmax is undefined.
    """

    def allowed(self, q_ids, kv_ids):
        raise NotImplementedError

    def validate(self, q_len: int, kv_len: int) -> None:
        """Raise ``ValueError`` if the mask does not describe a ``(q_len, kv_len)`` problem."""

    def dense(self, q_len: int, kv_len: int) -> np.ndarray:
        """The ``(q_len, kv_len)`` boolean matrix (numpy), for tests and inspection."""
        self.validate(q_len, kv_len)
        return np.asarray(self.allowed(np.arange(q_len)[:, None], np.arange(kv_len)[None, :]),
                          dtype=bool)


def _chunk_index(ids, bounds: tuple[int, ...]):
    # chunk c holds ids in [bounds[c-1], bounds[c]); unrolled comparisons work in numpy,
    # jax.numpy and inside Pallas kernels. ids past the last bound land in the last chunk.
    idx = ids * 0
    for b in bounds[:-1]:
        idx = idx + (ids >= b).astype(idx.dtype)
    return idx


@dataclasses.dataclass(frozen=True)
class ChunkCausalMask(AttentionMask):
    """Block-causal attention over chunks (FAR-style frame chunks).

    The query axis is cut into chunks ending at ``q_bounds`` and the key axis into the same
    number of chunks ending at ``kv_bounds`` (exclusive, ascending, last = sequence length).
    A query in chunk ``i`` attends to every key in chunks ``0..i`` (bidirectional inside its
    own chunk). Use :meth:`uniform` for equal chunk sizes.
    """
    q_bounds: tuple[int, ...]
    kv_bounds: tuple[int, ...]

    def __post_init__(self):
        for name in ("q_bounds", "kv_bounds"):
            b = tuple(int(x) for x in getattr(self, name))
            if not b or b[0] <= 0 or any(y <= x for x, y in itertools.pairwise(b)):
                raise ValueError(f"{name} must be positive and strictly ascending, got {b}")
            object.__setattr__(self, name, b)
        if len(self.q_bounds) != len(self.kv_bounds):
            raise ValueError(f"q_bounds and kv_bounds need the same number of chunks, got "
                             f"{len(self.q_bounds)} and {len(self.kv_bounds)}")

    @classmethod
    def uniform(cls, q_len: int, chunk: int, kv_len: int | None = None,
                kv_chunk: int | None = None) -> ChunkCausalMask:
        """Chunks of ``chunk`` queries (``kv_chunk`` keys, default the same); lengths must be
        multiples of the chunk sizes and give the same number of chunks."""
        kv_len = q_len if kv_len is None else kv_len
        kv_chunk = chunk if kv_chunk is None else kv_chunk
        if q_len % chunk or kv_len % kv_chunk:
            raise ValueError(f"lengths ({q_len}, {kv_len}) are not multiples of the chunk sizes "
                             f"({chunk}, {kv_chunk})")
        return cls(tuple(range(chunk, q_len + 1, chunk)), tuple(range(kv_chunk, kv_len + 1, kv_chunk)))

    def allowed(self, q_ids, kv_ids):
        return _chunk_index(kv_ids, self.kv_bounds) <= _chunk_index(q_ids, self.q_bounds)

    def validate(self, q_len: int, kv_len: int) -> None:
        if self.q_bounds[-1] != q_len or self.kv_bounds[-1] != kv_len:
            raise ValueError(f"ChunkCausalMask covers ({self.q_bounds[-1]}, {self.kv_bounds[-1]}) "
                             f"tokens, attention has ({q_len}, {kv_len})")


def _dense_mask_jnp(mask: AttentionMask, q_len: int, kv_len: int):
    mask.validate(q_len, kv_len)
    q_ids = jax.lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 0)
    kv_ids = jax.lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 1)
    return mask.allowed(q_ids, kv_ids)


# ------------------------------------------------------------------------------ xla / jax
# The ``xla`` path is written for XLA:CPU (where the toy runs, the tests and the benchmarks) and
# stays plain XLA for every backend:
# - heads-major blocks of queries: logits of ``XLA_BLOCK_ELEMENTS`` elements at most per step of a
#   ``lax.map`` over query blocks (batch and heads stay vectorised, so their shardings survive),
#   each rematerialised in the backward pass (``jax.checkpoint`` keeping only the block's output):
#   the (Lq, Lk) probabilities are never stored, and every block's softmax stays in cache (the
#   backward pass recomputes ``q k^T`` once more: 5 attention matmuls instead of 4);
# - a ``custom_jvp`` softmax-attention core whose tangent rule is the flash-attention derivative:
#   its transpose (reverse mode) is ``dS = E * (dO v^T - rowsum(dO * O)) / l`` with the
#   unnormalised ``E = exp(S - max)`` and the row sums ``l``, one pass over the logits instead of
#   the several that differentiating ``softmax`` gives; forward-mode AD (``jax.jvp``) works;
# - the logit scale folded into q (Lq x Dh multiplies instead of Lq x Lk).
# docs/benchmarks.md has the measurements behind these choices.
XLA_BLOCK_ELEMENTS = 1 << 21  # logits per query block (B x H x block_q x Lk), 8 MiB in fp32
_BLOCK_OUT = "xla_attention_block_out"


def _attention_stats(q, k, v, keep):
    """q ``(..., Lq, D)``, k/v ``(..., Lk, D)`` heads-major; ``keep`` a boolean mask broadcasting
    to ``(..., Lq, Lk)`` or None. Returns the output (fp32), ``E = exp(S - max)`` and ``1/l``."""
    s = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
    if keep is not None:
        s = jnp.where(keep, s, jnp.finfo(jnp.float32).min)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp(s - m)
    inv = 1.0 / jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("...qk,...kd->...qd", e.astype(v.dtype), v, preferred_element_type=jnp.float32) * inv
    return o, e, inv


@jax.custom_jvp
def _attention_core(q, k, v, keep):
    return _attention_stats(q, k, v, keep)[0]


@_attention_core.defjvp
def _attention_core_jvp(primals, tangents):
    q, k, v, keep = primals
    dq, dk, dv, _ = tangents
    o, e, inv = _attention_stats(q, k, v, keep)
    o = checkpoint_name(o, _BLOCK_OUT)  # kept for the backward pass; S and E are recomputed
    f32 = dict(preferred_element_type=jnp.float32)
    # dS = dq k^T + q dk^T;  dP = P * (dS - rowsum(P * dS));  dO = dP v + P dv, with P = E / l
    ds = jnp.einsum("...qd,...kd->...qk", dq, k, **f32) + jnp.einsum("...qd,...kd->...qk", q, dk, **f32)
    eds = e * ds
    r = jnp.sum(eds, axis=-1, keepdims=True) * inv
    do = (jnp.einsum("...qk,...kd->...qd", eds.astype(v.dtype), v, **f32)
          + jnp.einsum("...qk,...kd->...qd", e.astype(dv.dtype), dv, **f32)) * inv - r * o
    return o, do


def _xla_attention(q, k, v, scale, mask=None, block_elements: int | None = None, kv_valid=None):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if mask is not None:
        mask.validate(lq, lk)
    qt = jnp.swapaxes((q.astype(jnp.float32) * scale).astype(q.dtype), 1, 2)  # (B, H, Lq, D)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    budget = XLA_BLOCK_ELEMENTS if block_elements is None else block_elements
    nq = -(-lq // max(1, budget // max(1, b * h * lk)))
    bq = -(-lq // nq)  # balanced blocks; the last is padded

    def block(qb, q_ids):  # qb (B, H, bq, D), q_ids (bq,)
        keep = None
        if mask is not None:
            kv_ids = jnp.arange(lk, dtype=jnp.int32)[None, :]
            keep = mask.allowed(q_ids[:, None], kv_ids) | (q_ids[:, None] >= lq)  # padded rows: any key
        if kv_valid is not None:
            keep = kv_valid[None, :] if keep is None else keep & kv_valid[None, :]
        return _attention_core(qb, kt, vt, keep)

    block = jax.checkpoint(block, policy=jax.checkpoint_policies.save_only_these_names(_BLOCK_OUT))
    if nq == 1:
        out = block(qt, jnp.arange(lq, dtype=jnp.int32))
    else:
        qt = jnp.pad(qt, ((0, 0), (0, 0), (0, nq * bq - lq), (0, 0)))
        qb = jnp.moveaxis(qt.reshape(b, h, nq, bq, d), 2, 0)
        ids = jnp.arange(nq * bq, dtype=jnp.int32).reshape(nq, bq)
        out = jax.lax.map(lambda a: block(*a), (qb, ids))  # (nq, B, H, bq, D)
        out = jnp.moveaxis(out, 0, 2).reshape(b, h, nq * bq, d)[:, :, :lq]
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


# --------------------------------------------------------------------------------- splash
def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def splash_block_sizes(q_len: int, kv_len: int, block: int = SPLASH_BLOCK):
    """Default splash ``BlockSizes`` for a ``(q_len, kv_len)`` problem: ``block`` (512) for
    every forward/backward tile, shrunk to the 128-rounded length for short sequences."""
    from jax.experimental.pallas.ops.tpu.splash_attention import BlockSizes
    bq = min(block, _round_up(q_len, _LANES))
    bkv = min(block, _round_up(kv_len, _LANES))
    return BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                      block_q_dq=bq, block_kv_dq=bkv)


def _padded_lengths(q_len: int, kv_len: int, bs) -> tuple[int, int]:
    q_blocks = [b for b in (bs.block_q, bs.block_q_dkv, bs.block_q_dq) if b]
    kv_blocks = [b for b in (bs.block_kv, bs.block_kv_compute, bs.block_kv_dkv,
                             bs.block_kv_dkv_compute, bs.block_kv_dq) if b]
    return _round_up(q_len, math.lcm(*q_blocks)), _round_up(kv_len, math.lcm(*kv_blocks))


@functools.cache
def _splash_mask_class():
    from jax.experimental.pallas.ops.tpu.splash_attention import Mask

    class _PaddedMask(Mask):
        """Splash mask over the padded ``(q_pad, kv_pad)`` problem: the user mask on the real
        tokens, keys past ``kv_len`` masked out. Padded query rows (>= q_len) follow the user
        rule evaluated at their index; they are dropped afterwards, get a zero cotangent, and
        stay finite even if fully masked (the kernel masks with a finite value). Defines
        ``q_sequence`` and ``mask_function`` so the kernel evaluates partial blocks in-kernel
        instead of loading dense mask tiles; fully masked blocks are skipped."""

        def __init__(self, shape, kv_len, user):
            self._shape = tuple(shape)
            self.kv_len = int(kv_len)
            self.user = user
            self.q_sequence = np.arange(self._shape[0], dtype=np.int32)

            def mask_function(q_ids, kv_ids):
                keep = kv_ids < self.kv_len
                if self.user is not None:
                    keep = keep & self.user.allowed(q_ids, kv_ids)
                return keep
            self.mask_function = mask_function

        @property
        def shape(self):
            return self._shape

        def __getitem__(self, idx):
            q_slice, kv_slice = idx
            qs = range(*q_slice.indices(self._shape[0]))
            ks = range(*kv_slice.indices(self._shape[1]))
            rows = np.arange(qs.start, qs.stop, dtype=np.int32)[:, None]
            cols = np.arange(ks.start, ks.stop, dtype=np.int32)[None, :]
            return np.broadcast_to(self.mask_function(rows, cols), (len(qs), len(ks)))

        def __eq__(self, other):
            return (isinstance(other, _PaddedMask) and self._shape == other._shape
                    and self.kv_len == other.kv_len and self.user == other.user)

        def __hash__(self):
            return hash((_PaddedMask, self._shape, self.kv_len, self.user))

    return _PaddedMask


@functools.lru_cache(maxsize=64)
def _splash_kernel(q_pad: int, kv_pad: int, kv_len: int, heads: int, mask, block_sizes,
                   interpret: bool):
    """Per-device splash kernel for ``heads`` local heads (cached: mask processing is numpy
    work over all blocks, and every layer of a model asks for the same kernel)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    if mask is None and kv_pad == kv_len:
        head_mask = sa.FullMask((q_pad, kv_pad))  # every block full: no masking work at all
    else:
        head_mask = _splash_mask_class()((q_pad, kv_pad), kv_len, mask)
    multi = sa.MultiHeadMask([head_mask] * heads)

    def build():
        kernel = sa.make_splash_mha(multi, block_sizes=block_sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
        # keep the block tables as numpy: device-agnostic constants for any later trace
        return jax.tree.map(np.asarray, kernel)

    # make_splash_mha turns its numpy block tables into jax arrays. Called from inside a
    # trace (a jitted model, maybe under a TPU topology mesh) those would be tracers of that
    # trace, which the cache must not keep; a fresh thread has no trace or mesh context.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(build).result()


def _mesh_platform(mesh) -> str | None:
    if mesh is None:
        return None
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh.devices.flat[0].platform
    abstract = getattr(mesh, "abstract_device", None)  # AbstractMesh of jax.set_mesh
    return getattr(abstract, "platform", None) or getattr(mesh, "platform", None)


def _axes_for(dim: int, axes: tuple[str, ...], mesh) -> tuple[str, ...] | None:
    """The mesh axes (of ``axes``, present, > 1, not already manual) that split ``dim``
    evenly; ``None`` (replicate) when they do not divide it."""
    manual = set(getattr(mesh, "manual_axes", ()))
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in manual)
    if not axes or dim % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def _default_precision(fn):
    """``fn(q, k, v, *extra)`` with its forward and backward traced under the default matmul
    precision.

    For bf16/fp16 operands a global ``jax_default_matmul_precision="highest"`` (the tests set
    one) would ask Mosaic for fp32 contraction of bf16 tiles, which it rejects; the kernel
    accumulates in fp32 either way. The backward is traced after the forward's context has
    exited, hence the custom VJP that re-enters it. ``extra`` (the segment ids) are integer
    arrays with no cotangent."""
    ctx = functools.partial(jax.default_matmul_precision, "default")

    @jax.custom_vjp
    def wrapped(q, k, v, *extra):
        with ctx():
            return fn(q, k, v, *extra)

    def fwd(q, k, v, *extra):
        with ctx():
            out, vjp_fn = jax.vjp(lambda a, b, c: fn(a, b, c, *extra), q, k, v)
        return out, (vjp_fn, extra)

    def bwd(res, g):
        vjp_fn, extra = res
        with ctx():
            grads = vjp_fn(g)
        return (*grads, *(np.zeros(e.shape, jax.dtypes.float0) for e in extra))

    wrapped.defvjp(fwd, bwd)
    return wrapped


def _splash_attention(q, k, v, scale, mask=None, *, mesh=None, interpret=None, block_sizes=None, kv_valid=None):
    b, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if k.shape != (b, kv_len, heads, head_dim) or v.shape[:3] != (b, kv_len, heads):
        raise ValueError(f"splash attention needs k, v of shape (B, Lk, H, Dh) matching q; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if mask is not None:
        mask.validate(q_len, kv_len)
    if mesh is None:
        abstract = jax.sharding.get_abstract_mesh()
        mesh = None if abstract.empty else abstract
    if interpret is None:
        platform = _mesh_platform(mesh) or jax.default_backend()
        interpret = platform != "tpu"
    bs = block_sizes if block_sizes is not None else splash_block_sizes(q_len, kv_len)
    q_pad, kv_pad = _padded_lengths(q_len, kv_len, bs)

    # (B, L, H, D) -> (B, H, L_pad, D); the scale is folded into q (the kernel has none).
    qt = jnp.swapaxes((q.astype(jnp.float32) * scale).astype(q.dtype), 1, 2)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, q_pad - q_len), (0, 0)))
    kt = jnp.pad(kt, ((0, 0), (0, 0), (0, kv_pad - kv_len), (0, 0)))
    vt = jnp.pad(vt, ((0, 0), (0, 0), (0, kv_pad - kv_len), (0, 0)))

    batch_axes = head_axes = None
    if mesh is not None:
        batch_axes = _axes_for(b, _BATCH_AXES, mesh)
        head_axes = _axes_for(heads, (_HEAD_AXIS,), mesh)
    local_heads = heads // (mesh.shape[head_axes[0]] if head_axes else 1)
    kernel = _splash_kernel(q_pad, kv_pad, kv_len, local_heads, mask, bs, bool(interpret))

    if kv_valid is None:
        kv_seg = None
        per_device = jax.vmap(kernel)  # (B_local, H_local, L_pad, D) blocks
    else:
        # dynamic key validity as segment ids: queries in segment 0, valid keys 0, the rest 1
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
        kv_seg = jnp.pad(jnp.where(kv_valid, 0, 1).astype(jnp.int32), (0, kv_pad - kv_len), constant_values=1)

        def per_device(q_, k_, v_, seg_):
            ids = SegmentIds(q=jnp.zeros((q_pad,), jnp.int32), kv=seg_)
            return jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=ids))(q_, k_, v_)
    if q.dtype != jnp.float32:
        per_device = _default_precision(per_device)

    args = (qt, kt, vt) + (() if kv_seg is None else (kv_seg,))
    free_axes = () if mesh is None else tuple(
        a for a in mesh.axis_names if a not in set(getattr(mesh, "manual_axes", ())))
    if not free_axes:
        out = per_device(*args)  # single device, or already per-device (inside shard_map)
    else:
        spec = P(batch_axes, head_axes[0] if head_axes else None, None, None)
        specs = (spec, spec, spec) + (() if kv_seg is None else (P(None),))
        out = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=spec,
                            axis_names=set(free_axes), check_vma=False)(*args)
    return jnp.swapaxes(out[:, :, :q_len], 1, 2).astype(q.dtype)


# ---------------------------------------------------------------------------- entry point
def dot_product_attention(q, k, v, *, implementation: str = "xla", scale: float | None = None,
                          mask: AttentionMask | None = None, mesh: Any = None,
                          interpret: bool | None = None, block_sizes: Any = None, kv_valid: Any = None):
    """Scaled dot-product attention.

    Args:
      q: ``(B, Lq, H, Dh)``; k, v: ``(B, Lk, H, Dh)``.
      implementation: one of ``IMPLEMENTATIONS``.
      scale: logit scale, default ``1/sqrt(Dh)``.
      mask: ``None`` (full attention; all Wan attention) or an :class:`AttentionMask` over
        ``(Lq, Lk)``, e.g. :class:`ChunkCausalMask`.
      kv_valid: ``None`` or a boolean ``(Lk,)`` array (traced values allowed): keys that may be
        attended at all, on top of ``mask`` (the KV-cache padding of the scanned FAR chunk loop,
        whose valid lengths depend on a traced chunk index). Splash takes it as segment ids.
      mesh: splash only - the mesh to ``shard_map`` over; default the current
        (``jax.set_mesh``) mesh, or none (single device) when there is none.
      interpret: splash only - run the kernel in the Pallas interpreter; default: when the
        mesh's (else the default backend's) platform is not TPU.
      block_sizes: splash only - a ``splash_attention.BlockSizes``; default
        :func:`splash_block_sizes`.
    Returns:
      ``(B, Lq, H, Dh)`` in q's dtype.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects 4-D q/k/v (B, L, H, Dh); got {q.shape}, {k.shape}, {v.shape}")
    if mask is not None and not isinstance(mask, AttentionMask):
        raise TypeError(f"mask must be an AttentionMask or None, got {type(mask).__name__}")
    if kv_valid is not None:
        kv_valid = jnp.asarray(kv_valid)
        if kv_valid.shape != (k.shape[1],) or kv_valid.dtype != jnp.bool_:
            raise ValueError(f"kv_valid must be a boolean ({k.shape[1]},) array, got {kv_valid.dtype} "
                             f"{tuple(kv_valid.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if implementation == "xla":
        return _xla_attention(q, k, v, scale, mask, kv_valid=kv_valid)
    if implementation in ("jax", "cudnn"):
        dense = None if mask is None else _dense_mask_jnp(mask, q.shape[1], k.shape[1])
        if kv_valid is not None:
            dense = kv_valid[None, :] if dense is None else dense & kv_valid[None, :]
        dense = None if dense is None else jnp.broadcast_to(dense, (q.shape[1], k.shape[1]))[None, None]
        return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=dense,
                                            implementation=None if implementation == "jax" else "cudnn")
    if implementation == "splash":
        return _splash_attention(q, k, v, scale, mask, mesh=mesh, interpret=interpret,
                                 block_sizes=block_sizes, kv_valid=kv_valid)
    raise ValueError(
        f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
