"""The embedded default end to end: ``python -m anyflow_jax.pipeline --workdir runs/toy``.

Runs the four toy stages on moving digits, each from the previous one's workdir:
teacher (flow matching from scratch) -> stage 1 (flow map) -> stage 2 (on-policy: backward
simulation + DMD + critic), and the consistency-distillation baseline from the teacher; then
evaluates all four at 1-32 steps (``anyflow_jax.evaluate``) and prints the table. Each stage
lives in ``<workdir>/<stage>`` and resumes (or is skipped when finished) if the pipeline is run
again; the evaluation is written to ``<workdir>/eval``. ``--override key=value`` changes any
config field of every stage (YAML values).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import yaml

from anyflow_jax import cli
from anyflow_jax import stages as stage_registry
from anyflow_jax.config import set_field
from anyflow_jax.defaults import toy_config
from anyflow_jax.errors import RunError

ORDER = stage_registry.names()  # the registered stages, in registration order


def stage_config(stage: str, root: str, overrides: dict, steps_scale: float = 1.0):
    """The toy config of ``stage`` with its starting checkpoints in ``root`` (the stage
    record's ``starts_from``), ``steps_scale`` applied and ``overrides`` set."""
    c = toy_config(stage)
    record = stage_registry.get(stage)
    for field in ("student", "teacher", "critic"):
        c.init[field] = f"{root}/{record.starts_from[field]}" if field in record.starts_from else ""
    if c.eval.classifier_dir:  # the periodic evaluators share the pipeline evaluation's classifier
        c.eval.classifier_dir = f"{root}/eval/classifier"
    c.train.steps = max(1, int(round(c.train.steps * steps_scale)))
    c.train.checkpoint_every = min(c.train.checkpoint_every, c.train.steps)
    for key, value in overrides.items():
        try:
            set_field(c, key, value)
        except RunError as e:
            raise RunError(f"--override {key}: {e}") from None
    return c


def parse_overrides(items) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RunError(f"--override expects FIELD=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(root: str, *, stages=None, overrides=None, steps_scale: float = 1.0) -> dict[str, dict]:
    """Train ``stages`` (default: every registered stage, in order) in ``root/<stage>``, each from
    the workdirs its record starts from. Every stage's config is built and checked before the
    first one trains. A finished stage is skipped, an unfinished one resumed; a stop signal
    raises :class:`~anyflow_jax.errors.Preempted` (the later stages do not start)."""
    from anyflow_jax.config import parse
    from anyflow_jax.training.loop import train
    root = os.path.abspath(root)
    stages = stage_registry.names() if stages is None else tuple(stages)
    configs = {stage: stage_config(stage, root, overrides or {}, steps_scale) for stage in stages}
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
    ap.add_argument("--stages", default=",".join(stage_registry.names()), help="comma-separated subset, in order")
    ap.add_argument("--override", action="append", metavar="FIELD=VALUE",
                    help="config field for every stage, e.g. data.global_batch_size=8 (YAML value)")
    # dashes, as every other CLI; the underscore spellings of earlier versions keep working
    ap.add_argument("--steps-scale", "--steps_scale", dest="steps_scale", type=float, default=1.0,
                    help="multiply every stage's step count")
    ap.add_argument("--eval-steps", "--eval_steps", dest="eval_steps", default="1,2,4,8,16,32",
                    help="step counts to evaluate ('' to skip the evaluation)")
    ap.add_argument("--eval-samples", "--eval_samples", dest="eval_samples", default="256",
                    help="videos per model and step count")
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
        bad = [s for s in stages if s not in stage_registry.names()]
        if bad:
            raise cli.UsageError(f"--stages: unknown stage {bad[0]!r} (stages: {', '.join(stage_registry.names())})")
        if not args.steps_scale > 0:
            raise cli.UsageError(f"--steps-scale must be positive, got {args.steps_scale}")
        eval_steps = harness.parse_steps(args.eval_steps, "--eval-steps") if args.eval_steps.strip() else None
        eval_samples = harness.int_flag("--eval-samples", args.eval_samples, harness.MIN_SAMPLES)
        reference_steps = harness.int_flag("--eval-reference-steps", args.eval_reference_steps, 1)
        overrides = parse_overrides(args.override)
        for stage in stages:  # bad overrides fail now, not after the first stage
            stage_config(stage, os.path.abspath(args.workdir), overrides, args.steps_scale)
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    cli.cpu_flags()  # before JAX starts: much faster sampling on small CPUs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from anyflow_jax.training.loop import NonFiniteLoss
    try:
        run(args.workdir, stages=stages, overrides=overrides, steps_scale=args.steps_scale)
        if eval_steps:
            root = os.path.abspath(args.workdir)
            models = {stage_registry.get(s).eval_name: os.path.join(root, s) for s in stage_registry.names()
                      if os.path.isdir(os.path.join(root, s))}
            print(f"== evaluation of {sorted(models)} -> {root}/eval", flush=True)
            results = harness.evaluate(models, eval_steps, eval_samples, os.path.join(root, "eval"), overwrite=True,
                                       reference_steps=reference_steps, verbose=False)
            print(harness.format_table(results), flush=True)
    except Preempted as e:
        print(f"== pipeline {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except (RunError, NonFiniteLoss, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"== pipeline finished in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
