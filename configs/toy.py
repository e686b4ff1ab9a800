"""Toy AnyFlow on moving digits (the embedded default): every stage, on a laptop CPU.

  python -m anyflow_jax.train --config configs/toy.py:teacher     --workdir runs/toy/teacher
  python -m anyflow_jax.train --config configs/toy.py:flow_map    --workdir runs/toy/flow_map \
      --config.init.student=runs/toy/teacher
  python -m anyflow_jax.train --config configs/toy.py:on_policy   --workdir runs/toy/on_policy \
      --config.init.student=runs/toy/flow_map --config.init.teacher=runs/toy/teacher
  python -m anyflow_jax.train --config configs/toy.py:consistency --workdir runs/toy/consistency \
      --config.init.student=runs/toy/teacher --config.init.teacher=runs/toy/teacher

The causal (FAR) pair (docs/far.md; not in the toy pipeline's default stages yet):

  python -m anyflow_jax.train --config configs/toy.py:far_flow_map  --workdir runs/toy/far_flow_map \
      --config.init.student=runs/toy/teacher
  python -m anyflow_jax.train --config configs/toy.py:far_on_policy --workdir runs/toy/far_on_policy \
      --config.init.student=runs/toy/far_flow_map --config.init.teacher=runs/toy/teacher

Needs: nothing to download (scikit-learn's bundled digits). The teacher starts from random
weights; each later stage starts from the named workdirs (their EMA weights). The defaults
above are exactly these paths, so the four commands run as written from the repo root.
Stage 2 (on_policy) runs the periodic evaluators every 50 steps: samples and FD, accuracy and
ODE distance at 1, 4 and 32 steps (`eval/*` in its metrics; the classifier is trained once in
runs/toy/eval/classifier, which the pipeline's evaluation reuses); `--config.eval.every=0`
turns them off.

What is trained: every parameter of each stage's network (a full fine-tune; stage 2 also the
critic, a copy of the teacher). With --config.lora.enabled=True a stage that starts from a
checkpoint trains rank-16 LoRA adapters (alpha 16, the reference's targets per stage) on that
frozen network instead, as the Wan configs do by default; the teacher starts from random weights,
which LoRA cannot adapt (Wan's output head starts at zero), so it always trains in full (the toy
pipeline's `--override lora.enabled=true` makes every later stage LoRA).
"""
from anyflow_jax.defaults import toy_config


def get_config(arg: str = "teacher"):
    return toy_config(arg or "teacher")
