"""anyflow-jax: AnyFlow (any-step video diffusion via on-policy flow-map distillation) in JAX/Flax."""

__version__ = "0.1.0"
