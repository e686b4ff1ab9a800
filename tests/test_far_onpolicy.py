"""Causal stage 2 (the ``far_on_policy`` stage; losses/causal_backward_simulation.py,
losses/causal_onpolicy.py, docs/far.md): the chunk-by-chunk rollout against a recompute written
out here through the full chunk-causal training forward (forced N and k, one compiled program for
all of them; the default, scanned chunk loop), the scanned loop against the unrolled one (value
and gradient), no gradient into earlier chunks through the cache, the record and toy config, and
the trainer: two steps from a tiny ``far_flow_map`` workdir. A tiny FAR network (2 layers, 2
heads of 8, 4x8 latents, chunks [1, 2, 1], full_chunk_limit 2: the last chunk sees chunk 0 as
compressed context in its cache)."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax import stages as stage_registry
from anyflow_jax.losses.causal_backward_simulation import causal_backward_simulation
from anyflow_jax.models.far_wan import FarWanTransformer3D
from anyflow_jax.models.wan import make_apply_fn

CFG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8, freq_dim=16,
           ffn_dim=16, num_layers=2, rope_max_seq_len=64, flow_map=True, chunk_partition=(1, 2, 1),
           full_chunk_limit=2)
B, F, H, W, C = 1, 4, 4, 8, 4
BOUNDS = (0, 1, 3, 4)
SHIFT = 3.0


@functools.lru_cache(maxsize=None)
def _net():
    model = FarWanTransformer3D(**CFG)
    abstract = nn.meta.unbox(model.abstract_params())
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.randn(*s.shape), s.dtype), abstract)
    noise = rng.randn(B, F, H, W, C).astype(np.float32)
    ctx = rng.randn(B, 3, 8).astype(np.float32)
    return model, params, noise, ctx


@functools.lru_cache(maxsize=None)
def _forward():
    """The causal training forward (chunk-causal mask, no clean copy), one program per length."""
    model = _net()[0]
    return jax.jit(lambda p, x, t, r, ctx: model.apply({"params": p}, x, t, r, ctx))


def _rollout(model, **kw):
    fns = stage_registry.far_student_fns(make_apply_fn(model), model)
    return functools.partial(causal_backward_simulation, fns.encode, fns.chunk_apply,
                             chunk_partition=model.chunk_partition, shift=SHIFT, **kw)


def _grid(i, n):  # point i of the shifted N-step grid: shift(1 - i / N)
    s = 1.0 - i / n
    return SHIFT * s / (1.0 + (SHIFT - 1.0) * s)


def _recompute(model, params, noise, ctx, n, k):
    """No cache: chunk c's transitions (prefix 1 -> T_k if k > 0, current T_k -> T_{k+1}, suffix
    T_{k+1} -> 0 if k + 1 < N) each run the full chunk-causal training forward over [the chunks
    generated so far at t = r = 0; the chunk at (t, r)] and keep the chunk's velocity."""
    fwd = _forward()
    pairs = ([(1.0, _grid(k, n))] if k > 0 else []) + [(_grid(k, n), _grid(k + 1, n))] + (
        [(_grid(k + 1, n), 0.0)] if k + 1 < n else [])
    out = np.zeros_like(noise)
    for c in range(len(BOUNDS) - 1):
        a, b = BOUNDS[c], BOUNDS[c + 1]
        z = noise[:, a:b].astype(np.float64)
        for t_i, r_i in pairs:
            x = np.concatenate([out[:, :a], z.astype(np.float32)], axis=1)
            t = np.concatenate([np.zeros((B, a)), np.full((B, b - a), t_i)], 1).astype(np.float32)
            r = np.concatenate([np.zeros((B, a)), np.full((B, b - a), r_i)], 1).astype(np.float32)
            u = np.asarray(fwd(params, x, t, r, ctx), np.float64)[:, -(b - a):]
            z = z - (t_i - r_i) * u
        out[:, a:b] = z
    return out, len(pairs)


