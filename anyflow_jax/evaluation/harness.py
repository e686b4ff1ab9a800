"""The evaluation harness: quality against step count for several models on moving digits.

For every model and step count it generates ``N`` videos and measures:

- ``fd``: the Fréchet distance between the generated videos and ``N`` real held-out ('test'
  split) videos, in the embedding space of a small video classifier trained on real 'train'
  split videos only (:mod:`anyflow_jax.evaluation.classifier`; FID with Inception replaced).
  Lower is better. ``real_baseline.fd_real_vs_real`` is the distance between two independent
  real sets of the same size: the floor set by finite ``N``.
- ``accuracy``: conditional accuracy, the fraction of videos whose predicted digit is the
  requested class. Higher is better; ``real_baseline.accuracy_real`` is the classifier's
  accuracy on the real set (the ceiling).
- ``ode_distance``: the distance to the teacher's fine-grid ODE solution from the same noise and
  class (Euler, ``reference_steps`` steps, CFG 3): the mean over samples of the per-sample RMS
  difference (``metrics.ode_distance``). Lower means closer to the teacher's ODE; for
  distribution quality read ``fd`` and ``accuracy``.

A causal (FAR) model also gets image-to-video rows (``results["i2v"]``): it continues frame 0
of the real held-out video ``i`` (the FD set) from the same noise, prompted with that video's
digit and with the null (negative) prompt, scored as ``digit_kept`` (the classifier's digit ==
the source video's), ``fd``, ``motion_confidence`` (the motion head's mean top probability) and
``first_step_shift`` (pixels from the given frame 0 to the generated frame 1); see
:data:`I2V_INFO`.

Protocol. Sample ``i`` asks for class ``i % 10`` (balanced classes) and starts from noise that
is a function of ``(seed, i)`` only (``inference.initial_noise``, the same construction as
``anyflow_jax.sample``), so it is the same for every model and step count. Each model uses its
kind's default guidance (teacher CFG 3 with the negative embedding; AnyFlow students and the
consistency model 1). The consistency sampler's re-noising keys are per sample, functions of
``(seed, i)`` only (``inference.sample_keys``). Generated videos are measured as produced (no
clipping).

Outputs in ``out``: ``results.json`` (models, steps, metrics, N, seeds, classifier held-out
accuracies, reference, wall times), ``metrics_vs_steps.png`` (one panel per metric, steps on a
log2 axis, one line per model), the cached classifier (``classifier/``) and reference solution
(``reference/``), reused by later runs with the same settings. An existing ``results.json`` is
only replaced with ``overwrite=True`` (``--overwrite``); every argument and checkpoint path is
checked before any model is loaded, and a failed run removes the output folder again when it
created it and nothing was written into it. The progress bar is shown only when stderr is a
terminal unless ``progress`` says otherwise. The CLI is ``python -m anyflow_jax.evaluate``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from typing import Any, Mapping, Sequence

import numpy as np

from anyflow_jax import cli, fileio
from anyflow_jax.cli import UsageError

RESULTS_FILE = "results.json"
PLOT_FILE = "metrics_vs_steps.png"
FORMAT = "anyflow-eval/1"
DEFAULT_STEPS = (1, 2, 4, 8, 16, 32)
MIN_SAMPLES = 10
REFERENCE_GUIDANCE = 3.0
METRICS = ("fd", "accuracy", "ode_distance")
METRIC_INFO = {
    "fd": "Frechet distance to real held-out videos in the classifier's embedding (lower is better)",
    "accuracy": "conditional accuracy: classifier digit == requested class (higher is better)",
    "ode_distance": "mean per-sample RMS distance to the teacher's fine-grid ODE solution from the same "
                    "noise and class (lower = closer to the teacher ODE)",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# Data seeds of the real sets, offset from --seed (away from the training data seed 0 and from
# the classifier's own data seeds).
_REAL_OFFSET, _REAL_FLOOR_OFFSET = 10_000, 20_000


class EvalError(UsageError):
    """Bad input to the evaluation (printed as one ``error: ...`` line by the CLI)."""


class ResultsExist(EvalError):
    """``results.json`` is already in the output folder and ``overwrite`` is false."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(f"{path} already exists (an earlier evaluation); pass overwrite=True to replace it")


