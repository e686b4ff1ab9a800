"""Stage-1 forward flow-map loss: analytic truth, formula checks, sharding, training a tiny MLP."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from anyflow_jax import losses, sampling, schedule
from flowmap_testlib import GAUSS, MIXTURE, TinyFlowMapMLP, exact_apply, exact_velocity_fn, init_mlp, mlp_apply

UNCOND = dict(fuse_guidance_scale=1.0, text_dropout=0.0)


def _pairs(key, b, f):
    uu = jax.random.uniform(key, (2, b))
    t, r = jnp.maximum(uu[0], uu[1]), jnp.minimum(uu[0], uu[1])
    return jnp.repeat(t[:, None], f, 1), jnp.repeat(r[:, None], f, 1)


# ---------------------------------------------------------------------------------------------
# Analytic truth


@pytest.mark.parametrize("data, dim", [(GAUSS, 3), (MIXTURE, 2)], ids=["gaussian", "mixture"])
def test_meanflow_identity_target_equals_exact_average_velocity(data, dim):
    """With the exact flow map and its exact marginal velocity as tangent, the target
    v - (t - r) dF/dt is the flow map's own average velocity: JVP to float precision, central
    difference within O(delta^2)."""
    b, f = 32, 2
    k1, k2 = jax.random.split(jax.random.key(0))
    t, r = _pairs(k1, b, f)
    z = jax.random.normal(k2, (b, f, dim)) * 1.5
    v = data.velocity(z, t)
    u = data.average_velocity(z, t, r)
    apply = exact_apply(data)

    @jax.jit
    def targets(z, t, r, v):
        out = {"jvp": losses.flow_map_target(apply, None, z, t, r, v, derivative="jvp")}
        for delta in (0.005, 0.02, 0.04):
            out[f"cd{delta}"] = losses.flow_map_target(apply, None, z, t, r, v, delta=delta)
        return out

    got = targets(z, t, r, v)
    scale = float(jnp.max(jnp.abs(u)))
    err = {k: float(jnp.max(jnp.abs(val - u))) for k, val in got.items()}
    assert err["jvp"] < 2e-6 * scale
    # the reference's delta = 0.005 (5 model units): small, and second order in delta: the error
    # scales as delta^2 (x4 per doubling, x16 from 0.005 to 0.02), so it is truncation, not a bias
    assert err["cd0.005"] < 2e-4 * scale
    assert 3.0 < err["cd0.04"] / err["cd0.02"] < 5.0, err
    assert 11.0 < err["cd0.02"] / err["cd0.005"] < 21.0, err
    assert err["cd0.005"] > 10 * err["jvp"]  # the central difference really is an approximation


@pytest.mark.parametrize("data, dim", [(GAUSS, 3), (MIXTURE, 2)], ids=["gaussian", "mixture"])
def test_stage1_loss_vanishes_for_exact_flow_map(data, dim):
    """The whole stage-1 loss (split, weighting, rescaling) is ~0 for the exact flow map when the
    path velocity is the exact marginal velocity (velocity_fn), for both derivatives."""
    x0 = data.sample(jax.random.key(1), (16, 2, dim))
    apply = exact_apply(data)

    @jax.jit
    def run(x0, key):
        out = {}
        for deriv in ("central", "jvp"):
            for rescale in (True, False):
                out[f"{deriv}/{rescale}"] = losses.flow_map_loss(apply, None, {"x0": x0}, key, derivative=deriv,
                                                           adaptive_rescale=rescale,
                                                           velocity_fn=exact_velocity_fn(data), **UNCOND)
        # reference behaviour (data velocity eps - x0): clearly non-zero (irreducible variance)
        out["data_velocity"] = losses.flow_map_loss(apply, None, {"x0": x0}, key, **UNCOND)
        return out

    out = run(x0, jax.random.key(2))
    floor = float(out["data_velocity"][1]["loss_diffusion"])
    assert floor > 0.3
    for deriv, bound in (("central", 1e-8), ("jvp", 1e-11)):
        for rescale in (True, False):
            loss, m = out[f"{deriv}/{rescale}"]
            for k in ("loss", "loss_diffusion", "loss_consistency", "loss_general"):
                assert float(m[k]) < bound * max(floor, 1.0), (deriv, rescale, k, float(m[k]))


@pytest.mark.parametrize("derivative, rtol", [("jvp", 2e-5), ("central", 2e-3)])
def test_stage1_loss_with_data_velocity_matches_closed_form(derivative, rtol):
    """Reference behaviour (conditional velocity v = eps - x0) with the exact Gaussian flow map:
    the per-sample residual u - v + (t - r)(d/dt along (v, 1, 0)) u is computed independently in
    float64 from the closed form; the loss must equal its mean square."""
    b, f, d = 12, 2, 3
    ks = jax.random.split(jax.random.key(3), 3)
    x0 = GAUSS.sample(ks[0], (b, f, d))
    eps = jax.random.normal(ks[1], x0.shape)
    t, r = _pairs(ks[2], b, f)
    batch = {"x0": x0, "eps": eps, "t": t, "r": r}
    loss, _ = jax.jit(lambda bt: losses.flow_map_loss(exact_apply(GAUSS), None, bt, jax.random.key(0),
                                                      derivative=derivative, weighting="uniform",
                                                      adaptive_rescale=False, **UNCOND))(batch)
    x0n, epsn, tn, rn = (np.asarray(a, np.float64) for a in (x0, eps, t, r))
    tb, rb = tn[..., None], rn[..., None]
    z = tb * epsn + (1 - tb) * x0n
    v = epsn - x0n
    u = GAUSS.np_average_velocity(z, tn, rn)
    h = 1e-6
    u_plus = GAUSS.np_average_velocity(z + h * v, tn + h, rn)
    u_minus = GAUSS.np_average_velocity(z - h * v, tn - h, rn)
    dudt = (u_plus - u_minus) / (2 * h)
    residual = u - v + (tb - rb) * dudt
    expected = np.mean(np.mean(residual.reshape(b, -1) ** 2, axis=1))
    np.testing.assert_allclose(float(loss), expected, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Formula checks with a linear model: u = a z + b t + c r + context


def _linear_apply(params, z, t, r, context):
    out = params["a"] * z + params["b"] * t[..., None] + params["c"] * r[..., None]
    if context is not None:
        out = out + context[:, None, :]
    return out


LIN = {"a": jnp.float32(0.7), "b": jnp.float32(0.3), "c": jnp.float32(-0.2)}


def _linear_manual(params, x0, eps, t, r, ctx_cond, ctx_neg, w):
    """Independent re-implementation of the stage-1 per-sample loss for the linear model."""
    tb, rb = t[..., None], r[..., None]
    z = tb * eps + (1 - tb) * x0
    v = eps - x0
    big_f = params["a"] * z + params["b"] * tb + params["c"] * rb + ctx_cond[:, None, :]
    big_u = params["a"] * z + params["b"] * tb + params["c"] * rb + ctx_neg[:, None, :]
    dfdt = params["a"] * v + params["b"]  # exact total derivative along (v, 1, 0)
    u_hat = (big_f - (1 - w) * jax.lax.stop_gradient(big_u)) / w
    target = jax.lax.stop_gradient(v - (tb - rb) * dfdt / w)
    return jnp.mean(((u_hat - target) ** 2).reshape(x0.shape[0], -1), axis=1)


def _linear_batch(b=8, f=3, d=4, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x0 = jax.random.normal(ks[0], (b, f, d))
    eps = jax.random.normal(ks[1], (b, f, d))
    ctx = jax.random.normal(ks[2], (b, d))
    neg = jax.random.normal(ks[3], (1, d))
    kinds = losses.time_pair_kinds(b)
    t, r = _pairs(ks[4], b, f)
    r = jnp.where(kinds[:, None] == losses.DIFFUSION, t, r)
    r = jnp.where(kinds[:, None] == losses.CONSISTENCY, 0.0, r)
    return {"x0": x0, "eps": eps, "t": t, "r": r, "context": ctx, "neg_context": neg}, kinds


@pytest.mark.parametrize("derivative", ["central", "jvp"])
def test_guidance_fusion_formula(derivative):
    batch, _ = _linear_batch()
    w = 3.0
    run = jax.jit(lambda bt, w: losses.flow_map_loss(_linear_apply, LIN, bt, jax.random.key(0), derivative=derivative,
                                                     fuse_guidance_scale=w, text_dropout=0.0, weighting="uniform",
                                                     adaptive_rescale=False)[0], static_argnums=1)
    loss = run(batch, w)
    neg_b = jnp.broadcast_to(batch["neg_context"], batch["context"].shape)
    expected = jnp.mean(_linear_manual(LIN, batch["x0"], batch["eps"], batch["t"], batch["r"], batch["context"],
                                       neg_b, w))
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4)
    # without fusion the result differs (the check above is sensitive to w)
    unfused = run(batch, 1.0)
    assert abs(float(unfused) - float(loss)) > 1e-2 * float(loss)


def test_text_dropout_uses_negative_context():
    batch, _ = _linear_batch()
    neg_b = jnp.broadcast_to(batch["neg_context"], batch["context"].shape)
    opts = dict(fuse_guidance_scale=3.0, weighting="uniform", adaptive_rescale=False)
    # every sample dropped: the prediction and the derivative both use c_neg, so F = U
    loss, m = losses.flow_map_loss(_linear_apply, LIN, batch, jax.random.key(0), text_dropout=1.0, **opts)
    expected = jnp.mean(_linear_manual(LIN, batch["x0"], batch["eps"], batch["t"], batch["r"], neg_b, neg_b, 3.0))
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4)
    assert float(m["text_dropped"]) == 1.0
    # the dropout rate is the requested probability (0.1 by default)
    big = {"x0": jnp.zeros((4000, 1, 1)), "context": jnp.ones((4000, 1)), "neg_context": jnp.zeros((1, 1))}
    _, m = jax.jit(lambda bt: losses.flow_map_loss(_linear_apply, LIN, bt, jax.random.key(1)))(big)
    assert abs(float(m["text_dropped"]) - 0.1) < 0.015


def test_split_by_global_index_and_time_sampling():
    np.testing.assert_array_equal(losses.time_pair_kinds(8), [0, 0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(losses.time_pair_kinds(32), [0] * 16 + [1] * 8 + [2] * 8)
    np.testing.assert_array_equal(losses.time_pair_kinds(2), [0, 2])  # Python round(0.5) == 0
    np.testing.assert_array_equal(losses.time_pair_kinds(6, 1 / 3, 1 / 3), [0, 0, 1, 1, 2, 2])
    b, f = 4000, 3
    t, r = losses.sample_time_pairs(jax.random.key(0), b, f, diffusion_ratio=0.25, consistency_ratio=0.25)
    assert t.dtype == jnp.float32 and t.shape == (b, f)
    t, r = np.asarray(t), np.asarray(r)
    assert np.all(t == t[:, :1]) and np.all(r == r[:, :1])  # one pair per sample
    q = b // 4
    np.testing.assert_array_equal(r[:q], t[:q])  # diffusion: r = t
    assert np.all(r[q:2 * q] == 0)  # consistency: r = 0
    assert np.all(t[2 * q:] > r[2 * q:])  # general: t > r
    # t = shift(max(u1, u2)), r = shift(min(u1, u2)): undo the shift and check the order statistics
    unshift = lambda x: x / (5 - 4 * x)  # inverse of 5 s / (1 + 4 s)
    assert abs(unshift(t[:, 0]).mean() - 2 / 3) < 0.02
    assert abs(unshift(r[2 * q:, 0]).mean() - 1 / 3) < 0.02


def test_weighting_and_adaptive_rescaling_value_and_gradient():
    batch, kinds = _linear_batch(seed=5)
    opts = dict(derivative="jvp", fuse_guidance_scale=1.0, text_dropout=0.0)
    is_diff = jnp.asarray(kinds == losses.DIFFUSION)

    def expected_loss(params):
        raw = _linear_manual(params, batch["x0"], batch["eps"], batch["t"], batch["r"], batch["context"],
                             batch["context"], 1.0)
        weighted = raw * jnp.mean(schedule.loss_weight(batch["t"], "beta08"), axis=1)
        d = jnp.sum(jnp.where(is_diff, weighted, 0)) / jnp.sum(is_diff)
        factor = jax.lax.stop_gradient(d / (weighted + 1e-5))
        return jnp.mean(jnp.where(is_diff, weighted, weighted * factor)), d

    (exp_loss, exp_d), exp_grad = jax.value_and_grad(expected_loss, has_aux=True)(LIN)
    (loss, m), grad = jax.value_and_grad(
        lambda p: losses.flow_map_loss(_linear_apply, p, batch, jax.random.key(0), **opts), has_aux=True)(LIN)
    np.testing.assert_allclose(float(loss), float(exp_loss), rtol=1e-5)
    np.testing.assert_allclose(float(m["loss_diffusion"]), float(exp_d), rtol=1e-5)
    for k in LIN:
        np.testing.assert_allclose(float(grad[k]), float(exp_grad[k]), rtol=1e-4, atol=1e-7)
    # each rescaled sample's loss equals D (up to eps): the loss is ~D
    np.testing.assert_allclose(float(loss), float(exp_d), rtol=1e-3)
    # without rescaling the loss is the plain weighted mean, which differs
    plain = losses.flow_map_loss(_linear_apply, LIN, batch, jax.random.key(0), adaptive_rescale=False, **opts)[0]
    assert abs(float(plain) - float(loss)) > 1e-3


def test_central_difference_and_jvp_agree_on_an_mlp():
    model = TinyFlowMapMLP(32)
    params = init_mlp(model, jax.random.key(0), (8, 2, 3))
    x0 = GAUSS.sample(jax.random.key(1), (8, 2, 3))
    run = jax.jit(lambda p, d: {k: losses.flow_map_loss(mlp_apply(model), p, {"x0": d}, jax.random.key(2),
                                                        derivative=k, adaptive_rescale=False, **UNCOND)[0]
                                for k in ("central", "jvp")})
    out = run(params, x0)
    np.testing.assert_allclose(float(out["central"]), float(out["jvp"]), rtol=2e-3)


# ---------------------------------------------------------------------------------------------
# Sharding, training


def test_sharded_batch_equals_single_device():
    """The stage-1 loss and its gradient on 8 fake CPU devices with the batch sharded over 'data'
    equal the single-device values (the adaptive rescaling uses the global diffusion mean: with one
    sample per device, a local mean would see no diffusion sample on most devices)."""
    assert jax.device_count() >= 8
    b, f, d, e = 8, 2, 3, 4
    model = TinyFlowMapMLP(32)
    params = init_mlp(model, jax.random.key(0), (b, f, d), context_dim=e)
    batch = {"x0": GAUSS.sample(jax.random.key(1), (b, f, d)),
             "context": jax.random.normal(jax.random.key(2), (b, e)),
             "neg_context": jnp.zeros((1, e))}

    def loss_and_grad(p, bt, key):
        return jax.value_and_grad(lambda q: losses.flow_map_loss(mlp_apply(model), q, bt, key), has_aux=True)(p)

    fn = jax.jit(loss_and_grad)
    key = jax.random.key(3)
    (loss1, m1), g1 = fn(params, batch, key)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        sharded = {"x0": jax.device_put(batch["x0"], NamedSharding(mesh, P("data"))),
                   "context": jax.device_put(batch["context"], NamedSharding(mesh, P("data"))),
                   "neg_context": jax.device_put(batch["neg_context"], NamedSharding(mesh, P()))}
        rep_params = jax.device_put(params, NamedSharding(mesh, P()))
        assert len(sharded["x0"].sharding.device_set) == 8
        (loss8, m8), g8 = fn(rep_params, sharded, key)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    for k in m1:
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5, atol=1e-8)
    jax.tree_util.tree_map(lambda a, c: np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4,
                                                                   atol=1e-6), g8, g1)
    assert float(m1["loss_consistency"]) > 0 and float(m1["loss_general"]) > 0


def test_tiny_mlp_trains_from_scratch_on_gaussian_data():
    """Model-agnostic: a plain Flax MLP (no Wan code) trained with flow_map_loss + optax learns the
    exact flow map of Gaussian data (error against the closed form drops ~10x in 300 steps)."""
    b, f, d = 64, 2, 3
    model = TinyFlowMapMLP(64)
    apply = mlp_apply(model)
    params = init_mlp(model, jax.random.key(0), (b, f, d))
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @jax.jit
    def flow_map_error(p, key):
        k1, k2, k3 = jax.random.split(key, 3)
        x0 = GAUSS.sample(k1, (512, f, d))
        t, r = _pairs(k3, 512, f)
        z = schedule.add_noise(x0, jax.random.normal(k2, x0.shape), t)
        return jnp.mean((apply(p, z, t, r, None) - GAUSS.average_velocity(z, t, r)) ** 2)

    @jax.jit
    def train_step(p, s, key):
        k1, k2 = jax.random.split(key)
        grad_fn = jax.value_and_grad(losses.flow_map_loss, argnums=1, has_aux=True)
        (loss, _), g = grad_fn(apply, p, {"x0": GAUSS.sample(k1, (b, f, d))}, k2, **UNCOND)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    err0 = float(flow_map_error(params, jax.random.key(99)))
    hist = []
    for i in range(300):
        params, opt_state, loss = train_step(params, opt_state, jax.random.key(i + 1))
        hist.append(float(loss))
    err1 = float(flow_map_error(params, jax.random.key(99)))
    assert np.mean(hist[-30:]) < 0.7 * np.mean(hist[:30])
    assert err1 < 0.3 * err0, (err0, err1)


def test_every_objective_accepts_video_latents_and_pytree_context():
    """Channels-last video latents (B, F, H, W, C) and a dict context, through every objective and
    sampler in one jitted function (the MLP flattens the trailing axes)."""
    b, f, shape, e = 4, 3, (4, 4, 2), 3
    model = TinyFlowMapMLP(16)
    params = init_mlp(model, jax.random.key(0), (b, f) + shape, context_dim=e)

    def apply(p, z, t, r, context):  # a dict context, as a text encoder might give
        return model.apply({"params": p}, z, t, r, context["emb"] * context["scale"][:, None])

    batch = {"x0": jax.random.normal(jax.random.key(1), (b, f) + shape),
             "context": {"emb": jax.random.normal(jax.random.key(2), (b, e)), "scale": jnp.ones((b,))},
             "neg_context": {"emb": jnp.zeros((1, e)), "scale": jnp.ones((1,))}}

    @jax.jit
    def run(p, bt, key):
        out = {
            "teacher": losses.flow_matching_loss(apply, p, bt, key)[0],
            "stage1": losses.flow_map_loss(apply, p, bt, key)[0],
            "stage1_jvp": losses.flow_map_loss(apply, p, bt, key, derivative="jvp")[0],
            "stage2": losses.onpolicy_generator_loss(apply, p, apply, p, apply, p, bt, key, steps_list=(2, 4))[0],
            "critic": losses.onpolicy_critic_loss(apply, p, apply, p, bt, key, steps_list=(2, 4))[0],
            "consistency": losses.consistency_loss(apply, p, p, apply, p, bt, key, num_discretization_steps=4)[0],
        }
        noise = jax.random.normal(key, bt["x0"].shape)
        out["sample"] = sampling.sample(apply, p, noise, bt["context"], num_steps=2, guidance_scale=2.0,
                                        neg_context=bt["neg_context"], context_latents=bt["x0"][:, :1])
        return out

    out = run(params, batch, jax.random.key(3))
    for k, v in out.items():
        assert np.all(np.isfinite(np.asarray(v))), k
    assert out["sample"].shape == batch["x0"].shape
    np.testing.assert_array_equal(np.asarray(out["sample"][:, :1]), np.asarray(batch["x0"][:, :1]))
