"""Consistency-distillation baseline: loss and multistep sampler."""
import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax import losses, sampling, schedule
from flowmap_testlib import GAUSS, exact_apply


def _student(params, z, t, r, context):
    return params["a"] * z + params["b"] * t[..., None] + context[:, None, :]


def _teacher(params, z, t, r, context):
    return params * jnp.tanh(z) + context[:, None, :]


def test_consistency_loss_formula_and_gradients():
    b, f, d, m = 4, 2, 3, 8
    ks = jax.random.split(jax.random.key(0), 4)
    batch = {"x0": jax.random.normal(ks[0], (b, f, d)), "eps": jax.random.normal(ks[1], (b, f, d)),
             "context": jax.random.normal(ks[2], (b, d)), "neg_context": jnp.zeros((1, d)),
             "n": jnp.array([0, 3, 6, 7])}
    params = {"a": jnp.float32(0.5), "b": jnp.float32(-0.3)}
    target = {"a": jnp.float32(0.4), "b": jnp.float32(0.2)}
    g = 2.0

    def loss_fn(p, q):
        return losses.consistency_loss(_student, p, q, _teacher, jnp.float32(0.9), batch, jax.random.key(1),
                                       num_discretization_steps=m, teacher_guidance_scale=g)[0]

    loss, (gp, gq) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, target)

    grid = np.asarray(schedule.step_grid(m), np.float64)
    n = np.asarray(batch["n"])
    t, s = grid[n][:, None, None], grid[n + 1][:, None, None]
    x0, eps, ctx = (np.asarray(batch[k], np.float64) for k in ("x0", "eps", "context"))
    z_t = t * eps + (1 - t) * x0
    v_c = 0.9 * np.tanh(z_t) + ctx[:, None, :]
    v_u = 0.9 * np.tanh(z_t)
    z_s = z_t - (t - s) * (v_u + g * (v_c - v_u))  # one Euler step of the guided teacher ODE
    f_student = z_t - t * (0.5 * z_t - 0.3 * t + ctx[:, None, :])
    f_target = z_s - s * (0.4 * z_s + 0.2 * s + ctx[:, None, :])
    np.testing.assert_allclose(float(loss), np.mean((f_student - f_target) ** 2), rtol=1e-5)
    # the last interval ends at s = 0, where the target is z_s itself (f(z, 0) = z)
    assert grid[n[-1] + 1] == 0.0
    assert abs(float(gp["a"])) > 0 and abs(float(gp["b"])) > 0
    assert float(gq["a"]) == 0.0 and float(gq["b"]) == 0.0  # target network is not trained


def test_consistency_loss_of_exact_map_shrinks_with_the_discretisation():
    """With the exact flow map as consistency function and the exact velocity as teacher, only the
    teacher's Euler error remains: the loss falls like (step)^4 when the grid is refined."""
    x0 = GAUSS.sample(jax.random.key(0), (256, 1, 3))
    teacher = lambda p, z, t, r, c: GAUSS.velocity(z, t)
    run = lambda m: losses.consistency_loss(exact_apply(GAUSS), None, None, teacher, None, {"x0": x0},
                                            jax.random.key(1), num_discretization_steps=m)[0]
    coarse, fine = float(run(8)), float(run(32))
    assert fine < coarse / 30, (coarse, fine)
    assert fine < 1e-4


def test_consistency_sampler():
    noise = jax.random.normal(jax.random.key(0), (4096, 1, 3))
    apply = exact_apply(GAUSS)
    # one step is the deterministic x0 prediction z - 1 * u(z, 1, 0) (no noise is drawn)
    one = sampling.consistency_sample(apply, None, noise, key=jax.random.key(1), num_steps=1)
    np.testing.assert_allclose(np.asarray(one), np.asarray(GAUSS.flow_map(noise, jnp.ones((4096, 1)),
                                                                          jnp.zeros((4096, 1)))), atol=1e-5)
    # several steps re-noise with fresh noise: the output differs from the 1-step output but,
    # with the exact map, every x0 prediction is an exact data sample: N(mu, s^2)
    four = sampling.consistency_sample(apply, None, noise, key=jax.random.key(1), num_steps=4)
    assert float(jnp.mean(jnp.abs(four - one))) > 0.1
    x = np.asarray(four).reshape(-1, 3)
    np.testing.assert_allclose(x.mean(0), GAUSS.mu, atol=0.05)
    np.testing.assert_allclose(x.std(0), [GAUSS.s] * 3, atol=0.05)
    # and a different key gives a different sample
    other = sampling.consistency_sample(apply, None, noise, key=jax.random.key(2), num_steps=4)
    assert float(jnp.mean(jnp.abs(other - four))) > 0.1


