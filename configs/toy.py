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
"""
from anyflow_jax.defaults import toy_config


def get_config(arg: str = "teacher"):
    return toy_config(arg or "teacher")