@functools.lru_cache(maxsize=None)
def _program():
    """One jitted program of (params, N, k): the rollout and its forward-mode derivative along a
    noise direction on chunks 0 and 1 only (``jax.jvp``: the same Jacobian as the gradient, at
    half the compile of a backward pass); ``traces`` counts traces."""
    model, params, noise, ctx = _net()
    rollout = _rollout(model)
    direction = jnp.asarray(np.random.RandomState(1).randn(*noise.shape).astype(np.float32)).at[:, 3:].set(0.0)
    traces = []

    @jax.jit
    def run(p, n, k):
        traces.append(1)
        video, d_video, m = jax.jvp(lambda eps: rollout(p, {"noise": eps, "context": ctx}, num_steps=n, grad_step=k),
                                    (noise,), (direction,), has_aux=True)
        return video, d_video, m
    return run, traces


@functools.lru_cache(maxsize=None)
def _results():
    run, traces = _program()
    _, params, _, _ = _net()
    out = {nk: run(params, jnp.int32(nk[0]), jnp.int32(nk[1])) for nk in ((4, 0), (4, 2), (2, 1))}
    return out, len(traces)


def test_rollout_equals_the_recomputed_chunk_causal_forward_with_one_program_across_n_and_k():
    model, params, noise, ctx = _net()
    out, n_traces = _results()
    for (n, k), (video, _, m) in out.items():
        want, nfe = _recompute(model, params, noise, ctx, n, k)
        np.testing.assert_allclose(np.asarray(video), want, atol=1e-5, rtol=1e-5)
        assert int(m["num_steps"]) == n and int(m["grad_step"]) == k
        assert int(m["nfe"]) == 3 * nfe and int(m["cache_encodings"]) == 2
    assert n_traces == 1  # N and k traced: one program for every (N, k)


def test_no_gradient_into_earlier_chunks_through_the_cache():
    out, _ = _results()
    for _, d_video, _ in out.values():
        d_video = np.asarray(d_video)
        # chunks 0 and 1 move with their noise ...
        assert np.abs(d_video[:, :3]).max() > 0.0
        # ... and the last chunk sees them only through the stop-gradient cache: d(chunk 2) /
        # d(noise of chunks 0, 1) = 0, so no gradient from a loss on chunk 2 reaches them
        assert np.all(d_video[:, 3:] == 0.0)


@pytest.mark.slow  # two backward programs (~25 s); the quick loop checks the scanned loop against the recompute
def test_scanned_chunk_loop_equals_the_unrolled_loop_in_value_and_gradient():
    """The default chunk loop (a lax.scan over the chunk index in the network's scanned layout)
    against the unrolled Python loop of per-chunk static layouts: the same video and the same
    parameter gradient, with the scanned loop tracing the cache encoding once for all chunks."""
    model, params, noise, ctx = _net()
    fns = stage_registry.far_student_fns(make_apply_fn(model), model)
    calls = {"scan": 0, "unrolled": 0}
    weight = jnp.asarray(np.random.RandomState(2).randn(*noise.shape).astype(np.float32))

    def loss(p, loop):
        def counted(*a):
            calls[loop] += 1
            return (fns.encode_at if loop == "scan" else fns.encode)(*a)
        video, _ = causal_backward_simulation(
            fns.encode if loop == "scan" else counted, fns.chunk_apply, p, {"noise": noise, "context": ctx},
            chunk_partition=model.chunk_partition, shift=SHIFT, num_steps=4, grad_step=1, chunk_loop=loop,
            encode_at=counted if loop == "scan" else fns.encode_at, chunk_apply_at=fns.chunk_apply_at)
        return jnp.sum(video * weight), video

    out = {loop: jax.jit(jax.value_and_grad(functools.partial(loss, loop=loop), has_aux=True))(params)
           for loop in ("scan", "unrolled")}
    (_, v_scan), g_scan = out["scan"]
    (_, v_unr), g_unr = out["unrolled"]
    np.testing.assert_allclose(np.asarray(v_scan), np.asarray(v_unr), atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_unr)):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * max(scale, 1.0), rtol=0)
    assert max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g_scan)) > 1e-3
    # one scan body for every chunk: the encoding is traced once; unrolled, once per chunk
    # (chunk 0 runs on the empty cache, which the unrolled loop also asks encode for)
    assert calls["scan"] == 1 and calls["unrolled"] == 3
    with pytest.raises(ValueError, match="chunk_loop must be one of"):
        loss(params, "python")
    with pytest.raises(ValueError, match="needs the student's scanned-layout functions"):
        causal_backward_simulation(fns.encode, fns.chunk_apply, params, {"noise": noise, "context": ctx},
                                   chunk_partition=model.chunk_partition, num_steps=2, grad_step=0, chunk_loop="scan")


