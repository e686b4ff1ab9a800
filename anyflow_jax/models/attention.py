"""One attention entry point with a named implementation switch.

Every attention call in the networks goes through :func:`dot_product_attention`, so switching
kernels is a config change (``model.attention_impl``):

- ``"xla"`` (default): plain einsum + softmax in fp32 logits. Runs everywhere, supports
  forward-mode AD (``jax.jvp``), which the exact-derivative stage-1 loss needs.
- ``"jax"``: ``jax.nn.dot_product_attention`` with ``implementation=None`` (XLA's fused
  attention where available).
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` - flash attention on
  NVIDIA GPUs (bf16/fp16 inputs). Reverse-mode only (no ``jax.jvp``).
- ``"splash"``: reserved for the TPU splash kernel (``jax.experimental.pallas.ops.tpu``);
  see :func:`_splash_attention`.

Shapes follow ``jax.nn.dot_product_attention``: q ``(B, Lq, H, Dh)``, k/v ``(B, Lk, H, Dh)``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "jax", "cudnn", "splash")


def _xla_attention(q, k, v, scale):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * scale, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _splash_attention(q, k, v, scale):
    # Place for the TPU splash kernel: pad Lq/Lk to the kernel's block multiple, transpose to
    # (B, H, L, Dh), call `splash_attention_kernel.make_splash_mha` under `jax.shard_map` over
    # the batch/head mesh axes, and trim the padding. Not wired up yet: no TPU to test it on.
    raise NotImplementedError(
        "attention_impl='splash' (TPU splash kernel) is not implemented yet; "
        "use attention_impl='xla' or 'jax' on TPU for now")


def dot_product_attention(q, k, v, *, implementation: str = "xla", scale: float | None = None):
    """Scaled dot-product attention without masking (all Wan attention is unmasked).

    Args:
      q: ``(B, Lq, H, Dh)``; k, v: ``(B, Lk, H, Dh)``.
      implementation: one of ``IMPLEMENTATIONS``.
      scale: logit scale, default ``1/sqrt(Dh)``.
    Returns:
      ``(B, Lq, H, Dh)`` in q's dtype.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects 4-D q/k/v (B, L, H, Dh); got {q.shape}, {k.shape}, {v.shape}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if implementation == "xla":
        return _xla_attention(q, k, v, scale)
    if implementation == "jax":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=None)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    if implementation == "splash":
        return _splash_attention(q, k, v, scale)
    raise ValueError(
        f"unknown attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
