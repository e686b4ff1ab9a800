"""The Wan video VAE (diffusers ``AutoencoderKLWan``, v0.35) in Flax Linen, channels-last.

Layout: videos are ``(B, F, H, W, 3)`` in [-1, 1] and latents ``(B, f, h, w, z_dim)``, with
``F = 1 + 4 (f - 1)`` and ``H = 8 h``, ``W = 8 w`` for Wan2.1 (``dim_mult`` of length 4, two
temporal downsamplings).

What equals what in diffusers:

- :meth:`WanVAE.encode` is ``vae.encode(x).latent_dist.mean`` (un-normalised; see
  :func:`normalize_latents`), :meth:`WanVAE.encode_moments` also returns the clamped
  ``latent_dist.logvar``;
- :meth:`WanVAE.decode` is ``vae.decode(z).sample`` (clamped to [-1, 1]); with ``tile=...`` it
  is diffusers' tiled decode (``enable_tiling``) followed by the clamp;
- :func:`denormalize_latents` is what ``WanPipeline`` applies to the latents before decoding.

Temporal processing. Every 3-D convolution is causal in time (two frames of zero padding at
the start of the video). diffusers runs the encoder on the first frame and then on chunks of 4
frames, and the decoder one latent frame at a time, carrying the last ``CACHE_T = 2`` input frames
of every causal convolution from one chunk to the next (``feat_cache``). Here the same cache is
an explicit pytree, always holding 2 frames (zeros before the video starts, which is exactly
the causal zero padding), so every chunk after the first has one shape and the chunks run under
``jax.lax.scan`` (``nn.scan``): memory is bounded by one chunk's activations, not by the video
length. The first chunk runs on its own because two layers treat it differently:

- the decoder's temporal upsampler (``upsample3d``) skips its time convolution on the first chunk
  (diffusers' ``"Rep"`` marker: the first latent frame becomes one video frame, every later one
  four) and starts the following chunks from a zero cache;
- the encoder's temporal downsampler (``downsample3d``) passes the first frame through and keeps
  it as the cache for the strided time convolution of the next chunk.

``chunk`` (latent frames per scan step after the first frame; default 1 = diffusers' schedule)
trades memory for fewer, larger steps; ``chunk=None`` processes all remaining frames at once
(no scan). All settings give the same numbers up to float rounding.

Precision: parameters are fp32; convolutions and attention run in ``dtype``; RMS norms and the
attention softmax in fp32; outputs are fp32.

The Wan2.2 layout (``is_residual=True`` with its average-pool / duplicate shortcuts and
``patch_size=2`` patchification) is implemented too, following diffusers 0.35.1.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.models.attention import IMPLEMENTATIONS, dot_product_attention

CACHE_T = 2  # frames of input kept per causal convolution between chunks (kernel size 3 - 1)

# Wan2.1's latent statistics (diffusers' defaults for AutoencoderKLWan).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Logical axis names of the VAE's parameters and their (replicated) sharding rules. The VAE is
# small (~127M parameters for Wan2.1) and its activations, not its weights, dominate memory,
# so its weights stay replicated. ``anyflow_jax.parallel.DEFAULT_RULES`` includes these rules;
# the tuple is kept for callers that build their own rule sets.
VAE_LOGICAL_RULES = (("conv_in", None), ("conv_out", None), ("norm", None))

# config.json keys that carry no meaning for the network.
_IGNORED_CONFIG_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path",
                                  "_use_default_values", "dropout"})


def _conv_init(names):
    # PyTorch's default Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return nn.with_logical_partitioning(nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), names)


def _zeros(names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


# ------------------------------------------------------------------------------ layers
def _conv3d(x, kernel, bias, time_stride, dtype):
    """3-D convolution, valid in time, zero-padded by ``k // 2`` in space, in ``dtype``."""
    kt, kh, kw = kernel.shape[:3]
    x = x.astype(dtype)
    k = kernel.astype(dtype)
    if (kt, kh, kw) == (1, 1, 1) and time_stride == 1:
        y = jnp.einsum("...i,io->...o", x, k[0, 0, 0])
    else:
        y = jax.lax.conv_general_dilated(
            x, k, window_strides=(time_stride, 1, 1),
            padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + bias.astype(dtype)


class Conv2d(nn.Module):
    """A 2-D convolution applied to every frame. Kernel ``(kh, kw, C_in, C_out)``."""
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", _conv_init((None, None, "conv_in", "conv_out")),
                            (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", _zeros(("conv_out",)), (self.features,), jnp.float32)
        lead = x.shape[:-3]
        x = x.reshape((-1,) + x.shape[-3:]).astype(self.dtype)
        kern = kernel.astype(self.dtype)
        if k == 1 and self.stride == 1:
            y = jnp.einsum("...i,io->...o", x, kern[0, 0])
        else:
            y = jax.lax.conv_general_dilated(x, kern, window_strides=(self.stride, self.stride),
                                             padding=self.padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + bias.astype(self.dtype)
        return y.reshape(lead + y.shape[1:])


def _with_cache(x, cache, n):
    """``x`` preceded by the cached ``n`` previous input frames (zeros at the start of the
    video), and the new cache: the last ``n`` frames of that concatenation."""
    if cache is None:
        cache = jnp.zeros(x.shape[:1] + (n,) + x.shape[2:], x.dtype)
    xin = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    return xin, xin[:, -n:]


class CausalConv3d(nn.Module):
    """diffusers ``WanCausalConv3d`` with its feature cache made explicit.

    Kernel ``(kt, kh, kw, C_in, C_out)``, zero padding ``k // 2`` in space. ``__call__(x, cache)``
    returns ``(y, new_cache)``; the cache holds the previous ``kt - 1 = CACHE_T`` input frames
    (``None`` at the start of the video = causal zero padding). Kernels with ``kt == 1`` and
    ``causal=False`` convolutions (the caller supplies the context, as the temporal
    downsampler does) keep no cache (``new_cache`` is ``None``).
    """
    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    dtype: Any = jnp.float32
    time_stride: int = 1
    causal: bool = True

    @nn.compact
    def __call__(self, x, cache=None):
        kt, kh, kw = self.kernel_size
        kernel = self.param("kernel", _conv_init((None, None, None, "conv_in", "conv_out")),
                            (kt, kh, kw, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", _zeros(("conv_out",)), (self.features,), jnp.float32)
        new_cache = None
        if self.causal and kt > 1:
            x, new_cache = _with_cache(x.astype(self.dtype), cache, kt - 1)
        return _conv3d(x, kernel, bias, self.time_stride, self.dtype), new_cache


class RMSNorm(nn.Module):
    """diffusers ``WanRMS_norm``: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over channels, fp32."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        ss = jnp.sum(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.maximum(ss, 1e-24)) * (math.sqrt(c) * scale)
        return y.astype(x.dtype)


class ResidualBlock(nn.Module):
    """RMSNorm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) shortcut. Dropout is omitted
    (inference only)."""
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None):
        cache = cache or {}
        h = x
        if x.shape[-1] != self.out_dim:
            h = CausalConv3d(self.out_dim, (1, 1, 1), self.dtype, name="conv_shortcut")(x)[0]
        y = nn.silu(RMSNorm(name="norm1")(x))
        y, c1 = CausalConv3d(self.out_dim, dtype=self.dtype, name="conv1")(y, cache.get("conv1"))
        y = nn.silu(RMSNorm(name="norm2")(y))
        y, c2 = CausalConv3d(self.out_dim, dtype=self.dtype, name="conv2")(y, cache.get("conv2"))
        return y + h.astype(y.dtype), {"conv1": c1, "conv2": c2}


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (diffusers ``WanAttentionBlock``)."""
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        y = RMSNorm(name="norm")(x)
        qkv = Conv2d(3 * c, 1, padding=((0, 0), (0, 0)), dtype=self.dtype, name="to_qkv")(y)
        qkv = qkv.reshape(b * t, h * w, 1, 3 * c)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        o = dot_product_attention(q, k, v, implementation=self.attention_impl)
        o = o.reshape(b, t, h, w, c)
        o = Conv2d(c, 1, padding=((0, 0), (0, 0)), dtype=self.dtype, name="proj")(o)
        return x + o.astype(x.dtype)


class Resample(nn.Module):
    """diffusers ``WanResample``: ``upsample2d/3d`` (nearest 2x + 3x3 conv, plus for 3d a time
    conv that doubles the frames) and ``downsample2d/3d`` (pad right/bottom + strided 3x3 conv,
    plus for 3d a stride-2 time conv). ``first`` marks the video's first chunk (see the module
    docstring)."""
    dim: int
    mode: str
    upsample_out_dim: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None, first=False):
        cache = cache or {}
        new: dict[str, Any] = {}
        b, t, h, w, c = x.shape
        if self.mode == "upsample3d":
            if first:
                # diffusers' "Rep": no time conv on the first chunk; the next chunk starts from a
                # zero cache (it prepends a zero frame, the conv pads one more).
                new["time_conv"] = jnp.zeros((b, CACHE_T, h, w, c), self.dtype)
            else:
                y, new["time_conv"] = CausalConv3d(2 * c, (3, 1, 1), self.dtype, name="time_conv")(
                    x, cache.get("time_conv"))
                # channels [0:c] -> frame 2i, [c:2c] -> frame 2i+1
                x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        if self.mode.startswith("upsample"):
            out = self.upsample_out_dim or self.dim // 2
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest(-exact) 2x
            x = Conv2d(out, 3, padding=((1, 1), (1, 1)), dtype=self.dtype, name="resample")(x)
        elif self.mode.startswith("downsample"):
            x = Conv2d(self.dim, 3, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype, name="resample")(x)
        if self.mode == "downsample3d":
            if first:  # the first frame passes through and becomes the cache
                new["time_conv"] = x[:, -1:]
            else:
                xin = jnp.concatenate([cache["time_conv"].astype(x.dtype), x], axis=1)
                new["time_conv"] = x[:, -1:]
                x = CausalConv3d(self.dim, (3, 1, 1), self.dtype, time_stride=2, causal=False,
                                 name="time_conv")(xin)[0]
        return x, new


class MidBlock(nn.Module):
    """ResidualBlock -> AttentionBlock -> ResidualBlock."""
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, cache=None):
        cache = cache or {}
        dim = x.shape[-1]
        x, c0 = ResidualBlock(dim, self.dtype, name="resnets_0")(x, cache.get("resnets_0"))
        x = AttentionBlock(self.dtype, self.attention_impl, name="attentions_0")(x)
        x, c1 = ResidualBlock(dim, self.dtype, name="resnets_1")(x, cache.get("resnets_1"))
        return x, {"resnets_0": c0, "resnets_1": c1}


def avg_down_3d(x, out_channels: int, factor_t: int, factor_s: int):
    """diffusers ``AvgDown3D`` (Wan2.2 shortcut), channels-last: pad time at the front to a
    multiple of ``factor_t``, fold (t, h, w) neighbourhoods into channels, average groups."""
    pad_t = (factor_t - x.shape[1] % factor_t) % factor_t
    if pad_t:
        x = jnp.pad(x, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // factor_t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # (b, t', h', w', c, ft, fs, fs)
    factor = factor_t * factor_s * factor_s
    x = x.reshape(b, t // factor_t, h // factor_s, w // factor_s, out_channels, c * factor // out_channels)
    return x.mean(axis=-1)


def dup_up_3d(x, out_channels: int, factor_t: int, factor_s: int, first: bool):
    """diffusers ``DupUp3D`` (Wan2.2 shortcut), channels-last; on the first chunk the leading
    ``factor_t - 1`` frames are dropped."""
    b, t, h, w, c = x.shape
    factor = factor_t * factor_s * factor_s
    x = jnp.repeat(x, out_channels * factor // c, axis=-1)
    x = x.reshape(b, t, h, w, out_channels, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * factor_t, h * factor_s, w * factor_s, out_channels)
    if first:
        x = x[:, factor_t - 1:]
    return x


class ResidualDownBlock(nn.Module):
    """Wan2.2 encoder stage: residual blocks and a resampler, plus an average-pool shortcut."""
    out_dim: int
    num_res_blocks: int
    temporal: bool
    down: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None, first=False):
        cache = cache or {}
        new = {}
        shortcut = avg_down_3d(x, self.out_dim, 2 if self.temporal else 1, 2 if self.down else 1)
        for j in range(self.num_res_blocks):
            x, new[f"resnets_{j}"] = ResidualBlock(self.out_dim, self.dtype, name=f"resnets_{j}")(
                x, cache.get(f"resnets_{j}"))
        if self.down:
            mode = "downsample3d" if self.temporal else "downsample2d"
            x, new["downsampler"] = Resample(self.out_dim, mode, dtype=self.dtype, name="downsampler")(
                x, cache.get("downsampler"), first)
        return x + shortcut.astype(x.dtype), new


class UpBlock(nn.Module):
    """Wan2.1 decoder stage: ``num_res_blocks + 1`` residual blocks and an optional resampler."""
    out_dim: int
    num_res_blocks: int
    upsample_mode: str | None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None, first=False):
        cache = cache or {}
        new = {}
        for j in range(self.num_res_blocks + 1):
            x, new[f"resnets_{j}"] = ResidualBlock(self.out_dim, self.dtype, name=f"resnets_{j}")(
                x, cache.get(f"resnets_{j}"))
        if self.upsample_mode is not None:
            x, new["upsamplers_0"] = Resample(self.out_dim, self.upsample_mode, dtype=self.dtype,
                                              name="upsamplers_0")(x, cache.get("upsamplers_0"), first)
        return x, new


class ResidualUpBlock(nn.Module):
    """Wan2.2 decoder stage: residual blocks and a resampler, plus a duplicating shortcut."""
    out_dim: int
    num_res_blocks: int
    temporal: bool
    up: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cache=None, first=False):
        cache = cache or {}
        new = {}
        x_in = x
        for j in range(self.num_res_blocks + 1):
            x, new[f"resnets_{j}"] = ResidualBlock(self.out_dim, self.dtype, name=f"resnets_{j}")(
                x, cache.get(f"resnets_{j}"))
        if self.up:
            mode = "upsample3d" if self.temporal else "upsample2d"
            x, new["upsampler"] = Resample(self.out_dim, mode, upsample_out_dim=self.out_dim, dtype=self.dtype,
                                           name="upsampler")(x, cache.get("upsampler"), first)
            x = x + dup_up_3d(x_in, self.out_dim, 2 if self.temporal else 1, 2, first).astype(x.dtype)
        return x, new


class Encoder3d(nn.Module):
    """diffusers ``WanEncoder3d`` on one chunk: ``(x, cache, first) -> (y, new_cache)``."""
    dim: int
    out_channels: int  # 2 * z_dim (mean and log-variance)
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    attn_scales: tuple[float, ...]
    temperal_downsample: tuple[bool, ...]
    is_residual: bool = False
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, cache=None, first=False):
        cache = cache or {}
        new: dict[str, Any] = {}
        dims = [self.dim * u for u in (1,) + tuple(self.dim_mult)]
        x, new["conv_in"] = CausalConv3d(dims[0], dtype=self.dtype, name="conv_in")(x, cache.get("conv_in"))
        scale, k = 1.0, 0
        n_levels = len(self.dim_mult)
        for i, out_dim in enumerate(dims[1:]):
            last = i == n_levels - 1
            if self.is_residual:
                name = f"down_blocks_{i}"
                x, new[name] = ResidualDownBlock(out_dim, self.num_res_blocks,
                                                 temporal=bool(self.temperal_downsample[i]) if not last else False,
                                                 down=not last, dtype=self.dtype, name=name)(
                    x, cache.get(name), first)
                continue
            for _ in range(self.num_res_blocks):
                name = f"down_blocks_{k}"
                x, new[name] = ResidualBlock(out_dim, self.dtype, name=name)(x, cache.get(name))
                k += 1
                if scale in self.attn_scales:
                    x = AttentionBlock(self.dtype, self.attention_impl, name=f"down_blocks_{k}")(x)
                    k += 1
            if not last:
                name = f"down_blocks_{k}"
                mode = "downsample3d" if self.temperal_downsample[i] else "downsample2d"
                x, new[name] = Resample(out_dim, mode, dtype=self.dtype, name=name)(x, cache.get(name), first)
                k += 1
                scale /= 2.0
        x, new["mid_block"] = MidBlock(self.dtype, self.attention_impl, name="mid_block")(x, cache.get("mid_block"))
        x = nn.silu(RMSNorm(name="norm_out")(x))
        x, new["conv_out"] = CausalConv3d(self.out_channels, dtype=self.dtype, name="conv_out")(
            x, cache.get("conv_out"))
        return x, new


class Decoder3d(nn.Module):
    """diffusers ``WanDecoder3d`` on one chunk: ``(x, cache, first) -> (y, new_cache)``."""
    dim: int
    out_channels: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temperal_upsample: tuple[bool, ...]
    is_residual: bool = False
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, cache=None, first=False):
        cache = cache or {}
        new: dict[str, Any] = {}
        dims = [self.dim * u for u in (self.dim_mult[-1],) + tuple(self.dim_mult[::-1])]
        x, new["conv_in"] = CausalConv3d(dims[0], dtype=self.dtype, name="conv_in")(x, cache.get("conv_in"))
        x, new["mid_block"] = MidBlock(self.dtype, self.attention_impl, name="mid_block")(x, cache.get("mid_block"))
        n_levels = len(self.dim_mult)
        for i, out_dim in enumerate(dims[1:]):
            up = i != n_levels - 1
            name = f"up_blocks_{i}"
            if self.is_residual:
                block = ResidualUpBlock(out_dim, self.num_res_blocks,
                                        temporal=bool(self.temperal_upsample[i]) if up else False,
                                        up=up, dtype=self.dtype, name=name)
            else:
                mode = None
                if up:
                    mode = "upsample3d" if self.temperal_upsample[i] else "upsample2d"
                block = UpBlock(out_dim, self.num_res_blocks, mode, self.dtype, name=name)
            x, new[name] = block(x, cache.get(name), first)
        x = nn.silu(RMSNorm(name="norm_out")(x))
        x, new["conv_out"] = CausalConv3d(self.out_channels, dtype=self.dtype, name="conv_out")(
            x, cache.get("conv_out"))
        return x, new


