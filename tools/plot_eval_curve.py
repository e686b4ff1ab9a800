"""Plot the periodic evaluators' metrics against the training step (config.eval.metrics).

    python tools/plot_eval_curve.py --runs stage1=runs/toy/flow_map,stage2=runs/toy/on_policy \
        --metric fd --steps 1,4,32 --out docs/results_eval_curve.png

One panel per run: the metric at each sampler step count (``eval/<metric>/steps<n>`` in the
run's ``metrics.jsonl``) against the training step. Prints the values as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_curve(workdir: str, metric: str, steps: list[int]) -> dict[int, dict[int, float]]:
    """``{sampler steps: {training step: value}}`` from ``<workdir>/metrics.jsonl`` (the last
    record of a training step wins, as after a resume)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist")
    out: dict[int, dict[int, float]] = {s: {} for s in steps}
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            for s in steps:
                key = f"eval/{metric}/steps{s}"
                if key in rec:
                    out[s][int(rec["step"])] = float(rec[key])
    if not any(out.values()):
        raise SystemExit(f"error: {path} has no eval/{metric}/steps<n> records (was config.eval.metrics on?)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="name=workdir[,name=workdir...]")
    p.add_argument("--metric", default="fd", choices=["fd", "accuracy", "ode_distance"])
    p.add_argument("--steps", default="1,4,32")
    p.add_argument("--out", required=True, help="PNG file")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    runs = {}
    for item in args.runs.split(","):
        name, _, wd = item.partition("=")
        if not wd:
            raise SystemExit(f"error: --runs: {item!r} is not name=workdir")
        runs[name] = read_curve(wd, args.metric, steps)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False, sharey=True)
    for ax, (name, curve) in zip(axes[0], runs.items()):
        for s in steps:
            pts = sorted(curve[s].items())
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=f"{s} step{'s' if s != 1 else ''}")
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(args.metric)
    axes[0][-1].legend()
    fig.tight_layout()
    tmp = args.out + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, args.out)

    for name, curve in runs.items():
        train_steps = sorted({t for s in steps for t in curve[s]})
        print(f"\n{name}: {args.metric}\n")
        print("| training step | " + " | ".join(f"{s} step{'s' if s != 1 else ''}" for s in steps) + " |")
        print("|---|" + "---|" * len(steps))
        for t in train_steps:
            print(f"| {t} | " + " | ".join(f"{curve[s][t]:.3g}" if t in curve[s] else "" for s in steps) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
