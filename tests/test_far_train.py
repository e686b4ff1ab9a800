"""Causal stage 1 (the ``far_flow_map`` stage; losses/causal_flow_map.py, docs/far.md): the loss
against a recomputation of the section 4.7 target written out here (forced noise, times, chunk
count and coin), one compiled program across chunk counts and both sides of the bidirectional
coin, the chunk-count draw, and the trainer on the tiny teacher with the causal sampler on its
workdir. A tiny FAR network (2 layers, 2 heads of 8, 4x8 latents, chunks [1, 2, 1],
full_chunk_limit 2: three chunks put chunk 0 in compressed context)."""
import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax import inference
from anyflow_jax import stages as stage_registry
from anyflow_jax.flow import causal_sampling, schedule
from anyflow_jax.losses.causal_flow_map import causal_flow_map_loss, chunk_counts, sample_num_chunks
from anyflow_jax.models.far_wan import FarWanTransformer3D

CFG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8, freq_dim=16,
           ffn_dim=16, num_layers=2, rope_max_seq_len=64, flow_map=True, chunk_partition=(1, 2, 1),
           full_chunk_limit=2)
B, F, H, W, C = 4, 4, 4, 8, 4  # batch 4: two diffusion pairs, one consistency, one general
W_GUIDE, DELTA, SHIFT = 3.0, 0.005, 1.0
OPTS = dict(chunk_partition=(1, 2, 1), full_chunk_limit=2, shift=SHIFT, text_dropout=0.0, fuse_guidance_scale=W_GUIDE,
            delta=DELTA)


@functools.lru_cache(maxsize=None)
def _setup():
    model = FarWanTransformer3D(**CFG)
    abstract = nn.meta.unbox(model.abstract_params())
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.randn(*s.shape), s.dtype), abstract)
    data = dict(x0=rng.randn(B, F, H, W, C).astype(np.float32), eps=rng.randn(B, F, H, W, C).astype(np.float32),
                context=rng.randn(B, 3, 8).astype(np.float32), neg_context=rng.randn(1, 3, 8).astype(np.float32),
                t=np.array([0.9, 0.55, 0.7, 0.4], np.float32), r=np.array([0.9, 0.55, 0.0, 0.15], np.float32),
                bidirectional_eps=rng.randn(B, F, H, W, C).astype(np.float32),
                bidirectional_t=np.repeat(np.array([[0.3], [0.8], [0.5], [0.6]], np.float32), F, axis=1))
    return model, params, data


def _applies(model):
    def causal(p, z, t, r, c, clean):
        return model.apply({"params": p}, z, t, r, c, clean=clean)

    def bidirectional(p, z, t, r, c):
        return model.apply({"params": p}, z, t, r, c, causal=False)
    return causal, bidirectional


def _padded(model):
    def causal_at(p, z, t, r, c, clean, n):
        return model.apply({"params": p}, z, t, r, c, clean=clean, num_chunks=n)
    return causal_at


def _hand_causal_loss(model, params, d, n):
    """Section 4.7 written out: the first n chunks, the last 2 full (noised with the sample's one
    (t, r) pair), the rest clean context at t = r = 0, the clean copy of the full frames; fused
    guidance 3 with the model's own uncond; the central difference along (eps - x0, 1, 0); beta08
    weight of t; diffusion samples' mean D rescales the others by D / (l + 1e-5)."""
    fwd = jax.jit(lambda p, z, t, r, c, clean: model.apply({"params": p}, z, t, r, c, clean=clean))
    n_ctx, end = {2: (0, 3), 3: (1, 4)}[n]  # chunks [1, 2] both full; [1, 2, 1] with chunk 0 as context
    x_ctx, x_full, e_full = d["x0"][:, :n_ctx], d["x0"][:, n_ctx:end], d["eps"][:, n_ctx:end]
    nf = x_full.shape[1]
    tt = np.repeat(d["t"][:, None], nf, 1)
    rr = np.repeat(d["r"][:, None], nf, 1)
    z0 = np.zeros((B, n_ctx), np.float32)

    def u(z, t, ctx):
        return np.asarray(fwd(params, np.concatenate([x_ctx, z], 1), np.concatenate([z0, t], 1),
                              np.concatenate([z0, rr], 1), ctx, x_full), np.float64)
    e5 = (slice(None), None, None, None, None)
    zt = tt[..., None, None, None] * e_full + (1 - tt[..., None, None, None]) * x_full
    v = e_full - x_full
    cond = u(zt, tt, d["context"])
    uncond = u(zt, tt, np.broadcast_to(d["neg_context"], d["context"].shape))
    dfdt = (u(zt + DELTA * v, tt + DELTA, d["context"]) - u(zt - DELTA * v, tt - DELTA, d["context"])) / (2 * DELTA)
    target = v - (d["t"] - d["r"])[e5] * dfdt / W_GUIDE
    pred = (cond - (1 - W_GUIDE) * uncond) / W_GUIDE
    raw = np.mean((pred - target) ** 2, axis=(1, 2, 3, 4))
    grid = np.asarray(schedule.step_grid(1000, SHIFT), np.float64)  # the 1001-point grid (tau)
    y = grid * np.sqrt(1.0 - grid)  # beta08, normalised to sum 1000 over the grid, nearest point
    weight = np.array([1000.0 * y[np.argmin(np.abs(grid - t))] / y.sum() for t in d["t"]])
    wl = raw * weight
    diffusion = np.array([True, True, False, False])
    dmean = wl[diffusion].mean()
    return np.mean(np.where(diffusion, wl, wl * dmean / (wl + 1e-5)))


