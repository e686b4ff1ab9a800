"""diffusers-format Wan VAE checkpoints (``AutoencoderKLWan``, a pipeline's ``vae/`` folder) -> Flax.

The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or shards listed
in ``diffusion_pytorch_model.safetensors.index.json``). The mapping is one declarative table
(:func:`param_table`), built from the config the same way diffusers builds its modules:
diffusers name -> Flax path -> layout transform. Loading is strict: every missing, unexpected
or mis-shaped tensor is named in one :class:`CheckpointError`, raised before anything is
converted.

Layouts: ``Conv3d`` weights ``(O, I, kt, kh, kw)`` -> ``(kt, kh, kw, I, O)``; ``Conv2d``
weights ``(O, I, kh, kw)`` -> ``(kh, kw, I, O)``; RMS-norm ``gamma`` ``(C, 1, 1[, 1])`` -> ``(C,)``.
"""
from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from anyflow_jax.checkpoints.diffusers import (CONFIG_NAME, IDENTITY, CheckpointError, Entry, Transform,
                                               _TensorStore, _get, _progress, _set, read_json_config)
from anyflow_jax.checkpoints.safetensors_io import SafetensorsError
from anyflow_jax.models.wan_vae import WanVAE

VAE_CLASS = "AutoencoderKLWan"
_RUNTIME_FIELDS = ("dtype", "attention_impl")

CONV3D = Transform("conv3d", lambda a: a.transpose(2, 3, 4, 1, 0), lambda a: a.transpose(4, 3, 0, 1, 2),
                   lambda s: (s[4], s[3], s[0], s[1], s[2]))
CONV2D = Transform("conv2d", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1),
                   lambda s: (s[3], s[2], s[0], s[1]))


def _gamma(extra_dims: int) -> Transform:
    # (C, 1, 1, 1) for video norms, (C, 1, 1) for the attention's per-frame norm
    return Transform(f"gamma{extra_dims}", lambda a: a.reshape(a.shape[0]),
                     lambda a: a.reshape(a.shape + (1,) * extra_dims), lambda s: tuple(s) + (1,) * extra_dims)


# ----------------------------------------------------------------------------------- table
Rows = list  # list[tuple[diffusers name, flax path, Transform]]


def _conv(prefix: str, path: tuple, transform: Transform) -> Rows:
    return [(f"{prefix}.weight", path + ("kernel",), transform), (f"{prefix}.bias", path + ("bias",), IDENTITY)]


def _norm(prefix: str, path: tuple, extra_dims: int = 3) -> Rows:
    return [(f"{prefix}.gamma", path + ("scale",), _gamma(extra_dims))]


def _resblock(prefix: str, path: tuple, in_dim: int, out_dim: int) -> Rows:
    rows = _norm(f"{prefix}.norm1", path + ("norm1",))
    rows += _conv(f"{prefix}.conv1", path + ("conv1",), CONV3D)
    rows += _norm(f"{prefix}.norm2", path + ("norm2",))
    rows += _conv(f"{prefix}.conv2", path + ("conv2",), CONV3D)
    if in_dim != out_dim:
        rows += _conv(f"{prefix}.conv_shortcut", path + ("conv_shortcut",), CONV3D)
    return rows


def _attention(prefix: str, path: tuple) -> Rows:
    rows = _norm(f"{prefix}.norm", path + ("norm",), extra_dims=2)
    rows += _conv(f"{prefix}.to_qkv", path + ("to_qkv",), CONV2D)
    rows += _conv(f"{prefix}.proj", path + ("proj",), CONV2D)
    return rows


def _resample(prefix: str, path: tuple, mode: str) -> Rows:
    # the spatial conv is the second layer of diffusers' nn.Sequential (after the up/pad layer)
    rows = _conv(f"{prefix}.resample.1", path + ("resample",), CONV2D)
    if mode.endswith("3d"):
        rows += _conv(f"{prefix}.time_conv", path + ("time_conv",), CONV3D)
    return rows