# ------------------------------------------------------------------------------ parsing
def parse_models(spec: str) -> dict[str, str]:
    """``'name=CKPT[,name=CKPT...]'`` -> ``{name: CKPT}`` (order kept)."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise EvalError(f"--models expects name=CHECKPOINT[,name=CHECKPOINT...], got {item!r} in {spec!r}")
        if not _NAME_RE.match(name):
            raise EvalError(f"--models: model name {name!r} may only use letters, digits and _ . + -")
        if name in out:
            raise EvalError(f"--models: model name {name!r} is given twice")
        out[name] = path
    return out


def parse_steps(spec, flag: str = "steps") -> list[int]:
    """``'1,2,4'`` (or a sequence) -> sorted unique positive ints; anything else is an error."""
    try:
        return sorted(cli.parse_steps(spec, flag))
    except UsageError as e:
        raise EvalError(str(e)) from None


def int_flag(flag: str, value, minimum: int) -> int:
    """A command-line integer ``>= minimum``; anything else is an :class:`EvalError`."""
    text = str(value).strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise EvalError(f"{flag} must be an integer, got {value!r}")
    v = int(text)
    if v < minimum:
        raise EvalError(f"{flag} must be >= {minimum}, got {v}")
    return v


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise EvalError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise EvalError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# ------------------------------------------------------------------------------ helpers
def _params_fingerprint(params) -> str:
    import jax
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _writable_dir(out: str) -> str:
    try:
        return fileio.ensure_writable_dir(out)
    except OSError as e:
        raise EvalError(f"output folder {e}") from None


def _check_checkpoint(label: str, path: str, kind: str | None = None) -> None:
    """Fail unless ``path`` is a checkpoint (training workdir, Orbax model checkpoint or diffusers
    folder) and, for a workdir (whose ``run.json`` names its stage), of ``kind``; loads nothing."""
    from anyflow_jax.checkpoints import runs
    from anyflow_jax.errors import RunError
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise EvalError(f"{label}: checkpoint {path} does not exist")
    try:
        src_kind = runs.checkpoint_kind(full)
    except RunError:
        raise EvalError(f"{label}: {runs.not_a_checkpoint(path)}") from None
    if kind is None or src_kind != "workdir":
        return
    try:
        stage, found = runs.workdir_sampler(full)
    except (RunError, OSError, ValueError) as e:
        raise EvalError(f"{label}: cannot read {path}: {e}") from None
    if found is not None and found != kind:
        raise EvalError(f"{label}: {full} is a {found} checkpoint (stage {stage}), not {kind}")


def _generate(gen, noise, labels, table, neg, steps, guidance, *, seed, chunk_size, progress=None, capacity=None,
              context_latents=None):
    """Videos from ``gen`` for every row of ``noise``, in chunks of ``chunk_size`` (the last chunk is
    padded to the same shape, so the sampler compiles once for every step count up to
    ``capacity``); ``context_latents`` (N, Fc, ...): given first frames (a causal model's I2V)."""
    import jax.numpy as jnp

    from anyflow_jax.inference import sample_keys
    n = noise.shape[0]
    size = min(chunk_size, n)
    outs = []
    for start in range(0, n, size):
        idx = np.arange(start, min(start + size, n))
        k = idx.size
        idx = np.concatenate([idx, np.repeat(idx[-1:], size - k)])  # pad: one compiled shape
        z, c = noise[idx], table[labels[idx]]
        extra = {} if context_latents is None else {"context_latents": jnp.asarray(context_latents[idx])}
        x = gen.sample(jnp.asarray(z), jnp.asarray(c), int(steps), guidance=guidance, neg_context=jnp.asarray(neg),
                       keys=sample_keys(seed, idx), capacity=capacity, **extra)
        outs.append(np.asarray(x, np.float32)[:k])
        if progress is not None:
            progress.update(1)
    return np.concatenate(outs)


def class_table(gen) -> tuple[np.ndarray, np.ndarray]:
    """``(contexts (num_classes, L, D), negative (1, L, D))`` of a moving-digits model (its
    conditioning adapter's named conditions, in order)."""
    adapter = gen.conditioning
    neg = adapter.negative()
    if not adapter.names or neg is None:
        raise EvalError(f"{gen.path}: not a moving-digits run (the evaluation needs its class conditioning)")
    return np.stack(list(adapter.contexts().values())), np.asarray(neg)


def _load(name: str, path: str, kind: str | None = None):
    from anyflow_jax.errors import RunError
    from anyflow_jax.inference import load_generator
    if not os.path.exists(os.path.expanduser(path)):
        raise EvalError(f"model {name!r}: checkpoint {path} does not exist")
    try:
        return load_generator(path, kind=kind)
    except (RunError, ValueError, OSError, KeyError) as e:
        raise EvalError(f"model {name!r}: cannot load {path}: {e}") from None


# ------------------------------------------------------------------------------ evaluate
def evaluate(models: Mapping[str, str], steps: Sequence[int] = DEFAULT_STEPS, num_samples: int = 256,
             out: str = "eval", *, reference_teacher: str | None = None, reference_steps: int = 128,
             seed: int = 0, classifier_seed: int = 0, chunk_size: int = 128,
             classifier_config: Mapping[str, Any] | None = None, progress: bool | None = None,
             plot: bool = True, verbose: bool = True, overwrite: bool = False,
             classifier_dir: str | None = None) -> dict:
    """Evaluate ``models`` (``{name: checkpoint}``) at every step count; write ``results.json`` and
    the plot into ``out`` and return the results dict (see the module docstring).
    ``classifier_dir`` (default ``out/classifier``): where the classifier is cached (trained once).

    ``reference_teacher`` defaults to the model named ``'teacher'``. ``classifier_config``
    overrides fields of :class:`~anyflow_jax.evaluation.classifier.ClassifierConfig` (the video
    shape always follows the models). ``progress``: ``None`` shows the bar only when stderr is a
    terminal, ``True`` always, ``False`` never. An existing ``out/results.json`` is a
    :class:`ResultsExist` error unless ``overwrite``. Raises :class:`EvalError` on bad input,
    before any model is loaded where the input allows it.
    """
    t_start = time.perf_counter()
    if not isinstance(models, Mapping) or not models:
        raise EvalError("no models given")
    for name in models:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise EvalError(f"model name {name!r} may only use letters, digits and _ . + -")
    steps = parse_steps(steps)
    num_samples = _check_int("num_samples", num_samples, MIN_SAMPLES)
    reference_steps = _check_int("reference_steps", reference_steps, 1)
    seed = _check_int("seed", seed, 0)
    classifier_seed = _check_int("classifier_seed", classifier_seed, 0)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    for name, path in models.items():
        if not isinstance(path, (str, os.PathLike)):
            raise EvalError(f"model {name!r}: the checkpoint must be a path, got {path!r}")
        _check_checkpoint(f"model {name!r}", os.fspath(path))
    if reference_teacher is None:
        if "teacher" not in models:
            raise EvalError("no reference teacher: name one of the models 'teacher' or pass --reference-teacher")
        reference_teacher = models["teacher"]
    _check_checkpoint("reference teacher", os.fspath(reference_teacher), kind="teacher")
    results_path = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(out))), RESULTS_FILE)
    if os.path.lexists(results_path) and not overwrite:
        raise ResultsExist(results_path)
    created = cli.missing_dirs(out)
    try:
        out = _writable_dir(out)
        return _evaluate(models, steps, num_samples, out, reference_teacher=reference_teacher,
                         reference_steps=reference_steps, seed=seed, classifier_seed=classifier_seed,
                         chunk_size=chunk_size, classifier_config=classifier_config, progress=progress, plot=plot,
                         verbose=verbose, t_start=t_start, classifier_dir=classifier_dir)
    except BaseException:
        cli.remove_empty_dirs(created)  # a failed run leaves no empty output folder it created
        raise


