"""The chunk-causal FAR network (reference spec sections 2.4, 6.1-6.3): the Wan DiT of
:mod:`anyflow_jax.models.wan` (its blocks, embedders and output head, shared rather than copied)
with FAR's token layout, per-token times, clean copy, block-causal mask and KV cache.

:class:`FarWanTransformer3D` is a :class:`~anyflow_jax.models.wan.WanTransformer3D` with three
more ``config.json`` fields (``compressed_patch_size``, ``full_chunk_limit``,
``chunk_partition``) and one more parameter, ``far_patch_embedding`` (a Conv3d with kernel =
stride = ``compressed_patch_size``, as a per-patch Dense like ``patch_embedding``). Its forward
has the reference class's four paths:

- **causal training** (default; the reference's ``_forward_train``): latents ``(B, F, H, W, C)``
  holding the first ``n`` chunks of ``chunk_partition`` (``F = sum(chunk_partition[:n])``, so
  ``n`` follows from ``F``); with ``n > full_chunk_limit`` the first ``n - full_chunk_limit``
  chunks are compressed context (``far_patch_embedding``, 1/4 of the tokens per frame), the last
  ``full_chunk_limit`` full. ``t``/``r`` are per-frame ``(B, F)`` (context frames normally 0);
  ``clean`` (optional, ``(B, F_full, H, W, C)``) is the clean copy of the full frames, embedded
  with ``patch_embedding`` at time ``clean_t`` (default 0) and appended; attention then follows
  section 6.2's mask (:class:`~anyflow_jax.models.far.FarTrainMask`), and without a clean copy
  the plain chunk-causal mask (:class:`~anyflow_jax.models.attention.ChunkCausalMask`). Returns
  the velocity of the full (noisy) frames ``(B, F_full, H, W, out)`` only.
- **cache encoding** (``encode_cache=True``; ``_forward_cache``): the same forward with the full
  window ``full_chunk_limit - 1``, no clean copy and no output head; returns a
  :class:`FarKVCache` with every layer's self-attention keys (before RoPE) and values of the
  compressed and the full tokens, in buffers of a fixed size (the largest any chunk count of
  the partition needs; the valid lengths follow from the cached chunk count).
- **cached inference** (``kv_cache=cache``; ``_forward_inference``): latents are the next
  chunk's frames only; its tokens attend, without a mask, to the cached keys/values and to
  themselves; RoPE for the keys covers the whole sequence (compressed context, cached full
  chunks, the new chunk) at absolute frame positions. Returns that chunk's velocity.
- **bidirectional** (``causal=False``; ``_forward_bidirection``): the Wan forward with this
  class's RoPE split.

RoPE follows the FAR class (complex tables split ``[d/2 - 2*(d//6), d//6, d//6]``,
:func:`~anyflow_jax.models.far.far_rope_tables`), which equals the Wan DiT's at head dim 128 but
not at every head dim. Compressed frames take the first absolute frame positions, full frames
the following ones, and the clean copy its noisy twin's.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.models import far
from anyflow_jax.models.attention import ChunkCausalMask
from anyflow_jax.models.wan import (
    RESIDUAL, ConditionEmbedder, Dense, WanTransformer3D, constrain, output_head, patchify, run_blocks,
    unpatchify)

FAR_CLASS_NAME = "FAR_Wan_Transformer3DModel"
# config.json keys of a FAR_Wan_Transformer3DModel that carry no meaning for the network here
_FAR_META_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
                            "init_far_model", "init_flowmap_model", "window_size", "add_img_emb"})


@flax.struct.dataclass
class FarKVCache:
    """Per-layer keys (before RoPE) and values of the chunks encoded so far, ``(layers, B, capacity,
    H, Dh)`` each: compressed context tokens and full-resolution tokens in separate fixed-size
    buffers; the first ``compressed_tokens`` / ``full_tokens`` entries are valid (both follow from
    ``n_chunks`` and the partition, so they are static), the rest zeros."""
    compressed_k: jax.Array
    compressed_v: jax.Array
    full_k: jax.Array
    full_v: jax.Array
    n_chunks: int = flax.struct.field(pytree_node=False)
    compressed_tokens: int = flax.struct.field(pytree_node=False)
    full_tokens: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class FarSlotCache:
    """The KV cache of the scanned chunk loop (``chunk_index=`` paths): one layout for every
    chunk, so a ``lax.scan`` over chunks carries one program. Per-layer keys (before RoPE) and
    values ``(layers, B, L, H, Dh)``:

    - ``compressed_*``: the compressed-context region, the first ``len(chunk_partition) -
      full_chunk_limit`` chunks of the partition at their own static offsets (the chunks that can
      ever be compressed); the first ``max(0, chunk_index - (full_chunk_limit - 1))`` are valid;
    - ``window_*``: the full-resolution window, ``full_chunk_limit - 1`` slots of
      ``max(chunk_partition)`` frames each; slot ``p`` holds chunk ``chunk_index - W + p`` (``W``
      the slot count) when that exists, its first frames valid (a chunk shorter than the slot is
      padded).

    ``chunk_index`` (int32, traced): the chunk the cache serves, i.e. the chunks encoded."""
    compressed_k: jax.Array
    compressed_v: jax.Array
    window_k: jax.Array
    window_v: jax.Array
    chunk_index: jax.Array


def chunk_layout(chunks: Sequence[int], full: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(compressed, full)`` frames per chunk: the last ``full`` chunks full (all of them when
    there are no more), the earlier ones compressed (``full`` may be 0: all compressed)."""
    chunks = tuple(int(c) for c in chunks)
    n_comp = max(0, len(chunks) - max(0, int(full)))
    return chunks[:n_comp], chunks[n_comp:]


