"""anyflow_jax.training.optim: lr schedule, AdamW (PyTorch semantics), clipping, frozen leaves, EMA."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from anyflow_jax.training import optim


# ----------------------------------------------------------------------------- helpers
def _hf_constant_with_warmup(step, warmup):
    """transformers.get_constant_schedule_with_warmup's lr_lambda, verbatim semantics."""
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    return 1.0


def _torch_adamw_numpy(params, grads_seq, *, lr, b1, b2, eps, wd, warmup, clip=None, trainable=None):
    """Hand-written torch.optim.AdamW + LambdaLR(constant with warmup) + clip_grad_norm_ (fp64).

    The scheduler is stepped after each optimizer step, so update t (1-based) uses factor(t-1).
    """
    trainable = trainable or {k: True for k in params}
    p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    history = []
    for t, grads in enumerate(grads_seq, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items() if trainable[k]}
        lr_t = lr * _hf_constant_with_warmup(t - 1, warmup)
        if clip is not None:
            total = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
            coef = min(1.0, clip / (total + 1e-6))
            g = {k: x * coef for k, x in g.items()}
        for k in g:
            p[k] *= 1.0 - lr_t * wd
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            denom = np.sqrt(v2[k]) / np.sqrt(bc2) + eps
            p[k] -= (lr_t / bc1) * m[k] / denom
        history.append({k: x.copy() for k, x in p.items()})
    return history


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(4, 3)).astype(np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32),
            "frozen": rng.normal(size=(5,)).astype(np.float32)}


def _grads_seq(n, scale=1.0, seed=1):
    rng = np.random.default_rng(seed)
    return [{"w": (scale * rng.normal(size=(4, 3))).astype(np.float32),
             "b": (scale * rng.normal(size=(3,))).astype(np.float32),
             "frozen": (scale * rng.normal(size=(5,))).astype(np.float32)} for _ in range(n)]


def _run_optax(tx, params, grads_seq):
    params = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = []
    for g in grads_seq:
        params, state = step(params, state, jax.tree_util.tree_map(jnp.asarray, g))
        history.append(jax.tree_util.tree_map(np.asarray, params))
    return history, state