# ------------------------------------------------------------------------------ chunk drivers
def _run_chunked(module, first_x, rest_x, chunk: int | None):
    """Run ``module`` (Encoder3d / Decoder3d) over a video split in time: ``first_x`` (the
    first chunk, run with ``first=True``) and ``rest_x`` in steps of ``chunk`` input frames under
    ``nn.scan`` carrying the causal caches (``chunk=None``: all of ``rest_x`` in one step).
    Returns the outputs concatenated in time."""
    if chunk is not None and int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of latent frames or None, got {chunk}")
    y0, cache = module(first_x, None, first=True)
    outs = [y0]
    n = rest_x.shape[1]
    if n == 0:
        return y0
    step = n if chunk is None else min(int(chunk), n)
    full = n // step
    if full > 1:
        b = rest_x.shape[0]
        xs = rest_x[:, :full * step].reshape((b, full, step) + rest_x.shape[2:]).swapaxes(0, 1)

        def body(mdl, carry, x):
            y, carry = mdl(x, carry, first=False)
            return carry, y

        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
        cache, ys = scan(module, cache, xs)  # ys: (full, B, t, ...)
        ys = ys.swapaxes(0, 1)
        outs.append(ys.reshape((b, -1) + ys.shape[3:]))
    elif full == 1:
        y, cache = module(rest_x[:, :step], cache, first=False)
        outs.append(y)
    if full * step < n:  # a shorter last chunk
        y, cache = module(rest_x[:, full * step:], cache, first=False)
        outs.append(y)
    return jnp.concatenate(outs, axis=1)