def _evaluate(models, steps, num_samples, out, *, reference_teacher, reference_steps, seed, classifier_seed,
              chunk_size, classifier_config, progress, plot, verbose, t_start, classifier_dir=None) -> dict:
    """:func:`evaluate` after its checks (``out`` exists and is writable)."""
    from tqdm.auto import tqdm

    from anyflow_jax.evaluation import classifier as clf_lib
    from anyflow_jax.evaluation import metrics as M
    from anyflow_jax.inference import default_guidance, initial_noise

    say = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)

    # ---- models and the shared conditioning
    gens = {name: _load(name, path) for name, path in models.items()}
    ref_path = os.path.abspath(os.path.expanduser(reference_teacher))
    ref_gen = next((g for g in gens.values() if g.path == ref_path and g.kind == "teacher"), None)
    if ref_gen is None:
        ref_gen = _load("reference teacher", reference_teacher, kind="teacher")
    shapes, tables = {}, {}
    for name, g in list(gens.items()) + [("reference teacher", ref_gen)]:
        try:
            shapes[name] = tuple(g.video_shape())
            tables[name] = class_table(g)
        except Exception as e:  # RunError: not a moving-digits run
            raise EvalError(f"model {name!r}: {e}") from None
    first = next(iter(gens))
    shape, (table, neg) = shapes[first], tables[first]
    for name in shapes:
        if shapes[name] != shape:
            raise EvalError(f"model {name!r} makes videos of shape {shapes[name]}, model {first!r} {shape}")
        if tables[name][0].shape != table.shape or not np.array_equal(tables[name][0], table):
            raise EvalError(f"model {name!r} uses a different class conditioning than model {first!r}")

    # ---- classifier (cached in <out>/classifier)
    t0 = time.perf_counter()
    cfg_kw = dict(classifier_config or {})
    cfg_kw.update(video_shape=shape, seed=classifier_seed)
    try:
        ccfg = clf_lib.ClassifierConfig(**cfg_kw)
    except TypeError as e:
        raise EvalError(f"classifier_config: {e}") from None
    clf_dir = os.path.abspath(os.path.expanduser(classifier_dir)) if classifier_dir else os.path.join(out, "classifier")
    say(f"classifier: loading from {clf_dir} or training on real 'train' videos {shape} ...")
    clf = clf_lib.load_or_train(clf_dir, ccfg)
    clf_seconds = time.perf_counter() - t0
    acc = clf.held_out_accuracy
    say(f"classifier held-out accuracy ('test' split, {clf.metrics.get('held_out_samples')} videos): "
        f"digit {acc['digit']:.3f}, motion {acc['motion']:.3f} "
        f"(motion ceiling {clf.metrics.get('motion_bayes_accuracy', float('nan')):.3f}) [{clf_seconds:.1f}s]")

    # ---- real sets
    real, real_digits, real_dirs = clf_lib.real_videos(num_samples, split="test", seed=seed + _REAL_OFFSET,
                                                       video_shape=shape)
    floor, _, _ = clf_lib.real_videos(num_samples, split="test", seed=seed + _REAL_FLOOR_OFFSET, video_shape=shape)
    real_pred = clf.predict(real)
    real_feats = real_pred["features"].astype(np.float64)
    baseline = {
        "fd_real_vs_real": M.frechet_distance(real_feats, clf.features(floor)),
        "accuracy_real": M.conditional_accuracy(real_pred["digit_logits"], real_digits),
    }

    # ---- noise, classes, reference
    labels = np.arange(num_samples) % table.shape[0]
    noise = initial_noise(seed, np.arange(num_samples), shape)
    n_chunks = math.ceil(num_samples / min(chunk_size, num_samples))
    ref_key = hashlib.sha256(json.dumps(dict(
        teacher=_params_fingerprint(ref_gen.params), shift=ref_gen.shift, steps=reference_steps,
        guidance=REFERENCE_GUIDANCE, seed=seed, n=num_samples, shape=list(shape),
        noise=hashlib.sha256(noise.tobytes()).hexdigest(), table=hashlib.sha256(table.tobytes()).hexdigest(),
        neg=hashlib.sha256(np.asarray(neg).tobytes()).hexdigest()), sort_keys=True).encode()).hexdigest()[:16]
    ref_file = os.path.join(out, "reference", f"ode-{ref_key}.npy")
    causal = [name for name, g in gens.items() if g.causal]
    total = (len(gens) + len(I2V_PROMPTS) * len(causal)) * len(steps) * n_chunks + (
        0 if os.path.exists(ref_file) else n_chunks)
    bar = tqdm(total=total, desc="evaluate", unit="chunk", disable=cli.progress_disable(progress), dynamic_ncols=True)

    t0 = time.perf_counter()
    ref_cached = os.path.exists(ref_file)
    reference = None
    if ref_cached:
        try:
            reference = np.load(ref_file)
            if reference.shape != noise.shape:
                reference = None
        except (OSError, ValueError):
            reference = None
    if reference is None:
        ref_cached = False
        bar.set_postfix_str(f"reference: teacher ODE {cli.plural(reference_steps, 'step')}")
        reference = _generate(ref_gen, noise, labels, table, neg, reference_steps, REFERENCE_GUIDANCE,
                              seed=seed, chunk_size=chunk_size, progress=bar)
        os.makedirs(os.path.dirname(ref_file), exist_ok=True)
        import io
        buf = io.BytesIO()
        np.save(buf, reference)
        fileio.atomic_write_bytes(ref_file, buf.getvalue())
    ref_seconds = time.perf_counter() - t0

    # ---- generate and measure
    metrics = {m: {name: {} for name in gens} for m in METRICS}
    gen_seconds: dict[str, dict[str, float]] = {name: {} for name in gens}
    nonfinite: dict[str, dict[str, int]] = {}
    from anyflow_jax.flow.sampling import grid_capacity
    for name, g in gens.items():
        guidance = default_guidance(g.kind)
        for n in steps:
            bar.set_postfix_str(f"{name} {cli.plural(n, 'step')}")
            t1 = time.perf_counter()
            x = _generate(g, noise, labels, table, neg, n, guidance, seed=seed, chunk_size=chunk_size, progress=bar,
                          capacity=grid_capacity(max(steps)))
            gen_seconds[name][str(n)] = time.perf_counter() - t1
            bad = int(np.sum(~np.all(np.isfinite(x.reshape(num_samples, -1)), axis=1)))
            if bad:
                nonfinite.setdefault(name, {})[str(n)] = bad
                for m in METRICS:
                    metrics[m][name][str(n)] = None
                continue
            pred = clf.predict(x)
            metrics["fd"][name][str(n)] = M.frechet_distance(pred["features"], real_feats)
            metrics["accuracy"][name][str(n)] = M.conditional_accuracy(pred["digit_logits"], labels)
            metrics["ode_distance"][name][str(n)] = M.ode_distance(x, reference)
    i2v = None
    if causal:
        i2v = _image_to_video({name: gens[name] for name in causal}, clf, steps, noise, real, real_digits,
                              real_feats, table, neg, seed=seed, chunk_size=chunk_size, bar=bar,
                              capacity=grid_capacity(max(steps)), gen_seconds=gen_seconds)
    bar.close()

    results = {
        "format": FORMAT,
        "models": {name: {"checkpoint": g.path, "kind": g.kind, "stage": g.stage,
                          "guidance": default_guidance(g.kind)} for name, g in gens.items()},
        "steps": steps,
        "num_samples": num_samples,
        "seed": seed,
        "seeds": {"noise": seed, "consistency_renoise": seed, "real_videos": seed + _REAL_OFFSET,
                  "real_floor_videos": seed + _REAL_FLOOR_OFFSET, "classifier": classifier_seed},
        "classes": "sample i asks for class i % 10",
        "video_shape": list(shape),
        "classifier": {
            "architecture": "VideoClassifier (anyflow_jax.evaluation.classifier)",
            "trained_on": "MovingDigitsSource(split='train') real videos only",
            "config": ccfg.to_dict(),
            "held_out_accuracy": acc,
            "held_out_split": "test",
            "held_out_samples": clf.metrics.get("held_out_samples"),
            "motion_bayes_accuracy": clf.metrics.get("motion_bayes_accuracy"),
            "train_seconds": clf.metrics.get("train_seconds"),
            "cached": bool(clf.from_cache),
            "feature_dim": int(real_feats.shape[1]),
        },
        "reference": {"teacher": ref_gen.path, "steps": reference_steps, "guidance": REFERENCE_GUIDANCE,
                      "sampler": "Euler ODE (teacher)", "cached": ref_cached, "file": os.path.relpath(ref_file, out)},
        "real_baseline": baseline,
        "metric_info": METRIC_INFO,
        "metrics": metrics,
        **({"i2v": i2v} if i2v is not None else {}),
        "nonfinite_samples": nonfinite,
        "wall_seconds": {"classifier": clf_seconds, "reference": ref_seconds, "generation": gen_seconds,
                         "total": None},
    }
    if plot:
        plot_results(results, os.path.join(out, PLOT_FILE))
    results["wall_seconds"]["total"] = time.perf_counter() - t_start
    fileio.atomic_write_bytes(os.path.join(out, RESULTS_FILE), (json.dumps(results, indent=2) + "\n").encode())
    return results


