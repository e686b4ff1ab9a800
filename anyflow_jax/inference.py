"""Load a trained model of any kind and generate videos with any number of steps.

A checkpoint is a training workdir (its sampler follows its stage's registry record; EMA weights
by default), an Orbax model checkpoint or a diffusers folder (teacher or flow map by its
weights; ``kind='consistency'`` must then be given). Sampler kinds (:data:`anyflow_jax.stages.SAMPLERS`):

- ``teacher``: a flow-matching model; Euler ODE sampler, CFG by default (``guidance=3``, the
  reference's teacher validation setting);
- ``flow_map``: an AnyFlow student (stage 1 or stage 2); any-step flow-map sampler, guidance 1
  (the student fuses CFG);
- ``consistency``: the consistency-distillation baseline; multistep consistency sampler.

The generic path knows contexts (text embeddings) only: :func:`sample_videos` takes named
contexts ``(L, D)``. What a run's conditions are called and where its negative context comes
from is its data's *conditioning adapter* (:func:`conditioning_for`): the toy's moving digits
name ten classes; a latent-record run knows its negative-prompt embedding file.

Noise and keys are functions of ``(seed, sample index)`` only (:func:`initial_noise`,
:func:`sample_keys`), so a sample is the same whatever its batch, chunk or step count.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax import stages as stage_registry
from anyflow_jax.checkpoints import runs as run_files
from anyflow_jax.errors import RunError
from anyflow_jax.flow import sampling as flow_sampling
from anyflow_jax.models.wan import WanTransformer3D, make_apply_fn

KINDS = tuple(stage_registry.SAMPLERS)


def default_guidance(kind: str) -> float:
    return stage_registry.get_sampler(kind).default_guidance


class _Guidance(dict):
    """``DEFAULT_GUIDANCE[kind]``, read from the sampler registry (kept for existing code)."""

    def __missing__(self, kind):
        return default_guidance(kind)

    def __contains__(self, kind):
        return kind in stage_registry.SAMPLERS


DEFAULT_GUIDANCE = _Guidance()


# ------------------------------------------------------------------------------ noise and keys
def initial_noise(seed: int, indices, shape: Sequence[int]) -> np.ndarray:
    """``(len(indices), *shape)`` float32 standard normal noise; row ``k`` depends only on
    ``(seed, indices[k], shape)`` (``normal(fold_in(fold_in(key(seed), 0), index))``). An int
    ``indices`` gives the single ``shape`` array of that index."""
    single = isinstance(indices, (int, np.integer))
    idx = np.atleast_1d(np.asarray(indices, np.uint32))
    base = jax.random.fold_in(jax.random.key(int(seed)), 0)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(idx)
    out = np.asarray(jax.vmap(lambda k: jax.random.normal(k, tuple(shape), jnp.float32))(keys))
    return out[0] if single else out


def sample_keys(seed: int, indices) -> jax.Array:
    """Per-sample PRNG keys ``(len(indices),)`` of the stochastic samplers (the consistency
    sampler's re-noising): key ``k`` depends only on ``(seed, indices[k])``."""
    idx = np.atleast_1d(np.asarray(indices, np.uint32))
    base = jax.random.fold_in(jax.random.key(int(seed)), 1)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(idx)


# ------------------------------------------------------------------------------ conditioning
class Conditioning:
    """A run's conditioning adapter: named conditions, the negative context, the video shape."""

    #: names of the conditions this data defines, in order (empty: contexts must be given)
    names: tuple[str, ...] = ()
    #: label of each condition (contact-sheet rows)
    labels: Mapping[str, str] = {}

    def contexts(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        raise RunError("this run defines no named conditions; pass prompt embeddings")

    def negative(self) -> np.ndarray | None:
        """``(1, L, D)`` negative context, or None when unknown."""
        return None

    def video_shape(self) -> tuple[int, int, int, int] | None:
        return None


class ClassConditioning(Conditioning):
    """Moving digits: ten classes ``class0``..``class9``, each a row of a fixed embedding table."""

    def __init__(self, data: Mapping[str, Any], in_channels: int = 1):
        from anyflow_jax.data import class_embeddings, negative_embedding
        from anyflow_jax.data.digits import NUM_CLASSES
        self.length, self.dim = int(data["context_length"]), int(data["text_dim"])
        self.table = class_embeddings(NUM_CLASSES, self.length, self.dim)
        self._negative = negative_embedding(self.length, self.dim)
        self._shape = (int(data["num_frames"]), int(data["height"]), int(data["width"]), int(in_channels))
        self.names = tuple(f"class{c}" for c in range(NUM_CLASSES))
        self.labels = {f"class{c}": f"class {c}" for c in range(NUM_CLASSES)}

    def contexts(self, names=None):
        names = self.names if names is None else list(names)
        out = {}
        for n in names:
            if n not in self.names:
                raise RunError(f"unknown condition {n!r}; this run has {', '.join(self.names)}")
            out[n] = np.asarray(self.table[self.names.index(n)])
        return out

    def negative(self):
        return np.asarray(self._negative)

    def video_shape(self):
        return self._shape


class EmbeddingConditioning(Conditioning):
    """Precomputed text embeddings: the negative prompt's embedding file of the run, if readable."""

    def __init__(self, data: Mapping[str, Any]):
        self.path = data.get("negative_embedding") or ""
        if not self.path and data.get("paths"):  # a prepare output folder carries its own
            from anyflow_jax.data.records import RecordFormatError, resolve_record_paths
            try:
                self.path = resolve_record_paths(list(data["paths"]))[1] or ""
            except (RecordFormatError, OSError):
                self.path = ""

    def negative(self):
        if self.path and os.path.isfile(self.path):
            neg = np.load(self.path, allow_pickle=False)
            return np.asarray(neg, np.float32).reshape((1,) + neg.shape[-2:])
        return None


CONDITIONING_ADAPTERS: dict[str, Callable[[Mapping[str, Any], WanTransformer3D], Conditioning]] = {
    "moving_digits": lambda data, model: ClassConditioning(data, model.in_channels),
    "array_record": lambda data, model: EmbeddingConditioning(data),
}


def conditioning_for(data: Mapping[str, Any] | None, model: WanTransformer3D) -> Conditioning:
    """The conditioning adapter of a run's data config (a plain one when unknown)."""
    source = (data or {}).get("source")
    if source in CONDITIONING_ADAPTERS:
        return CONDITIONING_ADAPTERS[source](data, model)
    return Conditioning()


# ------------------------------------------------------------------------------ the generator
@dataclasses.dataclass
class Generator:
    kind: str  # a sampler kind (stages.SAMPLERS)
    stage: str
    model: WanTransformer3D
    params: Any
    path: str
    data: dict  # the run's data config when known
    shift: float = 5.0
    conditioning: Conditioning = dataclasses.field(default_factory=Conditioning)

    def __post_init__(self):
        self._sampler = stage_registry.get_sampler(self.kind)
        # a causal sampler (a FAR student's chunk loop) takes the FAR module itself
        self._apply = self.model if self._sampler.causal else make_apply_fn(self.model)
        self._fns: dict = {}
        self._programs: dict = {}
        self.traces = 0  # how often the any-step sampler was traced (each trace is a compile)

    @property
    def causal(self) -> bool:
        """Whether the checkpoint samples chunk by chunk (a FAR network: takes ``context_latents``)."""
        return self._sampler.causal

    def video_shape(self) -> tuple[int, int, int, int]:
        shape = self.conditioning.video_shape()
        if shape is None:
            raise RunError(f"{self.path}: the video shape is unknown for this checkpoint; pass it explicitly")
        return shape

    def _fn(self, steps: int, guidance: float):
        """The sampler for a static step count ``steps``: ``fn(params, noise, context, neg, keys)``
        (one program per step count; :meth:`sample` uses :meth:`_program` instead)."""
        key = (steps, guidance)
        if key not in self._fns:
            run, apply, shift = self._sampler.run, self._apply, self.shift

            def fn(params, noise, context, neg, keys):
                return run(apply, params, noise, context, num_steps=steps, shift=shift, guidance=guidance,
                           neg_context=neg, keys=keys)
            self._fns[key] = jax.jit(fn)
        return self._fns[key]

    def _program(self, guidance: float):
        """The any-step sampler: ``fn(params, noise, context, neg, keys, grid, steps)`` with the step
        count ``steps`` and the padded grid (:func:`sampling.padded_step_grid`) as data, so one
        program serves every step count up to the grid's capacity."""
        if guidance not in self._programs:
            run, apply, shift = self._sampler.run, self._apply, self.shift

            def fn(params, noise, context, neg, keys, grid, steps, context_latents=None):
                self.traces += 1
                extra = {} if context_latents is None else {"context_latents": context_latents}
                return run(apply, params, noise, context, num_steps=steps, shift=shift, guidance=guidance,
                           neg_context=neg, keys=keys, grid=grid, **extra)
            self._programs[guidance] = jax.jit(fn)
        return self._programs[guidance]

    def sample(self, noise, context, steps: int, *, guidance: float | None = None, neg_context=None,
               keys: jax.Array | None = None, capacity: int | None = None, context_latents=None) -> jax.Array:
        """Generate from ``noise`` (B, F, H, W, C) with ``steps`` model evaluations per sample
        (times 2 with CFG). ``keys`` (B,) feed a stochastic sampler (default: :func:`sample_keys`
        of seed 0 and indices 0..B-1). Every step count up to ``capacity`` (default
        :func:`sampling.grid_capacity` of ``steps``: 1..32 steps share one program) runs the same
        compiled program; pass the largest step count's capacity when sampling several.
        ``context_latents`` (B, Fc, H, W, C), a causal (FAR) sampler only: the first ``Fc`` latent
        frames are given (image-to-video: 1; video-to-video: a chunk boundary) and returned as they
        are; the rest continues them (one program per ``Fc``)."""
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if context_latents is not None and not self._sampler.causal:
            raise ValueError(f"context_latents (image/video-to-video) needs a causal (FAR) checkpoint; "
                             f"{self.path} samples with the {self.kind} sampler")
        cap = flow_sampling.grid_capacity(steps) if capacity is None else int(capacity)
        if cap < steps:
            raise ValueError(f"capacity {cap} is below the step count {steps}")
        g = self._sampler.default_guidance if guidance is None else float(guidance)
        if g < 1.0:
            raise ValueError(f"guidance must be >= 1, got {g}")
        if g != 1.0 and not self._sampler.supports_guidance:
            raise ValueError(f"the {self.kind} sampler has no classifier-free guidance; use guidance 1")
        if g != 1.0 and neg_context is None:
            raise ValueError("guidance > 1 needs a negative (unconditional) context")
        if neg_context is not None:
            neg_context = jnp.broadcast_to(jnp.asarray(neg_context), (noise.shape[0],) + tuple(neg_context.shape[1:]))
        if keys is None:
            keys = sample_keys(0, np.arange(noise.shape[0]))
        grid = flow_sampling.padded_step_grid(int(steps), cap, self.shift)
        extra = () if context_latents is None else (jnp.asarray(context_latents),)
        return self._program(g)(self.params, noise, context, neg_context, keys, grid, np.int32(steps), *extra)


def _is_far(model) -> bool:
    from anyflow_jax.models.far_wan import FarWanTransformer3D
    return isinstance(model, FarWanTransformer3D)


def load_generator(path: str, *, kind: str | None = None, use_ema: bool = True,
                   model_kwargs: dict | None = None) -> Generator:
    """Load a checkpoint for sampling; ``kind`` must match the checkpoint when both are known."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise RunError(f"checkpoint {path} does not exist")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    runtime = dict(model_kwargs or {})
    src_kind = run_files.checkpoint_kind(path)
    data, stage, meta = {}, None, {}
    if src_kind == "workdir":
        meta = run_files.read_run_file(path)
        stage = meta.get("stage")
        runtime.setdefault("scan_layers", meta.get("scan_layers", True))
        data = dict(meta.get("config", {}).get("data", {}))
    model, params, _ = run_files.load_start(path, runtime=runtime, use_ema=use_ema, field="--checkpoint")
    if stage is not None:
        found = stage_registry.get(stage).sampler
    else:
        found = {(True, True): "causal_flow_map", (True, False): "flow_map", (False, True): "causal_teacher",
                 (False, False): "teacher"}[(bool(model.flow_map), _is_far(model))]
    # outside a workdir a single-time model may be declared a consistency model
    declared_ok = stage is None and not model.flow_map and kind is not None and \
        not stage_registry.get_sampler(kind).flow_map_model
    if kind is not None and not stage_registry.kind_matches(found, kind) and not declared_ok:
        raise RunError(f"{path} is a {found} checkpoint{f' (stage {stage})' if stage else ''}, not {kind}")
    kind = found if kind is None or stage_registry.kind_matches(found, kind) else kind
    if stage_registry.get_sampler(kind).flow_map_model and not model.flow_map:
        raise RunError(f"{path}: a flow-map sampler needs a flow-map model")
    if stage_registry.get_sampler(kind).causal and not _is_far(model):
        raise RunError(f"{path}: the {kind} sampler needs a FAR (chunk-causal) network")
    if _is_far(model) and not stage_registry.get_sampler(kind).causal:
        raise RunError(f"{path}: a FAR (chunk-causal) network samples chunk by chunk (causal_flow_map or "
                       f"causal_teacher), not with the {kind} sampler")
    shift = float(meta.get("config", {}).get("loss", {}).get("shift", 5.0)) if src_kind == "workdir" else 5.0
    return Generator(kind=kind, stage=stage or kind, model=model, params=params, path=path, data=data, shift=shift,
                     conditioning=conditioning_for(data, model))


# ------------------------------------------------------------------------------ many videos
def _check_steps_value(s) -> int:
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
        raise ValueError(f"steps must be positive integers, got {s!r}")
    return int(s)


def _capacity(generator, steps_list) -> dict:
    """``{"capacity": K}`` for a :class:`Generator` (one program for every step count of the list),
    ``{}`` for other generators (any object with a ``sample`` method)."""
    if isinstance(generator, Generator):
        return {"capacity": flow_sampling.grid_capacity(max(steps_list))}
    return {}


def _context_latents_by_name(generator, context_latents, names, shape):
    """``{name: (Fc, H, W, C) float32}`` of :func:`sample_videos`' ``context_latents``, checked."""
    if context_latents is None:
        return None
    if not generator.causal:
        raise ValueError(f"context_latents (image/video-to-video) needs a causal (FAR) checkpoint; "
                         f"{generator.path} samples with the {generator.kind} sampler")
    if isinstance(context_latents, Mapping):
        missing = [n for n in names if n not in context_latents]
        if missing:
            raise ValueError(f"context_latents has no entry for condition(s) {missing}")
        given = {n: np.asarray(context_latents[n], np.float32) for n in names}
    else:
        one = np.asarray(context_latents, np.float32)
        given = {n: one for n in names}
    for n, a in given.items():
        if a.ndim != 4 or a.shape[1:] != tuple(shape[1:]) or a.shape[0] >= shape[0]:
            raise ValueError(f"context_latents for {n!r} must be (Fc, {', '.join(map(str, shape[1:]))}) with Fc < "
                             f"{shape[0]} frames, got {a.shape}")
    if len({a.shape for a in given.values()}) > 1:
        raise ValueError(f"all context_latents must have the same shape to be batched, got "
                         f"{sorted({a.shape for a in given.values()})}")
    return given


def sample_videos(generator, steps_list: Sequence[int], conditions: Mapping[str, Any], *, num_samples: int = 1,
                  seed: int = 0, guidance: float | None = None, neg_context=None,
                  video_shape: Sequence[int] | None = None, batch_size: int | None = None,
                  output: str = "float", progress: Callable[[int, int], None] | None = None,
                  context_latents: Any = None) -> dict[tuple[str, int, int], np.ndarray]:
    """Generate every (condition, sample, step count) video.

    ``conditions`` maps a name to a context ``(L, D)`` (or ``(1, L, D)``); sample ``i`` of every
    condition and step count starts from :func:`initial_noise` ``(seed, i)`` and, for a
    stochastic sampler, uses :func:`sample_keys` ``(seed, i)``. One ``generator.sample`` call per
    step count takes all conditions and samples (at most ``batch_size`` per call when given); the
    step counts share one compiled sampler (the grid capacity of the largest).
    ``guidance`` defaults to the kind's default; guidance > 1 needs ``neg_context`` ``(1, L, D)``.
    ``video_shape`` ``(F, H, W, C)`` defaults to ``generator.video_shape()``.

    Returns ``{(name, i, steps): video}`` with ``video`` ``(F, H, W, C)``: float32 in the model's
    range (``output="float"``) or mapped to uint8 (``output="uint8"``, see ``video.to_uint8``).
    ``progress(done, steps)`` is called after each batch with the number of videos it made.
    ``context_latents`` (a causal (FAR) generator only: image/video-to-video): the given first
    latent frames ``(Fc, H, W, C)``, one array for every condition or a mapping from each
    condition's name to its own; every sample continues them (``Generator.sample``).
    """
    from anyflow_jax import video as vid
    if output not in ("float", "uint8"):
        raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
    steps_list = [_check_steps_value(s) for s in steps_list]
    if not steps_list:
        raise ValueError("steps_list is empty")
    if not conditions:
        raise ValueError("no conditions to sample")
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    shape = tuple(int(x) for x in (video_shape if video_shape is not None else generator.video_shape()))
    names = list(conditions)
    ctx = []
    for n in names:
        c = np.asarray(conditions[n], np.float32)
        if c.ndim == 3 and c.shape[0] == 1:
            c = c[0]
        if c.ndim != 2:
            raise ValueError(f"condition {n!r}: a context must be (L, D) or (1, L, D), got {c.shape}")
        ctx.append(c)
    if len({c.shape for c in ctx}) > 1:
        raise ValueError(f"all contexts must have the same shape to be batched, got {sorted({c.shape for c in ctx})}")
    if neg_context is not None:
        neg_context = np.asarray(neg_context, np.float32)
        if neg_context.ndim == 2:
            neg_context = neg_context[None]
        if neg_context.shape != (1,) + ctx[0].shape:
            raise ValueError(f"the negative context must be (1, {ctx[0].shape[0]}, {ctx[0].shape[1]}) like the "
                             f"conditions, got {neg_context.shape}")
    given = _context_latents_by_name(generator, context_latents, names, shape)
    noise = initial_noise(seed, np.arange(int(num_samples)), shape)
    keys = sample_keys(seed, np.arange(int(num_samples)))
    jobs = [(n, k, i) for k, n in enumerate(names) for i in range(int(num_samples))]
    size = len(jobs) if not batch_size else int(batch_size)
    out: dict[tuple[str, int, int], np.ndarray] = {}
    capacity = _capacity(generator, steps_list)
    for steps in steps_list:
        for start in range(0, len(jobs), size):
            chunk = jobs[start:start + size]
            idx = np.asarray([i for _, _, i in chunk])
            z = jnp.asarray(noise[idx])
            c = jnp.asarray(np.stack([ctx[k] for _, k, _ in chunk]))
            if given is not None:
                capacity = dict(capacity, context_latents=jnp.asarray(np.stack([given[n] for n, _, _ in chunk])))
            x = generator.sample(z, c, steps, guidance=guidance, neg_context=neg_context, keys=keys[idx],
                                 **capacity)
            x = np.asarray(x, np.float32)
            for (n, _, i), v in zip(chunk, x):
                out[(n, i, steps)] = vid.to_uint8(v) if output == "uint8" else v
            if progress is not None:
                progress(len(chunk), steps)
    return out


__all__ = ["Generator", "load_generator", "sample_videos", "initial_noise", "sample_keys", "default_guidance",
           "DEFAULT_GUIDANCE", "KINDS", "Conditioning", "ClassConditioning", "EmbeddingConditioning",
           "conditioning_for", "CONDITIONING_ADAPTERS"]
