"""The embedded default end to end: ``python -m anyflow_jax.pipeline --workdir runs/toy``.

Runs the four toy stages on moving digits, each from the previous one's workdir:
teacher (flow matching from scratch) -> stage 1 (flow map) -> stage 2 (on-policy: backward
simulation + DMD + critic), and the consistency-distillation baseline from the teacher; then
evaluates all four at 1-32 steps (``anyflow_jax.evaluate``) and prints the table. Each stage
lives in ``<workdir>/<stage>`` and resumes (or is skipped when finished) if the pipeline is run
again; the evaluation is written to ``<workdir>/eval``. ``--override key=value`` changes any
config field of every stage (YAML values).

``--causal`` adds the causal (FAR) pair, ``far_flow_map`` (from the teacher) and ``far_on_policy``
(from it, with the teacher as the real score), to the stages and their text-to-video and
image-to-video rows to the evaluation (docs/far.md).

``--seeds 0,1,2`` repeats the whole pipeline per training seed (``seed`` and ``data.seed``) in
``<workdir>/seed<k>/``, evaluates each (one shared classifier in ``<workdir>/eval/classifier``)
and writes the mean and spread over seeds to ``<workdir>/eval/summary.json`` and
``summary.png``. One seed (the default, 0) keeps the single-run layout.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time

import yaml

from anyflow_jax import cli, fileio
from anyflow_jax import stages as stage_registry
from anyflow_jax.config import set_field
from anyflow_jax.defaults import toy_config
from anyflow_jax.errors import RunError

ORDER = stage_registry.pipeline_names()  # the registered stages (toy_pipeline), in registration order


def stage_config(stage: str, root: str, overrides: dict, steps_scale: float = 1.0, *,
                 classifier_root: str | None = None):
    """The toy config of ``stage`` with its starting checkpoints in ``root`` (the stage
    record's ``starts_from``), ``steps_scale`` applied and ``overrides`` set; its periodic
    evaluators' classifier in ``<classifier_root or root>/eval/classifier``."""
    c = toy_config(stage)
    record = stage_registry.get(stage)
    for field in ("student", "teacher", "critic"):
        c.init[field] = f"{root}/{record.starts_from[field]}" if field in record.starts_from else ""
    if c.eval.classifier_dir:  # the periodic evaluators share the pipeline evaluation's classifier
        c.eval.classifier_dir = f"{classifier_root or root}/eval/classifier"
    c.train.steps = max(1, int(round(c.train.steps * steps_scale)))
    c.train.checkpoint_every = min(c.train.checkpoint_every, c.train.steps)
    for key, value in overrides.items():
        try:
            set_field(c, key, value)
        except RunError as e:
            raise RunError(f"--override {key}: {e}") from None
    if c.lora.enabled and not c.init.student:
        # the toy teacher is the toy's pretraining (random init): trained in full, and every later
        # stage adapts it with LoRA (configs/toy.py)
        c.lora.enabled = False
    return c


def causal_stages() -> tuple[str, ...]:
    """The causal (FAR) stages ``--causal`` adds, in registration order (they start from the
    teacher, which the default stages train first)."""
    return tuple(name for name in stage_registry.names() if stage_registry.get(name).student_is_far)


def parse_seeds(spec: str) -> list[int]:
    try:
        seeds = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise RunError(f"--seeds expects comma-separated non-negative integers, got {spec!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise RunError(f"--seeds expects distinct non-negative integers, got {spec!r}")
    return seeds


# YAML 1.1 (PyYAML) reads "2e-3" as a string (its floats need a dot): numbers in scientific
# notation are floats here, as a user writing --override optim.lr=2e-3 means
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_overrides(items) -> dict:
    """``FIELD=VALUE`` items as ``{field: value}``, each value read as YAML (``true``, ``[1, 2]``,
    ``0.5``) with scientific notation (``2e-3``) as a float."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RunError(f"--override expects FIELD=VALUE, got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _SCIENTIFIC.match(parsed.strip()):
            parsed = float(parsed)
        out[key.strip()] = parsed
    return out


def seed_root(root: str, seed: int, seeds) -> str:
    """Where seed ``seed``'s stages live: ``root`` for a single seed, else ``root/seed<k>``."""
    return root if len(seeds) == 1 else os.path.join(root, f"seed{seed}")


def seed_overrides(overrides: dict, seed: int, seeds) -> dict:
    """``overrides`` plus the training and data seeds of ``seed`` (several seeds only)."""
    return dict(overrides) if len(seeds) == 1 else {**overrides, "seed": seed, "data.seed": seed}


def run(root: str, *, stages=None, overrides=None, steps_scale: float = 1.0,
        classifier_root: str | None = None) -> dict[str, dict]:
    """Train ``stages`` (default: every registered stage, in order) in ``root/<stage>``, each from
    the workdirs its record starts from. Every stage's config is built and checked before the
    first one trains. A finished stage is skipped, an unfinished one resumed; a stop signal
    raises :class:`~anyflow_jax.errors.Preempted` (the later stages do not start)."""
    from anyflow_jax.config import parse
    from anyflow_jax.training.loop import train
    root = os.path.abspath(root)
    stages = stage_registry.pipeline_names() if stages is None else tuple(stages)
    configs = {stage: stage_config(stage, root, overrides or {}, steps_scale, classifier_root=classifier_root)
               for stage in stages}
    for config in configs.values():
        parse(config)
    results = {}
    for stage, cfg in configs.items():
        t0 = time.time()
        print(f"== {stage}: {cfg.train.steps} steps -> {root}/{stage}", flush=True)
        results[stage] = train(cfg, os.path.join(root, stage))
        results[stage]["wall_sec"] = time.time() - t0
        done = "already done" if results[stage].get("already_done") else f"done in {results[stage]['wall_sec']:.0f}s"
        print(f"== {stage} {done}", flush=True)
    return results


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise cli.UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m anyflow_jax.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/toy")
    ap.add_argument("--stages", default=",".join(stage_registry.pipeline_names()),
                    help="comma-separated subset, in order (any registered stage)")
    ap.add_argument("--causal", action="store_true",
                    help="also train and evaluate the causal (FAR) pair after the stages: "
                         + ", ".join(causal_stages()) + " (text-to-video and image-to-video rows)")
    ap.add_argument("--override", action="append", metavar="FIELD=VALUE",
                    help="config field for every stage, e.g. data.global_batch_size=8 (YAML value)")
    # dashes, as every other CLI; the underscore spellings of earlier versions keep working
    ap.add_argument("--steps-scale", "--steps_scale", dest="steps_scale", type=float, default=1.0,
                    help="multiply every stage's step count")
    ap.add_argument("--eval-steps", "--eval_steps", dest="eval_steps", default="1,2,4,8,16,32",
                    help="step counts to evaluate ('' to skip the evaluation)")
    ap.add_argument("--eval-samples", "--eval_samples", dest="eval_samples", default="256",
                    help="videos per model and step count")
    ap.add_argument("--seeds", default="0",
                    help="training seeds, e.g. 0,1,2: one pipeline per seed in <workdir>/seed<k> and the mean and "
                         "spread over seeds in <workdir>/eval/summary.json (default: 0, one run in <workdir>)")
    ap.add_argument("--eval-reference-steps", "--eval_reference_steps", dest="eval_reference_steps", default="128",
                    help="teacher ODE steps of the reference")
    return ap


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, 75 stopped by a signal)."""
    from anyflow_jax.errors import EXIT_PREEMPTED, Preempted
    from anyflow_jax.evaluation import harness
    t0 = time.time()
    try:  # every flag is checked before any work
        args = build_parser().parse_args(argv)
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        if args.causal:
            stages += tuple(s for s in causal_stages() if s not in stages)
        bad = [s for s in stages if s not in stage_registry.names()]
        if bad:
            raise cli.UsageError(f"--stages: unknown stage {bad[0]!r} (stages: {', '.join(stage_registry.names())})")
        if not args.steps_scale > 0:
            raise cli.UsageError(f"--steps-scale must be positive, got {args.steps_scale}")
        eval_steps = harness.parse_steps(args.eval_steps, "--eval-steps") if args.eval_steps.strip() else None
        eval_samples = harness.int_flag("--eval-samples", args.eval_samples, harness.MIN_SAMPLES)
        reference_steps = harness.int_flag("--eval-reference-steps", args.eval_reference_steps, 1)
        overrides = parse_overrides(args.override)
        seeds = parse_seeds(args.seeds)
        for stage in stages:  # bad overrides fail now, not after the first stage
            stage_config(stage, os.path.abspath(args.workdir), seed_overrides(overrides, seeds[0], seeds),
                         args.steps_scale)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    cli.cpu_flags()  # before JAX starts: much faster sampling on small CPUs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from anyflow_jax.training.loop import NonFiniteLoss
    top = os.path.abspath(args.workdir)
    try:
        evaluations = {}
        for seed in seeds:
            root = seed_root(top, seed, seeds)
            if len(seeds) > 1:
                print(f"== seed {seed} -> {root}", flush=True)
            run(root, stages=stages, overrides=seed_overrides(overrides, seed, seeds), steps_scale=args.steps_scale,
                classifier_root=top)
            if eval_steps:
                models = {stage_registry.get(s).eval_name: os.path.join(root, s) for s in stage_registry.names()
                          if os.path.isdir(os.path.join(root, s))}
                print(f"== evaluation of {sorted(models)} -> {root}/eval", flush=True)
                evaluations[seed] = harness.evaluate(
                    models, eval_steps, eval_samples, os.path.join(root, "eval"), overwrite=True,
                    reference_steps=reference_steps, verbose=False, classifier_dir=os.path.join(top, "eval", "classifier"))
                print(harness.format_table(evaluations[seed]), flush=True)
        if len(evaluations) > 1:
            summary = harness.aggregate(evaluations)
            os.makedirs(os.path.join(top, "eval"), exist_ok=True)
            fileio.atomic_write_bytes(os.path.join(top, "eval", "summary.json"),
                                      (json.dumps(summary, indent=2) + "\n").encode())
            harness.plot_results(summary, os.path.join(top, "eval", "summary.png"))
            print(f"== {len(evaluations)} seeds -> {top}/eval/summary.json", flush=True)
            print(harness.format_aggregate(summary), flush=True)
    except Preempted as e:
        print(f"== pipeline {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except (RunError, NonFiniteLoss, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"== pipeline finished in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    from anyflow_jax.cli import hugepage_malloc
    hugepage_malloc()  # re-executes once with huge-page malloc where that helps (cli.py)
    sys.exit(main())
