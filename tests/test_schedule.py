"""anyflow_jax.schedule: time shift, step grids, loss-weight tables, noising, the flow-map step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax import schedule


def test_shift_formula_endpoints_monotone_identity():
    s = np.linspace(0, 1, 101)
    out = np.asarray(schedule.shift_time(jnp.asarray(s), 5.0))
    np.testing.assert_allclose(out, 5 * s / (1 + 4 * s), rtol=1e-6, atol=1e-7)
    assert out[0] == 0.0 and out[-1] == 1.0
    assert np.all(np.diff(out) > 0)
    np.testing.assert_array_equal(np.asarray(schedule.shift_time(jnp.asarray(s), 1.0)), s.astype(np.float32))
    with pytest.raises(ValueError, match="shift"):
        schedule.shift_time(0.5, 0.0)


@pytest.mark.parametrize("n, expected_model_units", [
    (1, [1000, 0]),
    (2, [1000, 833.33, 0]),
    (4, [1000, 937.5, 833.33, 625, 0]),
    (8, [1000, 972.2, 937.5, 892.9, 833.3, 750, 625, 416.7, 0]),
])
def test_step_grid_matches_reference_values(n, expected_model_units):
    grid = np.asarray(schedule.step_grid(n)) * 1000
    assert grid.shape == (n + 1,)
    np.testing.assert_allclose(grid, expected_model_units, atol=0.06)


def test_grid_time_with_traced_n_equals_static_grid():
    @jax.jit
    def grid_point(i, n):
        return schedule.grid_time(i, n)

    for n in (1, 2, 3, 8, 16, 50):
        static = np.asarray(schedule.step_grid(n))
        traced = np.array([grid_point(i, n) for i in range(n + 1)])
        np.testing.assert_allclose(traced, static, atol=2e-7)
    assert grid_point._cache_size() == 1  # one program for every (i, N)


def test_step_grid_rejects_bad_n():
    with pytest.raises(ValueError, match="num_steps"):
        schedule.step_grid(0)
    with pytest.raises(ValueError, match="num_steps"):
        schedule.step_grid(2.5)
    with pytest.raises(ValueError, match="num_steps"):
        schedule.grid_time(0, 0)


def test_beta08_table_matches_reference_numbers():
    grid, w = schedule.weight_table("beta08")
    assert grid.shape == w.shape == (1001,)
    assert grid[0] == 1.0 and grid[-1] == 0.0
    np.testing.assert_allclose(w.sum(), 1000.0, rtol=1e-12)
    # normaliser 1000 / sum(y) ~= 3.657, peak ~1.41 at s ~ 0.667 (anyflow-reference.md section 1)
    y = grid * np.sqrt(1 - grid)
    np.testing.assert_allclose(1000 / y.sum(), 3.657, atol=1e-3)
    assert abs(w.max() - 1.41) < 0.005 and abs(grid[w.argmax()] - 0.667) < 0.002
    got = np.asarray(schedule.loss_weight(jnp.array([0.1, 0.5, 0.9, 0.99, 0.0, 1.0])))
    np.testing.assert_allclose(got, [0.35, 1.29, 1.04, 0.36, 0.0, 0.0], atol=0.006)


def test_gaussian_and_uniform_tables():
    grid, w = schedule.weight_table("gaussian")
    np.testing.assert_allclose(w.sum(), 1000.0, rtol=1e-12)
    assert w[0] == 0.0 and w[-1] == 0.0  # exp(-2 (T-500)^2/1000^2) - min is 0 at both ends
    assert abs(w.max() - 2.08) < 0.01 and abs(grid[w.argmax()] - 0.5) < 0.002
    t = jnp.array([[0.3, 0.7]])
    np.testing.assert_array_equal(np.asarray(schedule.loss_weight(t, "uniform")), np.ones((1, 2), np.float32))


@pytest.mark.parametrize("weighting", ["beta08", "gaussian"])
def test_loss_weight_is_nearest_grid_point_lookup(weighting):
    grid, w = schedule.weight_table(weighting)
    t = np.asarray(jax.random.uniform(jax.random.key(3), (64,)), np.float64)
    # brute-force nearest neighbour in model units, first index on ties (torch.argmin)
    expected = w[np.argmin(np.abs(grid[:, None] * 1000 - t[None, :] * 1000), axis=0)]
    got = np.asarray(schedule.loss_weight(jnp.asarray(t, jnp.float32).reshape(8, 8), weighting)).ravel()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # on grid points the table value is returned exactly (up to fp32)
    idx = np.array([0, 1, 200, 500, 999, 1000])
    np.testing.assert_allclose(np.asarray(schedule.loss_weight(jnp.asarray(grid[idx]), weighting)), w[idx], rtol=1e-6)


def test_unknown_weighting_named_in_error():
    with pytest.raises(ValueError, match="weighting"):
        schedule.loss_weight(jnp.ones((2, 3)), "beta09")
    with pytest.raises(ValueError, match="weighting"):
        jax.jit(lambda t: schedule.loss_weight(t, "cosine")).lower(jnp.ones((2, 3)))


def test_add_noise_and_flow_map_step_on_video_latents():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k1, (2, 3, 4, 5, 6))
    eps = jax.random.normal(k2, x0.shape)
    t = jax.random.uniform(k3, (2, 3))
    z = schedule.add_noise(x0, eps, t)
    tt = np.asarray(t)[:, :, None, None, None]
    np.testing.assert_allclose(np.asarray(z), tt * np.asarray(eps) + (1 - tt) * np.asarray(x0), rtol=1e-6, atol=1e-6)
    # the exact velocity eps - x0 carries z_t to x0 in one flow-map step with r = 0 ...
    v = schedule.velocity_target(x0, eps)
    np.testing.assert_allclose(np.asarray(schedule.flow_map_step(z, v, t, jnp.zeros_like(t))), np.asarray(x0),
                               atol=1e-5)
    # ... and to z_r for any r <= t
    r = t * 0.3
    np.testing.assert_allclose(np.asarray(schedule.flow_map_step(z, v, t, r)),
                               np.asarray(schedule.add_noise(x0, eps, r)), atol=1e-5)


def test_schedule_shape_and_order_errors():
    z = jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="t must have shape"):
        schedule.add_noise(z, z, jnp.zeros((2,)))
    with pytest.raises(ValueError, match="eps"):
        schedule.add_noise(z, jnp.zeros((2, 3, 5)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="r must be <= t"):
        schedule.flow_map_step(z, z, jnp.full((2, 3), 0.2), jnp.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="r must have shape"):
        jax.jit(lambda t, r: schedule.flow_map_step(z, z, t, r)).lower(jnp.ones((2, 3)), jnp.ones((3, 2)))


def test_logit_normal_time_distribution():
    tau = np.asarray(schedule.logit_normal_time(jax.random.key(0), (20000,)))
    assert tau.dtype == np.float32 and tau.min() > 0 and tau.max() < 1
    logit = np.log(tau / (1 - tau))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
