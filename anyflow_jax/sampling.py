"""Alias of :mod:`anyflow_jax.flow.sampling` (the flow math moved to ``anyflow_jax.flow``): ``anyflow_jax.sampling`` keeps working for existing code."""
import sys

from anyflow_jax.flow import sampling as _module

sys.modules[__name__] = _module