def _hand_bidirectional_loss(model, params, d):
    """Plain flow matching of the bidirectional path on the whole clip, r = t, fused guidance 3."""
    fwd = jax.jit(lambda p, z, t, c: model.apply({"params": p}, z, t, t, c, causal=False))
    t = d["bidirectional_t"]
    z = t[..., None, None, None] * d["bidirectional_eps"] + (1 - t[..., None, None, None]) * d["x0"]
    cond = np.asarray(fwd(params, z, t, d["context"]), np.float64)
    uncond = np.asarray(fwd(params, z, t, np.broadcast_to(d["neg_context"], d["context"].shape)), np.float64)
    pred = (cond - (1 - W_GUIDE) * uncond) / W_GUIDE
    return np.mean((pred - (d["bidirectional_eps"] - d["x0"])) ** 2)


@pytest.mark.parametrize("layout", ["padded", pytest.param("switch", marks=pytest.mark.slow)])
def test_loss_matches_the_section_4_7_recomputation_with_one_program_across_chunk_counts(layout):
    """Both layouts of a traced chunk count: ``padded`` (one shape; chunks [1, 2] and [2, 1] in
    two slots of 2 frames, one of them padding) and ``switch`` (a branch per count; slow, with
    the padded layout's gradients against the switch's)."""
    model, params, d = _setup()
    causal, bidirectional = _applies(model)
    extra = dict(chunk_layout=layout, causal_apply_at=_padded(model) if layout == "padded" else None)
    traces = []

    @jax.jit
    def loss(p, n, coin):
        traces.append(1)
        return causal_flow_map_loss(causal, bidirectional, p, dict(d, num_chunks=n, bidirectional=coin),
                                    jax.random.key(0), **OPTS, **extra)

    got = {}
    for n in (2, 3):
        for coin in (False, True):
            value, m = loss(params, jnp.int32(n), jnp.asarray(coin))
            assert float(m["num_chunks"]) == n and float(m["bidirectional"]) == float(coin)
            got[n, coin] = (float(value), float(m["causal_loss"]), float(m["bidirectional_loss"]))
    assert len(traces) == 1  # one program: the chunk count and the coin are traced
    bi = _hand_bidirectional_loss(model, params, d)
    for n in (2, 3):
        hand = _hand_causal_loss(model, params, d, n)
        np.testing.assert_allclose(got[n, False][1], hand, rtol=1e-5)
        np.testing.assert_allclose(got[n, False][0], hand, rtol=1e-5)
        assert got[n, False][2] == 0.0
        np.testing.assert_allclose(got[n, True][2], bi, rtol=1e-5)
        np.testing.assert_allclose(got[n, True][0], got[n, True][1] + got[n, True][2], rtol=1e-6)
    assert got[2, False][1] != got[3, False][1]  # compressed context changes the full chunks' loss
    if layout == "switch":  # the padded layout's padding frames reach neither the loss nor its gradient
        def grad(layout_, **kw):
            return jax.jit(jax.grad(lambda p, n: causal_flow_map_loss(
                causal, bidirectional, p, dict(d, num_chunks=n, bidirectional=False), jax.random.key(0), **OPTS,
                chunk_layout=layout_, **kw)[0]))
        padded_grad, switch_grad = grad("padded", causal_apply_at=_padded(model)), grad("switch")
        for n in (2, 3):
            a, b = padded_grad(params, jnp.int32(n)), switch_grad(params, jnp.int32(n))
            scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(b))
            assert scale > 1e-3
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5 * scale, rtol=0), a, b)
    with pytest.raises(ValueError, match="needs causal_apply_at"):
        causal_flow_map_loss(causal, bidirectional, params, dict(d, num_chunks=jnp.int32(2)), jax.random.key(0),
                             **OPTS, chunk_layout="padded")


