"""Load a trained model of any kind and generate videos with any number of steps.

Kinds and their samplers (``anyflow_jax.sampling``):

- ``teacher``: a flow-matching model; Euler ODE sampler (``ode_sample``), CFG by default
  (``guidance=3``, the reference's teacher validation setting);
- ``flow_map``: an AnyFlow student (stage 1 or stage 2); any-step flow-map sampler
  (``sample``), guidance 1 (the student fuses CFG);
- ``consistency``: the consistency-distillation baseline; multistep consistency sampler.

A checkpoint is a training workdir (its kind follows the stage in ``run.json``; EMA weights by
default), an Orbax model checkpoint or a diffusers folder (teacher or flow map by its weights;
``kind='consistency'`` must then be given).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax import sampling
from anyflow_jax.models.wan import WanTransformer3D, make_apply_fn
from anyflow_jax.training import checkpointing as ckpt_lib
from anyflow_jax.training.checkpointing import RunError

KINDS = ("teacher", "flow_map", "consistency")
_STAGE_KIND = {"teacher": "teacher", "flow_map": "flow_map", "on_policy": "flow_map", "consistency": "consistency"}
DEFAULT_GUIDANCE = {"teacher": 3.0, "flow_map": 1.0, "consistency": 1.0}


@dataclasses.dataclass
class Generator:
    kind: str
    stage: str
    model: WanTransformer3D
    params: Any
    path: str
    data: dict  # the run's data config (video shape, conditioning) when known
    shift: float = 5.0

    def __post_init__(self):
        self._apply = make_apply_fn(self.model)
        self._fns: dict = {}

    # -------------------------------------------------------------- conditioning of the toy runs
    def video_shape(self) -> tuple[int, int, int, int]:
        d = self.data
        if "num_frames" in d:
            return (int(d["num_frames"]), int(d["height"]), int(d["width"]), self.model.in_channels)
        raise RunError(f"{self.path}: the video shape is unknown (not a moving-digits run); pass it explicitly")

    def conditioning(self):
        """(class table (10, L, D), negative (1, L, D)) of a moving-digits run."""
        from anyflow_jax.data import class_embeddings, negative_embedding
        d = self.data
        if d.get("source", "moving_digits") != "moving_digits" or "context_length" not in d:
            raise RunError(f"{self.path}: not a moving-digits run; pass prompt embeddings explicitly")
        L, D = int(d["context_length"]), int(d["text_dim"])
        return class_embeddings(10, L, D), negative_embedding(L, D)

    # -------------------------------------------------------------- sampling
    def _fn(self, steps: int, guidance: float):
        key = (steps, guidance)
        if key not in self._fns:
            apply, shift = self._apply, self.shift
            if self.kind == "teacher":
                def fn(params, noise, context, neg, rng):
                    del rng
                    return sampling.ode_sample(apply, params, noise, context, num_steps=steps, shift=shift,
                                               guidance_scale=guidance, neg_context=neg if guidance != 1.0 else None)
            elif self.kind == "flow_map":
                def fn(params, noise, context, neg, rng):
                    del rng
                    return sampling.sample(apply, params, noise, context, num_steps=steps, shift=shift,
                                           guidance_scale=guidance, neg_context=neg if guidance != 1.0 else None)
            else:
                if guidance != 1.0:
                    raise ValueError("the consistency sampler has no CFG; use guidance 1")

                def fn(params, noise, context, neg, rng):
                    del neg
                    return sampling.consistency_sample(apply, params, noise, context, key=rng, num_steps=steps,
                                                       shift=shift)
            self._fns[key] = jax.jit(fn)
        return self._fns[key]

    def sample(self, noise, context, steps: int, *, guidance: float | None = None, neg_context=None,
               rng: jax.Array | None = None) -> jax.Array:
        """Generate from ``noise`` (B, F, H, W, C) with ``steps`` model evaluations per sample
        (times 2 with CFG). ``rng`` feeds the consistency sampler's re-noising."""
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        g = DEFAULT_GUIDANCE[self.kind] if guidance is None else float(guidance)
        if g < 1.0:
            raise ValueError(f"guidance must be >= 1, got {g}")
        if g != 1.0 and neg_context is None:
            raise ValueError("guidance > 1 needs a negative (unconditional) context")
        if neg_context is not None:
            neg_context = jnp.broadcast_to(jnp.asarray(neg_context), (noise.shape[0],) + tuple(neg_context.shape[1:]))
        rng = rng if rng is not None else jax.random.key(0)
        return self._fn(int(steps), g)(self.params, noise, context, neg_context, rng)


def load_generator(path: str, *, kind: str | None = None, use_ema: bool = True,
                   model_kwargs: dict | None = None) -> Generator:
    """Load a checkpoint for sampling; ``kind`` must match the checkpoint when both are known."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise RunError(f"checkpoint {path} does not exist")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    runtime = dict(model_kwargs or {})
    src_kind = ckpt_lib.checkpoint_kind(path)
    data, stage = {}, None
    if src_kind == "workdir":
        meta = ckpt_lib.read_run_file(path)
        stage = meta.get("stage")
        runtime.setdefault("scan_layers", meta.get("scan_layers", True))
        data = dict(meta.get("config", {}).get("data", {}))
    model, params, _ = ckpt_lib.load_start(path, runtime=runtime, use_ema=use_ema, field="--checkpoint")
    found = _STAGE_KIND[stage] if stage else ("flow_map" if model.flow_map else "teacher")
    if kind is not None and kind != found and not (stage is None and kind == "consistency" and not model.flow_map):
        raise RunError(f"{path} is a {found} checkpoint{f' (stage {stage})' if stage else ''}, not {kind}")
    kind = kind or found
    if kind == "flow_map" and not model.flow_map:
        raise RunError(f"{path}: a flow-map sampler needs a flow-map model")
    shift = float(meta.get("config", {}).get("loss", {}).get("shift", 5.0)) if src_kind == "workdir" else 5.0
    return Generator(kind=kind, stage=stage or kind, model=model, params=params, path=path, data=data, shift=shift)
