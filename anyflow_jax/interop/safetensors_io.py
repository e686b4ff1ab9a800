"""Alias of :mod:`anyflow_jax.checkpoints.safetensors_io` (checkpoint I/O moved to ``anyflow_jax.checkpoints``): ``anyflow_jax.interop.safetensors_io`` keeps working for existing code."""
import sys

from anyflow_jax.checkpoints import safetensors_io as _module

sys.modules[__name__] = _module
