"""The UMT5 text encoder (Wan2.1's prompt encoder) in Flax Linen.

Numerically this is the encoder stack of transformers' ``UMT5EncoderModel`` (v4.57): its
``last_hidden_state`` for ``(input_ids, attention_mask)``. The constructor fields carry the names
of the transformers ``config.json`` (:meth:`UMT5Encoder.from_config` builds the module from one);
the defaults are google/umt5-xxl, the encoder Wan2.1 uses (5.7B parameters).

What the stack does, per layer (pre-norm residual blocks)::

    x = x + SelfAttention(RMSNorm(x))        # T5 attention: no 1/sqrt(d_kv) logit scaling,
                                             # a learned relative position bias in EVERY layer
    x = x + FFN(RMSNorm(x))                  # gated: act(x W_i0) * (x W_i1) W_o
    out = RMSNorm_final(x)

UMT5 differs from T5 in one place: T5 learns the relative position bias in the first layer only
and reuses it; UMT5 has a ``relative_attention_bias`` table in every layer. The encoder's
position buckets are bidirectional (half the buckets for keys to the right).

Precision. Parameters are ``param_dtype`` (fp32 by default); the residual stream and every RMS
norm are fp32; the q/k/v/o and FFN matmuls run in the compute ``dtype``; attention logits,
position bias, padding mask and softmax are fp32. In fp32 the result equals transformers' to float
rounding. In bf16 it is more precise than transformers' bf16, whose residual stream and norms
are bf16 too (a deliberate deviation: the design keeps norms and residuals in fp32). ``wo`` (the
FFN output projection) follows transformers' ``_keep_in_fp32_modules = ["wo"]``: fp32 only when
the compute dtype is fp16 (transformers 4.57 keeps it fp32 for fp16 loads, not for bf16);
``keep_wo_fp32=True/False`` forces it. transformers' fp16 ``clamp`` of inf activations is not
reproduced: our residual stream is fp32, where it never triggers. The output is returned in the
compute dtype, like transformers' ``last_hidden_state``.

Parameters carry logical axis names from :mod:`anyflow_jax.parallel`'s rule table (the same names
as the Wan DiT, so the XXL encoder shards over the same mesh): ``("embed", "heads")`` for q/k/v,
``("heads", "embed")`` for o, ``("embed", "mlp")`` / ``("mlp", "embed")`` for the FFN,
``(None, "heads")`` for the relative-bias tables (buckets x heads), ``(None, "embed")`` for the
token embedding (vocab x d_model: the vocabulary axis stays unsharded, d_model follows FSDP) and
``("norm",)`` for the norm scales. With ``scan_layers`` the layers are one ``nn.scan`` (compile
time independent of depth) and get a leading ``"layers"`` axis.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# ``dense_act_fn`` values (transformers' ACT2FN names) -> JAX functions.
ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # tanh approximation
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact (erf)
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# Keys of a transformers UMT5 ``config.json`` that this module reads; everything else (dropout,
# decoder settings, token ids, initializer factors, bookkeeping) has no effect on the encoder's
# inference output.
_CONFIG_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance",
                  "layer_norm_epsilon")


def _act_from_feed_forward_proj(proj: str) -> tuple[str, bool]:
    """``(dense_act_fn, is_gated_act)`` from ``feed_forward_proj``, as ``UMT5Config`` derives them."""
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj={proj!r} is not 'gated-<act>' or '<act>'")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return act, parts[0] == "gated"


@functools.lru_cache(maxsize=32)
def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """Bidirectional T5 relative-position buckets ``(query_length, key_length)`` int32.

    Bucket of ``key_pos - query_pos``: half the buckets for keys to the right; in each half, exact
    buckets for distances below ``num_buckets // 4`` and logarithmic ones up to ``max_distance``
    (everything further shares the last bucket). Computed with NumPy at trace time (shapes are
    static) using the same float32 operations as transformers, so bucket boundaries agree.
    """
    half = num_buckets // 2
    max_exact = half // 2
    rel = np.arange(-(query_length - 1), key_length, dtype=np.int64)  # every key - query offset
    bucket = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    # float32 like torch: log(d / max_exact) / log(max_distance / max_exact) * (half - max_exact),
    # truncated toward zero; d = 0 (log of 0) only occurs where the exact branch is taken.
    d32 = np.maximum(dist, 1).astype(np.float32)
    ratio = np.log(d32 / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (ratio * np.float32(half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    bucket += np.where(dist < max_exact, dist, large)
    # table[i, j] = bucket[(j - i) + (query_length - 1)]
    idx = np.arange(key_length)[None, :] - np.arange(query_length)[:, None] + (query_length - 1)
    return bucket[idx].astype(np.int32)


def _rms_norm(x, scale, eps):
    """T5 layer norm: scale * x / sqrt(mean(x^2) + eps), no mean subtraction, no bias; fp32."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return scale.astype(jnp.float32) * (x32 * jax.lax.rsqrt(var + eps))