def test_chunk_count_draw_follows_the_long_context_ratio():
    assert chunk_counts((1, 3, 3, 3, 3, 3, 3, 2), 3) == (3, 4, 5, 6, 7, 8)
    keys = jax.random.split(jax.random.key(1), 4000)
    n = np.asarray(jax.vmap(lambda k: sample_num_chunks(k, (1, 3, 3, 3, 3, 3, 3, 2), 3, 0.5))(keys))
    # P(3) = 0.5 + 0.5 / 6; every other count 0.5 / 6
    assert set(np.unique(n)) == {3, 4, 5, 6, 7, 8}
    assert abs(np.mean(n == 3) - (0.5 + 0.5 / 6)) < 0.03 and abs(np.mean(n == 8) - 0.5 / 6) < 0.02
    assert np.all(np.asarray(jax.vmap(lambda k: sample_num_chunks(k, (1, 2, 1), 2, 0.0))(keys[:50])) == 2)


def test_stage_record_and_toy_config():
    from anyflow_jax.config import parse
    from anyflow_jax.defaults import toy_config
    record = stage_registry.get("far_flow_map")
    assert record.student_is_far and record.student_is_flow_map and record.starts_from == {"student": "teacher"}
    assert stage_registry.get_sampler(record.sampler).causal
    assert "far_flow_map" not in stage_registry.pipeline_names()
    c = toy_config("far_flow_map")
    assert tuple(c.model.chunk_partition) == (1, 3, 2, 2) and sum(c.model.chunk_partition) == c.data.num_frames
    cfg = parse(c)
    assert cfg.loss["long_context_ratio"] == 0.5 and cfg.loss["bidirectional_prob"] == 0.1
    with pytest.raises(Exception, match="differs from the FAR student"):
        stage_registry.far_loss_options(FarWanTransformer3D(**CFG), {"chunk_partition": (2, 2)})


def test_trainer_runs_the_causal_stage_from_the_tiny_teacher(tiny_far_flow_map, tiny_teacher):
    from runs_testlib import metrics

    # conftest's shared run (2 steps, chunks (1, 2, 1); the loss test covers guidance fusion and
    # the bidirectional branch, which that cheaper program leaves out)
    wd = tiny_far_flow_map
    rows = metrics(wd)
    assert [r["step"] for r in rows][-1] == 2
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["causal_loss"]) for r in rows)
    gen = inference.load_generator(wd)
    assert gen.kind == "causal_flow_map" and isinstance(gen.model, FarWanTransformer3D)
    assert gen.model.chunk_partition == (1, 2, 1) and os.path.isdir(os.path.join(wd, "checkpoints"))
    noise = np.random.RandomState(0).randn(2, 4, 16, 16, 1).astype(np.float32)
    ctx = np.stack(list(gen.conditioning.contexts(["class3", "class7"]).values()))
    video = np.asarray(gen.sample(noise, ctx, 2))
    assert video.shape == noise.shape and np.all(np.isfinite(video))
    # image-to-video through the generator: the given frame comes back as it is, the rest is
    # causal_sample's continuation of it
    first = np.random.RandomState(1).randn(2, 1, 16, 16, 1).astype(np.float32)
    i2v = np.asarray(gen.sample(noise, ctx, 2, context_latents=first))
    np.testing.assert_array_equal(i2v[:, :1], first)
    want = causal_sampling.causal_sample(gen.model, gen.params, noise, ctx, num_steps=2, shift=gen.shift,
                                         context_latents=first)
    np.testing.assert_allclose(i2v, np.asarray(want), atol=1e-5)
    assert not np.allclose(i2v[:, 1:], video[:, 1:], atol=1e-3)  # the frame steers the continuation
    # sample_videos: every condition's samples continue its own given frame, as Generator.sample
    firsts = {"class3": first[0], "class7": first[1]}
    conds = gen.conditioning.contexts(["class3", "class7"])
    vids = inference.sample_videos(gen, [2], conds, num_samples=1, context_latents=firsts)
    for name in ("class3", "class7"):
        z = inference.initial_noise(0, np.arange(1), noise.shape[1:])
        one = np.asarray(gen.sample(jnp.asarray(z), conds[name][None], 2, context_latents=firsts[name][None]))[0]
        np.testing.assert_array_equal(vids[(name, 0, 2)][:1], firsts[name])
        np.testing.assert_allclose(vids[(name, 0, 2)], one, atol=1e-5)
    with pytest.raises(ValueError, match="no entry for condition"):
        inference.sample_videos(gen, [2], conds, context_latents={"class3": first[0]})
    with pytest.raises(ValueError, match="Fc < 4 frames"):
        inference.sample_videos(gen, [2], conds, context_latents=noise[0])
    with pytest.raises(ValueError, match="needs a causal"):
        inference.load_generator(tiny_teacher).sample(noise, ctx, 2, context_latents=first)