# ------------------------------------------------------------------------------ image-to-video
I2V_PROMPTS = ("prompted", "unprompted")
I2V_METRICS = ("digit_kept", "fd", "motion_confidence", "first_step_shift")
I2V_INFO = {
    "digit_kept": "the classifier's digit of the continuation == the digit of the real video whose first frame "
                  "was given (higher is better)",
    "fd": "Frechet distance of the continuations to the real held-out videos (lower is better)",
    "motion_confidence": "mean top probability of the classifier's motion head: one clear direction of motion "
                         "(real videos: real_motion_confidence)",
    "first_step_shift": "mean distance (pixels) between the intensity centroids of the given frame 0 and the "
                        "generated frame 1: continuity (real videos: real_first_step_shift; a continuation that "
                        "ignores frame 0: about shift_unrelated)",
}


def _image_to_video(gens, clf, steps, noise, real, real_digits, real_feats, table, neg, *, seed, chunk_size, bar,
                    capacity, gen_seconds) -> dict:
    """Image-to-video of causal (FAR) models: each continues the first frame of the real held-out
    video ``i`` (the same videos the FD compares with) from the same noise as text-to-video, with
    the prompt of that video's digit (``prompted``) and with the negative (null) prompt
    (``unprompted``: the digit can only come from the frame)."""
    from anyflow_jax.evaluation import metrics as M
    first = real[:, :1]
    labels = np.asarray(real_digits)
    real_conf = float(np.mean(_softmax(clf.predict(real)["motion_logits"]).max(-1)))
    # frame 1 of another real video after this one's frame 0: what ignoring the given frame scores
    unrelated = M.first_step_shift(np.concatenate([real[:, :1], np.roll(real[:, 1:2], 1, axis=0)], axis=1))
    out: dict = {"protocol": "continue frame 0 of real held-out video i (the FD set), noise as text-to-video; "
                             "prompted: the prompt of its digit; unprompted: the negative (null) prompt",
                 "metric_info": I2V_INFO, "real_motion_confidence": real_conf,
                 "real_first_step_shift": M.first_step_shift(real), "shift_unrelated": unrelated, "metrics": {}}
    for mode in I2V_PROMPTS:
        mtable = table if mode == "prompted" else np.broadcast_to(neg, (table.shape[0],) + neg.shape[1:])
        cells = out["metrics"][mode] = {m: {name: {} for name in gens} for m in I2V_METRICS}
        for name, g in gens.items():
            guidance = _default_guidance(g)
            for n in steps:
                bar.set_postfix_str(f"{name} i2v {mode} {cli.plural(n, 'step')}")
                t1 = time.perf_counter()
                x = _generate(g, noise, labels, mtable, neg, n, guidance, seed=seed, chunk_size=chunk_size,
                              progress=bar, capacity=capacity, context_latents=first)
                gen_seconds[name][f"i2v_{mode}_{n}"] = time.perf_counter() - t1
                if not np.all(np.isfinite(x)):
                    for m in I2V_METRICS:
                        cells[m][name][str(n)] = None
                    continue
                pred = clf.predict(x)
                cells["digit_kept"][name][str(n)] = M.conditional_accuracy(pred["digit_logits"], labels)
                cells["fd"][name][str(n)] = M.frechet_distance(pred["features"], real_feats)
                cells["motion_confidence"][name][str(n)] = float(np.mean(_softmax(pred["motion_logits"]).max(-1)))
                cells["first_step_shift"][name][str(n)] = M.first_step_shift(x)
    return out