class T5LayerNorm(nn.Module):
    """RMS layer norm with a learned scale (transformers' ``UMT5LayerNorm``); fp32 output."""
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        return _rms_norm(x, scale, self.eps)


class Linear(nn.Module):
    """A bias-free linear layer (T5 has no biases) with logical axis names on the kernel.

    ``dtype`` is the matmul dtype: input and kernel are cast to it, the product comes back in it.
    """
    features: int
    names: tuple[str | None, str | None]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    stddev: float = 0.02

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.stddev), self.names),
                            (x.shape[-1], self.features), self.param_dtype)
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))


class UMT5Attention(nn.Module):
    """T5 self-attention with this layer's own relative position bias (no logit scaling)."""
    num_heads: int
    d_kv: int
    num_buckets: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask_bias, buckets):
        # x: (B, L, D) compute dtype; mask_bias: (B, 1, 1, L) fp32; buckets: (L, L) int32.
        b, l, d = x.shape
        inner = self.num_heads * self.d_kv
        lin = functools.partial(Linear, dtype=self.dtype, param_dtype=self.param_dtype)
        q = lin(inner, ("embed", "heads"), name="q")(x).reshape(b, l, self.num_heads, self.d_kv)
        k = lin(inner, ("embed", "heads"), name="k")(x).reshape(b, l, self.num_heads, self.d_kv)
        v = lin(inner, ("embed", "heads"), name="v")(x).reshape(b, l, self.num_heads, self.d_kv)
        table = self.param("relative_attention_bias",
                           nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "heads")),
                           (self.num_buckets, self.num_heads), self.param_dtype)
        position_bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # (L, L, H)
        position_bias = position_bias.transpose(2, 0, 1)[None]  # (1, H, L, L)
        # transformers adds the padding mask to the position bias, then the sum to the logits
        bias = position_bias + mask_bias
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits + bias, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v.astype(self.dtype),
                         preferred_element_type=jnp.float32)
        out = out.astype(self.dtype).reshape(b, l, inner)
        return lin(d, ("heads", "embed"), name="o")(out)


class UMT5FeedForward(nn.Module):
    """Gated (``wi_0``, ``wi_1``) or plain (``wi``) feed-forward, output projection ``wo``."""
    d_ff: int
    act: str
    gated: bool
    dtype: Any
    param_dtype: Any
    keep_wo_fp32: bool | None

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        lin = functools.partial(Linear, dtype=self.dtype, param_dtype=self.param_dtype)
        fn = ACTIVATIONS[self.act]
        if self.gated:
            h = fn(lin(self.d_ff, ("embed", "mlp"), name="wi_0")(x)) * lin(self.d_ff, ("embed", "mlp"), name="wi_1")(x)
        else:
            h = fn(lin(self.d_ff, ("embed", "mlp"), name="wi")(x))
        keep = self.keep_wo_fp32
        if keep is None:  # transformers: _keep_in_fp32_modules = ["wo"], applied to fp16 loads
            keep = jnp.dtype(self.dtype) == jnp.dtype(jnp.float16)
        wo_dtype = jnp.float32 if keep else self.dtype
        return Linear(d, ("mlp", "embed"), wo_dtype, self.param_dtype, name="wo")(h)


class UMT5Layer(nn.Module):
    """One encoder layer: pre-norm self-attention and pre-norm FFN, fp32 residual stream."""
    num_heads: int
    d_kv: int
    d_ff: int
    num_buckets: int
    act: str
    gated: bool
    eps: float
    dtype: Any
    param_dtype: Any
    keep_wo_fp32: bool | None

    @nn.compact
    def __call__(self, x, mask_bias, buckets):
        # x: (B, L, D) fp32
        h = T5LayerNorm(self.eps, self.param_dtype, name="attn_norm")(x).astype(self.dtype)
        a = UMT5Attention(self.num_heads, self.d_kv, self.num_buckets, self.dtype, self.param_dtype,
                          name="attn")(h, mask_bias, buckets)
        x = x + a.astype(jnp.float32)
        h = T5LayerNorm(self.eps, self.param_dtype, name="ffn_norm")(x).astype(self.dtype)
        f = UMT5FeedForward(self.d_ff, self.act, self.gated, self.dtype, self.param_dtype,
                            self.keep_wo_fp32, name="ffn")(h)
        return x + f.astype(jnp.float32), None


