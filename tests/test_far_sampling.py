"""Any-step causal sampling (flow/causal_sampling.py) of the FAR network: the KV-cache sampler
against a recompute of the full chunk-causal forward at every step of every chunk (T2V, I2V,
V2V, with and without guidance), context frames returned unchanged, the step count, and the
context-length check. A tiny network (2 layers, 2 heads of 8 dims, 4x8 latents, chunks
[1, 2, 1], full_chunk_limit 2: the last chunk sees chunk 0 as compressed context). Both chunk
loops (the default scan over the chunk index in the scanned layout, and the unrolled per-chunk
programs) against the recompute. Programs are few on purpose."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax.flow import schedule
from anyflow_jax.flow.causal_sampling import causal_sample, check_context_length, context_lengths
from anyflow_jax.models.far_wan import FarWanTransformer3D

CFG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8, freq_dim=16,
           ffn_dim=16, num_layers=2, rope_max_seq_len=64, flow_map=True, chunk_partition=(1, 2, 1),
           full_chunk_limit=2)
B, H, W, F = 1, 4, 8, 4
BOUNDS = (0, 1, 3, 4)


@functools.lru_cache(maxsize=None)
def _net():
    model = FarWanTransformer3D(**CFG)
    abstract = nn.meta.unbox(model.abstract_params())
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.randn(*s.shape), s.dtype), abstract)
    return model, params


@functools.lru_cache(maxsize=None)
def _forward():
    """The causal training forward (chunk-causal mask, no clean copy), one program per length."""
    model, _ = _net()
    return jax.jit(lambda p, x, t, r, ctx: model.apply({"params": p}, x, t, r, ctx))


def _inputs(seed=0):
    rng = np.random.RandomState(seed)
    noise = rng.randn(B, F, H, W, 4).astype(np.float32)
    video = rng.randn(B, F, H, W, 4).astype(np.float32)  # stands in for VAE-encoded context
    ctx = rng.randn(B, 3, 8).astype(np.float32)
    neg = rng.randn(1, 3, 8).astype(np.float32)
    return noise, video, ctx, neg


def _recompute(params, noise, ctx, num_steps, context_latents=None, guidance=1.0, neg=None):
    """No cache: every step of chunk c runs the full chunk-causal forward over [frames before the
    chunk at t = r = 0; the chunk at (t_i, t_{i+1})] and keeps the chunk's velocity."""
    fwd = _forward()
    grid = np.asarray(schedule.step_grid(num_steps), np.float32)
    out = np.zeros_like(noise)
    n_ctx = 0 if context_latents is None else context_latents.shape[1]
    out[:, :n_ctx] = context_latents[:, :n_ctx] if n_ctx else 0
    for c in range(len(BOUNDS) - 1):
        a, b = BOUNDS[c], BOUNDS[c + 1]
        if b <= n_ctx:
            continue
        z = noise[:, a:b]
        for t_i, r_i in zip(grid[:-1], grid[1:]):
            x = np.concatenate([out[:, :a], z], axis=1)
            t = np.concatenate([np.zeros((B, a)), np.full((B, b - a), t_i)], 1).astype(np.float32)
            r = np.concatenate([np.zeros((B, a)), np.full((B, b - a), r_i)], 1).astype(np.float32)
            u = np.asarray(fwd(params, x, t, r, ctx))[:, -(b - a):]
            if guidance != 1.0:
                u_u = np.asarray(fwd(params, x, t, r, np.broadcast_to(neg, ctx.shape)))[:, -(b - a):]
                u = u_u + guidance * (u - u_u)
            z = z - (t_i - r_i) * u
        out[:, a:b] = z
    return out


@pytest.mark.parametrize("chunk_loop", ["scan", pytest.param("unrolled", marks=pytest.mark.slow)])
@pytest.mark.parametrize("n_context", [0, 1, 3], ids=["t2v", "i2v", "v2v"])
def test_kv_cache_sampling_equals_the_recomputed_chunk_causal_forward(n_context, chunk_loop):
    model, params = _net()
    noise, video, ctx, _ = _inputs()
    given = video[:, :n_context] if n_context else None
    got = np.asarray(causal_sample(model, params, noise, ctx, num_steps=2, context_latents=given,
                                   chunk_loop=chunk_loop))
    want = _recompute(params, noise, ctx, 2, given)
    assert got.shape == noise.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want[:, n_context:]).max() > 0.1
    if n_context:  # the given context frames come back bit-identical
        np.testing.assert_array_equal(got[:, :n_context], video[:, :n_context])