def _softmax(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _default_guidance(gen) -> float:
    from anyflow_jax.inference import default_guidance
    return default_guidance(gen.kind)


# ------------------------------------------------------------------------------ reporting
def _fmt(v, metric: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "nan"
    return f"{v:.3f}" if metric == "accuracy" else f"{v:.4g}"


def _grid(names, steps, cells, width) -> list[str]:
    """Rows = models, columns = step counts (right-aligned), under a header and a rule."""
    heads = [cli.plural(int(s), "step") if i == 0 else s for i, s in enumerate(steps)]
    colw = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(heads)]
    header = f"{'model':<{width}}  " + "  ".join(f"{h:>{colw[i]}}" for i, h in enumerate(heads))
    out = [header, "-" * len(header)]
    for n, row in zip(names, cells):
        out.append(f"{n:<{width}}  " + "  ".join(f"{c:>{colw[i]}}" for i, c in enumerate(row)))
    return out


def format_table(results: Mapping[str, Any]) -> str:
    """Plain-text tables: one block per metric, rows = models, columns = step counts."""
    steps = [str(s) for s in results["steps"]]
    names = list(results["models"])
    width = max([len("model")] + [len(n) for n in names])
    lines = []
    acc = results.get("classifier", {}).get("held_out_accuracy")
    if acc:
        lines.append(f"classifier held-out accuracy ({results['classifier'].get('held_out_samples')} 'test' videos): "
                     f"digit {acc['digit']:.3f}, motion {acc['motion']:.3f}")
    base = results.get("real_baseline", {})
    for metric in METRICS:
        if lines:
            lines.append("")
        lines.append(f"{metric}: {METRIC_INFO[metric]}; N={results['num_samples']}")
        if metric == "fd" and "fd_real_vs_real" in base:
            lines.append(f"  (real vs real at this N: {_fmt(base['fd_real_vs_real'], metric)})")
        if metric == "accuracy" and "accuracy_real" in base:
            lines.append(f"  (real videos: {_fmt(base['accuracy_real'], metric)})")
        cells = [[_fmt(results["metrics"][metric][n].get(s), metric) for s in steps] for n in names]
        lines.extend(_grid(names, steps, cells, width))
    i2v = results.get("i2v")
    if i2v:
        for mode in I2V_PROMPTS:
            for metric in I2V_METRICS:
                lines.append("")
                lines.append(f"image-to-video ({mode}) {metric}: {I2V_INFO[metric]}; N={results['num_samples']}")
                if metric == "motion_confidence":
                    lines.append(f"  (real videos: {i2v['real_motion_confidence']:.3f})")
                if metric == "first_step_shift":
                    lines.append(f"  (real videos: {i2v['real_first_step_shift']:.3f}; frame 1 of another video: "
                                 f"{i2v['shift_unrelated']:.3f})")
                table = i2v["metrics"][mode][metric]
                cells = [[_fmt(table[n].get(s), "accuracy" if metric != "fd" else metric) for s in steps]
                         for n in table]
                lines.extend(_grid(list(table), steps, cells, width))
    return "\n".join(lines)


def aggregate(runs: Mapping[Any, Mapping[str, Any]]) -> dict:
    """Mean and spread over training seeds of evaluations (``{seed: results}``, the same models
    and step counts): ``metrics[metric][model][steps]`` becomes ``{"mean", "std", "min", "max",
    "n", "values"}`` (``std`` the sample standard deviation, 0 for one value; runs whose value is
    missing, e.g. non-finite samples, are left out of that cell)."""
    runs = dict(runs)
    if not runs:
        raise EvalError("no evaluations to aggregate")
    first = next(iter(runs.values()))
    for seed, r in runs.items():
        if list(r["models"]) != list(first["models"]) or list(r["steps"]) != list(first["steps"]):
            raise EvalError(f"seed {seed}: the evaluation has other models or step counts than the first")
    def spread(tables, names):
        out: dict = {name: {} for name in names}
        for name in names:
            for s in first["steps"]:
                vals = [t[name].get(str(s)) for t in tables]
                vals = [float(v) for v in vals if v is not None]
                if not vals:
                    out[name][str(s)] = None
                    continue
                a = np.asarray(vals, np.float64)
                out[name][str(s)] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                                     "min": float(a.min()), "max": float(a.max()), "n": int(a.size), "values": vals}
        return out

    metrics = {m: spread([r["metrics"][m] for r in runs.values()], first["models"]) for m in METRICS}
    base = {k: float(np.mean([r.get("real_baseline", {}).get(k, np.nan) for r in runs.values()]))
            for k in first.get("real_baseline", {})}
    out = {"format": FORMAT, "aggregate": True, "seeds": list(runs), "models": first["models"],
           "steps": first["steps"], "num_samples": first["num_samples"], "metric_info": METRIC_INFO,
           "real_baseline": base, "metrics": metrics}
    if all("i2v" in r for r in runs.values()):  # the causal models' image-to-video scores
        i2v = [r["i2v"] for r in runs.values()]
        out["i2v"] = {"protocol": i2v[0]["protocol"], "metric_info": I2V_INFO,
                      **{k: float(np.mean([x[k] for x in i2v]))
                         for k in ("real_motion_confidence", "real_first_step_shift", "shift_unrelated")},
                      "metrics": {mode: {m: spread([x["metrics"][mode][m] for x in i2v],
                                                   list(i2v[0]["metrics"][mode][m]))
                                         for m in I2V_METRICS} for mode in I2V_PROMPTS}}
    return out