def patchify(x, p: int):
    """(B, F, H, W, C) -> (B, F, H/p, W/p, C*p*p), channel order ``c*p*p + pw*p + ph`` (diffusers)."""
    b, f, h, w, c = x.shape
    x = x.reshape(b, f, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, f, h // p, w // p, c * p * p)


def unpatchify(x, p: int):
    """Inverse of :func:`patchify`."""
    b, f, h, w, cp = x.shape
    c = cp // (p * p)
    x = x.reshape(b, f, h, w, c, p, p).transpose(0, 1, 2, 6, 3, 5, 4)  # (b, f, h, ph, w, pw, c)
    return x.reshape(b, f, h * p, w * p, c)


def _tile_starts(size: int, tile: int, stride: int):
    return [(s, min(tile, size - s)) for s in range(0, size, stride)]


def _blend(a, b, extent: int, axis: int):
    """diffusers' ``blend_v``/``blend_h``: the first ``extent`` rows/columns of ``b`` ramp
    linearly from ``a``'s last ones (weight ``1 - y/extent``) to ``b`` (weight ``y/extent``)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    wgt = np.arange(extent, dtype=np.float64) / extent
    shape = [1] * b.ndim
    shape[axis] = extent
    w_b = jnp.asarray(wgt.reshape(shape), jnp.float32)
    w_a = jnp.asarray((1.0 - wgt).reshape(shape), jnp.float32)
    a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    b_head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    b_rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
    return jnp.concatenate([a_tail * w_a + b_head * w_b, b_rest], axis=axis)


# ------------------------------------------------------------------------------ the VAE
class WanVAE(nn.Module):
    """diffusers ``AutoencoderKLWan``. Fields up to ``scale_factor_spatial`` are the names of its
    ``config.json`` (``dropout`` is accepted by :meth:`from_config` and ignored: inference only)."""
    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8
    clip_output: bool = True  # later diffusers releases' switch; 0.35.1 always clamps
    # Runtime settings (not part of a checkpoint).
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "WanVAE":
        """Build from a diffusers ``AutoencoderKLWan`` ``config.json`` dict; ``overrides`` win."""
        cfg = dict(config)
        fields = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name", "dtype", "attention_impl")}
        unknown = sorted(k for k in cfg if k not in fields and k not in _IGNORED_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown AutoencoderKLWan config keys: {unknown}")
        kwargs = {k: v for k, v in cfg.items() if k in fields}
        for key in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std", "attn_scales"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = tuple(kwargs[key])
        if kwargs.get("temperal_downsample") is not None:
            kwargs["temperal_downsample"] = tuple(bool(v) for v in kwargs["temperal_downsample"])
        if kwargs.get("attn_scales") is not None:
            kwargs["attn_scales"] = tuple(float(v) for v in kwargs["attn_scales"])
        for key in ("latents_mean", "latents_std"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        kwargs.update(overrides)
        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
        model = cls(**kwargs)
        model.validate()
        return model

    def to_config(self) -> dict[str, Any]:
        """The diffusers ``config.json`` content."""
        return {
            "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.1",
            "base_dim": self.base_dim, "decoder_base_dim": self.decoder_base_dim, "z_dim": self.z_dim,
            "dim_mult": list(self.dim_mult), "num_res_blocks": self.num_res_blocks,
            "attn_scales": list(self.attn_scales), "temperal_downsample": list(self.temperal_downsample),
            "dropout": 0.0, "latents_mean": list(self.latents_mean), "latents_std": list(self.latents_std),
            "is_residual": self.is_residual, "in_channels": self.in_channels, "out_channels": self.out_channels,
            "patch_size": self.patch_size, "scale_factor_temporal": self.scale_factor_temporal,
            "scale_factor_spatial": self.scale_factor_spatial,
        }

    def validate(self) -> None:
        """Fail early, naming the field, on inconsistent settings."""
        n = len(self.dim_mult)
        if n < 1:
            raise ValueError("dim_mult must not be empty")
        if len(self.temperal_downsample) < n - 1:
            raise ValueError(f"temperal_downsample needs {n - 1} entries for dim_mult={self.dim_mult}, "
                             f"got {self.temperal_downsample}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/latents_std must have z_dim={self.z_dim} entries, got "
                             f"{len(self.latents_mean)} and {len(self.latents_std)}")
        if self.patch_size is not None:
            p2 = self.patch_size ** 2
            if self.in_channels % p2 or self.out_channels % p2:
                raise ValueError(f"in_channels={self.in_channels} and out_channels={self.out_channels} must be "
                                 f"multiples of patch_size**2={p2}")
        if self.attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {self.attention_impl!r}")

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return tuple(self.temperal_downsample[::-1])

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first (4 for Wan)."""
        return 2 ** sum(bool(v) for v in self.temperal_downsample[:len(self.dim_mult) - 1])

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W (8 for Wan2.1, 16 for Wan2.2)."""
        return 2 ** (len(self.dim_mult) - 1) * (self.patch_size or 1)

    @property
    def video_channels(self) -> int:
        p2 = (self.patch_size or 1) ** 2
        return self.in_channels // p2

    def dummy_inputs(self, batch: int = 1):
        """The smallest video that touches every parameter (1 + temporal_factor frames)."""
        s = self.spatial_factor
        return (jnp.zeros((batch, 1 + self.temporal_factor, s, s, self.video_channels), jnp.float32),)

    def init_params(self, rng: jax.Array, boxed: bool = False):
        """Random parameters (PyTorch's default conv init, unit norm scales)."""
        # one compiled program (eager init dispatches every op of a forward pass one by one)
        params = jax.jit(lambda k: self.init(k, *self.dummy_inputs())["params"])(rng)
        return params if boxed else nn.meta.unbox(params)

    def abstract_params(self):
        """Shapes/dtypes of the parameters with their logical-axis metadata (no computation)."""
        return jax.eval_shape(lambda k: self.init(k, *self.dummy_inputs())["params"], jax.random.key(0))

    # ------------------------------------------------------------------ network
    def setup(self):
        self.encoder = Encoder3d(self.base_dim, 2 * self.z_dim, tuple(self.dim_mult), self.num_res_blocks,
                                 tuple(self.attn_scales), tuple(self.temperal_downsample), self.is_residual,
                                 self.dtype, self.attention_impl)
        self.quant_conv = CausalConv3d(2 * self.z_dim, (1, 1, 1), self.dtype)
        self.post_quant_conv = CausalConv3d(self.z_dim, (1, 1, 1), self.dtype)
        self.decoder = Decoder3d(self.decoder_base_dim or self.base_dim, self.out_channels, tuple(self.dim_mult),
                                 self.num_res_blocks, self.temperal_upsample, self.is_residual, self.dtype,
                                 self.attention_impl)

    def __call__(self, video):
        """Round trip ``decode(encode(video))`` without scanning (used by ``init``)."""
        return self.decode(self.encode(video, chunk=None), chunk=None)

    def encode_moments(self, video, *, chunk: int | None = 1):
        """Posterior ``(mean, logvar)`` of ``video`` (B, F, H, W, C) in [-1, 1], F = 1 + 4k.

        ``logvar`` is clamped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution``.
        ``chunk``: latent frames (4 video frames each) per scan step after the first frame;
        ``None`` = all at once. Returns fp32 ``(B, f, h, w, z_dim)`` arrays.
        """
        self.validate()
        if video.ndim != 5:
            raise ValueError(f"video must be (B, F, H, W, C); got shape {video.shape}")
        b, f, h, w, c = video.shape
        tf = self.temporal_factor
        if (f - 1) % tf:
            raise ValueError(f"video has {f} frames; the Wan VAE encodes 1 + {tf}k frames "
                             f"(diffusers would silently drop the last {(f - 1) % tf})")
        if c != self.video_channels:
            raise ValueError(f"video has {c} channels, the VAE expects {self.video_channels}")
        if chunk is not None and int(chunk) < 1:
            raise ValueError(f"chunk must be a positive number of latent frames or None, got {chunk}")
        x = video.astype(self.dtype)
        if self.patch_size is not None:
            x = patchify(x, self.patch_size)
        enc = _run_chunked(self.encoder, x[:, :1], x[:, 1:], None if chunk is None else chunk * tf)
        enc = self.quant_conv(enc)[0].astype(jnp.float32)
        mean, logvar = enc[..., :self.z_dim], enc[..., self.z_dim:]
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, video, *, chunk: int | None = 1):
        """Posterior mean (diffusers' ``encode(x).latent_dist.mean``), un-normalised."""
        return self.encode_moments(video, chunk=chunk)[0]

    def _decode_untiled(self, x, chunk):
        """Decode post-quant-conv latents; pixels before the clamp."""
        out = _run_chunked(self.decoder, x[:, :1], x[:, 1:], chunk)
        if self.patch_size is not None:
            out = unpatchify(out, self.patch_size)
        return out.astype(jnp.float32)

    def decode(self, latents, *, chunk: int | None = 1, tile: Sequence[int] | None = None,
               overlap: Sequence[int] | None = None):
        """Video ``(B, F, H, W, C)`` for latents ``(B, f, h, w, z_dim)`` (un-normalised: apply
        :func:`denormalize_latents` to a diffusion model's output first), clamped to [-1, 1].

        ``chunk``: latent frames per scan step after the first; ``None`` = all at once.
        ``tile=(th, tw)``: decode overlapping spatial tiles of ``th x tw`` latent pixels, with
        ``overlap=(oh, ow)`` latent pixels shared by neighbours (default a quarter of the tile),
        blended as diffusers' tiled decode does: tiles start every ``tile - overlap`` latent
        pixels; each tile's first ``overlap * spatial_factor`` output rows (columns) ramp
        linearly from the already blended tile above (left) to itself; each tile contributes
        its first ``(tile - overlap) * spatial_factor`` rows and columns. This equals diffusers
        with ``enable_tiling(tile_sample_min_height=th*8, tile_sample_min_width=tw*8,
        tile_sample_stride_height=(th-oh)*8, tile_sample_stride_width=(tw-ow)*8)`` (Wan2.1),
        except that the clamp is applied here (diffusers' tiled path skips it). Tiles of equal
        shape are decoded one after the other under one scan, so memory holds one tile's
        activations.
        """
        self.validate()
        if latents.ndim != 5 or latents.shape[-1] != self.z_dim:
            raise ValueError(f"latents must be (B, f, h, w, z_dim={self.z_dim}); got shape {latents.shape}")
        x = self.post_quant_conv(latents.astype(self.dtype))[0]
        if tile is None:
            out = self._decode_untiled(x, chunk)
        else:
            out = self._decode_tiled(x, chunk, tile, overlap)
        if self.clip_output:
            out = jnp.clip(out, -1.0, 1.0)
        return out

    def _decode_tiled(self, x, chunk, tile, overlap):
        b, f, h, w, _ = x.shape
        th, tw = (int(t) for t in tile)
        if overlap is None:
            overlap = (th // 4, tw // 4)
        oh, ow = (int(o) for o in overlap)
        sh, sw = th - oh, tw - ow
        if min(th, tw) < 1 or oh < 0 or ow < 0 or sh < 1 or sw < 1:
            raise ValueError(f"tile={tuple(tile)} and overlap={tuple(overlap)} must satisfy 0 <= overlap < tile")
        s = self.spatial_factor
        rows, cols = _tile_starts(h, th, sh), _tile_starts(w, tw, sw)
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, (r0, rh) in enumerate(rows):
            for j, (c0, cw) in enumerate(cols):
                groups.setdefault((rh, cw), []).append((i, j))
        decoded = {}
        for (rh, cw), members in groups.items():
            if len(members) == 1:
                i, j = members[0]
                decoded[(i, j)] = self._decode_untiled(x[:, :, rows[i][0]:rows[i][0] + rh,
                                                         cols[j][0]:cols[j][0] + cw], chunk)
                continue
            stack = jnp.stack([x[:, :, rows[i][0]:rows[i][0] + rh, cols[j][0]:cols[j][0] + cw]
                               for i, j in members])

            def tile_body(mdl, carry, t):
                return carry, mdl._decode_untiled(t, chunk)

            scan = nn.scan(tile_body, variable_broadcast="params", split_rngs={"params": False})
            _, outs = scan(self, None, stack)
            for n, key in enumerate(members):
                decoded[key] = outs[n]
        # blend in raster order, each tile with its already blended upper and left neighbours
        blended: dict[tuple[int, int], Any] = {}
        out_rows = []
        for i in range(len(rows)):
            row = []
            for j in range(len(cols)):
                t = decoded[(i, j)]
                if i > 0:
                    t = _blend(blended[(i - 1, j)], t, oh * s, axis=2)
                if j > 0:
                    t = _blend(blended[(i, j - 1)], t, ow * s, axis=3)
                blended[(i, j)] = t
                row.append(t[:, :, :sh * s, :sw * s])
            out_rows.append(jnp.concatenate(row, axis=3))
        return jnp.concatenate(out_rows, axis=2)[:, :, :h * s, :w * s]


# ------------------------------------------------------------------------------ latent scaling
def _stats(vae: WanVAE):
    return (jnp.asarray(np.asarray(vae.latents_mean, np.float32)),
            jnp.asarray(np.asarray(vae.latents_std, np.float32)))


def normalize_latents(vae: WanVAE, mean):
    """``(mean - latents_mean) / latents_std`` per channel (channels-last): the diffusion
    model's latent space."""
    m, s = _stats(vae)
    return (jnp.asarray(mean, jnp.float32) - m) / s


def denormalize_latents(vae: WanVAE, z):
    """``z * latents_std + latents_mean`` per channel (channels-last): what ``WanPipeline`` does
    to the diffusion model's output before :meth:`WanVAE.decode`."""
    m, s = _stats(vae)
    return jnp.asarray(z, jnp.float32) * s + m
