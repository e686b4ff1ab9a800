"""A tiny diffusers-format Wan2.1 text-to-video pipeline folder, built locally (nothing downloaded).

:func:`make_tiny_wan_pipeline` writes the folder layout of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``::

    model_index.json    WanPipeline: tokenizer, text_encoder, transformer, vae, scheduler
    tokenizer/          tiny T5-style tokenizer        (text_testlib.make_tiny_tokenizer)
    text_encoder/       tiny random UMT5EncoderModel   (text_testlib.make_tiny_text_encoder)
    vae/                tiny random AutoencoderKLWan   (vae_testlib.make_tiny_vae)
    transformer/        tiny random WanTransformer3DModel: text_dim = the UMT5's d_model,
                        in/out channels = the VAE's z_dim, patch (1, 2, 2)
    scheduler/          UniPCMultistepScheduler (flow_prediction, flow sigmas, shift 3, 1000 steps),
                        the scheduler the real Wan2.1-T2V-1.3B-Diffusers ships

``diffusers.WanPipeline.from_pretrained(path)`` loads it. Building takes a few seconds (torch
imports dominate); share one folder per test session and treat it as read-only::

    from wan_pipeline_testlib import shared_tiny_wan_pipeline
    path = shared_tiny_wan_pipeline()          # built once per process, removed at exit

or, as a session fixture in ``conftest.py``::

    @pytest.fixture(scope="session")
    def tiny_wan_pipeline(tmp_path_factory):
        from wan_pipeline_testlib import make_tiny_wan_pipeline
        return make_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan_pipeline"))

torch, diffusers and transformers are imported inside the functions (test-only dependencies).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

# The tiny transformer (diffusers WanTransformer3DModel arguments). Heads x head dim 2 x 16; the
# head dim splits into RoPE parts 6/6/4 (frames/rows/cols) as diffusers computes them.
TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, freq_dim=32,
                        ffn_dim=40, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                        eps=1e-6, rope_max_seq_len=32)

# Wan2.1-T2V-Diffusers' scheduler: UniPC on flow-matching sigmas (diffusers fills in the rest of
# the config with its defaults, as in the released scheduler_config.json).
SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)

MODEL_INDEX = {
    "_class_name": "WanPipeline",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}


def _read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as fh:
        return json.load(fh)


def make_tiny_wan_pipeline(directory, seed: int = 0) -> str:
    """Write a tiny random Wan2.1 T2V pipeline folder in ``directory`` (created); returns its path.

    Deterministic in ``seed`` (each component gets its own seed derived from it).
    """
    import diffusers
    from diffusers import UniPCMultistepScheduler

    from anyflow_jax.interop.reference import random_diffusers_model
    from text_testlib import make_tiny_text_encoder, make_tiny_tokenizer, tokenizer_vocab_size
    from vae_testlib import make_tiny_vae

    root = os.path.abspath(os.fspath(directory))
    os.makedirs(root, exist_ok=True)
    tok = make_tiny_tokenizer(os.path.join(root, "tokenizer"))
    text = make_tiny_text_encoder(os.path.join(root, "text_encoder"), vocab_size=tokenizer_vocab_size(tok),
                                  seed=seed)
    vae = make_tiny_vae(os.path.join(root, "vae"), seed=seed + 1)
    d_model = _read_config(text)["d_model"]
    z_dim = _read_config(vae)["z_dim"]
    transformer = random_diffusers_model(seed=seed + 2, scale=0.1, in_channels=z_dim, out_channels=z_dim,
                                         text_dim=d_model, **TINY_TRANSFORMER)
    transformer.save_pretrained(os.path.join(root, "transformer"), safe_serialization=True)
    UniPCMultistepScheduler(**SCHEDULER).save_pretrained(os.path.join(root, "scheduler"))
    with open(os.path.join(root, "model_index.json"), "w") as fh:
        json.dump({**MODEL_INDEX, "_diffusers_version": diffusers.__version__}, fh, indent=2)
    return root


_SHARED: dict[int, str] = {}


def shared_tiny_wan_pipeline(seed: int = 0) -> str:
    """One :func:`make_tiny_wan_pipeline` folder per seed and process (a temporary folder removed
    at exit). Read-only: copy it before changing anything."""
    if seed not in _SHARED:
        parent = tempfile.mkdtemp(prefix="anyflow-tiny-wan-")
        atexit.register(shutil.rmtree, parent, True)
        _SHARED[seed] = make_tiny_wan_pipeline(os.path.join(parent, "Wan2.1-T2V-tiny-Diffusers"), seed=seed)
    return _SHARED[seed]


__all__ = ["TINY_TRANSFORMER", "SCHEDULER", "MODEL_INDEX", "make_tiny_wan_pipeline", "shared_tiny_wan_pipeline"]
