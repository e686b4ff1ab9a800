"""Periodic evaluators: watch a run learn while it trains (``config.eval``).

Every ``eval.every`` steps (and at the last step) the training loop calls each evaluator with the
train state. The evaluators built from the config:

- :class:`SampleEvaluator`: samples at every step count of ``eval.steps`` from the EMA weights,
  from the same fixed noise every time (:func:`anyflow_jax.inference.initial_noise` of
  ``eval.seed``), written to ``<workdir>/eval/step_<k>/``: ``samples.npz`` (the raw float
  videos or latents), one mp4 per (condition, sample, step count) and ``contact_sheet.png``
  (rows: conditions, columns: step counts), the sheet also logged as an image to TensorBoard.
  Conditions: the run's named ones (the toy's classes), an .npz of named embeddings, or prompts
  from a file encoded once with a pipeline folder's UMT5; latents are decoded with that
  folder's VAE;
- :class:`ToyMetricsEvaluator` (``eval.metrics``, moving-digits runs): the evaluation's metrics
  (Frechet distance in a real-video classifier's feature space, conditional accuracy, and with a
  teacher the distance to its ODE solution; :mod:`anyflow_jax.evaluation`) at every step count,
  logged as scalars ``eval/fd/steps<n>``, ``eval/accuracy/steps<n>``, ``eval/ode_distance/steps<n>``,
  so the any-step curve can be watched over training.

Both sample with one compiled program for every step count (the inference sampler with the step
count as data, :meth:`anyflow_jax.inference.Generator._program`), on the training mesh with the
EMA parameters as they are sharded (nothing is gathered to one device; only the samples come to
the host). An evaluator's failure is logged and training goes on. The schedule is a function of
the step only, and the noise and keys of ``eval.seed`` only, so a resumed run evaluates at the
same steps and, training being bit-exact across a resume, writes the same samples.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.errors import RunError

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
WARN_FRACTION = 0.25  # warn (once) when the evaluators take more than this share of the run's time
SAMPLES_FILE = "samples.npz"
SHEET_FILE = "contact_sheet.png"


def step_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, EVAL_DIR, f"step_{int(step):08d}")


def due(step: int, every: int, total: int) -> bool:
    """Whether the evaluators run after ``step``: every ``every`` steps and at the last step."""
    return every > 0 and (step % every == 0 or step == total)


def _host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one NumPy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class _Sampling:
    """The fixed inputs and the single compiled sampler program shared by the evaluators."""

    def __init__(self, run, *, kind: str | None = None, model=None, guidance: float | None = None):
        from anyflow_jax import inference
        from anyflow_jax import stages
        from anyflow_jax.flow import sampling as flow_sampling
        cfg = run.cfg
        self.kind = kind or run.record.sampler
        model = model if model is not None else run.nets.student
        data = dataclasses.asdict(cfg.data)
        self.gen = inference.Generator(kind=self.kind, stage=run.record.name, model=model, params=None,
                                       path=run.workdir, data=data, shift=float(cfg.loss.get("shift", 5.0)),
                                       conditioning=inference.conditioning_for(data, model))
        sampler = stages.get_sampler(self.kind)
        g = sampler.default_guidance if not guidance else float(guidance)
        if g < 1.0:
            raise RunError(f"config.eval.guidance must be >= 1 (0: the {self.kind} sampler's default), got {g}")
        if g != 1.0 and not sampler.supports_guidance:
            raise RunError(f"config.eval.guidance: the {self.kind} sampler has no classifier-free guidance")
        self.guidance = g
        self.program = self.gen._program(g)
        self.flow_sampling = flow_sampling
        self.inference = inference

    def negative(self, batch: int):
        neg = self.gen.conditioning.negative()
        if self.guidance == 1.0:
            return None
        if neg is None:
            raise RunError("config.eval.guidance > 1 needs the run's negative context (data.negative_embedding)")
        neg = np.asarray(neg, np.float32)
        neg = neg[None] if neg.ndim == 2 else neg
        return np.broadcast_to(neg, (batch,) + neg.shape[1:])

    def run(self, params, noise, contexts, keys, steps: int, capacity: int) -> np.ndarray:
        grid = self.flow_sampling.padded_step_grid(int(steps), capacity, self.gen.shift)
        x = self.program(params, jnp.asarray(noise), jnp.asarray(contexts), self.negative(noise.shape[0]),
                         keys, grid, np.int32(steps))
        return _host(x).astype(np.float32)


class SampleEvaluator:
    """Samples at ``eval.steps`` from the EMA weights, written under ``<workdir>/eval/step_<k>/``."""
    name = "samples"

    def __init__(self, run, writer, *, process_index: int = 0, video_shape: Sequence[int] | None = None):
        from anyflow_jax.flow import sampling as flow_sampling
        e = run.cfg.eval
        self.run_workdir, self.writer, self.process_index = run.workdir, writer, process_index
        self.sampling = _Sampling(run, guidance=e.guidance)
        self.steps = [int(s) for s in e.steps]
        self.capacity = flow_sampling.grid_capacity(max(self.steps))
        adapter = self.sampling.gen.conditioning
        self.prompts: list[str] = []
        self.decoder = None
        if e.pipeline:
            from anyflow_jax import text_to_video as t2v
            try:
                pipeline = t2v.check_pipeline(os.path.abspath(os.path.expanduser(e.pipeline)), "config.eval.pipeline")
            except t2v.PipelineError as err:
                raise RunError(str(err)) from None
        if e.prompts_file:
            self.prompts = _read_prompts(e.prompts_file)
            ctx, _ = t2v.encode_prompts(pipeline, self.prompts, log=log.info)
            contexts = {f"prompt{k}": c for k, c in enumerate(ctx)}
            if e.conditions:
                contexts = {n: contexts[n] for n in _known(e.conditions, contexts, "config.eval.prompts_file")}
        else:
            contexts = _named_contexts(adapter, e)
        self.names = list(contexts)
        shape = adapter.video_shape() if video_shape is None else video_shape
        if shape is None:
            raise RunError("config.eval: the run's video shape is unknown (no moving-digits or latent-record data)")
        self.shape = tuple(int(x) for x in shape)
        if e.pipeline:
            self.decoder = t2v.VideoDecoder.from_pipeline(pipeline)
            if self.decoder.z_dim != self.shape[3]:
                raise RunError(f"config.eval.pipeline: its VAE has {self.decoder.z_dim} latent channels, the run's "
                               f"latents {self.shape[3]}")
        inf = self.sampling.inference
        n = int(e.num_samples)
        self.jobs = [(name, i) for name in self.names for i in range(n)]
        self.noise = inf.initial_noise(e.seed, np.asarray([i for _, i in self.jobs]), self.shape)
        self.keys = inf.sample_keys(e.seed, np.asarray([i for _, i in self.jobs]))
        self.contexts = np.stack([contexts[name] for name, _ in self.jobs]).astype(np.float32)
        self.write_videos = bool(e.videos)
        self.fps = 8

    def __call__(self, step: int, state) -> dict[str, float]:
        samples = {s: self.sampling.run(state.ema_params, self.noise, self.contexts, self.keys, s, self.capacity)
                   for s in self.steps}
        if self.process_index == 0:
            self._write(step, samples)
        return {}

    def _write(self, step: int, samples: Mapping[int, np.ndarray]) -> None:
        from anyflow_jax import video as vid
        final = step_dir(self.run_workdir, step)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".step_{step:08d}.", dir=os.path.dirname(final))
        try:
            buf = io.BytesIO()
            np.savez(buf, **{f"steps{s}": x for s, x in samples.items()},
                     conditions=np.asarray([n for n, _ in self.jobs]), sample=np.asarray([i for _, i in self.jobs]))
            with open(os.path.join(tmp, SAMPLES_FILE), "wb") as fh:
                fh.write(buf.getvalue())
            if self.prompts:
                with open(os.path.join(tmp, "prompts.json"), "w") as fh:
                    json.dump({f"prompt{k}": p for k, p in enumerate(self.prompts)}, fh, indent=2, ensure_ascii=False)
            sheet = None
            if self.shape[3] in (1, 3) or self.decoder is not None:
                scale = 1 if self.decoder is not None else max(1, 64 // max(self.shape[1:3]))
                cells = {}
                for s, x in samples.items():
                    for (name, i), v in zip(self.jobs, x):
                        frames = self.decoder(v) if self.decoder is not None else vid.to_uint8(v)
                        if self.write_videos:
                            vid.write_mp4(os.path.join(tmp, f"{name}_s{i}_steps{s}.mp4"), vid.upscale(frames, scale),
                                          fps=self.fps)
                        if i == 0:
                            cells[(name, s)] = vid.upscale(frames, scale)
                rows = [(name, [cells[(name, s)] for s in self.steps]) for name in self.names]
                sheet = vid.contact_sheet(rows, [f"{s} step{'s' if s != 1 else ''}" for s in self.steps],
                                          corner=f"step {step}")
                sheet.save(os.path.join(tmp, SHEET_FILE))
            if os.path.isdir(final):  # a resumed run evaluates this step again: replace it
                old = final + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            tmp = None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if sheet is not None:
            self.writer.write_images(step, {"eval/contact_sheet": np.asarray(sheet.convert("RGB"))[None]})


def _read_prompts(path: str) -> list[str]:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        with open(path, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh if line.strip()]
    except OSError as err:
        raise RunError(f"config.eval.prompts_file: cannot read {path} ({err.strerror or err})") from None
    if not prompts:
        raise RunError(f"config.eval.prompts_file: {path} has no prompts (one per line)")
    return prompts


def _known(names, available, where: str) -> list[str]:
    missing = [n for n in names if n not in available]
    if missing:
        raise RunError(f"config.eval.conditions: {missing[0]!r} is not in {where} (it has {', '.join(available)})")
    return list(names)


def _named_contexts(adapter, e) -> dict[str, np.ndarray]:
    """``{name: (L, D)}``: ``eval.contexts`` (an .npz of named text embeddings) when given, else
    the run's named conditions (``eval.conditions``, default all of them)."""
    if e.contexts:
        path = os.path.abspath(os.path.expanduser(e.contexts))
        try:
            with np.load(path) as z:
                out = {k: np.asarray(z[k], np.float32) for k in z.files}
        except (OSError, ValueError) as err:
            raise RunError(f"config.eval.contexts: cannot read {path} ({err})") from None
        out = {k: (v[0] if v.ndim == 3 and v.shape[0] == 1 else v) for k, v in out.items()}
        bad = [k for k, v in out.items() if v.ndim != 2]
        if bad or not out:
            raise RunError(f"config.eval.contexts: {path} must hold named (L, D) embeddings"
                           + (f"; {bad[0]!r} is not 2-D" if bad else " (it is empty)"))
        names = _known(e.conditions, out, path) if e.conditions else list(out)
        return {n: out[n] for n in names}
    if not adapter.names:
        raise RunError("config.eval: this run's data has no named conditions; give config.eval.contexts "
                       "(an .npz of named text embeddings)")
    names = list(e.conditions) or list(adapter.names)
    try:
        got = adapter.contexts(names)
    except RunError as err:
        raise RunError(f"config.eval.conditions: {err}") from None
    return {n: (v[0] if v.ndim == 3 else v) for n, v in got.items()}