class FarWanTransformer3D(WanTransformer3D):
    """The FAR chunk-causal Wan DiT (see the module docstring). Fields are the
    ``FAR_Wan_Transformer3DModel`` ``config.json`` names."""
    compressed_patch_size: tuple[int, int, int] = far.COMPRESSED_PATCH_SIZE
    full_chunk_limit: int = far.FULL_CHUNK_LIMIT
    chunk_partition: tuple[int, ...] = far.CHUNK_PARTITION

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "FarWanTransformer3D":
        """Build from a ``FAR_Wan_Transformer3DModel`` ``config.json`` dict; ``overrides`` win.
        ``flow_map`` follows ``init_flowmap_model`` (the released students set it)."""
        cfg = dict(config)
        flow_map = bool(cfg.get("init_flowmap_model", False))
        fields = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name")}
        unknown = sorted(k for k in cfg if k not in fields and k not in _FAR_META_KEYS)
        if unknown:
            raise ValueError(f"unknown FAR Wan transformer config keys: {unknown}")
        kwargs = {k: v for k, v in cfg.items() if k in fields}
        if kwargs.get("chunk_partition") is None:  # the class's default is None: the trainer passes it
            kwargs.pop("chunk_partition", None)
        kwargs["flow_map"] = flow_map
        kwargs.update(overrides)
        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
        for key in ("patch_size", "compressed_patch_size", "chunk_partition"):
            if key in kwargs:
                kwargs[key] = tuple(int(p) for p in kwargs[key])
        model = cls(**kwargs)
        model.validate()
        return model

    def to_config(self) -> dict[str, Any]:
        """The ``config.json`` of a released FAR checkpoint (the reference class's own keys)."""
        base = super().to_config()
        base.pop("pos_embed_seq_len", None)  # not a FAR_Wan_Transformer3DModel argument
        for key in ("gate_value", "deltatime_type", "init_flowmap_model"):
            base.pop(key, None)
        cfg = {"_class_name": FAR_CLASS_NAME, "_diffusers_version": base.pop("_diffusers_version")}
        base.pop("_class_name")
        cfg.update(base)
        cfg.update(compressed_patch_size=list(self.compressed_patch_size), full_chunk_limit=self.full_chunk_limit,
                   chunk_partition=list(self.chunk_partition), init_far_model=True,
                   init_flowmap_model=bool(self.flow_map),
                   gate_value=self.gate_value if self.flow_map else 0,
                   deltatime_type=self.deltatime_type)
        return cfg

    def validate(self) -> None:
        super().validate()
        pt, ph, pw = self.patch_size
        if len(self.compressed_patch_size) != 3:
            raise ValueError(f"compressed_patch_size must have 3 entries (t, h, w), got {self.compressed_patch_size}")
        qt, qh, qw = self.compressed_patch_size
        if pt != 1 or qt != 1:
            raise ValueError(f"FAR needs temporal patch 1 (patch_size={self.patch_size}, "
                             f"compressed_patch_size={self.compressed_patch_size})")
        if qh % ph or qw % pw or qh // ph != qw // pw:
            raise ValueError(f"compressed_patch_size {self.compressed_patch_size} must be the same multiple of "
                             f"patch_size {self.patch_size} in h and w")
        if self.full_chunk_limit < 1:
            raise ValueError(f"full_chunk_limit must be >= 1, got {self.full_chunk_limit}")
        if not self.chunk_partition or min(self.chunk_partition) < 1:
            raise ValueError(f"chunk_partition must be positive frame counts, got {self.chunk_partition}")

    def dummy_inputs(self, batch: int = 1):
        """The first chunk at the compressed patch size (for ``init`` / ``eval_shape``)."""
        _, qh, qw = self.compressed_patch_size
        f = self.chunk_partition[0]
        latents = jnp.zeros((batch, f, qh, qw, self.in_channels), jnp.float32)
        t = jnp.zeros((batch, f), jnp.float32)
        return latents, t, t, jnp.zeros((batch, 1, self.text_dim), jnp.float32)

    # ------------------------------------------------------------------ layout helpers
    def chunks_for_frames(self, frames: int) -> tuple[int, ...]:
        """The first ``n`` chunks of the partition that hold ``frames`` latent frames."""
        total = 0
        for n, c in enumerate(self.chunk_partition, 1):
            total += c
            if total == frames:
                return tuple(self.chunk_partition[:n])
        sums = np.cumsum(self.chunk_partition).tolist()
        raise ValueError(f"{frames} latent frames do not end on a chunk boundary of chunk_partition="
                         f"{tuple(self.chunk_partition)} (possible frame counts: {sums})")

    def tokens_per_frame(self, h: int, w: int) -> tuple[int, int]:
        """``(full, compressed)`` tokens per latent frame of an ``h x w`` latent."""
        _, ph, pw = self.patch_size
        _, qh, qw = self.compressed_patch_size
        return (h // ph) * (w // pw), (h // qh) * (w // qw)

    def cache_capacity(self, h: int, w: int) -> tuple[int, int]:
        """``(compressed, full)`` token capacity of a :class:`FarKVCache`: the most any encoded
        chunk count of the partition needs (full window ``full_chunk_limit - 1``; up to all chunks but
        the last, as a cache always has a next chunk to serve)."""
        tf, tc = self.tokens_per_frame(h, w)
        cap_c = cap_f = 0
        for n in range(1, max(2, len(self.chunk_partition))):
            comp, full = chunk_layout(self.chunk_partition[:n], self.full_chunk_limit - 1)
            cap_c, cap_f = max(cap_c, sum(comp) * tc), max(cap_f, sum(full) * tf)
        return cap_c, cap_f

    def empty_cache(self, batch: int, h: int, w: int, dtype=None) -> FarKVCache:
        """The cache before any chunk (zeros of the fixed size; ``n_chunks`` 0): chunk 0 runs on
        it as every later chunk runs on its encoded predecessors."""
        cap_c, cap_f = self.cache_capacity(h, w)
        heads, hd = self.num_attention_heads, self.attention_head_dim
        dt = self.dtype if dtype is None else dtype

        def zeros(cap):
            return jnp.zeros((self.num_layers, batch, cap, heads, hd), dt)
        return FarKVCache(zeros(cap_c), zeros(cap_c), zeros(cap_f), zeros(cap_f), n_chunks=0, compressed_tokens=0,
                          full_tokens=0)

    # ------------------------------------------------------------------ the scanned layout
    def slot_frames(self) -> int:
        """Frames per slot of the scanned layout: the largest chunk of the partition."""
        return max(self.chunk_partition)

    def _slot_tables(self):
        """Static per-chunk tables of the scanned layout (numpy int32): chunk starts (with the
        total), chunk sizes, and the compressed region's frames."""
        cp = tuple(int(c) for c in self.chunk_partition)
        starts = np.cumsum((0,) + cp).astype(np.int32)
        n_comp = max(0, len(cp) - self.full_chunk_limit)
        return starts, np.asarray(cp, np.int32), int(starts[n_comp]), n_comp

    def _slot_validity(self, c, h, w):
        """Traced validity of the scanned layout's tokens at chunk index ``c``: ``(compressed
        (Tc,), window (W * S * tf,), chunk (S * tf,))`` booleans and the absolute frame positions
        ``(window (W * S,), chunk (S,))`` (clamped into range where invalid)."""
        starts, sizes, comp_frames, _ = self._slot_tables()
        tf, tc = self.tokens_per_frame(h, w)
        win, s = self.full_chunk_limit - 1, self.slot_frames()
        starts_j, sizes_j = jnp.asarray(starts), jnp.asarray(sizes)
        c = jnp.asarray(c, jnp.int32)
        n_comp = jnp.maximum(c - win, 0)
        comp_valid = jnp.arange(comp_frames, dtype=jnp.int32) < starts_j[n_comp]
        frame = jnp.arange(s, dtype=jnp.int32)
        if win:
            j = c - win + jnp.arange(win, dtype=jnp.int32)  # the chunk in each window slot
            jc = jnp.clip(j, 0, len(sizes) - 1)
            win_valid = (j[:, None] >= 0) & (frame[None, :] < sizes_j[jc][:, None])
            win_pos = starts_j[jc][:, None] + frame[None, :]
        else:
            win_valid = jnp.zeros((0, s), bool)
            win_pos = jnp.zeros((0, s), jnp.int32)
        cc = jnp.clip(c, 0, len(sizes) - 1)
        chunk_valid = frame < sizes_j[cc]
        chunk_pos = starts_j[cc] + frame
        limit = int(starts[-1]) + s - 1
        return (jnp.repeat(comp_valid, tc), jnp.repeat(win_valid.reshape(-1), tf), jnp.repeat(chunk_valid, tf),
                jnp.clip(win_pos.reshape(-1), 0, limit), jnp.clip(chunk_pos, 0, limit))

    def _full_rope_at(self, positions, h, w):
        """cos/sin of full-resolution frames at traced absolute ``positions``: rows of the static
        table of every position the layout can name (gathered, so the values are the static
        path's exactly)."""
        _, ph, pw = self.patch_size
        starts, _, _, _ = self._slot_tables()
        n_pos = int(starts[-1]) + self.slot_frames()
        cos, sin = self._rope(range(n_pos), h // ph, w // pw, 1)
        per = (h // ph) * (w // pw)
        cos = jnp.asarray(cos).reshape(n_pos, per, -1)[positions]
        sin = jnp.asarray(sin).reshape(n_pos, per, -1)[positions]
        return cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])

    def _comp_rope(self, comp_frames, h, w):
        _, ph, pw = self.patch_size
        _, qh, qw = self.compressed_patch_size
        cos, sin = self._rope(range(comp_frames), h // qh, w // qw, qh // ph)
        return jnp.asarray(cos), jnp.asarray(sin)

    def _compressed_tokens(self, latents, frames, far_patch_embedding):
        """``far_patch_embedding`` tokens of the first ``frames`` latent frames (the compressed
        context; a strided conv drops rows and columns past the last whole patch)."""
        h, w = latents.shape[2:4]
        _, qh, qw = self.compressed_patch_size
        if h // qh == 0 or w // qw == 0:
            raise ValueError(f"latents {h}x{w} are smaller than compressed_patch_size {self.compressed_patch_size}")
        ctx_latents = latents[:, :frames, :(h // qh) * qh, :(w // qw) * qw]
        return far_patch_embedding(patchify(ctx_latents, self.compressed_patch_size))

    def _slot_encode(self, latents, c, embed, patch_embedding, far_patch_embedding):
        """The scanned layout's cache encoding at chunk index ``c`` from the video buffer
        ``latents`` (B, F_buf, H, W, C): frames from chunk ``c`` on are ignored."""
        b, f_buf, h, w, _ = latents.shape
        starts, _, comp_frames, n_comp = self._slot_tables()
        _, qh, qw = self.compressed_patch_size
        tf, tc = self.tokens_per_frame(h, w)
        win, s = self.full_chunk_limit - 1, self.slot_frames()
        need = int(starts[-1]) + s
        if f_buf < int(starts[-1]):
            raise ValueError(f"the video buffer has {f_buf} latent frames; chunk_partition={self.chunk_partition} "
                             f"needs {int(starts[-1])}")
        if f_buf < need:
            latents = jnp.pad(latents, ((0, 0), (0, need - f_buf), (0, 0), (0, 0), (0, 0)))
        comp_valid, win_valid, _, win_pos, _ = self._slot_validity(c, h, w)
        tokens, segments, bounds = [], [], []
        if comp_frames:
            tokens.append(self._compressed_tokens(latents, comp_frames, far_patch_embedding))
            segments.append((comp_frames, tc))
            bounds += [int(x) * tc for x in starts[1:n_comp + 1]]
        if win:
            slots = [jax.lax.dynamic_slice_in_dim(latents, win_pos[p * s], s, axis=1) for p in range(win)]
            tokens.append(patch_embedding(patchify(jnp.concatenate(slots, axis=1), self.patch_size)))
            segments.append((win * s, tf))
            base = comp_frames * tc
            bounds += [base + (p + 1) * s * tf for p in range(win)]
        if not tokens:  # full_chunk_limit 1 with one chunk: nothing can be cached
            raise ValueError("the scanned layout has no cache (one chunk and full_chunk_limit 1)")
        x = constrain(jnp.concatenate(tokens, axis=1) if len(tokens) > 1 else tokens[0], RESIDUAL)
        n_frames = comp_frames + win * s
        zeros = jnp.zeros((b, n_frames), jnp.float32)
        temb, mod, ctx = embed(zeros, zeros)
        parts = []
        if comp_frames:
            parts.append(self._comp_rope(comp_frames, h, w))
        if win:
            parts.append(self._full_rope_at(win_pos, h, w))
        rope = (jnp.concatenate([p[0] for p in parts], 0), jnp.concatenate([p[1] for p in parts], 0))
        mask = ChunkCausalMask(tuple(bounds), tuple(bounds)) if len(bounds) > 1 else None
        kv_valid = jnp.concatenate([comp_valid, win_valid])
        _, kv = run_blocks(self, x, ctx, mod, rope, segments=tuple(segments), mask=mask, return_kv=True,
                           kv_valid=kv_valid)
        k, v = kv
        lc = comp_frames * tc
        return FarSlotCache(k[:, :, :lc], v[:, :, :lc], k[:, :, lc:], v[:, :, lc:], jnp.asarray(c, jnp.int32))

    def _slot_chunk(self, latents, t, r, cache: FarSlotCache, embed, patch_embedding):
        """The chunk's velocity in the scanned layout: ``latents`` (B, S, H, W, C), the chunk
        ``cache.chunk_index`` padded to the slot's ``S`` frames (padding frames are ignored and
        their outputs meaningless)."""
        b, f, h, w, _ = latents.shape
        _, _, comp_frames, _ = self._slot_tables()
        s = self.slot_frames()
        if f != s:
            raise ValueError(f"the scanned layout's chunk has {s} latent frames (the largest chunk, padded); got {f}")
        comp_valid, win_valid, chunk_valid, win_pos, chunk_pos = self._slot_validity(cache.chunk_index, h, w)
        x = constrain(patch_embedding(patchify(latents, self.patch_size)), RESIDUAL)
        temb, mod, ctx = embed(t, r)
        q_cos, q_sin = self._full_rope_at(chunk_pos, h, w)
        parts = []
        if comp_frames:
            parts.append(self._comp_rope(comp_frames, h, w))
        if self.full_chunk_limit > 1:
            parts.append(self._full_rope_at(win_pos, h, w))
        parts.append((q_cos, q_sin))
        k_cos = jnp.concatenate([p[0] for p in parts], 0)
        k_sin = jnp.concatenate([p[1] for p in parts], 0)
        prefix = (jnp.concatenate([cache.compressed_k, cache.window_k], 2),
                  jnp.concatenate([cache.compressed_v, cache.window_v], 2))
        kv_valid = jnp.concatenate([comp_valid, win_valid, chunk_valid])
        x, _ = run_blocks(self, x, ctx, mod, (q_cos, q_sin, k_cos, k_sin), kv_prefix=prefix, kv_valid=kv_valid)
        return unpatchify(output_head(self, x, temb), (b, f, h, w, self.out_dim), self.patch_size)

    def train_slots(self, n):
        """The padded training layout at traced chunk count ``n`` (``full_chunk_limit ..
        len(chunk_partition)``): ``(frame positions (full_chunk_limit * S,), frame validity
        (full_chunk_limit * S,))`` of the full slots, slot ``p`` holding chunk ``n -
        full_chunk_limit + p`` (``S`` = :meth:`slot_frames`; positions clamped into range where
        invalid)."""
        starts, sizes, _, _ = self._slot_tables()
        fcl, s = self.full_chunk_limit, self.slot_frames()
        n = jnp.clip(jnp.asarray(n, jnp.int32), fcl, len(sizes))
        j = n - fcl + jnp.arange(fcl, dtype=jnp.int32)
        frame = jnp.arange(s, dtype=jnp.int32)
        valid = frame[None, :] < jnp.asarray(sizes)[j][:, None]
        pos = jnp.asarray(starts)[j][:, None] + frame[None, :]
        return jnp.clip(pos.reshape(-1), 0, int(starts[-1]) + s - 1), valid.reshape(-1)

    def train_context_frames(self) -> int:
        """Frames of the padded training layout's compressed region: the chunks that can ever be
        context (all but the last ``full_chunk_limit``)."""
        return self._slot_tables()[2]

    def _padded_train(self, latents, t, r, clean, clean_t, n, embed, patch_embedding, far_patch_embedding):
        """The teacher-forced training forward in the padded layout (``num_chunks=n``, traced):
        ``latents`` (B, CF + fcl * S, ...) = [the clip's first CF frames (compressed region; the
        first ``sum(chunk_partition[:n - fcl])`` are context)][the fcl full slots, noisy];
        ``clean`` (B, fcl * S, ...) the slots' clean copy. Returns the slots' velocity."""
        b, f, h, w, c = latents.shape
        starts, _, comp_frames, n_comp = self._slot_tables()
        _, qh, qw = self.compressed_patch_size
        tf, tc = self.tokens_per_frame(h, w)
        fcl, s = self.full_chunk_limit, self.slot_frames()
        nf = fcl * s
        if f != comp_frames + nf:
            raise ValueError(f"the padded training layout takes {comp_frames} context frames and {fcl} slots of {s} "
                             f"frames ({comp_frames + nf} latent frames); got {f}")
        if clean is None or tuple(clean.shape) != (b, nf, h, w, c):
            got = None if clean is None else tuple(clean.shape)
            raise ValueError(f"num_chunks (the padded training layout) needs the clean copy of the slots, "
                             f"{(b, nf, h, w, c)}; got {got}")
        pos, slot_valid = self.train_slots(n)
        n = jnp.clip(jnp.asarray(n, jnp.int32), fcl, len(self.chunk_partition))
        comp_valid = jnp.arange(comp_frames, dtype=jnp.int32) < jnp.asarray(starts)[jnp.maximum(n - fcl, 0)]
        tokens, segments = [], []
        if comp_frames:
            tokens.append(self._compressed_tokens(latents, comp_frames, far_patch_embedding))
            segments.append((comp_frames, tc))
        tokens.append(patch_embedding(patchify(jnp.concatenate([latents[:, comp_frames:], clean], 1),
                                               self.patch_size)))
        segments.append((2 * nf, tf))
        x = constrain(jnp.concatenate(tokens, axis=1) if len(tokens) > 1 else tokens[0], RESIDUAL)
        ct = jnp.asarray(0.0 if clean_t is None else clean_t, jnp.float32)
        ct = jnp.broadcast_to(ct[:, None] if ct.ndim == 1 else ct, (b, nf))
        t_all = jnp.concatenate([t, ct], axis=1)
        r_all = None
        if r is not None:  # as the exact layout: the clean copy's delta input is clean_t
            r_all = jnp.concatenate([r, ct if self.deltatime_type == "r" else jnp.zeros_like(ct)], axis=1)
        temb, mod, ctx = embed(t_all, r_all)
        f_cos, f_sin = self._full_rope_at(pos, h, w)
        parts = ([self._comp_rope(comp_frames, h, w)] if comp_frames else []) + [(f_cos, f_sin)] * 2
        rope = (jnp.concatenate([p[0] for p in parts], 0), jnp.concatenate([p[1] for p in parts], 0))
        cp = tuple(int(x) for x in self.chunk_partition)
        mask = far.FarTrainMask.from_frames(cp[:n_comp], (s,) * fcl, compressed_tokens=tc, full_tokens=tf)
        slot_tokens = jnp.repeat(slot_valid, tf)
        kv_valid = jnp.concatenate([jnp.repeat(comp_valid, tc), slot_tokens, slot_tokens])
        x, _ = run_blocks(self, x, ctx, mod, rope, segments=tuple(segments), mask=mask, kv_valid=kv_valid)
        lc = comp_frames * tc
        out = output_head(self, x[:, lc:lc + nf * tf], temb[:, comp_frames:comp_frames + nf])
        return unpatchify(out, (b, nf, h, w, self.out_dim), self.patch_size)

    def _rope(self, frame_positions, h, w, pool):
        if len(frame_positions) and max(frame_positions) >= self.rope_max_seq_len:
            raise ValueError(f"frame position {max(frame_positions)} exceeds rope_max_seq_len={self.rope_max_seq_len}")
        if h * pool > self.rope_max_seq_len or w * pool > self.rope_max_seq_len:
            raise ValueError(f"latent grid {h}x{w} (pool {pool}) exceeds rope_max_seq_len={self.rope_max_seq_len}")
        return far.far_rope_tables(self.attention_head_dim, list(frame_positions), h, w, pool=pool)

    def _rope_layout(self, n_comp_frames, full_positions, h, w, copies=1):
        """cos/sin of [compressed frames 0..n_comp_frames-1][full frames at ``full_positions``] x
        ``copies`` (the clean copy repeats the full frames' positions)."""
        _, ph, pw = self.patch_size
        _, qh, qw = self.compressed_patch_size
        parts = []
        if n_comp_frames:
            parts.append(self._rope(range(n_comp_frames), h // qh, w // qw, qh // ph))
        full = self._rope(full_positions, h // ph, w // pw, 1)
        parts += [full] * copies
        cos = np.concatenate([p[0] for p in parts], axis=0)
        sin = np.concatenate([p[1] for p in parts], axis=0)
        return jnp.asarray(cos), jnp.asarray(sin)

    # ------------------------------------------------------------------ forward
    @nn.compact
    def __call__(self, latents, t, r=None, context=None, clean=None, clean_t=None, *, causal: bool = True,
                 encode_cache: bool = False, kv_cache: FarKVCache | FarSlotCache | None = None,
                 chunk_index=None, num_chunks=None):
        self.validate()
        if context is None:
            raise ValueError("context (text embeddings, (B, L, text_dim)) is required")
        t, r, context = self._check_inputs(latents, t, r, context)
        b, f, h, w, c = latents.shape
        dim = self.inner_dim
        _, qh, qw = self.compressed_patch_size
        tf, tc = self.tokens_per_frame(h, w)
        patch_embedding = Dense(dim, ("patch", "embed"), self.dtype, name="patch_embedding")
        far_patch_embedding = Dense(dim, ("patch", "embed"), self.dtype, name="far_patch_embedding")
        embedder = ConditionEmbedder(dim, self.freq_dim, self.flow_map, self.gate_value, self.deltatime_type,
                                     self.dtype, name="condition_embedder")
        if self.is_initializing():  # every path's parameters exist after init, whichever path ran
            far_patch_embedding(jnp.zeros((b, 0, qh * qw * c), jnp.float32))
        if (clean is not None or clean_t is not None) and (not causal or encode_cache or kv_cache is not None):
            raise ValueError("clean / clean_t (the clean copy) belong to the causal training forward only")
        if num_chunks is not None and (not causal or encode_cache or kv_cache is not None or chunk_index is not None):
            raise ValueError("num_chunks (the padded training layout) belongs to the causal training forward only")
        if encode_cache and kv_cache is not None:
            raise ValueError("encode_cache and kv_cache are exclusive (encode the cache, then pass it)")

        def embed(t_frames, r_frames):
            t_model = t_frames * 1000.0
            r_model = None if r_frames is None else r_frames * 1000.0
            temb, mod, ctx = embedder(t_model, r_model, context)
            return temb, mod, constrain(ctx, ("batch", "act_len", "act_embed"))

        if not causal:  # the bidirectional path of the same weights (FAR RoPE split)
            if encode_cache or kv_cache is not None:
                raise ValueError("the KV cache belongs to the causal paths (causal=True)")
            x = constrain(patch_embedding(patchify(latents, self.patch_size)), RESIDUAL)
            temb, mod, ctx = embed(t, r)
            x, _ = run_blocks(self, x, ctx, mod, self._rope_layout(0, range(f), h, w))
            return unpatchify(output_head(self, x, temb), (b, f, h, w, self.out_dim), self.patch_size)

        if num_chunks is not None:  # the padded training layout (one shape for every chunk count)
            return self._padded_train(latents, t, r, clean, clean_t, num_chunks, embed, patch_embedding,
                                      far_patch_embedding)
        if chunk_index is not None or isinstance(kv_cache, FarSlotCache):  # the scanned layout
            if encode_cache:
                return self._slot_encode(latents, chunk_index, embed, patch_embedding, far_patch_embedding)
            if not isinstance(kv_cache, FarSlotCache):
                raise ValueError("chunk_index belongs to the scanned layout: encode_cache=True (the cache) or "
                                 "kv_cache=FarSlotCache (the chunk; its index is the cache's)")
            if chunk_index is not None:
                raise ValueError("the chunk's index is its FarSlotCache's chunk_index; do not pass chunk_index")
            return self._slot_chunk(latents, t, r, kv_cache, embed, patch_embedding)
        if kv_cache is not None:
            return self._cached_chunk(latents, t, r, kv_cache, embed, patch_embedding)

        chunks = self.chunks_for_frames(f)
        if encode_cache and len(chunks) == len(self.chunk_partition) > 1:
            raise ValueError(f"encode_cache got all {len(chunks)} chunks of chunk_partition; the cache serves the "
                             "next chunk, so it holds at most all chunks but the last")
        comp, full = chunk_layout(chunks, self.full_chunk_limit - 1 if encode_cache else self.full_chunk_limit)
        ncf, nff = sum(comp), sum(full)

        if clean is not None and tuple(clean.shape) != (b, nff, h, w, c):
            raise ValueError(f"clean (the clean copy of the full frames) must be {(b, nff, h, w, c)}; "
                             f"got {tuple(clean.shape)}")
        if clean is None and clean_t is not None:
            raise ValueError("clean_t needs the clean copy (clean)")
        tokens, t_parts, r_parts, segments = [], [t[:, :ncf], t[:, ncf:]], [], []
        if r is not None:
            r_parts = [r[:, :ncf], r[:, ncf:]]
        if ncf:
            tokens.append(self._compressed_tokens(latents, ncf, far_patch_embedding))
            segments.append((ncf, tc))
        if nff:  # (a cache encoding with full_chunk_limit 1 has no full frames)
            tokens.append(patch_embedding(patchify(latents[:, ncf:], self.patch_size)))
            segments.append((nff, tf))
        if clean is not None:
            tokens.append(patch_embedding(patchify(clean, self.patch_size)))
            segments.append((nff, tf))
            ct = jnp.asarray(0.0 if clean_t is None else clean_t, jnp.float32)
            ct = jnp.broadcast_to(ct[:, None] if ct.ndim == 1 else ct, (b, nff))
            t_parts.append(ct)
            if r is not None:  # the reference embeds clean_t as both times: the delta input is clean_t
                r_parts.append(ct if self.deltatime_type == "r" else jnp.zeros_like(ct))
        x = constrain(jnp.concatenate(tokens, axis=1) if len(tokens) > 1 else tokens[0], RESIDUAL)
        temb, mod, ctx = embed(jnp.concatenate(t_parts, axis=1), jnp.concatenate(r_parts, axis=1) if r_parts else None)
        rope = self._rope_layout(ncf, range(ncf, ncf + nff), h, w, copies=2 if clean is not None else 1)
        if clean is not None:
            mask = far.FarTrainMask.from_frames(comp, full, compressed_tokens=tc, full_tokens=tf)
        else:
            bounds = tuple(np.cumsum([n * tc for n in comp] + [n * tf for n in full]).tolist())
            mask = ChunkCausalMask(bounds, bounds) if len(bounds) > 1 else None
        x, kv = run_blocks(self, x, ctx, mod, rope, segments=tuple(segments), mask=mask, return_kv=encode_cache)

        if encode_cache:
            cap_c, cap_f = self.cache_capacity(h, w)
            lc, lf = ncf * tc, nff * tf

            def buffer(a, start, n, cap):  # (layers, B, L, H, Dh) -> the fixed-size buffer
                a = a[:, :, start:start + n]
                return jnp.pad(a, ((0, 0), (0, 0), (0, cap - n), (0, 0), (0, 0)))
            k, v = kv
            return FarKVCache(buffer(k, 0, lc, cap_c), buffer(v, 0, lc, cap_c), buffer(k, lc, lf, cap_f),
                              buffer(v, lc, lf, cap_f), n_chunks=len(chunks), compressed_tokens=lc, full_tokens=lf)

        x = x[:, ncf * tc:ncf * tc + nff * tf]  # the noisy full tokens: context and clean copy dropped
        out = output_head(self, x, temb[:, ncf:ncf + nff])
        return unpatchify(out, (b, nff, h, w, self.out_dim), self.patch_size)

    def _cached_chunk(self, latents, t, r, cache: FarKVCache, embed, patch_embedding):
        """The next chunk's velocity given the cache of the chunks before it (no mask)."""
        b, f, h, w, _ = latents.shape
        tf, tc = self.tokens_per_frame(h, w)
        n_cached = cache.n_chunks
        if n_cached >= len(self.chunk_partition):
            raise ValueError(f"the cache holds all {n_cached} chunks of chunk_partition; there is no next chunk")
        if self.chunk_partition[n_cached] != f:
            raise ValueError(f"chunk {n_cached} has {self.chunk_partition[n_cached]} latent frames, got {f}")
        comp, full = chunk_layout(self.chunk_partition[:n_cached + 1], self.full_chunk_limit)
        ncf, nff = sum(comp), sum(full)
        n_comp_tokens, n_full_tokens = ncf * tc, (nff - f) * tf
        if (n_comp_tokens, n_full_tokens) != (cache.compressed_tokens, cache.full_tokens):
            raise ValueError(f"the cache holds ({cache.compressed_tokens}, {cache.full_tokens}) compressed/full "
                             f"tokens; chunk {n_cached} at {h}x{w} expects ({n_comp_tokens}, {n_full_tokens})")
        prefix = (jnp.concatenate([cache.compressed_k[:, :, :n_comp_tokens], cache.full_k[:, :, :n_full_tokens]], 2),
                  jnp.concatenate([cache.compressed_v[:, :, :n_comp_tokens], cache.full_v[:, :, :n_full_tokens]], 2))
        x = constrain(patch_embedding(patchify(latents, self.patch_size)), RESIDUAL)
        temb, mod, ctx = embed(t, r)
        q_cos, q_sin = self._rope_layout(0, range(ncf + nff - f, ncf + nff), h, w)
        k_cos, k_sin = self._rope_layout(ncf, range(ncf, ncf + nff), h, w)
        x, _ = run_blocks(self, x, ctx, mod, (q_cos, q_sin, k_cos, k_sin), kv_prefix=prefix)
        return unpatchify(output_head(self, x, temb), (b, f, h, w, self.out_dim), self.patch_size)


def is_far_config(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` dict describes a FAR network (``init_far_model``)."""
    return bool(config.get("init_far_model"))


def model_from_config(config: Mapping[str, Any], **overrides) -> WanTransformer3D:
    """:class:`FarWanTransformer3D` for a FAR config (``init_far_model``), else
    :class:`~anyflow_jax.models.wan.WanTransformer3D` (a ``FAR_Wan_Transformer3DModel`` config
    without ``init_far_model`` is a bidirectional network)."""
    if is_far_config(config):
        return FarWanTransformer3D.from_config(config, **overrides)
    return WanTransformer3D.from_config({k: v for k, v in config.items() if k != "init_far_model"}, **overrides)


# ------------------------------------------------------------------------------ model surgery
def far_model_like(model: WanTransformer3D, **far_fields) -> FarWanTransformer3D:
    """The FAR network with ``model``'s fields and ``far_fields`` (``compressed_patch_size``,
    ``full_chunk_limit``, ``chunk_partition``), validated; no parameters."""
    fields = {k: getattr(model, k) for k in model.__dataclass_fields__ if k not in ("parent", "name")}
    fields.update(far_fields)
    far_model = FarWanTransformer3D(**fields)
    far_model.validate()
    return far_model


def make_far_model(model: WanTransformer3D, params, *, shardings=None, **far_fields) -> tuple[FarWanTransformer3D, Any]:
    """A Wan DiT (teacher or flow-map student) as a FAR network (the reference's
    ``setup_far_model``): ``far_patch_embedding`` starts as ``patch_embedding``'s kernels
    trilinearly resized to ``compressed_patch_size`` (no rescaling) with the bias copied.
    ``far_fields``: ``compressed_patch_size``, ``full_chunk_limit``, ``chunk_partition``.

    The resize runs on the devices holding ``patch_embedding``, so sharded (and multi-process)
    parameters work; ``shardings`` (``{"kernel": ..., "bias": ...}``) places the new leaves."""
    far_model = far_model_like(model, **far_fields)
    params = dict(params)
    pe = params["patch_embedding"]
    sh = shardings or {}
    resize = functools.partial(far.far_patch_kernel, patch_size=far_model.patch_size,
                               in_channels=far_model.in_channels,
                               compressed_patch_size=far_model.compressed_patch_size)
    kernel = jax.jit(resize, out_shardings=sh.get("kernel"))(pe["kernel"])
    bias = jax.jit(jnp.copy, out_shardings=sh.get("bias"))(pe["bias"])
    params["far_patch_embedding"] = {"kernel": kernel, "bias": bias}
    return far_model, params


def make_apply_fn(model: FarWanTransformer3D, **call_kwargs):
    """``u(params, z, t, r, context)`` of one FAR path (e.g. ``causal=False`` for the
    bidirectional branch), the form the losses take."""
    def apply_fn(params, z, t, r, context):
        return model.apply({"params": params}, z, t, r, context, **call_kwargs)
    return apply_fn


__all__ = ["FAR_CLASS_NAME", "FarKVCache", "FarSlotCache", "FarWanTransformer3D", "chunk_layout", "far_model_like",
           "is_far_config", "make_apply_fn", "make_far_model", "model_from_config"]