def _mid(prefix: str, path: tuple, dim: int) -> Rows:
    rows = _resblock(f"{prefix}.resnets.0", path + ("resnets_0",), dim, dim)
    rows += _attention(f"{prefix}.attentions.0", path + ("attentions_0",))
    rows += _resblock(f"{prefix}.resnets.1", path + ("resnets_1",), dim, dim)
    return rows


def _encoder(model: WanVAE) -> Rows:
    p, fp = "encoder", ("encoder",)
    dims = [model.base_dim * u for u in (1,) + tuple(model.dim_mult)]
    n = len(model.dim_mult)
    rows = _conv(f"{p}.conv_in", fp + ("conv_in",), CONV3D)
    scale, k = 1.0, 0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == n - 1
        if model.is_residual:
            bp, bfp = f"{p}.down_blocks.{i}", fp + (f"down_blocks_{i}",)
            d = in_dim
            for j in range(model.num_res_blocks):
                rows += _resblock(f"{bp}.resnets.{j}", bfp + (f"resnets_{j}",), d, out_dim)
                d = out_dim
            if not last:
                mode = "downsample3d" if model.temperal_downsample[i] else "downsample2d"
                rows += _resample(f"{bp}.downsampler", bfp + ("downsampler",), mode)
            continue
        for _ in range(model.num_res_blocks):
            rows += _resblock(f"{p}.down_blocks.{k}", fp + (f"down_blocks_{k}",), in_dim, out_dim)
            in_dim = out_dim
            k += 1
            if scale in model.attn_scales:
                rows += _attention(f"{p}.down_blocks.{k}", fp + (f"down_blocks_{k}",))
                k += 1
        if not last:
            mode = "downsample3d" if model.temperal_downsample[i] else "downsample2d"
            rows += _resample(f"{p}.down_blocks.{k}", fp + (f"down_blocks_{k}",), mode)
            k += 1
            scale /= 2.0
    rows += _mid(f"{p}.mid_block", fp + ("mid_block",), dims[-1])
    rows += _norm(f"{p}.norm_out", fp + ("norm_out",))
    rows += _conv(f"{p}.conv_out", fp + ("conv_out",), CONV3D)
    return rows


def _decoder(model: WanVAE) -> Rows:
    p, fp = "decoder", ("decoder",)
    base = model.decoder_base_dim or model.base_dim
    mult = tuple(model.dim_mult)
    dims = [base * u for u in (mult[-1],) + mult[::-1]]
    n = len(mult)
    up_t = model.temperal_upsample
    rows = _conv(f"{p}.conv_in", fp + ("conv_in",), CONV3D)
    rows += _mid(f"{p}.mid_block", fp + ("mid_block",), dims[0])
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        up = i != n - 1
        bp, bfp = f"{p}.up_blocks.{i}", fp + (f"up_blocks_{i}",)
        if i > 0 and not model.is_residual:
            in_dim //= 2  # Wan2.1: the previous stage's upsampler halved the channels
        d = in_dim
        for j in range(model.num_res_blocks + 1):
            rows += _resblock(f"{bp}.resnets.{j}", bfp + (f"resnets_{j}",), d, out_dim)
            d = out_dim
        if up:
            mode = "upsample3d" if up_t[i] else "upsample2d"
            if model.is_residual:
                rows += _resample(f"{bp}.upsampler", bfp + ("upsampler",), mode)
            else:
                rows += _resample(f"{bp}.upsamplers.0", bfp + ("upsamplers_0",), mode)
    rows += _norm(f"{p}.norm_out", fp + ("norm_out",))
    rows += _conv(f"{p}.conv_out", fp + ("conv_out",), CONV3D)
    return rows


def param_table(model: WanVAE) -> list[Entry]:
    """The full diffusers <-> Flax table for ``model``."""
    rows = _encoder(model)
    rows += _conv("quant_conv", ("quant_conv",), CONV3D)
    rows += _conv("post_quant_conv", ("post_quant_conv",), CONV3D)
    rows += _decoder(model)
    return [Entry(n, p, t) for n, p, t in rows]