def test_stage_record_and_toy_config():
    from anyflow_jax.config import parse
    from anyflow_jax.defaults import toy_config
    record = stage_registry.get("far_on_policy")
    assert record.student_is_far and record.needs_teacher and record.has_critic
    assert record.starts_from == {"student": "far_flow_map", "teacher": "teacher"}
    assert stage_registry.get_sampler(record.sampler).causal
    assert "far_on_policy" not in stage_registry.pipeline_names()
    cfg = parse(toy_config("far_on_policy"))
    assert cfg.loss["flow_map_options"]["bidirectional_prob"] == 0.0 and cfg.loss["cotrain_forward"]
    assert cfg.loss["steps_list"] == (2, 4, 8, 16, 32)
    assert cfg.loss["chunk_loop"] == cfg.critic_loss["chunk_loop"] == "scan"
    # a bad chunk loop fails with the config, before anything is loaded or traced
    from anyflow_jax.config import set_field
    from anyflow_jax.errors import RunError
    bad = toy_config("far_on_policy")
    set_field(bad, "critic_loss.chunk_loop", "python")
    with pytest.raises(RunError, match="config.critic_loss.chunk_loop must be one of 'scan', 'unrolled', got 'python'"):
        parse(bad)


@pytest.mark.slow
def test_trainer_runs_causal_stage_2_from_a_tiny_far_flow_map_run(tiny_teacher, tiny_far_flow_map, tmp_path):
    from runs_testlib import metrics, tiny

    from anyflow_jax import inference
    from anyflow_jax.training.loop import train
    far_wd = tiny_far_flow_map  # conftest's shared causal stage-1 run (chunks (1, 2, 1), window 2)
    cfg = tiny("far_on_policy", steps=2, checkpoint_every=2)
    cfg.model.update(dict(chunk_partition=(1, 2, 1), full_chunk_limit=2))
    cfg.loss.steps_list = [2, 4]
    cfg.critic_loss.steps_list = [2, 4]
    # a cheaper program: no guidance fusion or text dropout in the co-trained causal loss
    cfg.loss.flow_map_options.update(dict(fuse_guidance_scale=1.0, text_dropout=0.0))
    cfg.init.student, cfg.init.teacher = far_wd, tiny_teacher
    wd = str(tmp_path / "far_on_policy")
    train(cfg, wd)
    rows = metrics(wd)
    assert [r["step"] for r in rows][-1] == 2
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "dmd/loss", "forward/causal_loss", "critic/loss"))
        assert r["rollout/num_steps"] in (2, 4) and r["rollout/cache_encodings"] == 2
        # DMD on the rollout plus the co-trained causal stage-1 loss, 1:1; the student moves
        np.testing.assert_allclose(r["loss"], r["dmd/loss"] + r["forward/loss"], rtol=1e-5)
        assert r["grad_norm"] > 0.0 and r["critic/grad_norm"] > 0.0
    gen = inference.load_generator(wd)
    assert gen.kind == "causal_flow_map" and isinstance(gen.model, FarWanTransformer3D)
