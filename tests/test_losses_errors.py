"""Bad input fails at trace time (under jit, before anything runs) with a ValueError naming the argument."""
import jax
import jax.numpy as jnp
import pytest

from anyflow_jax import losses, sampling

B, F, D, E = 4, 2, 3, 5


def _apply(params, z, t, r, context):
    return params * z


def _batch(**overrides):
    batch = {"x0": jnp.zeros((B, F, D)), "context": jnp.zeros((B, E)), "neg_context": jnp.zeros((1, E))}
    batch.update(overrides)
    return {k: v for k, v in batch.items() if v is not None}


def _traced(fn, *args):
    """Trace ``fn`` under jit (lowering only: nothing is executed)."""
    return jax.jit(fn).lower(*args)


KEY = jax.random.key(0)

CASES = {
    # flow_map_loss
    "x0 not (B, F, ...)": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY),
                                           _batch(x0=jnp.zeros((B,)))), r"batch\['x0'\]"),
    "eps shape": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY),
                                  _batch(eps=jnp.zeros((B, F, D + 1)))), r"batch\['eps'\]"),
    "context batch": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY),
                                      _batch(context=jnp.zeros((B + 1, E)))), r"batch\['context'\]"),
    "neg_context batch": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY),
                                          _batch(neg_context=jnp.zeros((3, E)))), "neg_context"),
    "neg_context width": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY),
                                          _batch(neg_context=jnp.zeros((1, E + 1)))), "neg_context"),
    "forced t shape": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY),
                                       _batch(t=jnp.ones((B,)), r=jnp.zeros((B,)))), r"batch\['t'\]"),
    "forced t < r": (lambda: losses.flow_map_loss(_apply, 1.0, _batch(t=jnp.full((B, F), 0.2),
                                                                      r=jnp.full((B, F), 0.6)), KEY),
                     r"batch\['r'\] must be <= batch\['t'\]"),
    "unknown weighting": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY, weighting="beta09"),
                                          _batch()), "weighting"),
    "fused guidance < 1": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY,
                                                                          fuse_guidance_scale=0.5), _batch()),
                           "fuse_guidance_scale"),
    "unknown derivative": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY, derivative="fd"),
                                           _batch()), "derivative"),
    "apply_fn output shape": (lambda: _traced(lambda b: losses.flow_map_loss(lambda p, z, t, r, c: z[..., :1], 1.0,
                                                                             b, KEY), _batch()), "apply_fn"),
    "no diffusion sample to rescale": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY,
                                                                                      diffusion_ratio=0.0),
                                                       _batch()), "adaptive_rescale"),
    "ratios > 1": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY, diffusion_ratio=0.8,
                                                                  consistency_ratio=0.5), _batch()),
                   "diffusion_ratio"),
    "dropout without neg_context": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY,
                                                                                   fuse_guidance_scale=1.0),
                                                    _batch(neg_context=None)), "neg_context"),
    "guidance without neg_context": (lambda: _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY,
                                                                                    text_dropout=0.0),
                                                     _batch(neg_context=None)), "neg_context"),
    # flow_map_target
    "target t < r": (lambda: losses.flow_map_target(_apply, 1.0, jnp.zeros((B, F, D)), jnp.full((B, F), 0.1),
                                                    jnp.full((B, F), 0.3), jnp.zeros((B, F, D))), "r must be <= t"),
    # flow_matching_loss / critic_loss
    "teacher unknown batch key": (lambda: _traced(lambda b: losses.flow_matching_loss(_apply, 1.0, b, KEY),
                                                  {"latents": jnp.zeros((B, F, D))}), "x0"),
    "teacher guidance < 1": (lambda: _traced(lambda b: losses.flow_matching_loss(_apply, 1.0, b, KEY,
                                                                                 fuse_guidance_scale=0.0),
                                             _batch()), "fuse_guidance_scale"),
    "critic sample shape": (lambda: _traced(lambda s: losses.critic_loss(_apply, 1.0, {"sample": s}, KEY),
                                            jnp.zeros((B,))), r"batch\['sample'\]"),
    # backward simulation, stage 2
    "N < 1 in steps_list": (lambda: _traced(lambda z: losses.backward_simulation(_apply, 1.0, {"noise": z}, KEY,
                                                                                 steps_list=(0, 2)),
                                            jnp.zeros((B, F, D))), "steps_list"),
    "forced N < 1": (lambda: _traced(lambda z: losses.backward_simulation(_apply, 1.0, {"noise": z}, num_steps=0,
                                                                          grad_step=0), jnp.zeros((B, F, D))),
                     "num_steps"),
    "forced k >= N": (lambda: _traced(lambda z: losses.backward_simulation(_apply, 1.0, {"noise": z}, num_steps=4,
                                                                           grad_step=4), jnp.zeros((B, F, D))),
                      "grad_step"),
    "generator real guidance < 0": (lambda: _traced(
        lambda b: losses.onpolicy_generator_loss(_apply, 1.0, _apply, 1.0, _apply, 1.0, b, KEY,
                                                 real_guidance_scale=-1.0), _batch()), "real_guidance_scale"),
    "dmd context batch": (lambda: _traced(lambda s: losses.dmd_loss(_apply, 1.0, _apply, 1.0,
                                                                    {"sample": s, "context": jnp.zeros((B + 2, E)),
                                                                     "neg_context": jnp.zeros((1, E))}, KEY),
                                          jnp.zeros((B, F, D))), r"batch\['context'\]"),
    # consistency
    "consistency N < 1": (lambda: _traced(lambda b: losses.consistency_loss(_apply, 1.0, 1.0, _apply, 1.0, b, KEY,
                                                                            num_discretization_steps=0),
                                          _batch()), "num_discretization_steps"),
    "consistency guidance < 1": (lambda: _traced(lambda b: losses.consistency_loss(_apply, 1.0, 1.0, _apply, 1.0, b,
                                                                                   KEY, teacher_guidance_scale=0.5),
                                                 _batch()), "teacher_guidance_scale"),
    # samplers
    "sample N < 1": (lambda: _traced(lambda z: sampling.sample(_apply, 1.0, z, num_steps=0), jnp.zeros((B, F, D))),
                     "num_steps"),
    "sample guidance < 1": (lambda: _traced(lambda z: sampling.sample(_apply, 1.0, z, jnp.zeros((B, E)),
                                                                      guidance_scale=0.9,
                                                                      neg_context=jnp.zeros((1, E))),
                                            jnp.zeros((B, F, D))), "guidance_scale"),
    "consistency sampler N < 1": (lambda: _traced(lambda z: sampling.consistency_sample(_apply, 1.0, z, key=KEY,
                                                                                        num_steps=0),
                                                  jnp.zeros((B, F, D))), "num_steps"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_value_error_naming_the_argument(case):
    thunk, match = CASES[case]
    with pytest.raises(ValueError, match=match):
        thunk()


def test_valid_input_traces():
    # the same harness accepts a valid call (so the failures above are about the bad argument)
    _traced(lambda b: losses.flow_map_loss(_apply, 1.0, b, KEY), _batch())
    _traced(lambda z: losses.backward_simulation(_apply, 1.0, {"noise": z}, KEY), jnp.zeros((B, F, D)))
