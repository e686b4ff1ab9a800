"""Shared helpers for tests of random networks."""
import jax
import jax.numpy as jnp
import numpy as np


def perturbed(params, seed: int = 0, scale: float = 0.1):
    """Every parameter plus ``scale`` times standard normal noise, so no tensor is trivial (the
    default init zeroes biases and the output head). The draws are host NumPy ones from
    ``RandomState(seed)``, leaf by leaf: eager ``jax.random`` would compile one PRNG program per
    parameter shape, seconds per model in a test."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(np.asarray(leaf) + scale * rng.randn(*leaf.shape), leaf.dtype) for leaf in leaves])