class ToyMetricsEvaluator:
    """FD, conditional accuracy and (with a teacher) ODE distance at ``eval.steps`` on the toy."""
    name = "metrics"

    def __init__(self, run, writer, *, frozen=None, process_index: int = 0):
        from anyflow_jax.evaluation import classifier as clf_lib
        from anyflow_jax.evaluation import harness
        from anyflow_jax.evaluation import metrics as M
        from anyflow_jax.flow import sampling as flow_sampling
        e, cfg = run.cfg.eval, run.cfg
        if cfg.data.source != "moving_digits":
            raise RunError("config.eval.metrics needs moving-digits data (the classifier is trained on its videos)")
        self.M = M
        self.sampling = _Sampling(run, guidance=e.guidance)
        self.steps = [int(s) for s in e.steps]
        self.capacity = flow_sampling.grid_capacity(max(self.steps))
        shape = tuple(self.sampling.gen.conditioning.video_shape())
        n = int(e.metrics_samples)
        table, neg = harness.class_table(self.sampling.gen)
        self.labels = np.arange(n) % table.shape[0]
        inf = self.sampling.inference
        self.noise = inf.initial_noise(e.seed, np.arange(n), shape)
        self.keys = inf.sample_keys(e.seed, np.arange(n))
        self.contexts = np.asarray(table[self.labels], np.float32)
        directory = e.classifier_dir or os.path.join(run.workdir, EVAL_DIR, "classifier")
        ccfg = clf_lib.ClassifierConfig(video_shape=shape, train_steps=int(e.classifier_steps), seed=int(e.seed))
        t0 = time.perf_counter()
        self.clf = clf_lib.load_or_train(os.path.abspath(os.path.expanduser(directory)), ccfg)
        real, _, _ = clf_lib.real_videos(n, split="test", seed=int(e.seed) + harness._REAL_OFFSET, video_shape=shape)
        self.real_feats = self.clf.features(real).astype(np.float64)
        self.reference = None
        if frozen is not None and run.nets.teacher is not None:
            # the teacher's ODE solution from the same noise (the evaluation's reference, fewer steps)
            teacher = _Sampling(run, kind="teacher", model=run.nets.teacher, guidance=harness.REFERENCE_GUIDANCE)
            rs = int(e.reference_steps)
            self.reference = teacher.run(frozen, self.noise, self.contexts, self.keys, rs,
                                         flow_sampling.grid_capacity(rs))
        log.info("eval metrics: classifier from %s (held-out digit accuracy %.3f), %d samples, %s [%.1fs]",
                 directory, self.clf.held_out_accuracy["digit"], n,
                 f"teacher ODE reference with {e.reference_steps} steps" if self.reference is not None
                 else "no ODE reference (no teacher)", time.perf_counter() - t0)

    def __call__(self, step: int, state) -> dict[str, float]:
        out = {}
        for s in self.steps:
            x = self.sampling.run(state.ema_params, self.noise, self.contexts, self.keys, s, self.capacity)
            if not np.all(np.isfinite(x)):
                out[f"eval/nonfinite/steps{s}"] = float(np.sum(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)))
                continue
            pred = self.clf.predict(x)
            out[f"eval/fd/steps{s}"] = float(self.M.frechet_distance(pred["features"], self.real_feats))
            out[f"eval/accuracy/steps{s}"] = float(self.M.conditional_accuracy(pred["digit_logits"], self.labels))
            if self.reference is not None:
                out[f"eval/ode_distance/steps{s}"] = float(self.M.ode_distance(x, self.reference))
        return out