# ----------------------------------------------------------------------------- schedule
def test_lr_schedule_matches_constant_with_warmup():
    lr, w = 5e-5, 1000
    sched = optim.lr_schedule(lr, w)
    for step in (0, 1, w - 1, w, 10 * w):
        np.testing.assert_allclose(float(sched(step)), lr * _hf_constant_with_warmup(step, w), rtol=1e-6)
    assert float(sched(0)) == 0.0  # the first update uses lr 0, as LambdaLR does
    np.testing.assert_allclose(float(sched(1)), lr / w, rtol=1e-6)
    np.testing.assert_allclose(float(sched(w - 1)), lr * (w - 1) / w, rtol=1e-6)
    assert float(sched(w)) == pytest.approx(lr, rel=1e-7) and float(sched(10 * w)) == pytest.approx(lr, rel=1e-7)
    # traced step gives the same values
    steps = (0, 1, w - 1, w, 10 * w)
    traced = jax.jit(sched)(jnp.array(steps))
    np.testing.assert_allclose(np.asarray(traced), [lr * _hf_constant_with_warmup(s, w) for s in steps], rtol=1e-6)
    # warmup 0: constant from the first update
    const = optim.lr_schedule(2e-6, 0)
    assert float(const(0)) == pytest.approx(2e-6) and float(const(123)) == pytest.approx(2e-6)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.lr_schedule(1e-3, -1)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_decaying_lr_schedules_match_transformers(kind):
    """The decays after the warmup are transformers' get_{cosine,linear}_schedule_with_warmup, stepped
    as LambdaLR steps them (update k uses the factor at k), traced or not; the optimizer uses them."""
    import torch
    import transformers

    lr, warmup, total = 1e-3, 10, 50
    make = {"cosine": transformers.get_cosine_schedule_with_warmup,
            "linear": transformers.get_linear_schedule_with_warmup}[kind]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(opt, num_warmup_steps=warmup, num_training_steps=total)
    want = []
    for _ in range(total + 5):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = optim.lr_schedule(lr, warmup, kind, decay_steps=total)
    got = np.asarray(jax.jit(ours)(jnp.arange(total + 5)))
    # (past decay_steps transformers' cosine rises again; ours stays at 0)
    np.testing.assert_allclose(got[:total + 1], want[:total + 1], rtol=1e-5, atol=1e-9)
    assert (got[total:] == 0.0).all()
    assert got[warmup] == pytest.approx(lr) and got[total] == 0.0 and got[(warmup + total) // 2] < 0.75 * lr
    # the optimizer's scheduled lr: plain SGD-like AdamW steps shrink to 0 at the end of the decay
    tx = optim.make_optimizer(lr=lr, b1=0.0, b2=0.0, weight_decay=0.0, eps=0.0, warmup_steps=warmup,
                              grad_clip=None, schedule=kind, decay_steps=total)
    hist, _ = _run_optax(tx, {"w": np.zeros(1, np.float32)}, [{"w": np.ones(1, np.float32)}] * (total + 2))
    steps = -np.diff([0.0] + [float(h["w"][0]) for h in hist])
    np.testing.assert_allclose(steps, got[:total + 2], rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="decay_steps > warmup_steps"):
        optim.lr_schedule(lr, warmup, kind, decay_steps=warmup)
    with pytest.raises(ValueError, match="schedule must be one of"):
        optim.lr_schedule(lr, warmup, "step")


# ----------------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("hp", [
    dict(lr=1e-2, b1=0.9, b2=0.95, wd=0.1, warmup=3, eps=1e-8),   # stage 0/1 betas, with decay
    dict(lr=3e-3, b1=0.0, b2=0.999, wd=0.0, warmup=0, eps=1e-8),  # stage 2 betas, no warmup
])
def test_adamw_matches_numpy_pytorch_formula(hp):
    params, grads = _params(), _grads_seq(7)
    tx = optim.make_optimizer(lr=hp["lr"], b1=hp["b1"], b2=hp["b2"], weight_decay=hp["wd"], eps=hp["eps"],
                              warmup_steps=hp["warmup"], grad_clip=None)
    got, _ = _run_optax(tx, params, grads)
    want = _torch_adamw_numpy(params, grads, lr=hp["lr"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"],
                              wd=hp["wd"], warmup=hp["warmup"])
    for g, w in zip(got, want):
        for k in params:
            np.testing.assert_allclose(g[k], w[k], atol=1e-6, rtol=0)
    if hp["warmup"]:
        # lr factor 0 on the first update: nothing moves, but later steps use the accumulated moments
        for k in params:
            np.testing.assert_array_equal(got[0][k], params[k])
    assert not np.allclose(got[-1]["w"], params["w"], atol=1e-3)


def test_adamw_clip_and_mask_match_real_pytorch():
    torch = pytest.importorskip("torch")
    params, grads = _params(), _grads_seq(6, scale=3.0)
    hp = dict(lr=1e-2, b1=0.9, b2=0.95, wd=0.05, warmup=2, eps=1e-8, clip=1.0)
    mask = {"w": True, "b": True, "frozen": False}
    tx = optim.make_optimizer(lr=hp["lr"], b1=hp["b1"], b2=hp["b2"], weight_decay=hp["wd"], eps=hp["eps"],
                              warmup_steps=hp["warmup"], grad_clip=hp["clip"], mask=mask)
    got, _ = _run_optax(tx, params, grads)

    tp = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64), requires_grad=mask[k]) for k, v in params.items()}
    trainable = [tp[k] for k in params if mask[k]]
    opt = torch.optim.AdamW(trainable, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"], weight_decay=hp["wd"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _hf_constant_with_warmup(s, hp["warmup"]))
    for i, g in enumerate(grads):
        for k in params:
            if mask[k]:
                tp[k].grad = torch.tensor(g[k], dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(trainable, hp["clip"])
        opt.step()
        sched.step()
        opt.zero_grad()
        for k in params:
            np.testing.assert_allclose(got[i][k], tp[k].detach().numpy(), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got[-1]["frozen"], params["frozen"])


# ----------------------------------------------------------------------------- clipping
def test_clip_transform_uses_torch_formula():
    clip = optim.clip_by_global_norm_torch(1.0)
    g = {"a": jnp.array([30.0, 40.0]), "b": jnp.array([0.0])}  # norm 50
    out, _ = clip.update(g, clip.init(g))
    np.testing.assert_allclose(np.asarray(out["a"]), np.array([30.0, 40.0]) / (50.0 + 1e-6), rtol=1e-6)
    small = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([0.0])}  # norm 0.5: unchanged
    out, _ = clip.update(small, clip.init(small))
    np.testing.assert_array_equal(np.asarray(out["a"]), np.array([0.3, 0.4], np.float32))
    # where the 1e-6 matters (tiny max_norm): coef = 1e-6 / (2e-6 + 1e-6) = 1/3, not 1/2
    tiny = optim.clip_by_global_norm_torch(1e-6)
    g = {"a": jnp.array([1.2e-6, 1.6e-6])}
    out, _ = tiny.update(g, tiny.init(g))
    np.testing.assert_allclose(np.asarray(out["a"]), np.array([1.2e-6, 1.6e-6]) / 3, rtol=1e-5)


def test_clipped_update_equals_update_of_rescaled_gradient_and_ignores_frozen():
    # eps=1 makes Adam sensitive to the gradient's scale, so clipping is visible in the update.
    params = _params()
    mask = {"w": True, "b": True, "frozen": False}
    kw = dict(lr=0.1, b1=0.9, b2=0.95, weight_decay=0.0, eps=1.0, warmup_steps=0)
    g = _grads_seq(1, scale=20.0)[0]
    norm = np.sqrt(sum(np.sum(g[k].astype(np.float64) ** 2) for k in ("w", "b")))
    assert norm > 10
    g_big_frozen = dict(g, frozen=np.full((5,), 1e6, np.float32))
    clipped, _ = _run_optax(optim.make_optimizer(**kw, grad_clip=1.0, mask=mask), params, [g_big_frozen])
    rescaled = {k: (v / (norm + 1e-6)).astype(np.float32) for k, v in g.items()}
    ref, _ = _run_optax(optim.make_optimizer(**kw, grad_clip=None, mask=mask), params, [rescaled])
    unclipped, _ = _run_optax(optim.make_optimizer(**kw, grad_clip=None, mask=mask), params, [g])
    for k in ("w", "b"):
        np.testing.assert_allclose(clipped[0][k], ref[0][k], atol=1e-6, rtol=0)
        assert np.max(np.abs(clipped[0][k] - unclipped[0][k])) > 1e-3  # clipping did something
    np.testing.assert_array_equal(clipped[0]["frozen"], params["frozen"])
    # grad_norm (for metrics) counts only trainable leaves
    np.testing.assert_allclose(float(optim.grad_norm(g_big_frozen, mask)), norm, rtol=1e-5)
    full = np.sqrt(norm ** 2 + 5 * 1e12)
    np.testing.assert_allclose(float(optim.grad_norm(g_big_frozen)), full, rtol=1e-5)


# ----------------------------------------------------------------------------- frozen leaves
def test_frozen_leaves_unchanged_and_carry_no_moments():
    params = _params()
    mask = {"w": True, "b": True, "frozen": False}
    tx = optim.make_optimizer(lr=1e-2, b1=0.9, b2=0.95, weight_decay=0.1, warmup_steps=1, grad_clip=1.0, mask=mask)
    history, state = _run_optax(tx, params, _grads_seq(4))
    for h in history:
        np.testing.assert_array_equal(h["frozen"], params["frozen"])
    assert not np.allclose(history[-1]["w"], params["w"])
    trainable_size = params["w"].size + params["b"].size
    leaves = jax.tree_util.tree_leaves(state)
    counters = [x for x in leaves if np.ndim(x) == 0]
    arrays = [x for x in leaves if np.ndim(x) > 0]
    assert sum(np.size(x) for x in leaves) == 2 * trainable_size + len(counters)
    assert len(counters) == 2 and all(int(c) == 4 for c in counters)  # Adam count + schedule count
    assert sorted(x.shape for x in arrays) == sorted([(3,), (3,), (4, 3), (4, 3)])
    # without a mask every leaf is trainable and has moments
    full_state = optim.make_optimizer(lr=1e-2, b1=0.9, b2=0.95, weight_decay=0.0, warmup_steps=0,
                                      grad_clip=1.0).init(params)
    total = sum(v.size for v in params.values())
    assert sum(np.size(x) for x in jax.tree_util.tree_leaves(full_state)) == 2 * total + 2


# ----------------------------------------------------------------------------- trainable mask
def _model_like_params():
    z = np.zeros
    return {
        "blocks": {"attn1": {"to_q": {"kernel": z((2, 4, 4)), "bias": z((2, 4))},
                             "to_k": {"kernel": z((2, 4, 4))}},
                   "attn2": {"to_q": {"kernel": z((2, 4, 4))}},
                   "ffn": {"net_0": {"kernel": z((2, 4, 8))}}},
        "condition_embedder": {"time_proj": {"kernel": z((4, 24))}},
        "proj_out": {"kernel": z((4, 4)), "bias": z((4,))},
    }


def _true_paths(mask):
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    return sorted(optim.param_path(p) for p, v in flat if v)


def test_trainable_mask_patterns():
    params = _model_like_params()
    mask = optim.trainable_mask(params, [r"attn1/to_(q|k)/kernel", r"^proj_out/"])
    assert _true_paths(mask) == ["blocks/attn1/to_k/kernel", "blocks/attn1/to_q/kernel",
                                 "proj_out/bias", "proj_out/kernel"]
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    assert all(isinstance(v, bool) for v in jax.tree_util.tree_leaves(mask))
    everything = sorted(optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    assert _true_paths(optim.trainable_mask(params, None)) == everything
    assert _true_paths(optim.trainable_mask(params, [])) == everything
    assert _true_paths(optim.trainable_mask(params, "ffn")) == ["blocks/ffn/net_0/kernel"]
    with pytest.raises(ValueError, match=re.escape("'attn3/to_q'")):
        optim.trainable_mask(params, ["attn1", "attn3/to_q"])
    with pytest.raises(ValueError, match="regular expression"):
        optim.trainable_mask(params, ["attn1/(to_q"])


def test_trainable_mask_on_toy_wan_paths_and_boxed_params():
    from flax import linen as nn

    from anyflow_jax.defaults import toy_model_config
    from anyflow_jax.models.wan import WanTransformer3D
    cfg = toy_model_config().to_dict()
    cfg.pop("dtype")
    boxed = WanTransformer3D(**cfg).abstract_params()
    params = nn.meta.unbox(boxed)
    mask = optim.trainable_mask(params, ["blocks/attn1/to_q/kernel"])
    assert _true_paths(mask) == ["blocks/attn1/to_q/kernel"]
    boxed_mask = optim.trainable_mask(boxed, ["blocks/attn1/to_q/kernel"])
    assert sum(jax.tree_util.tree_leaves(boxed_mask)) == 1
    assert len(jax.tree_util.tree_leaves(boxed_mask)) == len(jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------- EMA
def test_ema_decay_boundary():
    d = [float(optim.ema_decay(s, 0.99, 200)) for s in (0, 1, 199, 200, 201, 5000)]
    assert d == [0.0, 0.0, 0.0, pytest.approx(0.99), pytest.approx(0.99), pytest.approx(0.99)]
    assert float(optim.ema_decay(0, 0.999, 0)) == pytest.approx(0.999)


def test_ema_update_copy_before_warmup_then_decay_under_jit():
    decay, warmup = 0.9, 3
    mask = {"t": True, "f": False}
    update = jax.jit(lambda e, p, s: optim.ema_update(e, p, s, decay=decay, warmup_steps=warmup, mask=mask))
    rng = np.random.default_rng(0)
    ema = {"t": jnp.full((3,), 7.0, jnp.float32), "f": jnp.full((2,), 7.0, jnp.float32)}
    ref_t = np.full((3,), 7.0)
    for step in range(7):
        p = {"t": jnp.asarray(rng.normal(size=3), jnp.float32), "f": jnp.asarray(rng.normal(size=2), jnp.float32)}
        ema = update(ema, p, jnp.int32(step))  # traced step: one compilation for all steps
        if step < warmup:
            np.testing.assert_array_equal(np.asarray(ema["t"]), np.asarray(p["t"]))  # exact copy
            ref_t = np.asarray(p["t"], np.float64)
        else:
            ref_t = decay * ref_t + (1 - decay) * np.asarray(p["t"], np.float64)
            np.testing.assert_allclose(np.asarray(ema["t"]), ref_t, rtol=1e-6, atol=1e-7)
            assert not np.allclose(np.asarray(ema["t"]), np.asarray(p["t"]))
        np.testing.assert_array_equal(np.asarray(ema["f"]), np.asarray(p["f"]))  # frozen tracks params
    assert update._cache_size() == 1
    # without a mask every leaf is averaged; warmup 0 averages from the first update
    out = optim.ema_update({"a": jnp.ones(2)}, {"a": jnp.zeros(2)}, 0, decay=0.75, warmup_steps=0)
    np.testing.assert_allclose(np.asarray(out["a"]), [0.75, 0.75])
