"""Flow Map Backward Simulation and the stage-2 (on-policy) losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax import losses, sampling, schedule
from flowmap_testlib import GAUSS, MIXTURE, TinyFlowMapMLP, exact_apply, init_mlp, mlp_apply


def _toy_apply(params, z, t, r, context):
    """A fixed nonlinear 'model' whose output depends on z, t and r (not a flow map)."""
    return jnp.sin(z) + 2.0 * t[..., None] - 3.0 * r[..., None] * z


def _np_transition(z, t, r):
    return z - (t - r) * (np.sin(z) + 2.0 * t - 3.0 * r * z)


@pytest.mark.parametrize("data, dim, steps_list", [(GAUSS, 3, (1, 2, 3, 4, 8, 50)), (MIXTURE, 2, (1, 2, 5))],
                         ids=["gaussian", "mixture"])
def test_exact_flow_map_rollout_equals_n_step_rollout_for_every_n_and_k(data, dim, steps_list):
    noise = jax.random.normal(jax.random.key(0), (4, 2, dim))
    apply = exact_apply(data)
    traces = []

    @jax.jit
    def rollout(noise, n, k):
        traces.append(1)
        return losses.backward_simulation(apply, None, {"noise": noise}, num_steps=n, grad_step=k)

    one_jump = data.flow_map(noise, jnp.ones((4, 2)), jnp.zeros((4, 2)))
    for n in steps_list:
        n_step = jax.jit(lambda z: sampling.sample(apply, None, z, num_steps=n))(noise)
        np.testing.assert_allclose(np.asarray(n_step), np.asarray(one_jump), atol=5e-5)
        for k in range(n):
            out, m = rollout(noise, n, k)
            assert int(m["num_steps"]) == n and int(m["grad_step"]) == k
            assert int(m["nfe"]) == 1 + (k > 0) + (k + 1 < n)
            np.testing.assert_allclose(np.asarray(out), np.asarray(n_step), atol=5e-5, err_msg=f"N={n} k={k}")
    assert len(traces) == 1 and rollout._cache_size() == 1  # every (N, k): one program


@pytest.mark.parametrize("n, k, pairs", [
    (4, 1, [(1.0, 0.9375), (0.9375, 0.833333), (0.833333, 0.0)]),
    (4, 0, [(1.0, 0.9375), (0.9375, 0.0)]),
    (4, 3, [(1.0, 0.625), (0.625, 0.0)]),
    (8, 5, [(1.0, 0.75), (0.75, 0.625), (0.625, 0.0)]),
    (1, 0, [(1.0, 0.0)]),
])
def test_rollout_transitions_follow_the_reference_grid(n, k, pairs):
    """For a model that is not a flow map the result depends on every (t, r) used: compare with a
    hand-written rollout on the reference grid (shift 5) values."""
    noise = jax.random.normal(jax.random.key(1), (2, 3, 4))
    out, _ = losses.backward_simulation(_toy_apply, None, {"noise": noise}, num_steps=n, grad_step=k)
    z = np.asarray(noise, np.float64)
    for t, r in pairs:
        z = _np_transition(z, t, r)
    np.testing.assert_allclose(np.asarray(out), z, rtol=2e-5, atol=2e-5)


def test_draw_steps_distribution():
    keys = jax.random.split(jax.random.key(0), 4000)
    n, k = jax.vmap(lambda kk: losses.draw_steps(kk, (2, 4, 8)))(keys)
    n, k = np.asarray(n), np.asarray(k)
    for value in (2, 4, 8):
        assert abs(np.mean(n == value) - 1 / 3) < 0.03
    assert np.all((k >= 0) & (k < n))
    np.testing.assert_allclose(np.mean(k[n == 8]), 3.5, atol=0.25)  # k uniform in [0, N)


def test_skipped_transitions_make_no_model_call():
    calls = []

    def counting_apply(params, z, t, r, context):
        jax.debug.callback(lambda: calls.append(1))
        return _toy_apply(params, z, t, r, context)

    run = jax.jit(lambda z, n, k: losses.backward_simulation(counting_apply, None, {"noise": z}, num_steps=n,
                                                             grad_step=k)[0])
    noise = jnp.ones((1, 1, 2))
    for n, k, nfe in ((4, 1, 3), (4, 0, 2), (4, 3, 2), (1, 0, 1)):
        calls.clear()
        run(noise, n, k).block_until_ready()
        jax.effects_barrier()
        assert len(calls) == nfe, (n, k, len(calls))


def _probe_apply(pairs):
    """The toy model plus one scalar probe per transition, switched on only at that (t, r): the
    gradient w.r.t. probe j is what reaches transition j's model call."""

    def apply(params, z, t, r, context):
        u = _toy_apply(None, z, t, r, context) * params["scale"]
        for j, (tj, rj) in enumerate(pairs):
            hit = (jnp.abs(t - tj) < 1e-6) & (jnp.abs(r - rj) < 1e-6)
            u = u + jnp.where(hit, params["probe"][j], 0.0)[..., None]
        return u

    return apply