def test_continuous_consistency_loss_vanishes_for_the_exact_consistency_function():
    """With the teacher's exact velocity and the exact flow map to 0, the tangent df/dt is 0."""
    x0 = GAUSS.sample(jax.random.key(3), (16, 2, 3))
    apply = exact_apply(GAUSS)

    def teacher(params, z, t, r, context):
        return GAUSS.velocity(z, t)
    for c in (0.0, 0.1):
        loss, m = jax.jit(lambda x: losses.continuous_consistency_loss(
            apply, None, teacher, None, {"x0": x}, jax.random.key(4), shift=1.0, tangent_normalization=c))(x0)
        assert float(loss) < 1e-9, (c, float(loss))
    # a wrong teacher (the data velocity of another distribution) gives a clearly non-zero loss
    loss, _ = losses.continuous_consistency_loss(apply, None, lambda p, z, t, r, c: 0.5 * GAUSS.velocity(z, t),
                                                 None, {"x0": x0}, jax.random.key(4), shift=1.0,
                                                 tangent_normalization=0.0)
    assert float(loss) > 1e-2


def test_continuous_consistency_target_is_the_flow_map_identity_at_r0():
    """Without tangent normalisation the loss is the stage-1 flow-map loss with r = 0 everywhere,
    the teacher's velocity as the path velocity, no guidance fusion, dropout or rescaling; with
    it, each sample's loss is (rms / (rms + c))^2 of its tangent."""
    b, f, d = 4, 2, 3
    ks = jax.random.split(jax.random.key(5), 5)
    x0 = jax.random.normal(ks[0], (b, f, d))
    eps = jax.random.normal(ks[1], (b, f, d))
    t = jnp.repeat(jax.random.uniform(ks[2], (b, 1), minval=0.1, maxval=0.9), f, axis=1)
    ctx = jax.random.normal(ks[3], (b, d))
    params = {"a": jnp.float32(0.7), "b": jnp.float32(-0.4)}
    teacher_p = jnp.float32(1.3)
    batch = {"x0": x0, "eps": eps, "t": t, "context": ctx}
    ct, _ = losses.continuous_consistency_loss(_student, params, _teacher, teacher_p, batch, ks[4],
                                               tangent_normalization=0.0)
    fm, _ = losses.flow_map_loss(_student, params, dict(batch, r=jnp.zeros_like(t)), ks[4], diffusion_ratio=0.0,
                                 consistency_ratio=1.0, derivative="jvp", fuse_guidance_scale=1.0, text_dropout=0.0,
                                 weighting="uniform", adaptive_rescale=False,
                                 velocity_fn=lambda z, tt, c: _teacher(teacher_p, z, tt, tt, c))
    np.testing.assert_allclose(float(ct), float(fm), rtol=1e-6)
    # closed form of the normalised loss: the tangent g = v - u - t du/dt of this linear student
    z = schedule.add_noise(x0, eps, t)
    v = _teacher(teacher_p, z, t, t, ctx)
    u = _student(params, z, t, 0 * t, ctx)
    g = np.asarray(v - u - t[..., None] * (params["a"] * v + params["b"]))
    rms = np.sqrt(np.mean(g ** 2, axis=(1, 2)))
    want = np.mean((rms / (rms + 0.1)) ** 2)
    got, _ = losses.continuous_consistency_loss(_student, params, _teacher, teacher_p, batch, ks[4])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert abs(float(ct) - np.mean(rms ** 2)) < 1e-4 * float(ct)


def test_consistency_stage_selects_the_continuous_time_loss():
    from anyflow_jax import stages
    record = stages.get("consistency")
    opts = record.loss_options({"continuous_time": True, "tangent_normalization": 0.0, "shift": 1.0})
    b, f, d = 2, 2, 3
    ks = jax.random.split(jax.random.key(9), 3)
    batch = {"x0": jax.random.normal(ks[0], (b, f, d)), "context": jax.random.normal(ks[1], (b, d))}
    params = {"a": jnp.float32(0.5), "b": jnp.float32(0.2)}
    nets = stages.Networks(student_apply=_student, student_params=params, ema_params=params, teacher_apply=_teacher,
                           teacher_params=jnp.float32(1.1))
    got, _ = record.objective(nets, batch, ks[2], opts)
    want, _ = losses.continuous_consistency_loss(_student, params, _teacher, jnp.float32(1.1), batch, ks[2],
                                                 tangent_normalization=0.0, shift=1.0)
    assert float(got) == float(want)
    disc, _ = record.objective(nets, batch, ks[2], record.loss_options({"shift": 1.0}))
    assert float(disc) != float(got)  # the default stays the discrete-time loss
