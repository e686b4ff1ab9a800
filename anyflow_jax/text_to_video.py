"""Text to video on Wan2.1-format checkpoints: prompts -> UMT5 -> any-step sampler -> Wan VAE.

The pieces a diffusers Wan2.1 pipeline folder holds (``model_index.json`` with ``transformer/``,
``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``) all run in JAX here:

1. :func:`encode_prompts` cleans and tokenises every prompt (and the negative prompt) and runs
   the UMT5 encoder once per prompt, whatever the number of step counts sampled later
   (:class:`anyflow_jax.text.PromptEncoder`, equal to diffusers' ``_get_t5_prompt_embeds``);
2. the transformer samples latents with its kind's sampler (``anyflow_jax.inference``): the
   teacher's Euler ODE with CFG, or the flow map's any-step jumps (reference spec section 7);
3. :class:`VideoDecoder` denormalises the latents with the VAE's per-channel mean/std
   (``z * std + mean``, as the Wan pipeline) and decodes them one video at a time, the VAE
   scanning over latent frames with a carried causal cache, so memory stays bounded.

:func:`resolve_checkpoint` finds the transformer and the pipeline folder from what the user
gave: a pipeline folder (a Wan2.1 teacher or a released AnyFlow bidirectional student), or any
other checkpoint (training workdir, Orbax model, diffusers transformer folder) plus a pipeline
folder for the text encoder and the VAE.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from anyflow_jax.checkpoints.runs import PIPELINE_INDEX, pipeline_transformer

PIPELINE_PARTS = ("text_encoder", "tokenizer", "vae")
#: reference pipeline defaults (spec section 7): 480x832, 81 frames, 16 fps
DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_FRAMES, DEFAULT_FPS = 480, 832, 81, 16
MAX_SEQUENCE_LENGTH = 512


class PipelineError(ValueError):
    """A pipeline folder that lacks a part, or a checkpoint without one."""


def is_pipeline(path: str) -> bool:
    """A diffusers pipeline folder: ``model_index.json`` and ``transformer/config.json``."""
    return pipeline_transformer(path) is not None


def check_pipeline(path: str, flag: str = "--pipeline") -> str:
    """Absolute ``path`` when it holds the text encoder, tokenizer and VAE; else one error naming
    what is missing."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(full):
        raise PipelineError(f"{flag} {path} is not a folder")
    missing = [p for p in PIPELINE_PARTS if not os.path.isdir(os.path.join(full, p))]
    if missing:
        raise PipelineError(f"{flag} {path} is not a Wan2.1 pipeline folder: it has no "
                            f"{', '.join(m + '/' for m in missing)} (expected {', '.join(PIPELINE_PARTS)})")
    return full


def resolve_checkpoint(checkpoint: str, pipeline: str | None = None) -> tuple[str, str]:
    """``(transformer checkpoint, pipeline folder)`` for ``--checkpoint`` / ``--pipeline``.

    A pipeline folder as checkpoint samples its own ``transformer/`` (and is its own pipeline
    unless ``pipeline`` is given); any other checkpoint needs ``pipeline``."""
    full = os.path.abspath(os.path.expanduser(checkpoint))
    if is_pipeline(full):
        return os.path.join(full, "transformer"), check_pipeline(pipeline if pipeline else full,
                                                                 "--pipeline" if pipeline else "--checkpoint")
    if not pipeline:
        raise PipelineError(f"--checkpoint {checkpoint} is not a pipeline folder ({PIPELINE_INDEX} with "
                            f"transformer/); text prompts need --pipeline <Wan2.1 pipeline folder> for the text "
                            f"encoder and the VAE")
    return full, check_pipeline(pipeline)


def latent_shape(frames: int, height: int, width: int, *, z_dim: int, temporal: int = 4,
                 spatial: int = 8) -> tuple[int, int, int, int]:
    """Latent ``(f, h, w, z)`` of a ``frames x height x width`` video (Wan VAE: 4x time, 8x space;
    ``frames = 1 + 4k``)."""
    if frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"frames must be 1 + {temporal}k (e.g. 81), got {frames}")
    if height % spatial or width % spatial or height < spatial or width < spatial:
        raise ValueError(f"height and width must be positive multiples of {spatial}, got {height}x{width}")
    return (frames - 1) // temporal + 1, height // spatial, width // spatial, int(z_dim)


def encode_prompts(pipeline: str, prompts: Sequence[str], negative: str | None = None, *, dtype=None,
                   batch_size: int = 8, log: Callable[[str], None] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """UMT5 embeddings of ``prompts`` ``(P, 512, D)`` float32 and of ``negative`` ``(1, 512, D)``
    (None when ``negative`` is None), each prompt encoded once. The encoder is released before
    returning, so the transformer can take its memory."""
    import jax.numpy as jnp

    from anyflow_jax.text import PromptEncoder
    texts = list(prompts) + ([negative] if negative is not None else [])
    unique = list(dict.fromkeys(texts))
    if log:
        log(f"encoding {len(unique)} prompt{'s' if len(unique) != 1 else ''} with the UMT5 encoder")
    encoder = PromptEncoder.from_pipeline(pipeline, dtype=jnp.float32 if dtype is None else dtype)
    table: dict[str, np.ndarray] = {}
    for start in range(0, len(unique), max(1, int(batch_size))):
        chunk = unique[start:start + batch_size]
        emb, _ = encoder(chunk)
        for text, e in zip(chunk, np.asarray(emb, np.float32)):
            table[text] = e
    del encoder
    ctx = np.stack([table[p] for p in prompts])
    neg = table[negative][None] if negative is not None else None
    return ctx, neg


@dataclasses.dataclass
class VideoDecoder:
    """Wan VAE decoding of normalised latents ``(f, h, w, z)`` -> uint8 video ``(F, H, W, 3)``."""
    vae: object
    params: object

    @classmethod
    def from_pipeline(cls, pipeline: str, *, dtype=None) -> "VideoDecoder":
        import jax.numpy as jnp

        from anyflow_jax.checkpoints.vae import load_vae
        vae, params = load_vae(os.path.join(pipeline, "vae"), dtype=jnp.float32 if dtype is None else dtype)
        return cls(vae, params)

    @property
    def z_dim(self) -> int:
        return int(self.vae.z_dim)

    def __post_init__(self):
        import jax

        from anyflow_jax.models.wan_vae import denormalize_latents
        vae = self.vae

        def decode(params, z):
            return vae.apply({"params": params}, denormalize_latents(vae, z), method=vae.decode)
        self._decode = jax.jit(decode)

    def decode(self, latents) -> np.ndarray:
        """Float video in [-1, 1] ``(F, H, W, 3)`` of one normalised latent ``(f, h, w, z)``."""
        import jax.numpy as jnp
        z = jnp.asarray(np.asarray(latents, np.float32)[None])
        return np.asarray(self._decode(self.params, z)[0], np.float32)

    def __call__(self, latents) -> np.ndarray:
        from anyflow_jax import video as vid
        return vid.to_uint8(self.decode(latents))


__all__ = ["PipelineError", "is_pipeline", "check_pipeline", "resolve_checkpoint", "latent_shape",
           "encode_prompts", "VideoDecoder", "DEFAULT_HEIGHT", "DEFAULT_WIDTH", "DEFAULT_FRAMES", "DEFAULT_FPS"]
