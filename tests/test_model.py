"""The Flax Wan DiT on its own: flow-map mode, gate mixing, logical axes, attention and remat
switches, compute dtype and input validation."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_testlib import perturbed
from anyflow_jax.models import attention
from anyflow_jax.models.wan import ConditionEmbedder, WanTransformer3D

CFG = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
           ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _perturb(params, seed=0, scale=0.1):
    return perturbed(params, seed, scale)


def _inputs(b=2, f=3, h=4, w=6, seed=0):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(b, f, h, w, 4), jnp.float32)
    t = jnp.asarray(rng.rand(b, f), jnp.float32)
    ctx = jnp.asarray(rng.randn(b, 5, 16), jnp.float32)
    return x, t, ctx


def _student_from_teacher(tparams):
    sparams = jax.tree_util.tree_map(lambda a: a, tparams)
    sparams["condition_embedder"] = dict(sparams["condition_embedder"])
    sparams["condition_embedder"]["delta_embedder"] = jax.tree_util.tree_map(
        jnp.copy, tparams["condition_embedder"]["time_embedder"])
    return sparams


@pytest.mark.parametrize("scan", [True, False])
def test_flow_map_on_diagonal_equals_teacher_bit_for_bit(scan):
    teacher = WanTransformer3D(**CFG, scan_layers=scan)
    student = WanTransformer3D(**CFG, scan_layers=scan, flow_map=True)
    tparams = _perturb(teacher.init_params(jax.random.key(0)))
    assert "delta_embedder" not in tparams["condition_embedder"]
    sparams = _student_from_teacher(tparams)
    x, t, ctx = _inputs()
    teacher_fn = jax.jit(lambda p, r: teacher.apply({"params": p}, x, t, r, ctx))
    u_teacher = teacher_fn(tparams, None)
    u_student = jax.jit(lambda p: student.apply({"params": p}, x, t, t, ctx))(sparams)
    np.testing.assert_array_equal(np.asarray(u_student), np.asarray(u_teacher))
    # the teacher ignores r, like the reference's single-time embedder
    np.testing.assert_array_equal(np.asarray(teacher_fn(tparams, t * 0.3)), np.asarray(u_teacher))


def _np_sinusoid(t, dim):
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = t[..., None].astype(np.float64) * freqs
    return np.concatenate([np.cos(args), np.sin(args)], -1)


def _np_mlp(p, x):
    h = x @ np.asarray(p["linear_1"]["kernel"], np.float64) + np.asarray(p["linear_1"]["bias"], np.float64)
    h = h / (1 + np.exp(-h))
    return h @ np.asarray(p["linear_2"]["kernel"], np.float64) + np.asarray(p["linear_2"]["bias"], np.float64)


@pytest.mark.parametrize("deltatime_type", ["r", "t-r"])
def test_gate_mixing_against_numpy(deltatime_type):
    dim, freq, gate = 24, 16, 0.25
    emb = ConditionEmbedder(dim, freq, True, gate, deltatime_type, jnp.float32)
    t = np.array([[900.0, 500.0], [250.0, 13.0]], np.float32)
    r = np.array([[100.0, 480.0], [0.0, 13.0]], np.float32)
    ctx = np.random.RandomState(0).randn(2, 3, 16).astype(np.float32)
    params = _perturb(nn.meta.unbox(emb.init(jax.random.key(0), t, r, ctx)["params"]), seed=1, scale=0.3)
    e, mod, _ = emb.apply({"params": params}, t, r, ctx)
    second = r if deltatime_type == "r" else t - r
    e_t = _np_mlp(params["time_embedder"], _np_sinusoid(t, freq))
    e_d = _np_mlp(params["delta_embedder"], _np_sinusoid(second, freq))
    want = (1 - gate) * e_t + gate * e_d
    np.testing.assert_allclose(np.asarray(e), want, atol=2e-5, rtol=0)
    assert np.abs(e_t - e_d).max() > 0.1  # the two embedders really differ here
    silu = want / (1 + np.exp(-want))
    want_mod = silu @ np.asarray(params["time_proj"]["kernel"]) + np.asarray(params["time_proj"]["bias"])
    np.testing.assert_allclose(np.asarray(mod).reshape(2, 2, -1), want_mod, atol=2e-5, rtol=0)


@pytest.mark.parametrize("scan", [True, False])
def test_every_parameter_has_logical_axis_names(scan):
    model = WanTransformer3D(**CFG, flow_map=True, scan_layers=scan)
    boxed = model.abstract_params()
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape)
        if scan and leaf.value.ndim and leaf.value.shape[0] == CFG["num_layers"] and "layers" in leaf.names:
            assert leaf.names[0] == "layers"
    n_layers_axes = sum("layers" in leaf.names for leaf in leaves)
    assert (n_layers_axes > 0) == scan


def test_attention_implementations_agree():
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rng.randn(2, 7, 3, 8), jnp.float32) for _ in range(3))
    ref = np.einsum("bhqk,bkhd->bqhd",
                    jax.nn.softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8), axis=-1), v)
    for impl in ("xla", "jax", "splash"):  # splash: the Pallas interpreter on CPU (tests/test_splash.py)
        np.testing.assert_allclose(np.asarray(attention.dot_product_attention(q, k, v, implementation=impl)),
                                   ref, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention.dot_product_attention(q, k, v, implementation="flash9")


def test_xla_attention_supports_forward_mode_ad():
    model = WanTransformer3D(**CFG, flow_map=True)
    params = _perturb(model.init_params(jax.random.key(0)))
    x, t, ctx = _inputs()
    r = t * 0.5
    # jitted: one program each instead of eager op-by-op dispatch (same values, faster test)
    f = jax.jit(lambda tt: model.apply({"params": params}, x, tt, r, ctx))
    tangent = jnp.asarray(np.random.RandomState(1).rand(*t.shape), jnp.float32)
    jvp = jax.jit(lambda tt, v: jax.jvp(f, (tt,), (v,))[1])(t, tangent)
    # <w, J v> must equal <J^T w, v> (reverse mode)
    w = jnp.asarray(np.random.RandomState(2).randn(*x.shape), jnp.float32)
    vjp = jax.jit(lambda tt, ww: jax.vjp(f, tt)[1](ww)[0])(t, w)
    lhs = float(jnp.vdot(w, jvp))
    rhs = float(jnp.vdot(vjp, tangent))
    assert abs(lhs) > 1.0
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)
    # and a small finite difference agrees to its own accuracy
    eps = 1e-4
    fd = (f(t + eps * tangent) - f(t - eps * tangent)) / (2 * eps)
    assert np.abs(np.asarray(fd) - np.asarray(jvp)).max() < 0.05 * np.abs(np.asarray(jvp)).max()


@pytest.mark.parametrize("policy", ["full", "dots", pytest.param("attn_out", marks=pytest.mark.slow)])
def test_remat_policies_keep_values_and_gradients(policy):
    x, t, ctx = _inputs()
    base = WanTransformer3D(**CFG, flow_map=True)
    params = _perturb(base.init_params(jax.random.key(0)))

    def loss(model, p):
        return jnp.mean(model.apply({"params": p}, x, t, t * 0.5, ctx) ** 2)

    v0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(base, p)))(params)
    v1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(base.clone(remat_policy=policy), p)))(params)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), g1, g0)


def test_bf16_compute_is_close_to_fp32():
    x, t, ctx = _inputs()
    m32 = WanTransformer3D(**CFG)
    params = _perturb(m32.init_params(jax.random.key(0)))
    out32 = np.asarray(m32.apply({"params": params}, x, t, None, ctx))
    out16 = m32.clone(dtype=jnp.bfloat16).apply({"params": params}, x, t, None, ctx)
    assert out16.dtype == jnp.float32  # the velocity is returned in fp32
    err = np.abs(np.asarray(out16) - out32).max() / np.abs(out32).max()
    assert 0 < err < 0.05


def test_bad_inputs_are_named():
    model = WanTransformer3D(**CFG, flow_map=True)
    params = model.init_params(jax.random.key(0))
    x, t, ctx = _inputs()
    apply = lambda *a: model.apply({"params": params}, *a)  # noqa: E731
    with pytest.raises(ValueError, match="needs the target time r"):
        apply(x, t, None, ctx)
    with pytest.raises(ValueError, match="channels"):
        apply(x[..., :3], t, t, ctx)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        apply(x[:, :, :3], t, t, ctx)
    with pytest.raises(ValueError, match=r"t has shape \(2, 2\)"):
        apply(x, t[:, :2], t, ctx)
    with pytest.raises(ValueError, match="text_dim=16"):
        apply(x, t, t, ctx[..., :8])
    with pytest.raises(ValueError, match="deltatime_type"):
        WanTransformer3D(**CFG, flow_map=True, deltatime_type="dt").init_params(jax.random.key(0))
    with pytest.raises(ValueError, match="unknown Wan transformer config keys"):
        WanTransformer3D.from_config(dict(CFG, num_heads=3))
    with pytest.raises(ValueError, match="FAR"):
        WanTransformer3D.from_config(dict(CFG, init_far_model=True))
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        WanTransformer3D(**dict(CFG, rope_max_seq_len=2)).init_params(jax.random.key(0)) and model.clone(
            rope_max_seq_len=2).apply({"params": params}, x, t, t, ctx)


def test_batch_one_context_is_broadcast():
    model = WanTransformer3D(**CFG)
    params = _perturb(model.init_params(jax.random.key(0)))
    x, t, ctx = _inputs()
    one = model.apply({"params": params}, x, t, None, ctx[:1])
    full = model.apply({"params": params}, x, t, None, jnp.broadcast_to(ctx[:1], ctx.shape))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(full))


def test_dense_matmul_form_follows_the_lowering_platform():
    """``Dense``'s matmul is one 2-D dot on the flattened tokens when lowered for CPU (XLA:CPU's
    fast weight gradient) and a dot over the last axis that keeps the batch and token axes apart
    for TPU and GPU (the flattened form cost the 14B teacher step 26.6 instead of 19.7 GiB per
    v5p chip under tensor parallelism); both give the same values and gradients."""
    from anyflow_jax.models import wan
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 5, 8), jnp.float32)
    k = jnp.asarray(rng.randn(8, 4), jnp.float32)
    b = jnp.asarray(rng.randn(4), jnp.float32)
    fn = jax.jit(wan._dense)
    for platform, operand in (("cpu", "tensor<10x8xf32>"), ("tpu", "tensor<2x5x8xf32>"), ("cuda", "tensor<2x5x8xf32>")):
        text = fn.trace(x, k, b).lower(lowering_platforms=(platform,)).as_text()
        dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        assert len(dots) == 1 and f"({operand}, tensor<8x4xf32>)" in dots[0], (platform, dots)
    flat, nd = (jax.jit(jax.value_and_grad(lambda x, k, f=f: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1)))
                for f in (wan._dense_flat, wan._dense_nd))
    (v1, g1), (v2, g2) = flat(x, k), nd(x, k)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fn(x, k, b), jnp.einsum("bti,io->bto", x, k) + b, rtol=1e-6, atol=1e-6)
