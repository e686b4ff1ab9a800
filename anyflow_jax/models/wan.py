"""Wan2.1 text-to-video DiT in Flax Linen: the teacher/critic and the AnyFlow flow-map student.

The module mirrors diffusers' ``WanTransformer3DModel`` (v0.35) numerically; its constructor
fields carry the names of diffusers' ``config.json`` so a checkpoint's config builds the model
(:meth:`WanTransformer3D.from_config`). Two modes:

- teacher (``flow_map=False``): one time input, ``u = model(z_t, t)``; ``r`` is ignored, as in
  the reference's single-time embedder.
- flow map (``flow_map=True``): AnyFlow's two-time embedder. A ``delta_embedder`` (same MLP
  shape as ``time_embedder``) embeds ``r`` (``deltatime_type='r'``) or ``t - r``
  (``'t-r'``); the two embeddings are mixed with the fixed gate ``g = gate_value``:
  ``e = (1 - g) * e_t + g * e_delta``. The output is the average velocity, so the flow map is
  ``z_r = z_t - (t - r) * u``.

Public call: ``model.apply({'params': p}, latents, t, r, context)`` with latents
``(B, F, H, W, C)`` channels-last, ``t``/``r`` per-frame times ``(B, F)`` as tau in [0, 1]
(1 = noise; scaled by 1000 internally, as Wan does) and ``context`` ``(B, L, text_dim)``.
Returns the velocity ``(B, F, H, W, out_channels)`` in float32.

Precision: parameters are fp32; matmuls run in ``dtype`` (the compute dtype); layer norms,
RMS norms, the time embedding, the adaLN modulation and RoPE run in fp32.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from anyflow_jax import parallel
from anyflow_jax.models.attention import IMPLEMENTATIONS, dot_product_attention

# Keys of a diffusers / AnyFlow ``config.json`` that carry no meaning for the network itself.
_IGNORED_CONFIG_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "window_size", "add_img_emb",
    "init_flowmap_model", "compressed_patch_size", "full_chunk_limit", "chunk_partition",
})

# Remat policies selectable by name from a config (``model.remat_policy``).
REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attn_out": jax.checkpoint_policies.save_only_these_names("attn_out", "ffn_out"),
}


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by logical axis names (``parallel.DEFAULT_RULES``) on the mesh
    of the enclosing ``jax.set_mesh`` (the trainer's steps and the deviceless compiles run under
    one); outside a mesh it is the identity. Values are unchanged; without the constraints the
    partitioner may replicate activations that FSDP or tensor parallelism should split.

    Activation names: ``batch`` (data x fsdp), ``seq`` (tokens of the residual stream; tensor:
    sequence parallelism between the tensor-parallel attention and MLP), ``heads``/``mlp``
    (tensor, as the weights), ``act_embed``/``act_len``/``head_dim`` (replicated). A dimension its
    axes do not divide, or whose axes an earlier dimension took, stays replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = parallel.logical_to_spec(names, x.shape, mesh, parallel.DEFAULT_RULES)
    return jax.lax.with_sharding_constraint(x, spec)


RESIDUAL = ("batch", "seq", "act_embed")  # (B, L, D) between blocks
HEADS = ("batch", "act_len", "heads", "head_dim")  # (B, L, H, Dh) inside attention


def _dense_init(names):
    return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names)


def _zeros(names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class Dense(nn.Module):
    """A linear layer with logical axis names on kernel and bias.

    LoRA in the network (:func:`anyflow_jax.lora.network_apply`): when the ``lora`` variable
    collection holds an adapter (:class:`~anyflow_jax.lora.LoraWeights`) at this layer's
    ``kernel``, the kernel used is ``W + (alpha/r) A @ B``, merged here; inside the scanned blocks
    that is one layer's merged kernel at a time. Without one the layer is unchanged."""
    features: int
    names: tuple[str | None, str | None]
    dtype: Any = jnp.float32
    kernel_init: Any = None

    @nn.compact
    def __call__(self, x):
        kinit = self.kernel_init or nn.initializers.xavier_uniform()
        kernel = self.param("kernel", nn.with_logical_partitioning(kinit, self.names),
                            (x.shape[-1], self.features), jnp.float32)
        if self.has_variable("lora", "kernel"):
            kernel = kernel + self.get_variable("lora", "kernel").delta().astype(kernel.dtype)
        bias = self.param("bias", _zeros((self.names[1],)), (self.features,), jnp.float32)
        return _dense(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))


