"""Flow math, independent of any network: the time convention and schedule, the samplers and
the apply-function helpers the objectives share.

- :mod:`anyflow_jax.flow.schedule`: tau convention, step grids, loss weights, noising, flow-map step;
- :mod:`anyflow_jax.flow.sampling`: any-step flow-map sampler, teacher ODE sampler, consistency sampler;
- :mod:`anyflow_jax.flow.causal_sampling`: the chunk-autoregressive any-step sampler of the FAR
  network (KV cache re-encoded per chunk; T2V, I2V, V2V);
- :mod:`anyflow_jax.flow.apply`: the ``apply_fn(params, z, t, r, context) -> u`` convention and its checks.

``anyflow_jax.schedule`` and ``anyflow_jax.sampling`` are aliases of the first two.
"""
from anyflow_jax.flow import apply, causal_sampling, sampling, schedule
from anyflow_jax.flow.apply import ApplyFn
from anyflow_jax.flow.causal_sampling import causal_sample
from anyflow_jax.flow.sampling import consistency_sample, ode_sample, sample

__all__ = ["apply", "causal_sampling", "sampling", "schedule", "ApplyFn", "sample", "ode_sample",
           "consistency_sample", "causal_sample"]