class Evaluators:
    """The run's evaluators, called by the training loop after each due step."""

    def __init__(self, evaluators: Sequence[Any], every: int, total: int):
        self.evaluators = list(evaluators)
        self.every, self.total = every, total
        self.seconds = 0.0
        self.train_seconds = 0.0
        self.warned = False

    def due(self, step: int) -> bool:
        return bool(self.evaluators) and due(step, self.every, self.total)

    def __call__(self, step: int, state, train_seconds: float) -> dict[str, float]:
        """Run every evaluator; returns their scalars plus ``eval/seconds`` and ``eval/fraction``
        (this evaluation's time over the training time since the previous one plus it)."""
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        for ev in self.evaluators:
            try:
                out.update(ev(step, state))
            except Exception as e:  # noqa: BLE001 - an evaluator never stops training
                log.warning("evaluator %r failed at step %d, training goes on: %s: %s", ev.name, step,
                            type(e).__name__, e)
                out[f"eval/failed/{ev.name}"] = 1.0
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.train_seconds += train_seconds
        out["eval/seconds"] = dt
        out["eval/fraction"] = dt / max(dt + train_seconds, 1e-9)
        log.info("evaluated step %d in %.1fs (%.0f%% of the time since the last evaluation)", step, dt,
                 100 * out["eval/fraction"])
        # the cost is bounded by the config (every, samples, step counts); say when it is large
        total = self.seconds / max(self.seconds + self.train_seconds, 1e-9)
        if total > WARN_FRACTION and not self.warned:
            self.warned = True
            log.warning("the evaluators have taken %.0f%% of the run's time so far; raise config.eval.every or "
                        "lower config.eval.metrics_samples / config.eval.steps to make them cheaper", 100 * total)
        return out


def build(run, writer, *, frozen=None, video_shape: Sequence[int] | None = None) -> Evaluators:
    """The evaluators of ``run.cfg.eval`` (none when ``eval.every`` is 0). ``video_shape``
    ``(F, H, W, C)``: one training sample's (needed for latent-record runs). Errors in the eval
    config are :class:`RunError` (raised before training starts)."""
    e = run.cfg.eval
    if e.every <= 0:
        return Evaluators([], 0, run.cfg.train.steps)
    process_index = jax.process_index()
    evs: list[Any] = [SampleEvaluator(run, writer, process_index=process_index, video_shape=video_shape)]
    if e.metrics:
        evs.append(ToyMetricsEvaluator(run, writer, frozen=frozen, process_index=process_index))
    log.info("evaluators: %s every %d steps at %s", ", ".join(ev.name for ev in evs), e.every,
             ", ".join(f"{s} step{'s' if s != 1 else ''}" for s in e.steps))
    return Evaluators(evs, e.every, run.cfg.train.steps)


__all__ = ["SampleEvaluator", "ToyMetricsEvaluator", "Evaluators", "build", "due", "step_dir", "EVAL_DIR",
           "SAMPLES_FILE", "SHEET_FILE"]