@pytest.mark.parametrize("n, k", [(4, 2), (4, 0), (4, 3), (2, 1), (1, 0)])
@pytest.mark.parametrize("stop_prefix", [False, True])
def test_gradients_reach_every_active_transition_and_never_a_stopped_prefix(n, k, stop_prefix):
    grid = np.asarray(schedule.step_grid(n))
    pairs = [(grid[0], grid[k]), (grid[k], grid[k + 1]), (grid[k + 1], 0.0)]
    active = [k > 0, True, k + 1 < n]
    apply = _probe_apply(pairs)
    params = {"scale": jnp.float32(1.0), "probe": jnp.zeros(3)}
    noise = jax.random.normal(jax.random.key(2), (2, 3, 4))
    weights = jax.random.normal(jax.random.key(3), noise.shape)

    def objective(p):
        out, _ = losses.backward_simulation(apply, p, {"noise": noise}, num_steps=n, grad_step=k,
                                            stop_prefix_grad=stop_prefix)
        return jnp.sum(out * weights)

    g = jax.jit(jax.grad(objective))(params)
    probe = np.asarray(g["probe"])
    for j in range(3):
        if active[j] and not (stop_prefix and j == 0):
            assert abs(probe[j]) > 1e-3, (j, probe)
        else:
            assert probe[j] == 0.0, (j, probe)

    # and the gradient w.r.t. the shared parameters equals that of a hand-unrolled rollout
    def unrolled(p):
        z = noise
        for j, (t, r) in enumerate(pairs):
            if not active[j]:
                continue
            tt, rr = jnp.full((2, 3), t), jnp.full((2, 3), r)
            z = schedule.flow_map_step(z, apply(p, z, tt, rr, None), tt, rr)
            if stop_prefix and j == 0:
                z = jax.lax.stop_gradient(z)
        return jnp.sum(z * weights)

    np.testing.assert_allclose(float(g["scale"]), float(jax.grad(unrolled)(params)["scale"]), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Stage-2 losses


def _teacher(params, z, t, r, context):
    return params * z + context[:, None, :]


def _stage2_setup():
    b, f, d, e = 4, 2, 3, 3
    model = TinyFlowMapMLP(16)
    student = init_mlp(model, jax.random.key(0), (b, f, d), context_dim=e)
    batch = {"x0": GAUSS.sample(jax.random.key(1), (b, f, d)),
             "context": jax.random.normal(jax.random.key(2), (b, e)),
             "neg_context": jnp.zeros((1, e))}
    return mlp_apply(model), student, batch


def test_stage2_generator_loss_is_one_program_for_all_n_and_k():
    student_apply, student, batch = _stage2_setup()
    traces = []

    @jax.jit
    def generator_step(student, teacher, critic, batch, key):
        traces.append(1)
        grad_fn = jax.value_and_grad(
            lambda p: losses.onpolicy_generator_loss(student_apply, p, _teacher, teacher, _teacher, critic, batch,
                                                     key, steps_list=(1, 2, 4, 8, 16, 50)), has_aux=True)
        return grad_fn(student)

    seen = set()
    for i in range(8):
        (loss, m), g = generator_step(student, jnp.float32(0.9), jnp.float32(1.1), batch, jax.random.key(i))
        assert np.isfinite(float(loss))
        seen.add((int(m["rollout/num_steps"]), int(m["rollout/grad_step"])))
        assert float(m["loss"]) == pytest.approx(float(m["dmd/loss"]) + float(m["forward/loss"]), rel=1e-6)
    assert len({n for n, _ in seen}) >= 3 and len(seen) >= 5, seen  # the keys drew different N and k
    assert len(traces) == 1 and generator_step._cache_size() == 1
    assert any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree_util.tree_leaves(g))


def test_stage2_critic_loss_trains_only_the_critic():
    student_apply, student, batch = _stage2_setup()
    grads = jax.jit(jax.grad(
        lambda s, c: losses.onpolicy_critic_loss(student_apply, s, _teacher, c, batch, jax.random.key(0),
                                                 steps_list=(2, 4))[0], argnums=(0, 1)))(student, jnp.float32(1.1))
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree_util.tree_leaves(grads[0]))
    assert abs(float(grads[1])) > 0
