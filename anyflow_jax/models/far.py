"""Building blocks of the chunk-causal FAR variant (reference spec sections 2.4 and 6).

Pieces the FAR network, its loader and its samplers share, each a pure function of shapes and
arrays (the network itself reuses the Wan blocks of :mod:`anyflow_jax.models.wan`):

- the chunk layout: which latent frames are compressed context and which are full
  (:func:`split_chunks`, ``chunk_partition`` ``[1,3,3,3,3,3,3,2]``, ``full_chunk_limit`` 3);
- the compressed patch embedding's initialisation from the full one (:func:`far_patch_kernel`:
  trilinear resize of each (1,2,2) kernel to (1,4,4), ``align_corners=False``, no rescaling);
- the RoPE tables of the FAR class (:func:`far_rope_angles`, :func:`far_rope_tables`): complex
  tables split ``[d/2 - 2*(d//6), d//6, d//6]`` (t, h, w), absolute frame positions, and for
  compressed tokens the h and w tables average-pooled over 2 and renormalised to unit modulus
  (compressed token j sits at full-resolution position 2j + 0.5);
- the training mask with the clean copy (:class:`FarTrainMask`, section 6.2), an
  :class:`~anyflow_jax.models.attention.AttentionMask`, so the ``xla`` and ``splash`` attention
  paths take it alike.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from anyflow_jax.models.attention import AttentionMask

CHUNK_PARTITION = (1, 3, 3, 3, 3, 3, 3, 2)  # latent frames per chunk (21 in all: 81 video frames)
FULL_CHUNK_LIMIT = 3  # the newest chunks kept at full resolution; older ones are compressed
COMPRESSED_PATCH_SIZE = (1, 4, 4)


# ------------------------------------------------------------------------------------ chunks
@dataclasses.dataclass(frozen=True)
class ChunkSplit:
    """The first ``n`` chunks of a partition, split into compressed context and full chunks."""
    compressed: tuple[int, ...]  # frames per compressed chunk (oldest first)
    full: tuple[int, ...]  # frames per full chunk

    @property
    def compressed_frames(self) -> int:
        return sum(self.compressed)

    @property
    def full_frames(self) -> int:
        return sum(self.full)


def split_chunks(n_chunks: int, partition: Sequence[int] = CHUNK_PARTITION,
                 full_chunk_limit: int = FULL_CHUNK_LIMIT) -> ChunkSplit:
    """With ``n_chunks`` chunks, the first ``n - full_chunk_limit`` are compressed and the last
    ``full_chunk_limit`` full; with ``n <= full_chunk_limit`` all are full (section 6.1)."""
    partition = tuple(int(p) for p in partition)
    if not partition or min(partition) < 1:
        raise ValueError(f"chunk_partition must be positive frame counts, got {partition}")
    if not 1 <= n_chunks <= len(partition):
        raise ValueError(f"n_chunks must be in [1, {len(partition)}], got {n_chunks}")
    if full_chunk_limit < 1:
        raise ValueError(f"full_chunk_limit must be >= 1, got {full_chunk_limit}")
    used = partition[:n_chunks]
    n_comp = max(0, n_chunks - full_chunk_limit)
    return ChunkSplit(compressed=used[:n_comp], full=used[n_comp:])


# ------------------------------------------------------------------------------ patch embedding
def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of 1-D linear interpolation with ``align_corners=False`` (source
    coordinate ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the edges), as PyTorch's."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        x = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(x)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w1 = x - i0
        m[i, i0] += 1.0 - w1
        m[i, i1] += w1
    return m


def far_patch_kernel(kernel, patch_size: Sequence[int], in_channels: int,
                     compressed_patch_size: Sequence[int] = COMPRESSED_PATCH_SIZE):
    """The compressed patch embedding's initial kernel from the full one (section 2.4): each
    output feature's ``patch_size`` kernel trilinearly resized to ``compressed_patch_size``
    (``align_corners=False``), without rescaling. Kernels are our per-patch Dense layout
    ``(pt*ph*pw*C, D)`` (rows ordered pt, ph, pw, C); the bias is copied unchanged.

    Computed in float32 (at least) with jax, so a ``jax.Array`` input may be sharded over any
    mesh, processes included (the result is sharded as the compiler propagates; inside ``jax.jit``
    pass ``out_shardings``); a NumPy input gives a NumPy result."""
    import jax
    import jax.numpy as jnp

    pt, ph, pw = (int(x) for x in patch_size)
    qt, qh, qw = (int(x) for x in compressed_patch_size)
    if len(kernel.shape) != 2 or kernel.shape[0] != pt * ph * pw * in_channels:
        raise ValueError(f"kernel must be ({pt}*{ph}*{pw}*{in_channels}, D), got {tuple(kernel.shape)}")
    d = kernel.shape[1]
    dtype = kernel.dtype
    compute = jnp.promote_types(dtype, jnp.float32)
    mt, mh, mw = (jnp.asarray(_linear_resize_matrix(a, b), compute) for a, b in ((pt, qt), (ph, qh), (pw, qw)))
    k5 = jnp.asarray(kernel).astype(compute).reshape(pt, ph, pw, in_channels, d)
    out = jnp.einsum("ta,hb,wc,abcCd->thwCd", mt, mh, mw, k5, precision=jax.lax.Precision.HIGHEST)
    out = out.reshape(qt * qh * qw * in_channels, d).astype(dtype)
    return np.asarray(out) if isinstance(kernel, np.ndarray) else out


# ----------------------------------------------------------------------------------- RoPE
def far_rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex (pair) dims of the t, h, w tables: ``[d/2 - 2*(d//6), d//6, d//6]``."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    hw = head_dim // 6
    return head_dim // 2 - 2 * hw, hw, hw


def _freqs(pairs: int, theta: float) -> np.ndarray:
    # the table of a part with 2 * pairs real dims: 1 / theta^(2k / (2 * pairs))
    return 1.0 / (theta ** (np.arange(0, 2 * pairs, 2, dtype=np.float64) / (2 * pairs)))


def far_rope_angles(head_dim: int, frame_positions: Sequence[int], h: int, w: int, *, pool: int = 1,
                    theta: float = 10000.0) -> np.ndarray:
    """Complex RoPE factors ``(len(frame_positions) * h * w, head_dim // 2)`` (unit modulus) of a
    token grid: frames at the given absolute positions, an ``h x w`` grid whose h and w tables
    are average-pooled over ``pool`` full-resolution positions and renormalised (``pool=2`` for
    compressed tokens: token j gets position ``2j + 0.5``; ``pool=1`` leaves them unchanged).
    Built in float64."""
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    ct, ch, cw = far_rope_split(head_dim)
    pos_t = np.asarray(frame_positions, np.float64)
    tab_t = np.exp(1j * np.outer(pos_t, _freqs(ct, theta)))

    def pooled(n, pairs):
        full = np.exp(1j * np.outer(np.arange(n * pool, dtype=np.float64), _freqs(pairs, theta)))
        avg = full.reshape(n, pool, pairs).mean(axis=1)
        return avg / np.abs(avg)
    tab_h, tab_w = pooled(h, ch), pooled(w, cw)
    f = len(pos_t)
    grid = np.concatenate([
        np.broadcast_to(tab_t[:, None, None], (f, h, w, ct)),
        np.broadcast_to(tab_h[None, :, None], (f, h, w, ch)),
        np.broadcast_to(tab_w[None, None, :], (f, h, w, cw))], axis=-1)
    return grid.reshape(f * h * w, head_dim // 2)


def far_rope_tables(head_dim: int, frame_positions: Sequence[int], h: int, w: int, *, pool: int = 1,
                    theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` float32 ``(tokens, head_dim // 2)`` of :func:`far_rope_angles`, the layout
    :func:`anyflow_jax.models.wan.apply_rope` takes (adjacent channel pairs)."""
    z = far_rope_angles(head_dim, frame_positions, h, w, pool=pool, theta=theta)
    return z.real.astype(np.float32), z.imag.astype(np.float32)


# ----------------------------------------------------------------------------------- mask
CONTEXT, NOISE, CLEAN, PAD = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class FarTrainMask(AttentionMask):
    """The training mask with the clean copy (section 6.2) over the token sequence
    ``[context chunks][noisy full chunks][clean copies of the full chunks][padding]``.

    ``context_bounds``: end (exclusive) of each compressed context chunk's tokens;
    ``full_bounds``: end of each noisy full chunk's tokens; the clean copy repeats the full
    chunks' sizes right after them; tokens past it up to ``length`` are padding. Chunk ids:
    context ``0..n_c-1``, full chunk ``j`` (noisy and clean) ``n_c + j``. A query may attend to
    a key when ``chunk(q) >= chunk(kv)`` and: clean -> noise never; noise -> noise only in the
    same chunk; noise -> clean only strictly earlier chunks; context -> only context; clean ->
    context or clean. Padding is masked both ways (a padding query sees only padding, so its
    row is not empty; its output is dropped). Square: queries and keys are the same sequence.
    """
    context_bounds: tuple[int, ...]
    full_bounds: tuple[int, ...]
    length: int

    def __post_init__(self):
        c = tuple(int(x) for x in self.context_bounds)
        f = tuple(int(x) for x in self.full_bounds)
        if not f:
            raise ValueError("full_bounds needs at least one full chunk")
        start = c[-1] if c else 0
        for name, b, lo in (("context_bounds", c, 0), ("full_bounds", f, start)):
            if b and (b[0] <= lo or any(y <= x for x, y in itertools.pairwise(b))):
                raise ValueError(f"{name} must be strictly ascending past {lo}, got {b}")
        clean_end = f[-1] + (f[-1] - start)
        if int(self.length) < clean_end:
            raise ValueError(f"length {self.length} is shorter than the tokens it describes ({clean_end})")
        object.__setattr__(self, "context_bounds", c)
        object.__setattr__(self, "full_bounds", f)
        object.__setattr__(self, "length", int(self.length))

    @classmethod
    def from_frames(cls, context_frames: Sequence[int], full_frames: Sequence[int], *, compressed_tokens: int,
                    full_tokens: int, multiple: int = 1) -> FarTrainMask:
        """From frames per chunk and tokens per frame (390 and 1560 at 480x832), the length
        padded to a multiple of ``multiple`` (the reference pads to 128 for flex attention)."""
        cb = tuple(np.cumsum([n * compressed_tokens for n in context_frames]).tolist())
        start = cb[-1] if cb else 0
        fb = tuple((start + np.cumsum([n * full_tokens for n in full_frames])).tolist())
        end = fb[-1] + (fb[-1] - start)
        length = -(-end // multiple) * multiple
        return cls(cb, fb, length)

    def _classify(self, ids):
        """(kind, chunk id) of token ids; elementwise only (numpy, jax.numpy, Pallas)."""
        nc = len(self.context_bounds)
        start = self.context_bounds[-1] if nc else 0
        full_end = self.full_bounds[-1]
        clean_end = full_end + (full_end - start)
        is_noise = (ids >= start) & (ids < full_end)
        is_clean = (ids >= full_end) & (ids < clean_end)
        is_pad = ids >= clean_end
        kind = is_noise * NOISE + is_clean * CLEAN + is_pad * PAD
        # chunk ids: context by its bounds; a clean token by its noisy twin's position
        twin = ids - is_clean * (full_end - start)
        chunk = ids * 0
        for b in self.context_bounds:
            chunk = chunk + (twin >= b)
        for b in self.full_bounds[:-1]:
            chunk = chunk + (twin >= b)
        return kind, chunk

    def allowed(self, q_ids, kv_ids):
        qk, qc = self._classify(q_ids)
        kk, kc = self._classify(kv_ids)
        causal = qc >= kc
        same = qc == kc
        q_noise, q_clean, q_ctx, q_pad = qk == NOISE, qk == CLEAN, qk == CONTEXT, qk == PAD
        k_noise, k_clean, k_ctx, k_pad = kk == NOISE, kk == CLEAN, kk == CONTEXT, kk == PAD
        noise_rule = q_noise & causal & ((k_noise & same) | (k_clean & ~same) | k_ctx)
        clean_rule = q_clean & causal & (k_clean | k_ctx)
        ctx_rule = q_ctx & causal & k_ctx
        pad_rule = q_pad & k_pad
        return noise_rule | clean_rule | ctx_rule | pad_rule

    def validate(self, q_len: int, kv_len: int) -> None:
        if q_len != self.length or kv_len != self.length:
            raise ValueError(f"FarTrainMask covers {self.length} tokens, attention has ({q_len}, {kv_len})")


__all__ = ["CHUNK_PARTITION", "FULL_CHUNK_LIMIT", "COMPRESSED_PATCH_SIZE", "ChunkSplit", "split_chunks",
           "far_patch_kernel", "far_rope_split", "far_rope_angles", "far_rope_tables", "FarTrainMask"]
