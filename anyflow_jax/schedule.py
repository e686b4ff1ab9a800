"""Alias of :mod:`anyflow_jax.flow.schedule` (the flow math moved to ``anyflow_jax.flow``): ``anyflow_jax.schedule`` keeps working for existing code."""
import sys

from anyflow_jax.flow import schedule as _module

sys.modules[__name__] = _module
