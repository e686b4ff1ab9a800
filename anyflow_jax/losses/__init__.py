"""Model-agnostic AnyFlow objectives (pure JAX functions).

Every loss takes apply function(s) ``apply_fn(params, z, t, r, context) -> u`` (average velocity,
shaped like ``z``; ``t``, ``r`` of shape (B, F) in tau, 1 = noise; a teacher or critic is called
with ``r = t``), parameter pytree(s), a batch dict, a PRNG key and keyword options, and returns
``(loss scalar, metrics dict)``. Nothing here knows about Wan. See docs/losses.md.
"""
from anyflow_jax.losses.backward_simulation import DEFAULT_STEPS_LIST, backward_simulation, draw_steps
from anyflow_jax.losses.causal_backward_simulation import causal_backward_simulation
from anyflow_jax.losses.causal_flow_map import causal_flow_map_loss, sample_num_chunks
from anyflow_jax.losses.causal_onpolicy import CausalStudent, causal_onpolicy_critic_loss, causal_onpolicy_generator_loss
from anyflow_jax.losses.consistency import consistency_distillation_loss, consistency_loss, continuous_consistency_loss
from anyflow_jax.losses.dmd import critic_loss, dmd_loss, sample_dmd_time
from anyflow_jax.losses.flow_map import (
    CONSISTENCY,
    DIFFUSION,
    GENERAL,
    flow_map_loss,
    flow_map_target,
    sample_time_pairs,
    time_pair_kinds,
)
from anyflow_jax.losses.flow_matching import flow_matching_loss, sample_flow_matching_time
from anyflow_jax.losses.onpolicy import onpolicy_critic_loss, onpolicy_generator_loss

__all__ = [
    "continuous_consistency_loss", "consistency_distillation_loss",
    "flow_matching_loss",
    "flow_map_loss",
    "flow_map_target",
    "causal_flow_map_loss",
    "sample_num_chunks",
    "causal_backward_simulation",
    "CausalStudent",
    "causal_onpolicy_generator_loss",
    "causal_onpolicy_critic_loss",
    "backward_simulation",
    "dmd_loss",
    "critic_loss",
    "onpolicy_generator_loss",
    "onpolicy_critic_loss",
    "consistency_loss",
    "sample_time_pairs",
    "time_pair_kinds",
    "sample_flow_matching_time",
    "sample_dmd_time",
    "draw_steps",
    "DEFAULT_STEPS_LIST",
    "DIFFUSION",
    "CONSISTENCY",
    "GENERAL",
]