def test_guided_video_to_video_equals_the_recompute():
    """Guidance as the reference's causal pipeline: every call (cache encoding too) on
    [uncond; cond], u = u_u + g (u_c - u_u)."""
    model, params = _net()
    noise, video, ctx, neg = _inputs(1)
    got = np.asarray(causal_sample(model, params, noise, ctx, num_steps=2, context_latents=video[:, :3],
                                   guidance_scale=2.5, neg_context=neg))
    want = _recompute(params, noise, ctx, 2, video[:, :3], guidance=2.5, neg=neg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    plain = np.asarray(causal_sample(model, params, noise, ctx, num_steps=2, context_latents=video[:, :3]))
    assert np.abs(got[:, 3:] - plain[:, 3:]).max() > 1e-3
    np.testing.assert_array_equal(got[:, :3], video[:, :3])


def test_step_count_and_the_one_step_jump():
    """One step per chunk is one flow-map jump z = noise - u(noise, 1, 0) given the chunks before
    it; four steps give another video (the same compiled chunk programs: the step count is traced)."""
    model, params = _net()
    noise, video, ctx, _ = _inputs(2)
    one = np.asarray(causal_sample(model, params, noise, ctx, num_steps=1, context_latents=video[:, :1]))
    four = np.asarray(causal_sample(model, params, noise, ctx, num_steps=4, context_latents=video[:, :1]))
    assert np.abs(one[:, 1:] - four[:, 1:]).max() > 1e-3
    np.testing.assert_array_equal(one[:, :1], four[:, :1])
    fwd = _forward()
    for c in range(1, len(BOUNDS) - 1):
        a, b = BOUNDS[c], BOUNDS[c + 1]
        x = np.concatenate([one[:, :a], noise[:, a:b]], axis=1)
        t = np.concatenate([np.zeros((B, a)), np.ones((B, b - a))], 1).astype(np.float32)
        u = np.asarray(fwd(params, x, t, np.zeros_like(t), ctx))[:, -(b - a):]
        np.testing.assert_allclose(one[:, a:b], noise[:, a:b] - u, atol=1e-5, rtol=0)


def test_scanned_sampler_is_one_program_for_every_chunk_and_step_count():
    """The default chunk loop compiles one program (a scan over the chunk index) where the
    unrolled loop compiles one per chunk index; both give the same video."""
    from anyflow_jax.flow import causal_sampling as cs
    model, params = _net()
    rng = np.random.RandomState(5)
    noise = rng.randn(3, F, H, W, 4).astype(np.float32)  # a batch no other test uses: fresh programs
    ctx = rng.randn(3, 3, 8).astype(np.float32)
    scan0, unrolled0 = cs._generate_scanned_jit._cache_size(), cs._generate_chunk_jit._cache_size()
    videos = {n: np.asarray(causal_sample(model, params, noise, ctx, num_steps=n)) for n in (1, 3)}
    assert cs._generate_scanned_jit._cache_size() - scan0 == 1  # three chunks, two step counts: one program
    unrolled = np.asarray(causal_sample(model, params, noise, ctx, num_steps=3, chunk_loop="unrolled"))
    assert cs._generate_chunk_jit._cache_size() - unrolled0 == 3  # one per chunk index
    np.testing.assert_allclose(videos[3], unrolled, atol=1e-5, rtol=0)
    assert np.abs(videos[1] - videos[3]).max() > 1e-3
    with pytest.raises(ValueError, match="chunk_loop must be"):
        causal_sample(model, params, noise, ctx, chunk_loop="loop")


def test_context_length_must_end_on_a_chunk_boundary():
    model, params = _net()
    noise, video, ctx, _ = _inputs()
    assert context_lengths((1, 3, 3, 3, 3, 3, 3, 2)) == (1, 4, 7, 10, 13, 16, 19)  # the reference's: 1 and 7
    assert context_lengths((1, 2, 1)) == (1, 3) and context_lengths((1, 2, 1), 3) == (1,)
    assert check_context_length((1, 2, 1), 3) == 2 and check_context_length((1, 2, 1), 0) == 0
    for n in (2, 4):
        with pytest.raises(ValueError, match=rf"context of {n} latent frames does not end on a chunk boundary.*"
                                             r"one of \[1, 3\] latent frames"):
            causal_sample(model, params, noise, ctx, context_latents=video[:, :n])
    with pytest.raises(ValueError, match=r"noise has 2 latent frames.*one of \[1, 3, 4\]"):
        causal_sample(model, params, noise[:, :2], ctx)
    with pytest.raises(ValueError, match="needs neg_context"):
        causal_sample(model, params, noise, ctx, guidance_scale=2.0)


def test_sample_cli_tasks_of_a_far_checkpoint(tmp_path, capsys):
    """``python -m anyflow_jax.sample`` on a FAR checkpoint: v2v from a latent .npy is the library
    sample (the same chunk programs), context unchanged; a context off the chunk boundaries, a bad
    task/context pairing and --task on a bidirectional checkpoint are one error line each."""
    from anyflow_jax import inference
    from anyflow_jax import sample as cli
    from anyflow_jax.checkpoints.diffusers import save_transformer
    from anyflow_jax.models.wan import WanTransformer3D
    model, params = _net()
    _, video, ctx, _ = _inputs(3)
    far_dir, out = str(tmp_path / "far"), tmp_path / "out"
    save_transformer(far_dir, model, params)
    np.save(tmp_path / "cat.npy", ctx[0])
    np.save(tmp_path / "ctx.npy", video[0, :3])
    np.save(tmp_path / "bad.npy", video[0, :2])
    base = ["--checkpoint", far_dir, "--prompt-embedding", str(tmp_path / "cat.npy"), "--video-shape", "4,4,8,4",
            "--format", "npy", "--steps", "2", "--no-progress", "--out", str(out)]
    assert cli.main(base + ["--video", str(tmp_path / "ctx.npy")]) == 0, capsys.readouterr().err
    assert "causal v2v (3 context latent frames)" in capsys.readouterr().out
    got = np.load(out / "cat_s0_steps2.npy")
    want = causal_sample(model, params, inference.initial_noise(0, [0], (F, H, W, 4)), ctx, num_steps=2,
                         context_latents=video[:, :3])
    np.testing.assert_array_equal(got, np.asarray(want)[0])
    np.testing.assert_array_equal(got[:3], video[0, :3])

    def error(argv):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        return err[0]
    msg = error(base + ["--video", str(tmp_path / "bad.npy")])
    assert "has 2 latent frames; a context must end on a chunk boundary" in msg and "one of [1, 3] latent" in msg
    assert "--task i2v needs --image" in error(base + ["--task", "i2v"])
    assert "--video is the context of --task v2v, not i2v" in error(
        base + ["--task", "i2v", "--video", str(tmp_path / "ctx.npy")])
    (tmp_path / "first.png").write_bytes(b"not read: pixels need a pipeline's VAE")
    assert "needs text prompts (--prompt) with a pipeline folder" in error(
        base + ["--image", str(tmp_path / "first.png")])
    wan = WanTransformer3D(**{k: v for k, v in CFG.items() if k not in ("chunk_partition", "full_chunk_limit")})
    wan_params = {k: v for k, v in params.items() if k != "far_patch_embedding"}
    save_transformer(str(tmp_path / "wan"), wan, wan_params)
    assert "need a FAR (chunk-causal) checkpoint" in error(
        ["--checkpoint", str(tmp_path / "wan")] + base[2:] + ["--task", "t2v"])


def test_causal_sampling_on_a_mesh_matches_one_device():
    """Image-to-video with the parameters sharded (FSDP and tensor axes of the logical rules) and
    the batch split over the data and fsdp axes of a (2, 2, 2) mesh of fake CPU devices gives the
    single-device video, with the output sharded over the batch."""
    from anyflow_jax import parallel
    model, params = _net()
    rng = np.random.RandomState(5)
    noise = rng.randn(4, F, H, W, 4).astype(np.float32)  # 4 = data x fsdp: one video per shard
    ctx = rng.randn(4, 3, 8).astype(np.float32)
    first = rng.randn(4, 1, H, W, 4).astype(np.float32)
    want = np.asarray(causal_sample(model, params, noise, ctx, num_steps=2, context_latents=first))
    mesh = parallel.make_mesh(2, 2, 2)
    shardings = parallel.param_shardings(model.abstract_params(), mesh)
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))  # really sharded
    with jax.set_mesh(mesh):
        sharded = parallel.shard_params(params, shardings)
        put = lambda x: jax.device_put(x, parallel.batch_sharding(mesh, x.ndim))  # noqa: E731
        got = causal_sample(model, sharded, put(noise), put(ctx), num_steps=2, context_latents=put(first))
    assert len(got.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(got)[:, :1], first)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_a_single_time_far_network_samples_with_the_causal_teacher_sampler(tmp_path):
    """A FAR network without the delta embedder (a causal teacher) loads as ``causal_teacher``:
    chunk by chunk, Euler steps with r = t and CFG 3 by default, I2V included, the same video as
    ``causal_sample(use_mean_velocity=False)``; ``--kind teacher`` is accepted for it and a
    bidirectional sampler kind refused."""
    from anyflow_jax import inference
    from anyflow_jax.checkpoints.diffusers import save_transformer
    from anyflow_jax.errors import RunError
    model = FarWanTransformer3D(**dict(CFG, flow_map=False))
    abstract = nn.meta.unbox(model.abstract_params())
    rng = np.random.RandomState(1)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.randn(*s.shape), s.dtype), abstract)
    path = str(tmp_path / "far_teacher")
    save_transformer(path, model, params)
    gen = inference.load_generator(path)
    assert gen.kind == "causal_teacher" and gen.causal
    assert inference.load_generator(path, kind="teacher").kind == "causal_teacher"
    with pytest.raises(RunError, match="samples chunk by chunk .* not with the consistency sampler"):
        inference.load_generator(path, kind="consistency")
    noise, video, ctx, neg = _inputs(5)
    got = np.asarray(gen.sample(noise, ctx, 2, neg_context=neg, context_latents=video[:, :1]))
    want = np.asarray(causal_sample(model, gen.params, noise, ctx, num_steps=2, shift=gen.shift, guidance_scale=3.0,
                                    neg_context=neg, context_latents=video[:, :1], use_mean_velocity=False))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    np.testing.assert_array_equal(got[:, :1], video[:, :1])
    plain = np.asarray(gen.sample(noise, ctx, 2, guidance=1.0, context_latents=video[:, :1]))
    assert np.abs(plain - got).max() > 1e-3  # the default guidance (3) is applied
