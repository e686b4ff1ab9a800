"""Toy AnyFlow on moving digits (the embedded default): every stage, on a laptop CPU.

  python -m anyflow_jax.train --config configs/toy.py:teacher     --workdir runs/toy/teacher
  python -m anyflow_jax.train --config configs/toy.py:flow_map    --workdir runs/toy/flow_map \
      --config.init.student=runs/toy/teacher
  python -m anyflow_jax.train --config configs/toy.py:on_policy   --workdir runs/toy/on_policy \
      --config.init.student=runs/toy/flow_map --config.init.teacher=runs/toy/teacher
  python -m anyflow_jax.train --config configs/toy.py:consistency --workdir runs/toy/consistency \
      --config.init.student=runs/toy/teacher --config.init.teacher=runs/toy/teacher

Needs: nothing to download (scikit-learn's bundled digits). The teacher starts from random
weights; each later stage starts from the named workdirs (their EMA weights). The defaults
above are exactly these paths, so the four commands run as written from the repo root.
Stage 2 (on_policy) runs the periodic evaluators every 50 steps: samples and FD, accuracy and
ODE distance at 1, 4 and 32 steps (`eval/*` in its metrics; the classifier is trained once in
runs/toy/eval/classifier, which the pipeline's evaluation reuses); `--config.eval.every=0`
turns them off.
"""
from anyflow_jax.defaults import toy_config


def get_config(arg: str = "teacher"):
    return toy_config(arg or "teacher")
