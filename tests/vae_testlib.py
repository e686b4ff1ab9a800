"""A tiny random diffusers ``AutoencoderKLWan`` on disk, for VAE tests and tiny pipeline folders.

:func:`make_tiny_vae` keeps Wan2.1's real compression (8x in space, 4x in time: four
``dim_mult`` levels, temporal downsampling in the last two) at tiny widths, so latent shapes
follow the real rules: a ``(F, H, W)`` video with ``F = 1 + 4k`` encodes to
``(1 + k, H / 8, W / 8)`` latents.
"""
from __future__ import annotations

import os

import numpy as np

TINY_VAE_CONFIG = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                       temperal_downsample=[False, True, True], dropout=0.0)


def tiny_vae_config(seed: int = 0, **overrides) -> dict:
    """The config: :data:`TINY_VAE_CONFIG` with per-channel latent statistics drawn from ``seed``
    (non-trivial, so per-channel normalisation is exercised); ``overrides`` win."""
    cfg = dict(TINY_VAE_CONFIG)
    cfg.update(overrides)
    rng = np.random.RandomState(1000 + seed)
    z = cfg["z_dim"]
    cfg.setdefault("latents_mean", [round(float(v), 4) for v in rng.uniform(-1.0, 1.0, z)])
    cfg.setdefault("latents_std", [round(float(v), 4) for v in rng.uniform(0.5, 3.0, z)])
    return cfg


def random_torch_vae(seed: int = 0, scale: float = 0.1, **overrides):
    """A diffusers ``AutoencoderKLWan`` with every parameter perturbed by ``scale * N(0, 1)``
    (so the norm scales, which start at one, are exercised too)."""
    import torch
    from diffusers import AutoencoderKLWan
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**tiny_vae_config(seed, **overrides)).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * scale)
    return vae


def make_tiny_vae(directory, seed: int = 0, **overrides) -> str:
    """Save a tiny random ``AutoencoderKLWan`` (``save_pretrained``, safetensors) into
    ``directory`` (e.g. ``<pipeline>/vae``) and return that path. ``overrides`` change config
    entries (e.g. ``z_dim=16`` to match a transformer's ``in_channels``)."""
    path = os.fspath(directory)
    random_torch_vae(seed, **overrides).save_pretrained(path, safe_serialization=True)
    return path