class UMT5Encoder(nn.Module):
    """UMT5 encoder stack: ``apply({'params': p}, input_ids, attention_mask) -> last_hidden_state``.

    Fields before ``dtype`` are transformers ``config.json`` names (``dense_act_fn`` and
    ``is_gated_act`` are derived from ``feed_forward_proj`` the way ``UMT5Config`` does when a
    config lacks them); defaults are google/umt5-xxl.
    """
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True
    layer_norm_epsilon: float = 1e-6
    # Runtime settings (not part of a checkpoint).
    dtype: Any = jnp.float32  # compute dtype of the matmuls (and of the output)
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    keep_wo_fp32: bool | None = None  # None: fp32 ``wo`` only for fp16 compute, as transformers

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "UMT5Encoder":
        """Build from a transformers UMT5 ``config.json`` dict; ``overrides`` (runtime fields,
        or config fields) win."""
        cfg = dict(config)
        model_type = cfg.get("model_type")
        if model_type != "umt5":
            hint = (" (T5/mT5 share the relative position bias of layer 0 across layers; only UMT5, "
                    "which has one per layer, is implemented)") if model_type in ("t5", "mt5") else ""
            raise ValueError(f"model_type={model_type!r} is not a UMT5 encoder{hint}")
        missing = [k for k in _CONFIG_FIELDS if k not in cfg and k not in overrides]
        if missing:
            raise ValueError(f"UMT5 config lacks {missing}")
        kwargs = {k: cfg[k] for k in _CONFIG_FIELDS if k in cfg}
        act, gated = _act_from_feed_forward_proj(cfg.get("feed_forward_proj", "gated-gelu"))
        # like UMT5Config: values saved in config.json win over the ones derived here
        kwargs["dense_act_fn"] = cfg.get("dense_act_fn") or act
        kwargs["is_gated_act"] = bool(cfg.get("is_gated_act", gated))
        kwargs.update(overrides)
        for key in ("dtype", "param_dtype"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = jnp.dtype(kwargs[key])
        model = cls(**kwargs)
        model.validate()
        return model

    def validate(self) -> None:
        """Fail early, naming the field, on settings this implementation does not support."""
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"dense_act_fn={self.dense_act_fn!r} is not supported (known: {sorted(ACTIVATIONS)})")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be at least 4 "
                             f"(bidirectional exact + log buckets), got {self.relative_attention_num_buckets}")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError("relative_attention_max_distance must exceed relative_attention_num_buckets // 4, "
                             f"got {self.relative_attention_max_distance}")

    def dummy_inputs(self, batch: int = 1, length: int = 1):
        ids = jnp.zeros((batch, length), jnp.int32)
        return ids, jnp.ones((batch, length), jnp.int32)

    def init_params(self, rng: jax.Array, boxed: bool = False):
        """Random parameters (only for tests and shapes; real weights come from a checkpoint)."""
        # one compiled program (eager init dispatches every op of a forward pass one by one)
        params = jax.jit(lambda k: self.init(k, *self.dummy_inputs())["params"])(rng)
        return params if boxed else nn.meta.unbox(params)

    def abstract_params(self):
        """Shapes/dtypes of the parameters with their logical-axis metadata (no computation)."""
        return jax.eval_shape(lambda k: self.init(k, *self.dummy_inputs())["params"], jax.random.key(0))

    # ------------------------------------------------------------------ forward
    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """``input_ids`` (B, L) int, ``attention_mask`` (B, L) int/bool (1 = token, 0 = padding;
        None = all tokens) -> ``last_hidden_state`` (B, L, d_model) in the compute dtype."""
        self.validate()
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L); got shape {input_ids.shape}")
        b, l = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, l), jnp.int32)
        if attention_mask.shape != (b, l):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected {(b, l)} like input_ids")

        embedding = self.param("embed_tokens",
                               nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
                               (self.vocab_size, self.d_model), self.param_dtype)
        x = jnp.take(embedding, input_ids.astype(jnp.int32), axis=0).astype(jnp.float32)

        # transformers: (1 - mask) * finfo(dtype).min added to the position bias (fp32 here)
        keep = attention_mask.astype(jnp.float32)[:, None, None, :]
        mask_bias = (1.0 - keep) * jnp.finfo(jnp.float32).min
        buckets = jnp.asarray(relative_position_buckets(
            l, l, self.relative_attention_num_buckets, self.relative_attention_max_distance))

        kwargs = dict(num_heads=self.num_heads, d_kv=self.d_kv, d_ff=self.d_ff,
                      num_buckets=self.relative_attention_num_buckets, act=self.dense_act_fn,
                      gated=self.is_gated_act, eps=self.layer_norm_epsilon, dtype=self.dtype,
                      param_dtype=self.param_dtype, keep_wo_fp32=self.keep_wo_fp32)
        if self.scan_layers:
            layers = nn.scan(UMT5Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})(**kwargs, name="layers")
            x, _ = layers(x, mask_bias, buckets)
        else:
            for i in range(self.num_layers):
                x, _ = UMT5Layer(**kwargs, name=f"layers_{i}")(x, mask_bias, buckets)
        x = T5LayerNorm(self.layer_norm_epsilon, self.param_dtype, name="final_layer_norm")(x)
        return x.astype(self.dtype)