def _flat_paths(tree, prefix=()):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        out = []
        for k, v in tree.items():
            out += _flat_paths(v, prefix + (k,))
        return out
    return [prefix]


def expected_shapes(model: WanVAE) -> dict[str, tuple[int, ...]]:
    """diffusers name -> torch shape, derived from the Flax parameter shapes. Also checks that
    the table covers every Flax parameter exactly once (an internal consistency check)."""
    abstract = nn.meta.unbox(model.abstract_params())
    table = param_table(model)
    flax_paths = set(_flat_paths(abstract))
    table_paths = [e.flax_path for e in table]
    if set(table_paths) != flax_paths or len(table_paths) != len(flax_paths):
        raise AssertionError(f"VAE name table out of step with the module: not in table "
                             f"{sorted(flax_paths - set(table_paths))[:5]}, not in module "
                             f"{sorted(set(table_paths) - flax_paths)[:5]}")
    return {e.diffusers_name: e.transform.torch_shape(tuple(_get(abstract, e.flax_path).shape)) for e in table}


# ----------------------------------------------------------------------------------- reading
def read_vae_config(path) -> dict[str, Any]:
    """The ``config.json`` of a diffusers ``AutoencoderKLWan`` folder, checked for its class."""
    cfg, cfg_path = read_json_config(path, "diffusers VAE")
    cls = cfg.get("_class_name")
    if cls != VAE_CLASS:
        raise CheckpointError(f"{cfg_path}: _class_name={cls!r} is not a Wan VAE (expected {VAE_CLASS!r})")
    return cfg


def load_vae(path, *, dtype=jnp.float32, progress: bool = False, model_kwargs=None):
    """Load a diffusers ``AutoencoderKLWan`` folder (e.g. ``<pipeline>/vae``) as ``(model, params)``.

    Args:
      path: directory with ``config.json`` and safetensors weights (single file or sharded).
      dtype: dtype of the returned parameters and the model's compute dtype (default float32).
        ``None`` keeps each tensor's stored dtype and computes in float32.
      progress: show a progress bar while reading tensors.
      model_kwargs: runtime fields of :class:`WanVAE` (``dtype`` = compute dtype, overriding the
        one above, ``attention_impl``).

    Returns:
      ``(model, params)``: ``model.apply({'params': params}, video, method='encode')`` and
      ``model.apply({'params': params}, latents, method='decode')``.
    """
    path = os.fspath(path)
    cfg = read_vae_config(path)
    try:
        store = _TensorStore(path)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    runtime = dict(model_kwargs or {})
    unknown = sorted(set(runtime) - set(_RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"model_kwargs may only set {_RUNTIME_FIELDS}; got {unknown}")
    if dtype is not None:
        runtime.setdefault("dtype", jnp.dtype(dtype))
    try:
        model = WanVAE.from_config(cfg, **runtime)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/{CONFIG_NAME}: {e}") from None

    expected = expected_shapes(model)
    present = store.names()
    problems = []
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:10]}"
                        f"{' ...' if len(unexpected) > 10 else ''}")
    for name in sorted(set(expected) & present):
        if tuple(store.shape(name)) != tuple(expected[name]):
            problems.append(f"tensor {name!r} has shape {tuple(store.shape(name))}, expected {tuple(expected[name])}")
    if problems:
        raise CheckpointError(f"{path} does not match a Wan VAE with config {CONFIG_NAME}: " + "; ".join(problems))

    target = None if dtype is None else np.dtype(jnp.dtype(dtype))
    params: dict = {}
    table = param_table(model)
    for e in _progress(table, len(table), "loading VAE", progress):
        arr = e.transform.to_flax(store.read(e.diffusers_name))
        if target is not None and arr.dtype != target:
            arr = arr.astype(target)
        _set(params, e.flax_path, jnp.asarray(arr))
    return model, params


__all__ = ["CheckpointError", "load_vae", "param_table", "expected_shapes", "read_vae_config"]
