"""PyTorch reference models for parity checks (needs the test-only extras: torch, diffusers).

:func:`random_diffusers_model` builds a diffusers ``WanTransformer3DModel`` with random weights;
:func:`add_flow_map_embedder` turns it into AnyFlow's two-time model the way the reference's
``setup_flowmap_model`` does (a ``delta_embedder`` copied from ``time_embedder``, mixed with a
fixed gate), written here directly in PyTorch as an independent implementation;
:func:`torch_forward` runs either on channels-last NumPy inputs with per-frame tau times.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np


def random_diffusers_model(seed: int = 0, scale: float = 0.1, **config):
    """A diffusers ``WanTransformer3DModel`` with all parameters perturbed by ``scale * N(0, 1)``
    (so zero-initialised tensors are exercised too)."""
    import torch
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


class _TwoTimeEmbedder:
    """Replaces ``condition_embedder.forward`` with AnyFlow's two-time mixing."""

    def __init__(self, embedder, gate: float, deltatime_type: str):
        import torch
        self.e = embedder
        self.e.delta_embedder = copy.deepcopy(embedder.time_embedder)
        self.gate = gate
        self.deltatime_type = deltatime_type
        self.r_timestep = None
        with torch.no_grad():  # make the copy differ so the mixing is visible off the diagonal
            for p in self.e.delta_embedder.parameters():
                p.add_(torch.randn_like(p) * 0.05)

    def __call__(self, timestep, encoder_hidden_states, encoder_hidden_states_image=None, timestep_seq_len=None):
        e = self.e
        r = self.r_timestep.flatten() if self.r_timestep.ndim == 2 else self.r_timestep
        second = r if self.deltatime_type == "r" else timestep - r
        emb_t = e.time_embedder(e.timesteps_proj(timestep))
        emb_d = e.delta_embedder(e.timesteps_proj(second))
        temb = (1 - self.gate) * emb_t + self.gate * emb_d
        if timestep_seq_len is not None:
            temb = temb.unflatten(0, (-1, timestep_seq_len))
        timestep_proj = e.time_proj(e.act_fn(temb))
        return temb, timestep_proj, e.text_embedder(encoder_hidden_states), None


def add_flow_map_embedder(model, gate: float = 0.25, deltatime_type: str = "r"):
    """Make ``model`` an AnyFlow flow-map model (in place); returns it."""
    model._two_time = _TwoTimeEmbedder(model.condition_embedder, gate, deltatime_type)
    model.condition_embedder.forward = model._two_time
    return model


def save_flow_map_model(model, path: str):
    """Save a flow-map model in the released AnyFlow layout (diffusers + delta embedder)."""
    model.save_pretrained(path, safe_serialization=True)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg.update(gate_value=model._two_time.gate, deltatime_type=model._two_time.deltatime_type,
               init_flowmap_model=True)
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh, indent=2)


def torch_forward(model, latents: np.ndarray, t: np.ndarray, context: np.ndarray, r: np.ndarray | None = None) -> np.ndarray:
    """Run a diffusers Wan model on channels-last latents (B, F, H, W, C) with per-frame tau
    times (B, F); returns channels-last float32 output."""
    import torch
    pt, ph, pw = model.config.patch_size
    b, f, h, w, _ = latents.shape
    tokens_per_frame = (h // ph) * (w // pw)

    def per_token(x):
        x = torch.from_numpy(np.ascontiguousarray(x[:, ::pt], dtype=np.float32)) * 1000.0
        return x.repeat_interleave(tokens_per_frame, dim=1)

    if r is not None:
        model._two_time.r_timestep = per_token(r)
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(latents)).permute(0, 4, 1, 2, 3), per_token(t),
                    torch.from_numpy(np.ascontiguousarray(context)), return_dict=False)[0]
    return out.permute(0, 2, 3, 4, 1).float().numpy()
