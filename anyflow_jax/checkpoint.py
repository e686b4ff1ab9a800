"""Alias of :mod:`anyflow_jax.checkpoints.model` (checkpoint I/O moved to ``anyflow_jax.checkpoints``): ``anyflow_jax.checkpoint`` keeps working for existing code."""
import sys

from anyflow_jax.checkpoints import model as _module

sys.modules[__name__] = _module
