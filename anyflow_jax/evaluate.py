"""Evaluation CLI: quality against step count for several models on moving digits.

  python -m anyflow_jax.evaluate --models teacher=runs/toy/teacher,anyflow=runs/toy/on_policy,\\
      stage1=runs/toy/flow_map,consistency=runs/toy/consistency --steps 1,2,4,8,16,32 \\
      --num-samples 256 --out runs/toy/eval

Metrics (Frechet distance in a video classifier's feature space, conditional accuracy, distance
to the teacher's fine-grid ODE solution), protocol and outputs: :mod:`anyflow_jax.evaluation.harness`,
which this module only calls. A plain-text table goes to stdout. Bad input (every model path
is checked before any model is loaded) prints one ``error: ...`` line and exits with status 2;
an existing ``results.json`` in ``--out`` is not replaced without ``--overwrite``. The progress
bar is shown only when stderr is a terminal (``--progress`` / ``--no-progress`` force it on or
off); absl/Orbax WARNING lines from reading checkpoints are silenced.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from anyflow_jax.cli import cpu_flags as _cpu_flags
from anyflow_jax.cli import quiet_logs as _quiet_logs
from anyflow_jax.evaluation.harness import (  # noqa: F401  (the library, re-exported for existing code)
    DEFAULT_STEPS,
    METRIC_INFO,
    METRICS,
    MIN_SAMPLES,
    PLOT_FILE,
    REFERENCE_GUIDANCE,
    RESULTS_FILE,
    EvalError,
    ResultsExist,
    evaluate,
    format_table,
    int_flag,
    parse_models,
    parse_steps,
    plot_results,
)


# ------------------------------------------------------------------------------ CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise EvalError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m anyflow_jax.evaluate", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="name=CHECKPOINT[,name=CHECKPOINT...]")
    p.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="step counts, e.g. 1,2,4,8,16,32")
    p.add_argument("--num-samples", default="256", help=f"videos per model and step count (>= {MIN_SAMPLES})")
    p.add_argument("--out", required=True, help="output folder (results.json, metrics_vs_steps.png, caches)")
    p.add_argument("--reference-teacher", default=None, help="teacher checkpoint of the ODE reference "
                                                             "(default: the model named 'teacher')")
    p.add_argument("--reference-steps", default="128", help="Euler steps of the reference ODE solution")
    p.add_argument("--seed", default="0", help="noise and real-set seed")
    p.add_argument("--chunk-size", default="128", help="videos per generation call (memory bound)")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {RESULTS_FILE} in --out")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                     help="always show the progress bar (default: only when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    return p


_int_arg = int_flag


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    _cpu_flags()
    _quiet_logs()  # no absl/Orbax WARNING lines while reading checkpoints
    try:
        args = build_parser().parse_args(argv)
        models = parse_models(args.models)
        try:
            steps = parse_steps(args.steps, "--steps")
        except EvalError as e:
            raise EvalError(str(e)) from None
        num = _int_arg("--num-samples", args.num_samples, MIN_SAMPLES)
        ref_steps = _int_arg("--reference-steps", args.reference_steps, 1)
        seed = _int_arg("--seed", args.seed, 0)
        chunk = _int_arg("--chunk-size", args.chunk_size, 1)
        results = evaluate(models, steps, num, args.out, reference_teacher=args.reference_teacher,
                           reference_steps=ref_steps, seed=seed, chunk_size=chunk, progress=args.progress,
                           overwrite=args.overwrite)
    except ResultsExist as e:
        print(f"error: {e.path} already exists (an earlier evaluation); pass --overwrite to replace it",
              file=sys.stderr)
        return 2
    except EvalError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"\nwrote {os.path.join(os.path.abspath(args.out), RESULTS_FILE)} and {PLOT_FILE} "
          f"({results['wall_seconds']['total']:.0f}s)")
    return 0


__all__ = ["DEFAULT_STEPS", "METRIC_INFO", "METRICS", "MIN_SAMPLES", "PLOT_FILE", "REFERENCE_GUIDANCE", "RESULTS_FILE",
           "EvalError", "ResultsExist", "evaluate", "format_table", "int_flag", "parse_models", "parse_steps",
           "plot_results", "build_parser", "main"]


if __name__ == "__main__":
    from anyflow_jax.cli import hugepage_malloc
    hugepage_malloc()  # re-executes once with huge-page malloc where that helps (cli.py)
    sys.exit(main())
