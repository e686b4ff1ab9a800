"""The embedded default: a toy Wan DiT sized for a laptop CPU (moving-digits videos).

The toy "latents" are the videos themselves (1 channel, 16x16 pixels, 8 frames); the
"text embeddings" are rows of a fixed class-embedding table. ``configs/`` files build on this.
"""
from __future__ import annotations

import ml_collections


def toy_model_config() -> ml_collections.ConfigDict:
    """diffusers-style config of the toy DiT (plus runtime fields)."""
    return ml_collections.ConfigDict(dict(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=1,
        out_channels=1,
        text_dim=32,
        freq_dim=64,
        ffn_dim=256,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
        # runtime
        dtype="float32",
        attention_impl="xla",
        scan_layers=True,
        remat_policy="none",
    ))


def toy_video_shape() -> tuple[int, int, int, int]:
    """(F, H, W, C) of the toy videos."""
    return (8, 16, 16, 1)
