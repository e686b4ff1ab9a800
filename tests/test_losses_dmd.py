"""DMD generator loss and the critic's flow-matching loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax import losses


def _teacher(params, z, t, r, context):
    # velocity depending nonlinearly on z and on the context
    return params["a"] * jnp.tanh(z) + context[:, None, :] * (1.0 + t[..., None])


def _critic(params, z, t, r, context):
    return params["a"] * z + 0.5 * context[:, None, :]


TEACHER = {"a": jnp.float32(0.8)}
CRITIC = {"a": jnp.float32(0.6)}


def _dmd_batch(b=3, f=2, d=5, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    sample = jax.random.normal(ks[0], (b, f, d))
    ctx = jax.random.normal(ks[1], (b, d))
    neg = jax.random.normal(ks[2], (1, d))
    eps = jax.random.normal(ks[3], (b, f, d))
    t = jnp.repeat(jax.random.uniform(ks[4], (b, 1), minval=0.1, maxval=0.95), f, axis=1)
    return {"sample": sample, "context": ctx, "neg_context": neg, "eps": eps, "t": t}


def _np(a):
    return np.asarray(a, np.float64)


def test_dmd_gradient_wrt_sample_is_weighted_normalised_score_difference():
    batch = _dmd_batch()
    s, weight = 3.0, 0.7
    loss_fn = lambda x: losses.dmd_loss(_teacher, TEACHER, _critic, CRITIC, {**batch, "sample": x},
                                        jax.random.key(0), real_guidance_scale=s, dmd_weight=weight)[0]
    loss, grad = jax.jit(jax.value_and_grad(loss_fn))(batch["sample"])

    # independent float64 computation of x_fake, x_real and the normaliser
    x, eps, t, ctx = _np(batch["sample"]), _np(batch["eps"]), _np(batch["t"])[..., None], _np(batch["context"])
    neg = np.broadcast_to(_np(batch["neg_context"]), ctx.shape)
    z = t * eps + (1 - t) * x
    x_fake = z - t * (0.6 * z + 0.5 * ctx[:, None, :])
    teach = lambda c: z - t * (0.8 * np.tanh(z) + c[:, None, :] * (1 + t))
    x_real_c, x_real_u = teach(ctx), teach(neg)
    x_real = x_real_c + s * (x_real_c - x_real_u)
    normaliser = np.mean(np.abs(x - x_real), axis=(1, 2), keepdims=True)
    g = (x_fake - x_real) / normaliser
    # d/dx [weight * mean((x - sg(x - g))^2)] = 2 * weight * g / x.size
    np.testing.assert_allclose(_np(grad), 2 * weight * g / x.size, rtol=2e-4, atol=1e-8)
    np.testing.assert_allclose(float(loss), weight * np.mean(g ** 2), rtol=2e-4)
    # the real-score guidance matters: s = 0 (no CFG) gives another gradient
    grad0 = jax.grad(lambda x_: losses.dmd_loss(_teacher, TEACHER, _critic, CRITIC, {**batch, "sample": x_},
                                                jax.random.key(0), real_guidance_scale=0.0)[0])(batch["sample"])
    assert float(jnp.max(jnp.abs(grad0 / 1.0 - grad / weight))) > 1e-4


def test_dmd_nan_to_num_when_normaliser_vanishes():
    """If teacher and critic both reproduce the sample exactly, (x_fake - x_real)/0 = 0/0 is NaN;
    nan_to_num turns it into 0 (loss 0, finite zero gradient)."""
    batch = _dmd_batch()
    x = batch["sample"]

    def perfect(params, z, t, r, context):  # x0 prediction z - t u == x exactly
        return (z - x) / t[..., None]

    loss, grad = jax.value_and_grad(lambda s: losses.dmd_loss(perfect, None, perfect, None, {**batch, "sample": s},
                                                              jax.random.key(0), real_guidance_scale=0.0)[0])(x)
    assert float(loss) == 0.0
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.max(jnp.abs(grad))) == 0.0


def test_dmd_time_is_shifted_uniform_and_clamped():
    t = np.asarray(losses.sample_dmd_time(jax.random.key(0), 20000, 3))
    assert t.shape == (20000, 3) and np.all(t == t[:, :1])
    s = t[:, 0] / (5 - 4 * t[:, 0])  # undo the shift: uniform on [0, 1]
    assert abs(s.mean() - 0.5) < 0.01 and abs(np.mean(s < 0.25) - 0.25) < 0.01
    tc = np.asarray(losses.sample_dmd_time(jax.random.key(0), 1000, 1, min_t=0.2, max_t=0.9))
    assert tc.min() >= 0.2 and tc.max() <= 0.9 and np.any(tc == 0.9)


def test_dmd_num_samples_uses_the_first_samples_of_the_global_batch():
    batch = _dmd_batch(b=4)
    free = {k: v for k, v in batch.items() if k not in ("eps", "t")}
    grad = jax.jit(jax.grad(lambda s: losses.dmd_loss(_teacher, TEACHER, _critic, CRITIC, {**free, "sample": s},
                                                      jax.random.key(0), dmd_num_samples=2)[0]))(free["sample"])
    g = np.asarray(grad)
    assert np.all(g[2:] == 0) and np.any(g[:2] != 0)
    # with forced noise and times: exactly the loss of the first 2 samples on their own
    def loss_fn(b, **kw):
        return lambda s: losses.dmd_loss(_teacher, TEACHER, _critic, CRITIC, {**b, "sample": s},
                                         jax.random.key(0), **kw)[0]

    loss_n, g_n = jax.value_and_grad(loss_fn(batch, dmd_num_samples=2))(batch["sample"])
    first = {k: (v if k == "neg_context" else v[:2]) for k, v in batch.items()}
    loss_2, g_2 = jax.value_and_grad(loss_fn(first))(first["sample"])
    np.testing.assert_allclose(float(loss_n), float(loss_2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_n)[:2], np.asarray(g_2), rtol=1e-6, atol=1e-12)
    # None = every sample; out-of-range counts fail naming the option
    full = losses.dmd_loss(_teacher, TEACHER, _critic, CRITIC, batch, jax.random.key(0), dmd_num_samples=None)[0]
    assert float(full) != float(loss_n)
    with pytest.raises(ValueError, match="dmd_num_samples"):
        losses.dmd_loss(_teacher, TEACHER, _critic, CRITIC, batch, jax.random.key(0), dmd_num_samples=5)


def test_dmd_batch_size_was_renamed_to_dmd_num_samples():
    import inspect
    for fn in (losses.dmd_loss, losses.onpolicy_generator_loss):
        kw = {n for n, p in inspect.signature(fn).parameters.items() if p.kind == inspect.Parameter.KEYWORD_ONLY}
        assert "dmd_num_samples" in kw and "dmd_batch_size" not in kw, fn.__name__
    with pytest.raises(TypeError, match="dmd_batch_size"):
        losses.dmd_loss(_teacher, TEACHER, _critic, CRITIC, _dmd_batch(), jax.random.key(0), dmd_batch_size=2)


def test_critic_loss_is_flow_matching_on_stopped_samples():
    batch = _dmd_batch()
    cb = {"sample": batch["sample"], "context": batch["context"], "eps": batch["eps"], "t": batch["t"]}
    loss, (g_params, g_sample) = jax.value_and_grad(
        lambda p, s: losses.critic_loss(_critic, p, {**cb, "sample": s}, jax.random.key(0))[0],
        argnums=(0, 1))(CRITIC, cb["sample"])
    x, eps, t, ctx = _np(cb["sample"]), _np(cb["eps"]), _np(cb["t"])[..., None], _np(cb["context"])
    z = t * eps + (1 - t) * x
    expected = np.mean((0.6 * z + 0.5 * ctx[:, None, :] - (eps - x)) ** 2)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(jnp.max(jnp.abs(g_sample))) == 0.0  # the student sample is a constant for the critic
    assert abs(float(g_params["a"])) > 0


def test_flow_matching_loss_formula_and_time_distribution():
    batch = _dmd_batch()
    fm = {"x0": batch["sample"], "context": batch["context"], "neg_context": batch["neg_context"],
          "eps": batch["eps"], "t": batch["t"]}
    x, eps, t, ctx = _np(fm["x0"]), _np(fm["eps"]), _np(fm["t"])[..., None], _np(fm["context"])
    neg = np.broadcast_to(_np(fm["neg_context"]), ctx.shape)
    z = t * eps + (1 - t) * x
    u = lambda c: 0.8 * np.tanh(z) + c[:, None, :] * (1 + t)
    loss = losses.flow_matching_loss(_teacher, TEACHER, fm, jax.random.key(0), text_dropout=0.0)[0]
    np.testing.assert_allclose(float(loss), np.mean((u(ctx) - (eps - x)) ** 2), rtol=1e-5)
    # text dropout with probability 1 trains the negative-context (unconditional) branch
    loss = losses.flow_matching_loss(_teacher, TEACHER, fm, jax.random.key(0), text_dropout=1.0)[0]
    np.testing.assert_allclose(float(loss), np.mean((u(neg) - (eps - x)) ** 2), rtol=1e-5)
    # optional guidance fusion (used by the FAR bidirectional branch): (F - (1 - w) U) / w
    w = 3.0
    loss = losses.flow_matching_loss(_teacher, TEACHER, fm, jax.random.key(0), text_dropout=0.0,
                                     fuse_guidance_scale=w)[0]
    np.testing.assert_allclose(float(loss), np.mean(((u(ctx) - (1 - w) * u(neg)) / w - (eps - x)) ** 2), rtol=1e-5)
    # times: logit-normal, shifted, shared by the frames
    tt = np.asarray(losses.sample_flow_matching_time(jax.random.key(1), 20000, 2))
    assert np.all(tt == tt[:, :1])
    s = tt[:, 0] / (5 - 4 * tt[:, 0])
    logit = np.log(s / (1 - s))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1.0) < 0.03


@pytest.mark.parametrize("bad", [-0.5])
def test_dmd_rejects_negative_real_guidance(bad):
    with pytest.raises(ValueError, match="real_guidance_scale"):
        losses.dmd_loss(_teacher, TEACHER, _critic, CRITIC, _dmd_batch(), jax.random.key(0), real_guidance_scale=bad)