def _dense_flat(x, kernel):
    lead = x.shape[:-1]
    return jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(lead + (kernel.shape[-1],))


def _dense_nd(x, kernel):
    return jnp.einsum("...i,io->...o", x, kernel)


def _dense(x, kernel, bias):
    """``x @ kernel + bias`` over the last axis; the matmul's form depends on the platform the
    program is lowered for (``jax.lax.platform_dependent``; the values are the same):

    - CPU: one 2-D matmul on the flattened ``(tokens, features)`` view. Written as an einsum, the
      kernel's gradient is a dot contracting two axes (batch and tokens) that XLA:CPU lowers with
      a transposed copy of the output gradient and a slower matmul path; flattened it is a plain
      ``x^T @ dy`` (docs/benchmarks.md, issue 12).
    - TPU/GPU: ``einsum('...i,io->...o')``, which keeps the batch and token axes (and their
      shardings) apart: the flattened form cost the 14B teacher step on a v5p-64 slice (FSDP x
      tensor parallelism) 26.6 GiB per chip instead of 19.7 (docs/benchmarks.md)."""
    return jax.lax.platform_dependent(x, kernel, cpu=_dense_flat, default=_dense_nd) + bias


def _layer_norm(x, eps, scale=None, bias=None):
    """LayerNorm over the last axis in fp32 (diffusers' ``FP32LayerNorm``)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale + bias
    return y


class AffineLayerNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (d,), jnp.float32)
        bias = self.param("bias", _zeros(("norm",)), (d,), jnp.float32)
        return _layer_norm(x, self.eps, scale, bias)


class RMSNorm(nn.Module):
    """RMS norm over the whole last axis (Wan's q/k norm "across heads"), computed in fp32."""
    eps: float = 1e-6
    names: tuple[str | None] = ("heads",)

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), self.names),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


