"""anyflow_jax.sampling: the any-step flow-map sampler, the teacher ODE sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax import sampling
from flowmap_testlib import GAUSS, MIXTURE, exact_apply

GRID4 = [1.0, 0.9375, 0.8333333, 0.625, 0.0]  # reference N=4 grid with shift 5 (/1000)


def _toy(params, z, t, r, context):
    out = jnp.sin(z) + 2.0 * t[..., None] - 3.0 * r[..., None] * z
    if context is not None:
        out = out + context[:, None, :]
    return out


def _np_toy(z, t, r, ctx=None):
    out = np.sin(z) + 2.0 * t - 3.0 * r * z
    return out if ctx is None else out + ctx[:, None, :]


@pytest.mark.parametrize("data, dim", [(GAUSS, 3), (MIXTURE, 2)], ids=["gaussian", "mixture"])
def test_exact_flow_map_gives_the_same_sample_at_every_step_count(data, dim):
    noise = jax.random.normal(jax.random.key(0), (8, 2, dim))
    ref = data.flow_map(noise, jnp.ones((8, 2)), jnp.zeros((8, 2)))
    for n in (1, 2, 4, 8, 32):
        out = sampling.sample(exact_apply(data), None, noise, num_steps=n)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=5e-5, err_msg=f"N={n}")


def test_sampler_follows_the_reference_grid():
    noise = jax.random.normal(jax.random.key(1), (2, 3, 4))
    out = sampling.sample(_toy, None, noise, num_steps=4)
    z = np.asarray(noise, np.float64)
    for t, r in zip(GRID4[:-1], GRID4[1:]):
        z = z - (t - r) * _np_toy(z, t, r)
    np.testing.assert_allclose(np.asarray(out), z, rtol=2e-5, atol=2e-5)
    # a custom grid is used as given
    out = sampling.sample(_toy, None, noise, timesteps=[1.0, 0.5, 0.0])
    z = np.asarray(noise, np.float64)
    for t, r in ((1.0, 0.5), (0.5, 0.0)):
        z = z - (t - r) * _np_toy(z, t, r)
    np.testing.assert_allclose(np.asarray(out), z, rtol=2e-5, atol=2e-5)


def test_classifier_free_guidance():
    b, f, d = 3, 2, 4
    noise = jax.random.normal(jax.random.key(2), (b, f, d))
    ctx = jax.random.normal(jax.random.key(3), (b, d))
    neg = jax.random.normal(jax.random.key(4), (1, d))
    g = 2.5
    out = jax.jit(lambda z: sampling.sample(_toy, None, z, ctx, num_steps=4, guidance_scale=g, neg_context=neg))(noise)
    z = np.asarray(noise, np.float64)
    c, n = np.asarray(ctx, np.float64), np.broadcast_to(np.asarray(neg, np.float64), (b, d))
    for t, r in zip(GRID4[:-1], GRID4[1:]):
        u_c, u_u = _np_toy(z, t, r, c), _np_toy(z, t, r, n)
        z = z - (t - r) * (u_u + g * (u_c - u_u))
    np.testing.assert_allclose(np.asarray(out), z, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="guidance_scale"):
        sampling.sample(_toy, None, noise, ctx, guidance_scale=0.5, neg_context=neg)


def test_context_frames_are_held_clean_with_zero_times():
    """Frames coupled through the model: the model sees the clean context with t = r = 0 on the
    first Fc frames; the context frames come out unchanged."""

    def coupled(params, z, t, r, context):
        mix = jnp.mean(z * (1.0 + t[..., None] + r[..., None]), axis=1, keepdims=True)
        return jnp.sin(z) + mix + 2.0 * t[..., None] - r[..., None]

    b, f, fc, d = 2, 4, 1, 3
    noise = jax.random.normal(jax.random.key(5), (b, f, d))
    ctx_lat = jax.random.normal(jax.random.key(6), (b, fc, d))
    out = sampling.sample(coupled, None, noise, num_steps=4, context_latents=ctx_lat)
    np.testing.assert_array_equal(np.asarray(out[:, :fc]), np.asarray(ctx_lat))
    z = np.asarray(noise, np.float64)
    for t_i, r_i in zip(GRID4[:-1], GRID4[1:]):
        z[:, :fc] = np.asarray(ctx_lat, np.float64)
        t = np.full((b, f, 1), t_i)
        r = np.full((b, f, 1), r_i)
        t[:, :fc], r[:, :fc] = 0.0, 0.0
        mix = np.mean(z * (1 + t + r), axis=1, keepdims=True)
        z = z - (t - r) * (np.sin(z) + mix + 2 * t - r)
    np.testing.assert_allclose(np.asarray(out[:, fc:]), z[:, fc:], rtol=2e-5, atol=2e-5)


def test_ode_sampler_calls_the_model_with_r_equal_t_and_converges():
    noise = jax.random.normal(jax.random.key(7), (2, 3, 4))
    out = sampling.ode_sample(_toy, None, noise, num_steps=4)
    z = np.asarray(noise, np.float64)
    for t, r in zip(GRID4[:-1], GRID4[1:]):
        z = z - (t - r) * _np_toy(z, t, t)  # the velocity at (z, t), r = t
    np.testing.assert_allclose(np.asarray(out), z, rtol=2e-5, atol=2e-5)
    # Euler on the exact Gaussian velocity converges (first order) to the exact flow map
    noise = jax.random.normal(jax.random.key(8), (64, 1, 3))
    exact = GAUSS.flow_map(noise, jnp.ones((64, 1)), jnp.zeros((64, 1)))
    velocity = lambda p, z_, t_, r_, c: GAUSS.velocity(z_, t_)
    err = {n: float(jnp.max(jnp.abs(sampling.ode_sample(velocity, None, noise, num_steps=n) - exact)))
           for n in (25, 100)}
    assert err[100] < 0.1 and 3.0 < err[25] / err[100] < 5.0, err  # first order: x4 steps, /4 error


def test_sampler_input_errors():
    noise = jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="num_steps"):
        sampling.sample(_toy, None, noise, num_steps=0)
    with pytest.raises(ValueError, match="t < r"):
        sampling.sample(_toy, None, noise, timesteps=[1.0, 0.2, 0.5, 0.0])
    with pytest.raises(ValueError, match="context_latents"):
        sampling.sample(_toy, None, noise, context_latents=jnp.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match="apply_fn"):
        sampling.sample(lambda p, z, t, r, c: z[..., :2], None, noise)
    with pytest.raises(ValueError, match="neg_context"):
        jax.jit(lambda z: sampling.sample(_toy, None, z, jnp.zeros((2, 4)), guidance_scale=2.0)).lower(noise)


def _consistency_toy(params, z, t, r, context):
    # a per-sample model (no coupling across the batch) that depends on z, t and the context
    return jnp.sin(z) + 0.5 * z + t[..., None] + context[:, None, :]


def test_consistency_sampler_per_sample_keys_do_not_depend_on_the_batch():
    b, f, d = 4, 2, 3
    noise = jax.random.normal(jax.random.key(10), (b, f, d))
    ctx = jax.random.normal(jax.random.key(11), (b, d))
    keys = jax.random.split(jax.random.key(12), b)
    run = jax.jit(lambda z, c, k: sampling.consistency_sample(_consistency_toy, None, z, c, key=k, num_steps=4))
    batched = np.asarray(run(noise, ctx, keys))
    for i in range(b):  # sample i alone, with its own key, equals sample i of the batch
        alone = np.asarray(run(noise[i:i + 1], ctx[i:i + 1], keys[i:i + 1]))
        np.testing.assert_allclose(alone[0], batched[i], rtol=1e-6, atol=1e-6, err_msg=f"sample {i}")
    perm = np.array([2, 0, 3, 1])  # a permuted batch permutes the samples and nothing else
    permuted = np.asarray(run(noise[perm], ctx[perm], keys[perm]))
    np.testing.assert_allclose(permuted, batched[perm], rtol=1e-6, atol=1e-6)
    # the keys matter: other keys give other samples (several steps re-noise)
    other = np.asarray(run(noise, ctx, jax.random.split(jax.random.key(13), b)))
    assert np.all(np.mean(np.abs(other - batched), axis=(1, 2)) > 1e-3)
    # a single key is split into B per-sample keys (position-dependent convenience)
    single = np.asarray(run(noise, ctx, jax.random.key(12)))
    np.testing.assert_allclose(single, batched, rtol=1e-6, atol=1e-6)
    # a raw uint32 key (jax.random.PRNGKey) is wrapped and used the same way
    raw = np.asarray(run(noise, ctx, jax.random.key_data(keys)))
    np.testing.assert_allclose(raw, batched, rtol=1e-6, atol=1e-6)


def test_consistency_sampler_last_step_returns_the_x0_prediction():
    b, f, d = 3, 1, 2
    noise = jax.random.normal(jax.random.key(14), (b, f, d))
    ctx = jax.random.normal(jax.random.key(15), (b, d))
    keys = jax.random.split(jax.random.key(16), b)
    grid = [1.0, 0.6, 0.25, 0.0]
    out = sampling.consistency_sample(_consistency_toy, None, noise, ctx, key=keys, timesteps=grid)
    # replay the steps with the documented per-sample noise: fold_in(sample_key, step)
    z = np.asarray(noise, np.float64)
    c = np.asarray(ctx, np.float64)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        x0 = z - t * (np.sin(z) + 0.5 * z + t + c[:, None, :])
        eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, i), (f, d))) for k in keys])
        z = t_next * eps + (1 - t_next) * x0
    # the last step (t_next = 0) returns x0 exactly: no noise added
    np.testing.assert_allclose(np.asarray(out), x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), z, rtol=1e-5, atol=1e-5)


def test_consistency_sampler_key_shape_errors():
    noise = jnp.zeros((4, 2, 3))
    with pytest.raises(ValueError, match=r"key must be a single PRNG key or a \(B,\) = \(4,\)"):
        sampling.consistency_sample(_toy, None, noise, key=jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match="key must be"):
        sampling.consistency_sample(_toy, None, noise, key=jax.random.split(jax.random.key(0), (4, 2)))
    with pytest.raises(ValueError, match="key must be a JAX PRNG key"):
        sampling.consistency_sample(_toy, None, noise, key=jnp.zeros((4,), jnp.float32))


def test_padded_grid_is_the_static_grid_then_zeros():
    g = sampling.padded_step_grid(4, 32, 5.0)
    assert g.shape == (33,) and g.dtype == np.float32
    np.testing.assert_array_equal(g[:5], np.asarray(sampling.resolve_timesteps(4, None, 5.0)))
    np.testing.assert_allclose(g[:5], GRID4, rtol=1e-6)
    assert not g[5:].any()
    assert [sampling.grid_capacity(n) for n in (1, 32, 33, 64, 65, 200)] == [32, 32, 64, 64, 128, 256]
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, capacity = 32\]"):
        sampling.padded_step_grid(33, 32)


def test_one_program_samples_every_step_count_like_the_static_sampler():
    """A traced step count over a padded grid: one trace for 1..32 steps (and any sampler), and
    every sample equal to the compiled static-grid sampler's (to float32 rounding)."""
    b, f, d = 3, 2, 4
    noise = jax.random.normal(jax.random.key(20), (b, f, d))
    ctx = jax.random.normal(jax.random.key(21), (b, d))
    neg = jax.random.normal(jax.random.key(22), (1, d))
    ctx_lat = jax.random.normal(jax.random.key(23), (b, 1, d))
    keys = jax.random.split(jax.random.key(24), b)
    traces = []

    def any_step(z, grid, n):
        traces.append(1)
        return (sampling.sample(_toy, None, z, ctx, num_steps=n, grid=grid, guidance_scale=2.0, neg_context=neg,
                                context_latents=ctx_lat),
                sampling.ode_sample(_toy, None, z, ctx, num_steps=n, grid=grid),
                sampling.consistency_sample(_toy, None, z, ctx, key=keys, num_steps=n, grid=grid))
    fn = jax.jit(any_step)
    for n in (1, 2, 4, 7, 32):
        got = fn(noise, sampling.padded_step_grid(n, 32), np.int32(n))
        want = jax.jit(lambda z: (  # noqa: B023 - the static sampler, compiled for this n
            sampling.sample(_toy, None, z, ctx, num_steps=n, guidance_scale=2.0, neg_context=neg,
                            context_latents=ctx_lat),
            sampling.ode_sample(_toy, None, z, ctx, num_steps=n),
            sampling.consistency_sample(_toy, None, z, ctx, key=keys, num_steps=n)))(noise)
        for g, w in zip(got, want):
            # same operations; the static program may fold its constant grid (float32 rounding)
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6, err_msg=f"N={n}")
    assert len(traces) == 1
    # concrete misuse is named
    with pytest.raises(ValueError, match="either timesteps or grid"):
        sampling.sample(_toy, None, noise, grid=sampling.padded_step_grid(2, 32), timesteps=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 32\]"):
        sampling.sample(_toy, None, noise, num_steps=33, grid=sampling.padded_step_grid(2, 32))