def format_aggregate(agg: Mapping[str, Any]) -> str:
    """Plain-text tables of :func:`aggregate`: ``mean ± std`` over the seeds in every cell."""
    steps = [str(s) for s in agg["steps"]]
    names = list(agg["models"])
    width = max([len("model")] + [len(n) for n in names])
    lines = [f"mean ± std over training seeds {', '.join(str(s) for s in agg['seeds'])}"]
    for metric in METRICS:
        lines.append("")
        lines.append(f"{metric}: {METRIC_INFO[metric]}; N={agg['num_samples']} per seed")
        cells = [[(f"{_fmt(c['mean'], metric)} ± {_fmt(c['std'], metric)}" if c else _fmt(None, metric))
                  for c in (agg["metrics"][metric][n].get(s) for s in steps)] for n in names]
        lines.extend(_grid(names, steps, cells, width))
    i2v = agg.get("i2v")
    if i2v:
        for mode in I2V_PROMPTS:
            for metric in I2V_METRICS:
                fmt = "accuracy" if metric != "fd" else metric
                lines.append("")
                lines.append(f"image-to-video ({mode}) {metric}: {I2V_INFO[metric]}; N={agg['num_samples']} per seed")
                table = i2v["metrics"][mode][metric]
                cells = [[(f"{_fmt(c['mean'], fmt)} ± {_fmt(c['std'], fmt)}" if c else _fmt(None, fmt))
                          for c in (table[n].get(s) for s in steps)] for n in table]
                lines.extend(_grid(list(table), steps, cells, width))
    return "\n".join(lines)


