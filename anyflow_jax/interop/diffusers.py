"""Alias of :mod:`anyflow_jax.checkpoints.diffusers` (checkpoint I/O moved to ``anyflow_jax.checkpoints``): ``anyflow_jax.interop.diffusers`` keeps working for existing code."""
import sys

from anyflow_jax.checkpoints import diffusers as _module

sys.modules[__name__] = _module
