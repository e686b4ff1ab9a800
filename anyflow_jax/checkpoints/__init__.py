"""Checkpoints of every kind, independent of the trainer.

- :mod:`anyflow_jax.checkpoints.model`: Orbax model checkpoints (``model.json`` + ``params/``);
- :mod:`anyflow_jax.checkpoints.runs`: training workdirs read as starting points (``run.json``,
  the EMA item of the latest checkpoint; a LoRA run's base and adapters merged once), and
  :func:`load_start` for all three kinds (:func:`load_start_parts` keeps a LoRA run's base and
  adapters apart);
- :mod:`anyflow_jax.checkpoints.diffusers`: diffusers-format Wan2.1 / AnyFlow transformers
  (declarative parameter table, strict loading, atomic export);
- :mod:`anyflow_jax.checkpoints.safetensors_io`: a dependency-free safetensors reader/writer.

``anyflow_jax.checkpoint``, ``anyflow_jax.interop.diffusers`` and
``anyflow_jax.interop.safetensors_io`` are aliases kept for existing code.
"""
from anyflow_jax.checkpoints.diffusers import CheckpointError, load_transformer, save_transformer
from anyflow_jax.checkpoints.model import load_model, save_model
from anyflow_jax.checkpoints.runs import checkpoint_kind, load_start, load_start_parts, read_run_file

__all__ = ["CheckpointError", "load_transformer", "save_transformer", "load_model", "save_model",
           "checkpoint_kind", "load_start", "load_start_parts", "read_run_file"]