def plot_results(results: Mapping[str, Any], path: str) -> None:
    """One panel per metric against steps (log2 axis), one line per model; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = list(results["steps"])
    fig = Figure(figsize=(4.2 * len(METRICS), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(METRICS))
    titles = {"fd": "Frechet distance (lower is better)", "accuracy": "conditional accuracy (higher is better)",
              "ode_distance": "distance to teacher ODE (lower: closer)"}
    base = results.get("real_baseline", {})
    for ax, metric in zip(axes, METRICS):
        for name in results["models"]:
            vals = results["metrics"][metric][name]
            xs = [s for s in steps if vals.get(str(s)) is not None]
            if results.get("aggregate"):  # mean over seeds, the band spans the seeds' min..max
                line, = ax.plot(xs, [vals[str(s)]["mean"] for s in xs], marker="o", label=name)
                ax.fill_between(xs, [vals[str(s)]["min"] for s in xs], [vals[str(s)]["max"] for s in xs],
                                color=line.get_color(), alpha=0.2, lw=0)
            else:
                ax.plot(xs, [vals[str(s)] for s in xs], marker="o", label=name)
        if metric == "fd" and base.get("fd_real_vs_real") is not None:
            ax.axhline(base["fd_real_vs_real"], color="gray", ls="--", lw=1, label="real vs real")
        if metric == "accuracy" and base.get("accuracy_real") is not None:
            ax.axhline(base["accuracy_real"], color="gray", ls="--", lw=1, label="real videos")
            ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance")
            ax.legend(fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps])
        ax.set_xlabel("sampling steps")
        ax.set_title(titles[metric], fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = f", mean and min-max over training seeds {', '.join(map(str, results['seeds']))}" \
        if results.get("aggregate") else ""
    fig.suptitle(f"moving digits, N={results['num_samples']}{seeds}", fontsize=10)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    fileio.atomic_write_bytes(path, buf.getvalue())