def timestep_sinusoid(t_model: jax.Array, dim: int) -> jax.Array:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: [cos | sin].

    ``t_model`` is in model units (0..1000); any shape; returns ``t_model.shape + (dim,)`` fp32.
    """
    half = dim // 2
    exponent = (-math.log(10000.0) * np.arange(half, dtype=np.float32)) / np.float32(half)
    freqs = jnp.exp(jnp.asarray(exponent, jnp.float32))
    args = t_model.astype(jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
    return emb


@functools.lru_cache(maxsize=64)
def rope_tables(head_dim: int, ppf: int, pph: int, ppw: int, max_seq_len: int,
                theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """3-D RoPE cos/sin tables ``(ppf*pph*ppw, head_dim // 2)`` as diffusers builds them.

    Built in float64 with NumPy at trace time (shapes are static), then cast to fp32, so no
    precision is lost to JAX's disabled x64. The head dim is split t : h : w with
    ``h = w = 2 * (head_dim // 6)`` when the tables are built, and sliced back with sizes
    ``[head_dim - 2 * (head_dim // 3), head_dim // 3, head_dim // 3]`` when they are applied,
    exactly as diffusers does. The two agree when ``head_dim // 3`` is even (Wan's 128 gives
    44 : 42 : 42); for other head dims diffusers' slicing straddles the t/h/w tables and we
    reproduce that bit for bit, since released checkpoints were trained with it.
    """
    if max(ppf, pph, ppw) > max_seq_len:
        raise ValueError(f"video grid {ppf}x{pph}x{ppw} (in patches) exceeds rope_max_seq_len={max_seq_len}")
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim
    cos_parts, sin_parts = [], []
    pos = np.arange(max_seq_len, dtype=np.float64)
    for d in (t_dim, h_dim, w_dim):
        inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        ang = np.outer(pos, inv)
        cos_parts.append(np.repeat(np.cos(ang), 2, axis=1).astype(np.float32))
        sin_parts.append(np.repeat(np.sin(ang), 2, axis=1).astype(np.float32))
    cos_full = np.concatenate(cos_parts, axis=1)
    sin_full = np.concatenate(sin_parts, axis=1)
    split = np.cumsum([head_dim - 2 * (head_dim // 3), head_dim // 3])

    def grid(table):
        tt, th, tw = np.split(table, split, axis=1)
        shape = (ppf, pph, ppw)
        parts = [np.broadcast_to(tt[:ppf, None, None], shape + (tt.shape[1],)),
                 np.broadcast_to(th[None, :pph, None], shape + (th.shape[1],)),
                 np.broadcast_to(tw[None, None, :ppw], shape + (tw.shape[1],))]
        return np.concatenate(parts, axis=-1).reshape(ppf * pph * ppw, head_dim)

    return grid(cos_full)[:, 0::2].copy(), grid(sin_full)[:, 1::2].copy()


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent channel pairs ``(x[2k], x[2k+1])``. x: (B, L, H, Dh); cos/sin: (L, Dh/2)."""
    x32 = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    x1, x2 = x32[..., 0], x32[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _modulate(x32, shift, scale, frames):
    """Per-frame adaLN on per-token activations: x (B, L, D), shift/scale (B, F', D)."""
    b, l, d = x32.shape
    x4 = x32.reshape(b, frames, l // frames, d)
    return (x4 * (1.0 + scale[:, :, None]) + shift[:, :, None]).reshape(b, l, d)


def _gate_product(y, gate, frames):
    b, l, d = y.shape
    y4 = y.astype(jnp.float32).reshape(b, frames, l // frames, d)
    return (y4 * gate[:, :, None]).reshape(b, l, d)


def _per_segment(fn, segments, x32, *per_frame):
    """``fn(x, *per_frame, frames)`` on each segment of the token axis and concatenated back.

    ``segments``: ``None`` (the whole sequence is ``frames = per_frame[0].shape[1]`` frames of
    equal token counts, the Wan layout) or static ``((frames, tokens_per_frame), ...)`` runs of
    frames with their own token counts (FAR: compressed context, full frames, clean copy), the
    per-frame arrays ``(B, sum(frames), D)`` holding the runs' frames in the same order. Per-token
    modulation without a ``(B, L, 6, D)`` broadcast."""
    if segments is None:
        return fn(x32, *per_frame, per_frame[0].shape[1])
    outs, f0, l0 = [], 0, 0
    for frames, tpf in segments:
        outs.append(fn(x32[:, l0:l0 + frames * tpf], *(a[:, f0:f0 + frames] for a in per_frame), frames))
        f0, l0 = f0 + frames, l0 + frames * tpf
    if l0 != x32.shape[1]:
        raise ValueError(f"segments {segments} cover {l0} tokens, the sequence has {x32.shape[1]}")
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _modulate_tokens(x32, shift, scale, segments):
    return _per_segment(_modulate, segments, x32, shift, scale)


def _gated_tokens(x32, y, gate, segments):
    return x32 + _per_segment(_gate_product, segments, y, gate)


class WanAttention(nn.Module):
    """Self- (with RoPE) or cross-attention with RMS q/k norm across heads.

    FAR extras (defaults keep the Wan network unchanged): ``mask`` (an
    :class:`~anyflow_jax.models.attention.AttentionMask` over (queries, keys), passed to the
    attention switch); ``kv_prefix`` (keys and values ``(B, Lp, H, Dh)`` of earlier tokens, before
    RoPE, put in front of this call's own: the KV cache); ``rope`` as ``(cos, sin)`` for queries
    and keys alike or ``(cos_q, sin_q, cos_k, sin_k)`` when the keys (cache + new) are longer than
    the queries; ``return_kv``: also return this call's own keys and values before RoPE;
    ``kv_valid``: a boolean ``(Lk,)`` array of the keys (cache + own) that may be attended (the
    padding of fixed-size caches whose valid lengths are traced)."""
    num_heads: int
    eps: float
    dtype: Any
    attention_impl: str
    mask: Any = None
    return_kv: bool = False

    @nn.compact
    def __call__(self, x, context=None, rope=None, kv_prefix=None, kv_valid=None):
        dim = x.shape[-1]
        kv_in = x if context is None else context
        q = Dense(dim, ("embed", "heads"), self.dtype, name="to_q")(x)
        k = Dense(dim, ("embed", "heads"), self.dtype, name="to_k")(kv_in)
        v = Dense(dim, ("embed", "heads"), self.dtype, name="to_v")(kv_in)
        q = RMSNorm(self.eps, name="norm_q")(q)
        k = RMSNorm(self.eps, name="norm_k")(k)
        b, lq, _ = q.shape
        hd = dim // self.num_heads
        q = constrain(q.reshape(b, lq, self.num_heads, hd), HEADS)
        k = constrain(k.reshape(b, k.shape[1], self.num_heads, hd), HEADS)
        v = constrain(v.reshape(b, v.shape[1], self.num_heads, hd), HEADS)
        own_kv = (k, v)
        if kv_prefix is not None:
            k = jnp.concatenate([kv_prefix[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([kv_prefix[1].astype(v.dtype), v], axis=1)
        if rope is not None:
            q_rope, k_rope = (rope, rope) if len(rope) == 2 else (rope[:2], rope[2:])
            q = constrain(apply_rope(q, *q_rope), HEADS)
            k = constrain(apply_rope(k, *k_rope), HEADS)
        out = constrain(dot_product_attention(q, k, v, implementation=self.attention_impl, mask=self.mask,
                                              kv_valid=kv_valid), HEADS)
        out = checkpoint_name(out.reshape(b, lq, dim), "attn_out")
        out = Dense(dim, ("heads", "embed"), self.dtype, name="to_out_0")(out)
        return (out, own_kv) if self.return_kv else out


class WanBlock(nn.Module):
    """One Wan transformer block (self-attn with adaLN + gate, cross-attn, FFN with adaLN + gate).

    FAR extras (defaults keep the Wan block): ``segments`` (per-token modulation over runs of
    frames with their own token counts, see :func:`_per_segment`), ``mask`` (self-attention
    mask), ``kv_prefix`` / ``return_kv`` (the KV cache, see :class:`WanAttention`); with
    ``return_kv`` the second output is the self-attention's own ``(k, v)`` before RoPE."""
    ffn_dim: int
    num_heads: int
    eps: float
    cross_attn_norm: bool
    dtype: Any
    attention_impl: str
    segments: tuple[tuple[int, int], ...] | None = None
    mask: Any = None
    return_kv: bool = False

    @nn.compact
    def __call__(self, x, context, mod, rope, kv_prefix=None, kv_valid=None):
        # x: (B, L, D) compute dtype; context: (B, Lc, D); mod: (B, F', 6, D) fp32.
        dim = x.shape[-1]
        seg = self.segments
        table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(lambda k, s, d: jax.random.normal(k, s, d) / math.sqrt(dim),
                                         (None, None, "norm")),
            (1, 6, dim), jnp.float32)
        m = table[None] + mod  # (B, F', 6, D) fp32
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (m[:, :, i] for i in range(6))

        x = constrain(x, RESIDUAL)
        h = _modulate_tokens(_layer_norm(x, self.eps), shift_msa, scale_msa, seg).astype(x.dtype)
        attn = WanAttention(self.num_heads, self.eps, self.dtype, self.attention_impl, mask=self.mask,
                            return_kv=self.return_kv, name="attn1")(h, rope=rope, kv_prefix=kv_prefix,
                                                                        kv_valid=kv_valid)
        own_kv = None
        if self.return_kv:
            attn, own_kv = attn
        x = constrain(_gated_tokens(x.astype(jnp.float32), attn, gate_msa, seg).astype(x.dtype), RESIDUAL)

        if self.cross_attn_norm:
            h = AffineLayerNorm(self.eps, name="norm2")(x).astype(x.dtype)
        else:
            h = x
        x = constrain(x + WanAttention(self.num_heads, self.eps, self.dtype, self.attention_impl, name="attn2")(h, context),
                      RESIDUAL)

        h = _modulate_tokens(_layer_norm(x, self.eps), c_shift, c_scale, seg).astype(x.dtype)
        ff = FeedForward(self.ffn_dim, self.dtype, name="ffn")(h)
        x = constrain(_gated_tokens(x.astype(jnp.float32), ff, c_gate, seg).astype(x.dtype), RESIDUAL)
        return x, own_kv


class FeedForward(nn.Module):
    """Linear(D -> ffn) -> GELU(tanh) -> Linear(ffn -> D) (diffusers ``ffn.net.0.proj`` / ``ffn.net.2``)."""
    ffn_dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        h = constrain(Dense(self.ffn_dim, ("embed", "mlp"), self.dtype, name="net_0")(x), ("batch", "act_len", "mlp"))
        h = Dense(x.shape[-1], ("mlp", "embed"), self.dtype, name="net_2")(jax.nn.gelu(h, approximate=True))
        return checkpoint_name(h, "ffn_out")


class TimeEmbedding(nn.Module):
    """Linear(freq -> D) -> SiLU -> Linear(D -> D), fp32 (diffusers ``TimestepEmbedding``)."""
    dim: int

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.02)
        x = Dense(self.dim, ("freq", "mlp"), jnp.float32, init, name="linear_1")(x)
        return Dense(self.dim, ("mlp", "embed"), jnp.float32, init, name="linear_2")(nn.silu(x))


class ConditionEmbedder(nn.Module):
    """Time (one or two inputs) and text embedding (diffusers ``WanTimeTextImageEmbedding``,
    AnyFlow's ``WanTwoTimeTextImageEmbedding`` when ``flow_map``)."""
    dim: int
    freq_dim: int
    flow_map: bool
    gate_value: float
    deltatime_type: str
    dtype: Any

    @nn.compact
    def __call__(self, t_model, r_model, context):
        e = TimeEmbedding(self.dim, name="time_embedder")(timestep_sinusoid(t_model, self.freq_dim))
        if self.flow_map:
            second = r_model if self.deltatime_type == "r" else t_model - r_model
            e_delta = TimeEmbedding(self.dim, name="delta_embedder")(timestep_sinusoid(second, self.freq_dim))
            # (1 - g) * e_t + g * e_delta, written so that e_delta == e_t gives e_t exactly
            # (bit-for-bit teacher equivalence on the diagonal r = t).
            e = e + self.gate_value * (e_delta - e)
        mod = Dense(6 * self.dim, ("embed", "mod"), jnp.float32, name="time_proj")(nn.silu(e))
        c = TextProjection(self.dim, self.dtype, name="text_embedder")(context)
        return e, mod.reshape(mod.shape[:-1] + (6, self.dim)), c


class TextProjection(nn.Module):
    """Linear(text_dim -> D) -> GELU(tanh) -> Linear(D -> D) (diffusers ``PixArtAlphaTextProjection``)."""
    dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        # Deviation from Wan's init (N(0, 0.02) for the text embedder): xavier-uniform, so that a
        # small text_dim (the toy's 32-d class embeddings) is not scaled to near zero at the start
        # and conditioning is learned. Only matters for models trained from scratch.
        x = Dense(self.dim, ("text_embed", "mlp"), self.dtype, name="linear_1")(x)
        return Dense(self.dim, ("mlp", "embed"), self.dtype, name="linear_2")(jax.nn.gelu(x, approximate=True))


class WanTransformer3D(nn.Module):
    """Wan2.1 T2V DiT. Fields before ``flow_map`` are diffusers ``config.json`` names."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    # AnyFlow flow-map fields (``config.json`` of released AnyFlow checkpoints).
    flow_map: bool = False
    gate_value: float = 0.25
    deltatime_type: str = "r"
    # Runtime settings (not part of a checkpoint).
    dtype: Any = jnp.float32
    attention_impl: str = "xla"
    scan_layers: bool = True
    remat_policy: str = "none"

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "WanTransformer3D":
        """Build from a diffusers / AnyFlow ``config.json`` dict; ``overrides`` win."""
        cfg = dict(config)
        if cfg.get("init_far_model"):
            raise ValueError("FAR (chunk-causal) checkpoints (init_far_model=true) are not supported yet by the "
                             "bidirectional WanTransformer3D; build anyflow_jax.models.far_wan.FarWanTransformer3D")
        cfg.pop("init_far_model", None)
        fields = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name")}
        unknown = sorted(k for k in cfg if k not in fields and k not in _IGNORED_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown Wan transformer config keys: {unknown}")
        kwargs = {k: v for k, v in cfg.items() if k in fields}
        if "gate_value" in cfg or "deltatime_type" in cfg:
            kwargs.setdefault("flow_map", True)
        kwargs.update(overrides)
        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(int(p) for p in kwargs["patch_size"])
        model = cls(**kwargs)
        model.validate()
        return model

    def to_config(self) -> dict[str, Any]:
        """The diffusers ``config.json`` content (plus AnyFlow's fields in flow-map mode)."""
        cfg = {
            "_class_name": "WanTransformer3DModel",
            "_diffusers_version": "0.35.1",
            "patch_size": list(self.patch_size),
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": self.qk_norm,
            "eps": self.eps,
            "image_dim": self.image_dim,
            "added_kv_proj_dim": self.added_kv_proj_dim,
            "rope_max_seq_len": self.rope_max_seq_len,
            "pos_embed_seq_len": self.pos_embed_seq_len,
        }
        if self.flow_map:
            cfg.update(gate_value=self.gate_value, deltatime_type=self.deltatime_type,
                       init_flowmap_model=True)
        return cfg

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    def validate(self) -> None:
        """Fail early, naming the field, on settings this implementation does not support."""
        if self.image_dim is not None or self.added_kv_proj_dim is not None or self.pos_embed_seq_len is not None:
            raise ValueError("image conditioning (image_dim / added_kv_proj_dim / pos_embed_seq_len) "
                             "is Wan I2V; only the text-to-video transformer is supported")
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm={self.qk_norm!r} is not supported (Wan uses 'rms_norm_across_heads')")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even for RoPE, got {self.attention_head_dim}")
        if self.deltatime_type not in ("r", "t-r"):
            raise ValueError(f"deltatime_type must be 'r' or 't-r', got {self.deltatime_type!r}")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {self.attention_impl!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")

    def dummy_inputs(self, batch: int = 1):
        """Smallest valid inputs (for ``init`` / ``eval_shape``)."""
        pt, ph, pw = self.patch_size
        latents = jnp.zeros((batch, pt, ph, pw, self.in_channels), jnp.float32)
        t = jnp.zeros((batch, pt), jnp.float32)
        context = jnp.zeros((batch, 1, self.text_dim), jnp.float32)
        return latents, t, t, context

    def init_params(self, rng: jax.Array, boxed: bool = False):
        """Random parameters (Wan-style init: xavier linears, zero biases and zero output head)."""
        # one compiled program (eager init dispatches every op of a forward pass one by one)
        params = jax.jit(lambda k: self.init(k, *self.dummy_inputs())["params"])(rng)
        return params if boxed else nn.meta.unbox(params)

    def abstract_params(self):
        """Shapes/dtypes of the parameters with their logical-axis metadata (no computation)."""
        return jax.eval_shape(lambda k: self.init(k, *self.dummy_inputs())["params"], jax.random.key(0))

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, latents, t, r, context):
        if latents.ndim != 5:
            raise ValueError(f"latents must be (B, F, H, W, C); got shape {latents.shape}")
        b, f, h, w, c = latents.shape
        if c != self.in_channels:
            raise ValueError(f"latents have {c} channels, the model expects in_channels={self.in_channels}")
        pt, ph, pw = self.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent shape (F, H, W)=({f}, {h}, {w}) is not divisible by patch_size={self.patch_size}")

        def norm_time(x, name):
            x = jnp.asarray(x, jnp.float32)
            if x.ndim == 0:
                x = jnp.broadcast_to(x, (b, f))
            elif x.ndim == 1:
                if x.shape[0] != b:
                    raise ValueError(f"{name} has shape {x.shape}; expected (B, F)=({b}, {f}) or (B,)")
                x = jnp.broadcast_to(x[:, None], (b, f))
            elif x.shape != (b, f):
                raise ValueError(f"{name} has shape {x.shape}; expected per-frame times (B, F)=({b}, {f})")
            return x

        t = norm_time(t, "t")
        if self.flow_map:
            if r is None:
                raise ValueError("flow-map model needs the target time r (B, F); got r=None")
            r = norm_time(r, "r")
        if context.ndim != 3 or context.shape[-1] != self.text_dim:
            raise ValueError(f"context must be (B, L, text_dim={self.text_dim}); got shape {context.shape}")
        if context.shape[0] not in (1, b):
            raise ValueError(f"context batch {context.shape[0]} does not match latents batch {b}")
        context = jnp.broadcast_to(context, (b,) + context.shape[1:])
        return t, r, context

    @nn.compact
    def __call__(self, latents, t, r=None, context=None):
        self.validate()
        if context is None:
            raise ValueError("context (text embeddings, (B, L, text_dim)) is required")
        t, r, context = self._check_inputs(latents, t, r, context)
        b, f, h, w, c = latents.shape
        pt, ph, pw = self.patch_size
        fp, hp, wp = f // pt, h // ph, w // pw
        dim = self.inner_dim

        # Patch embedding: a Conv3d with kernel = stride = patch_size, as a per-patch Dense.
        x = patchify(latents, self.patch_size)
        x = constrain(Dense(dim, ("patch", "embed"), self.dtype, name="patch_embedding")(x), RESIDUAL)

        # Per-frame time embedding (one time per temporal patch) and text projection.
        t_model = t[:, ::pt] * 1000.0
        r_model = None if r is None else r[:, ::pt] * 1000.0
        temb, mod, ctx = ConditionEmbedder(dim, self.freq_dim, self.flow_map, self.gate_value,
                                           self.deltatime_type, self.dtype,
                                           name="condition_embedder")(t_model, r_model, context)
        ctx = constrain(ctx, ("batch", "act_len", "act_embed"))
        cos, sin = rope_tables(self.attention_head_dim, fp, hp, wp, self.rope_max_seq_len)
        rope = (jnp.asarray(cos), jnp.asarray(sin))

        x, _ = run_blocks(self, x, ctx, mod, rope)

        # Output head: adaLN from the top-level table and temb, then project and unpatchify.
        x = output_head(self, x, temb)
        return unpatchify(x, (b, f, h, w, self.out_dim), self.patch_size)


# ------------------------------------------------------------------------------ shared pieces
# The FAR network (models/far_wan.py) builds its forward from these same pieces and blocks; each
# takes the calling module (a WanTransformer3D or subclass, inside its compact ``__call__``) so
# the parameters they create keep the Wan names.
def patchify(latents: jax.Array, patch_size) -> jax.Array:
    """``(B, F, H, W, C)`` -> ``(B, F' * H' * W', pt * ph * pw * C)`` tokens in (frame, row, col)
    order, each patch's values ordered (pt, ph, pw, C): a Conv3d with kernel = stride =
    ``patch_size`` is then one Dense."""
    b, f, h, w, c = latents.shape
    pt, ph, pw = patch_size
    fp, hp, wp = f // pt, h // ph, w // pw
    x = latents.reshape(b, fp, pt, hp, ph, wp, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, fp * hp * wp, pt * ph * pw * c)


def unpatchify(x: jax.Array, shape, patch_size) -> jax.Array:
    """The inverse layout of :func:`patchify` for the output head: tokens ``(B, L, pt*ph*pw*C)``
    (channels (pt, ph, pw, C), C fastest) -> ``shape = (B, F, H, W, C)`` in float32."""
    b, f, h, w, out_c = shape
    pt, ph, pw = patch_size
    fp, hp, wp = f // pt, h // ph, w // pw
    x = x.reshape(b, fp, hp, wp, pt, ph, pw, out_c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, f, h, w, out_c).astype(jnp.float32)


def run_blocks(module: "WanTransformer3D", x, ctx, mod, rope, *, segments=None, mask=None, kv_prefix=None,
               return_kv: bool = False, kv_valid=None):
    """The ``num_layers`` Wan blocks of ``module`` (scanned or unrolled, rematerialised by its
    policy) as its submodules ``blocks`` / ``blocks_<i>``. Returns ``(x, kv)``: ``kv`` is ``None``
    unless ``return_kv`` (then each layer's self-attention ``(k, v)`` before RoPE, stacked on a
    leading layer axis). ``kv_prefix``: per-layer cached ``(k, v)`` stacked the same way;
    ``kv_valid``: the self-attention keys (prefix + own) that may be attended, every layer."""
    block = WanBlock
    policy_name = module.remat_policy
    if policy_name != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[policy_name], prevent_cse=not module.scan_layers)
    kwargs = dict(ffn_dim=module.ffn_dim, num_heads=module.num_attention_heads, eps=module.eps,
                  cross_attn_norm=module.cross_attn_norm, dtype=module.dtype,
                  attention_impl=module.attention_impl)
    if segments is not None or mask is not None or return_kv:
        kwargs.update(segments=segments, mask=mask, return_kv=return_kv)
    args = (x, ctx, mod, rope) + (() if kv_prefix is None and kv_valid is None else (kv_prefix,))
    args += () if kv_valid is None else (kv_valid,)
    if module.scan_layers:
        in_axes = (nn.broadcast, nn.broadcast, nn.broadcast)
        in_axes += () if len(args) == 4 else ((nn.broadcast if kv_prefix is None else 0),)
        in_axes += () if kv_valid is None else (nn.broadcast,)
        blocks = nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                         in_axes=in_axes, length=module.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})(**kwargs, name="blocks")
        return blocks(*args)
    kvs = []
    for i in range(module.num_layers):
        layer_prefix = () if kv_prefix is None else (jax.tree.map(lambda a, i=i: a[i], kv_prefix),)
        if kv_valid is not None:
            layer_prefix = (layer_prefix[0] if layer_prefix else None, kv_valid)
        x, kv = block(**kwargs, name=f"blocks_{i}")(x, ctx, mod, rope, *layer_prefix)
        kvs.append(kv)
    if not return_kv:
        return x, None
    return x, jax.tree.map(lambda *a: jnp.stack(a), *kvs)


def output_head(module: "WanTransformer3D", x, temb, segments=None):
    """adaLN from the top-level ``scale_shift_table`` and the per-frame ``temb`` (B, F', D), then
    ``proj_out``: ``(B, L, D)`` -> ``(B, L, pt*ph*pw*out)`` in the compute dtype."""
    dim = module.inner_dim
    pt, ph, pw = module.patch_size
    table = module.param(
        "scale_shift_table",
        nn.with_logical_partitioning(lambda k, s, d: jax.random.normal(k, s, d) / math.sqrt(dim),
                                     (None, None, "norm")),
        (1, 2, dim), jnp.float32)
    x = constrain(x, RESIDUAL)
    ss = table[None] + temb[:, :, None, :]  # (B, F', 2, D)
    x = _modulate_tokens(_layer_norm(x, module.eps), ss[:, :, 0], ss[:, :, 1], segments).astype(module.dtype)
    return Dense(pt * ph * pw * module.out_dim, ("embed", "patch_out"), module.dtype,
                 nn.initializers.zeros_init(), name="proj_out")(x)


def make_apply_fn(model: WanTransformer3D):
    """The pure ``u(params, z, t, r, context)`` function the losses take. Keyword arguments go to
    the module's call (a FAR network's ``clean=`` / ``causal=``, used by its stage's adapter)."""
    def apply_fn(params, z, t, r, context, **kwargs):
        return model.apply({"params": params}, z, t, r, context, **kwargs)
    return apply_fn


# ------------------------------------------------------------------------------ model surgery
def make_flow_map_student(model: WanTransformer3D, params, *, gate_value: float = 0.25,
                          deltatime_type: str = "r") -> tuple[WanTransformer3D, Any]:
    """A teacher as a new flow-map student: the delta embedder starts as a copy of the time
    embedder (the reference's ``setup_flowmap_model``), so the student equals the teacher on the
    diagonal r = t."""
    if model.flow_map:
        return model, params
    student = model.clone(flow_map=True, gate_value=gate_value, deltatime_type=deltatime_type)
    params = dict(params)
    ce = dict(params["condition_embedder"])
    ce["delta_embedder"] = jax.tree_util.tree_map(jnp.copy, ce["time_embedder"])
    params["condition_embedder"] = ce
    return student, params
