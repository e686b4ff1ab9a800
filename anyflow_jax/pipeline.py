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
            raise ValueError(f"--override expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(root: str, *, stages=None, overrides=None, steps_scale: float = 1.0) -> dict[str, dict]:
    from anyflow_jax.training.loop import train
    root = os.path.abspath(root)
    results = {}
    for stage in (stage_registry.names() if stages is None else stages):
        cfg = stage_config(stage, root, overrides or {}, steps_scale)
        t0 = time.time()
        print(f"== {stage}: {cfg.train.steps} steps -> {root}/{stage}", flush=True)
        results[stage] = train(cfg, os.path.join(root, stage))
        results[stage]["wall_sec"] = time.time() - t0
        print(f"== {stage} done in {results[stage]['wall_sec']:.0f}s", flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/toy")
    ap.add_argument("--stages", default=",".join(stage_registry.names()), help="comma-separated subset, in order")
    ap.add_argument("--override", action="append", help="config field for every stage, e.g. data.global_batch_size=8")
    ap.add_argument("--steps_scale", type=float, default=1.0, help="multiply every stage's step count")
    ap.add_argument("--eval_steps", default="1,2,4,8,16,32", help="step counts to evaluate ('' to skip)")
    ap.add_argument("--eval_samples", type=int, default=256, help="videos per model and step count")
    ap.add_argument("--eval_reference_steps", type=int, default=128, help="teacher ODE steps of the reference")
    args = ap.parse_args(argv)
    cli.cpu_flags()  # before JAX starts: much faster sampling on small CPUs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in stage_registry.names()]
    if bad or args.steps_scale <= 0:
        ap.error(f"unknown stages {bad}" if bad else "--steps_scale must be positive")
    from anyflow_jax.evaluation import harness
    from anyflow_jax.training.loop import NonFiniteLoss
    t0 = time.time()
    try:
        run(args.workdir, stages=stages, overrides=parse_overrides(args.override), steps_scale=args.steps_scale)
        if args.eval_steps.strip():
            root = os.path.abspath(args.workdir)
            models = {stage_registry.get(s).eval_name: os.path.join(root, s) for s in stage_registry.names()
                      if os.path.isdir(os.path.join(root, s))}
            print(f"== evaluation of {sorted(models)} -> {root}/eval", flush=True)
            results = harness.evaluate(models, harness.parse_steps(args.eval_steps, "--eval_steps"), args.eval_samples,
                                            os.path.join(root, "eval"),
                                            reference_steps=args.eval_reference_steps, verbose=False)
            print(harness.format_table(results), flush=True)
    except (RunError, NonFiniteLoss, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"== pipeline finished in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
