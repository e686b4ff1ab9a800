"""FAR building blocks (models/far.py): chunk layout, compressed patch-embedding init, RoPE of
compressed frames and the training mask with the clean copy, each against its closed form or
the PyTorch operation the reference uses; the FAR network (models/far_wan.py): causality, the
mask rules seen through its outputs, the KV cache, the bidirectional path; and the released
FAR checkpoint layout (interop)."""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax.checkpoints.diffusers import CheckpointError, _conv3d, load_transformer, save_transformer
from anyflow_jax.checkpoints.model import load_model, save_model
from anyflow_jax.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from anyflow_jax.models import far
from anyflow_jax.models.far_wan import FarWanTransformer3D, chunk_layout, make_far_model
from anyflow_jax.models.wan import WanTransformer3D, rope_tables


def test_chunk_split_follows_the_full_chunk_limit():
    s = far.split_chunks(8)
    assert (s.compressed, s.full, s.compressed_frames, s.full_frames) == ((1, 3, 3, 3, 3), (3, 3, 2), 13, 8)
    s = far.split_chunks(3)
    assert (s.compressed, s.full) == ((), (1, 3, 3))
    assert far.split_chunks(4).compressed == (1,)
    with pytest.raises(ValueError, match=r"n_chunks must be in \[1, 8\]"):
        far.split_chunks(9)


def test_far_patch_kernel_is_torch_trilinear_resize_without_rescaling():
    torch = pytest.importorskip("torch")
    rng = np.random.RandomState(0)
    c, d = 3, 5
    w = rng.randn(d, c, 1, 2, 2).astype(np.float32)  # torch Conv3d weight of patch (1, 2, 2)
    ours = _conv3d((1, 2, 2), c).to_flax(w)
    got = far.far_patch_kernel(ours, (1, 2, 2), c)
    want_torch = torch.nn.functional.interpolate(torch.from_numpy(w), size=(1, 4, 4), mode="trilinear",
                                                 align_corners=False).numpy()
    np.testing.assert_allclose(got, _conv3d((1, 4, 4), c).to_flax(want_torch), rtol=1e-6, atol=1e-7)
    # corners copy the source taps; no rescaling: a constant kernel stays constant
    assert got.shape == (16 * c, d)
    const = far.far_patch_kernel(np.ones((4 * c, d), np.float32), (1, 2, 2), c)
    np.testing.assert_array_equal(const, np.ones((16 * c, d), np.float32))


def test_rope_split_and_compressed_positions():
    assert far.far_rope_split(128) == (22, 21, 21)
    assert far.far_rope_split(16) == (4, 2, 2)  # not diffusers' real-dim slicing at this head dim
    d, h, w = 16, 3, 2
    full = far.far_rope_angles(d, [0, 1], h, w)
    comp = far.far_rope_angles(d, [0, 1], h, w, pool=2)
    ct, ch, cw = far.far_rope_split(d)
    fh = 1.0 / (10000.0 ** (np.arange(0, 2 * ch, 2) / (2 * ch)))
    g_full, g_comp = full.reshape(2, h, w, -1), comp.reshape(2, h, w, -1)
    for j in range(h):
        np.testing.assert_allclose(g_full[0, j, 0, ct:ct + ch], np.exp(1j * j * fh), atol=1e-12)
        # compressed token j sits at full-resolution position 2j + 0.5, at unit modulus
        np.testing.assert_allclose(g_comp[0, j, 0, ct:ct + ch], np.exp(1j * (2 * j + 0.5) * fh), atol=1e-12)
    np.testing.assert_allclose(np.abs(comp), 1.0, atol=1e-12)
    np.testing.assert_array_equal(g_comp[..., :ct], g_full[..., :ct])  # the t table is not pooled
    # absolute frame positions: frames 5 and 6 use table rows 5 and 6
    shifted = far.far_rope_angles(d, [5, 6], h, w).reshape(2, h, w, -1)
    ft = 1.0 / (10000.0 ** (np.arange(0, 2 * ct, 2) / (2 * ct)))
    np.testing.assert_allclose(shifted[1, 0, 0, :ct], np.exp(1j * 6 * ft), atol=1e-12)


def test_rope_tables_equal_the_wan_tables_where_the_splits_agree():
    """At head dim 128 the FAR class's split is diffusers' (44:42:42), so full-resolution
    tables from frame 0 are the Wan DiT's."""
    cos, sin = far.far_rope_tables(128, range(3), 4, 5)
    wcos, wsin = rope_tables(128, 3, 4, 5, 1024)
    np.testing.assert_allclose(cos, wcos, atol=1e-6)
    np.testing.assert_allclose(sin, wsin, atol=1e-6)


def _mask():
    # two context chunks of 2 tokens, two full chunks of 3, their clean copies, padded to 16
    return far.FarTrainMask.from_frames([1, 1], [1, 1], compressed_tokens=2, full_tokens=3, multiple=8)


def test_train_mask_rules():
    m = _mask()
    assert (m.context_bounds, m.full_bounds, m.length) == ((2, 4), (7, 10), 16)
    a = m.dense(16, 16)
    ctx0, ctx1 = [0, 1], [2, 3]
    n0, n1 = [4, 5, 6], [7, 8, 9]
    c0, c1 = [10, 11, 12], [13, 14, 15]  # 16 = 4 + 6 + 6 tokens: no padding at this size
    blk = lambda q, k: a[np.ix_(q, k)]  # noqa: E731
    # noise -> noise: only inside its own chunk (bidirectional there)
    assert blk(n0, n0).all() and blk(n1, n1).all() and not blk(n1, n0).any() and not blk(n0, n1).any()
    # noise -> clean: strictly earlier chunks only
    assert blk(n1, c0).all() and not blk(n1, c1).any() and not blk(n0, c0).any()
    # noise -> context: every context chunk (all are earlier)
    assert blk(n0, ctx0 + ctx1).all() and blk(n1, ctx0 + ctx1).all()
    # clean -> noise: never; clean -> clean / context: chunks up to its own
    assert not blk(c0 + c1, n0 + n1).any()
    assert blk(c1, c0 + c1).all() and blk(c0, c0).all() and not blk(c0, c1).any()
    assert blk(c0 + c1, ctx0 + ctx1).all()
    # context -> context only, chunk-causal
    assert blk(ctx1, ctx0 + ctx1).all() and blk(ctx0, ctx0).all() and not blk(ctx0, ctx1).any()
    assert not blk(ctx0 + ctx1, n0 + n1 + c0 + c1).any()
    # the same rule evaluated with jax.numpy (the xla path) gives the same matrix
    import jax.numpy as jnp
    ids = jnp.arange(16)
    np.testing.assert_array_equal(np.asarray(m.allowed(ids[:, None], ids[None, :])), a)


def test_train_mask_padding_and_validation():
    m = far.FarTrainMask.from_frames([1], [1], compressed_tokens=2, full_tokens=3, multiple=5)
    assert m.length == 10  # 2 + 3 + 3 = 8 tokens, padded to a multiple of 5
    a = m.dense(10, 10)
    assert not a[:8, 8:].any() and not a[8:, :8].any() and a[8:, 8:].all()  # padding masked both ways
    assert a.any(axis=1).all()  # no empty row
    no_context = far.FarTrainMask.from_frames([], [2, 1], compressed_tokens=2, full_tokens=1)
    b = no_context.dense(6, 6)
    assert b[:2, :2].all() and not b[2, :2].any() and b[2, 3:5].all() and not b[3:, :3].any()
    with pytest.raises(ValueError, match=r"FarTrainMask covers 10 tokens, attention has \(12, 12\)"):
        m.dense(12, 12)
    with pytest.raises(ValueError, match="length 7 is shorter than the tokens it describes"):
        far.FarTrainMask((2,), (5,), 7)


# ------------------------------------------------------------------------------ the network
# A tiny FAR network: 4 chunks (1, 2, 2, 1), 2 full at a time; a 4x8 latent has 8 full tokens and
# 2 compressed tokens per frame.
FAR_CFG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8, freq_dim=16,
               ffn_dim=16, num_layers=2, rope_max_seq_len=64, flow_map=True, chunk_partition=(1, 2, 2, 1),
               full_chunk_limit=2)
B, H, W = 1, 4, 8


def _random_params(model, seed=0, scale=0.3):
    """Host NumPy draws on the abstract parameter shapes (no init program to compile)."""
    abstract = nn.meta.unbox(model.abstract_params())
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.randn(*s.shape), s.dtype), abstract)


@functools.lru_cache(maxsize=None)
def _net(**overrides):
    model = FarWanTransformer3D(**dict(FAR_CFG, **overrides))
    return model, _random_params(FarWanTransformer3D(**FAR_CFG))


@functools.lru_cache(maxsize=None)
def _apply(**kw):
    """One jitted program per path and setting (the tests reuse them across inputs)."""
    items = dict(kw)
    overrides = items.pop("model", ())
    model, _ = _net(**dict(overrides))
    return jax.jit(lambda p, x, t, r, ctx, clean=None: model.apply({"params": p}, x, t, r, ctx, clean, **items))


def _data(f, seed=0, n_context=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(B, f, H, W, 4).astype(np.float32)
    t = np.concatenate([np.zeros((B, n_context)), np.full((B, f - n_context), 0.7)], 1).astype(np.float32)
    return x, t, (t * 0.4).astype(np.float32), rng.randn(B, 3, 8).astype(np.float32)


def test_far_network_layout_and_parameters():
    model, params = _net()
    assert set(params) == {"blocks", "condition_embedder", "far_patch_embedding", "patch_embedding", "proj_out",
                           "scale_shift_table"}
    assert params["far_patch_embedding"]["kernel"].shape == (4 * 4 * 4, 16)  # (1, 4, 4) patches of 4 channels
    assert model.tokens_per_frame(H, W) == (8, 2)
    assert model.chunks_for_frames(5) == (1, 2, 2)
    assert chunk_layout((1, 2, 2, 1), 2) == ((1, 2), (2, 1)) and chunk_layout((1, 2), 0) == ((1, 2), ())
    with pytest.raises(ValueError, match=r"4 latent frames do not end on a chunk boundary.*\[1, 3, 5, 6\]"):
        model.chunks_for_frames(4)
    x, t, r, ctx = _data(6, n_context=3)
    out = _apply()(params, x, t, r, ctx)
    assert out.shape == (B, 3, H, W, 4)  # the two full chunks (3 frames) only
    with pytest.raises(ValueError, match=r"clean \(the clean copy of the full frames\) must be \(1, 3, 4, 8, 4\)"):
        model.apply({"params": params}, x, t, r, ctx, x)
    with pytest.raises(ValueError, match="temporal patch 1"):
        FarWanTransformer3D(**dict(FAR_CFG, compressed_patch_size=(2, 4, 4))).validate()


def test_far_causality_perturbing_a_chunk_leaves_earlier_chunks_bit_identical():
    _, params = _net()
    x, t, r, ctx = _data(6)
    allfull = _apply(model=(("full_chunk_limit", 4),))  # every chunk full: every chunk has an output
    base = np.asarray(allfull(params, x, t, r, ctx))
    frames = np.cumsum([0, 1, 2, 2, 1])  # chunk j: frames[j]:frames[j + 1]
    for j in (1, 2, 3):
        x2 = x.copy()
        x2[:, frames[j]:frames[j + 1]] += 1.0
        out = np.asarray(allfull(params, x2, t, r, ctx))
        np.testing.assert_array_equal(out[:, :frames[j]], base[:, :frames[j]])
        for k in range(j, 4):  # chunk j and every later one move
            assert np.abs(out[:, frames[k]:frames[k + 1]] - base[:, frames[k]:frames[k + 1]]).max() > 1e-4
    # with compressed context (chunks 0, 1 compressed, 2 and 3 full): chunk 3 never reaches chunk 2
    x, t, r, ctx = _data(6, n_context=3)
    causal = _apply()
    base = np.asarray(causal(params, x, t, r, ctx))
    x2 = x.copy()
    x2[:, 5] += 1.0
    out = np.asarray(causal(params, x2, t, r, ctx))
    np.testing.assert_array_equal(out[:, :2], base[:, :2])
    assert np.abs(out[:, 2] - base[:, 2]).max() > 1e-3
    x2 = x.copy()
    x2[:, 1] += 1.0  # compressed context chunk 1 reaches both full chunks
    out = np.asarray(causal(params, x2, t, r, ctx))
    assert np.abs(out[:, :2] - base[:, :2]).max() > 1e-3 and np.abs(out[:, 2] - base[:, 2]).max() > 1e-3


def test_far_clean_copy_mask_rules_through_the_network():
    """Section 6.2 seen from the outputs: a noisy chunk talks only to itself (noise -> noise in
    the same chunk), later chunks see an earlier chunk only through its clean copy (noise ->
    clean strictly earlier), and the clean copy of a chunk never reaches that chunk itself."""
    _, params = _net()
    x, t, r, ctx = _data(6, seed=1)
    clean = np.random.RandomState(2).randn(B, 6, H, W, 4).astype(np.float32)
    fwd = _apply(model=(("full_chunk_limit", 4),))
    base = np.asarray(fwd(params, x, t, r, ctx, clean))
    assert base.shape == (B, 6, H, W, 4)
    frames = np.cumsum([0, 1, 2, 2, 1])
    for j in (0, 1, 2):
        a, b = frames[j], frames[j + 1]
        x2 = x.copy()
        x2[:, a:b] += 1.0  # the noisy chunk j: only chunk j's output moves
        out = np.asarray(fwd(params, x2, t, r, ctx, clean))
        np.testing.assert_array_equal(np.delete(out, np.s_[a:b], axis=1), np.delete(base, np.s_[a:b], axis=1))
        assert np.abs(out[:, a:b] - base[:, a:b]).max() > 1e-3
        c2 = clean.copy()
        c2[:, a:b] += 1.0  # its clean copy: chunks up to j unchanged, every later chunk moves
        out = np.asarray(fwd(params, x, t, r, ctx, c2))
        np.testing.assert_array_equal(out[:, :b], base[:, :b])
        for k in range(j + 1, 4):
            assert np.abs(out[:, frames[k]:frames[k + 1]] - base[:, frames[k]:frames[k + 1]]).max() > 1e-4


def test_kv_cache_forward_equals_the_full_chunk_causal_forward():
    """Encoding chunks 0..2 (at t = r = 0, full window full_chunk_limit - 1 = 1: chunks 0-1
    compressed, chunk 2 full) and running chunk 3 on that cache gives chunk 3's output of the
    chunk-causal forward over chunks 0..3 (chunks 0-1 compressed, 2-3 full, context at t = 0)."""
    model, params = _net()
    x, t, r, ctx = _data(6, seed=3, n_context=5)
    full = np.asarray(_apply()(params, x, t, r, ctx))[:, -1:]
    zeros = np.zeros((B, 5), np.float32)
    encode = jax.jit(lambda p, x, ctx: model.apply({"params": p}, x, zeros, zeros, ctx, encode_cache=True))
    cache = encode(params, x[:, :5], ctx)
    # context -> context is chunk-causal too: chunk 1 never reaches chunk 0's cached keys/values
    x2 = x.copy()
    x2[:, 1:3] += 1.0
    moved = encode(params, x2[:, :5], ctx)
    np.testing.assert_array_equal(moved.compressed_k[:, :, :2], cache.compressed_k[:, :, :2])
    np.testing.assert_array_equal(moved.compressed_v[:, :, :2], cache.compressed_v[:, :, :2])
    assert np.abs(moved.compressed_k[:, :, 2:6] - cache.compressed_k[:, :, 2:6]).max() > 1e-3
    # fixed-size buffers: the largest cache of the partition (chunks 0-1 compressed: 3 frames x 2
    # tokens; one full chunk of at most 2 frames x 8 tokens), of which this one fills all
    assert (cache.n_chunks, cache.compressed_tokens, cache.full_tokens) == (3, 6, 16)
    assert cache.compressed_k.shape == cache.compressed_v.shape == (2, B, 6, 2, 8) and cache.full_k.shape[2] == 16
    got = jax.jit(lambda p, x, t, r, ctx, cache: model.apply({"params": p}, x, t, r, ctx, kv_cache=cache))(
        params, x[:, 5:], t[:, 5:], r[:, 5:], ctx, cache)
    np.testing.assert_allclose(np.asarray(got), full, atol=1e-5, rtol=0)
    assert np.abs(full).max() > 0.1
    # chunk 0 on the empty cache is the causal forward of chunk 0 alone
    x0 = x[:, :1]
    first = jax.jit(lambda p, c: model.apply({"params": p}, x0, t[:, 5:], r[:, 5:], ctx, kv_cache=c))(
        params, model.empty_cache(B, H, W))
    alone = jax.jit(lambda p: model.apply({"params": p}, x0, t[:, 5:], r[:, 5:], ctx))(params)
    np.testing.assert_allclose(np.asarray(first), np.asarray(alone), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="chunk 3 has 1 latent frames, got 2"):
        model.apply({"params": params}, x[:, :2], t[:, :2], r[:, :2], ctx, kv_cache=cache)
    with pytest.raises(ValueError, match="encode_cache got all 4 chunks"):
        model.apply({"params": params}, x, t, r, ctx, encode_cache=True)


@pytest.mark.parametrize("full_chunk_limit", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_scanned_layout_equals_the_static_cache_for_every_chunk_index(full_chunk_limit):
    """The scanned layout (one program, the chunk index traced: fixed-size compressed region and
    window slots, the chunk padded to the largest chunk) gives every chunk the velocity of the
    static per-chunk cache path (a relative ~1e-7 from summation order). Padding frames and the
    frames from chunk c on are filled with junk that must not leak in. full_chunk_limit 1: no
    window, every earlier chunk compressed."""
    model, params = _net(full_chunk_limit=full_chunk_limit)
    rng = np.random.RandomState(7)
    s, bounds = 2, (0, 1, 3, 5, 6)
    video = rng.randn(B, 6, H, W, 4).astype(np.float32)
    ctx = rng.randn(B, 3, 8).astype(np.float32)
    encode_at = jax.jit(lambda p, v, c: model.apply({"params": p}, v, jnp.zeros(v.shape[:2]), jnp.zeros(v.shape[:2]),
                                                    ctx, encode_cache=True, chunk_index=c))
    chunk_at = jax.jit(lambda p, z, t, r, cache: model.apply({"params": p}, z, t, r, ctx, kv_cache=cache))
    static_chunk = jax.jit(lambda p, z, t, r, cache: model.apply({"params": p}, z, t, r, ctx, kv_cache=cache))
    for c in range(4):
        a, b = bounds[c], bounds[c + 1]
        junk = video.copy()
        junk[:, a:] = 50.0 * rng.randn(B, 6 - a, H, W, 4)  # not generated yet: must be ignored
        buf = np.concatenate([junk, 50.0 * rng.randn(B, s, H, W, 4).astype(np.float32)], axis=1)
        z = 50.0 * rng.randn(B, s, H, W, 4).astype(np.float32)  # padding frames past the chunk: junk
        z[:, :b - a] = video[:, a:b]
        t = np.full((B, s), 0.6, np.float32)
        cache = encode_at(params, buf, jnp.int32(c))
        assert int(cache.chunk_index) == c
        got = np.asarray(chunk_at(params, z, t, 0.5 * t, cache))[:, :b - a]
        if c == 0:
            ref_cache = model.empty_cache(B, H, W)
        else:
            zeros = np.zeros((B, a), np.float32)
            ref_cache = model.apply({"params": params}, video[:, :a], zeros, zeros, ctx, encode_cache=True)
        want = np.asarray(static_chunk(params, video[:, a:b], t[:, :b - a], 0.5 * t[:, :b - a], ref_cache))
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max(), rtol=0)
    # one layout: the compressed region holds the chunks that can ever be compressed, the window
    # full_chunk_limit - 1 slots of the largest chunk
    n_comp_frames = 5 if full_chunk_limit == 1 else 3
    assert cache.compressed_k.shape == (2, B, n_comp_frames * 2, 2, 8)
    assert cache.window_k.shape == (2, B, (full_chunk_limit - 1) * s * 8, 2, 8)
    assert encode_at._cache_size() == 1 and chunk_at._cache_size() == 1
    with pytest.raises(ValueError, match="padded"):
        model.apply({"params": params}, z[:, :1], t[:, :1], t[:, :1], ctx, kv_cache=cache)


@pytest.mark.parametrize("full_chunk_limit", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_padded_training_layout_equals_the_exact_layout_for_every_chunk_count(full_chunk_limit):
    """The teacher-forced training forward in the padded layout (``num_chunks`` traced: the
    compressed region holds every chunk that can be context, the full chunks sit in
    ``full_chunk_limit`` slots of the largest chunk, each with its clean copy) gives the full
    frames the velocity of the exact per-count layout, for every chunk count, from one program.
    Everything the layout must ignore (compressed frames past the context, padding frames of the
    slots and of their clean copies) is junk."""
    model, params = _net(full_chunk_limit=full_chunk_limit)
    rng = np.random.RandomState(11)
    s, bounds, fcl = 2, (0, 1, 3, 5, 6), full_chunk_limit
    cf = model.train_context_frames()
    assert cf == bounds[4 - fcl]
    video = rng.randn(B, 6, H, W, 4).astype(np.float32)
    clean_video = rng.randn(B, 6, H, W, 4).astype(np.float32)
    ctx = rng.randn(B, 3, 8).astype(np.float32)
    padded = jax.jit(lambda p, z, t, r, clean, n: model.apply({"params": p}, z, t, r, ctx, clean=clean,
                                                              num_chunks=n))
    exact = lambda p, z, t, r, clean: model.apply({"params": p}, z, t, r, ctx, clean=clean)  # noqa: E731
    for n in range(fcl, 5):
        a, end = bounds[n - fcl], bounds[n]  # context frames, all frames
        tau = rng.uniform(0.2, 0.9, (B, 1)).astype(np.float32)
        t_full = np.broadcast_to(tau, (B, end - a)).astype(np.float32)
        z_exact = np.concatenate([video[:, :a], video[:, a:end]], 1)
        t_exact = np.concatenate([np.zeros((B, a), np.float32), t_full], 1)
        want = np.asarray(exact(params, z_exact, t_exact, 0.5 * t_exact, clean_video[:, a:end]))
        # the padded layout: [compressed region][slots]; junk wherever it must not look
        region = 50.0 * rng.randn(B, cf, H, W, 4).astype(np.float32)
        region[:, :a] = video[:, :a]
        slots = 50.0 * rng.randn(B, fcl * s, H, W, 4).astype(np.float32)
        clean = 50.0 * rng.randn(B, fcl * s, H, W, 4).astype(np.float32)
        pos, valid = (np.asarray(x) for x in model.train_slots(n))
        for p in range(fcl):
            j = n - fcl + p
            size = bounds[j + 1] - bounds[j]
            assert list(pos[p * s:p * s + size]) == list(range(bounds[j], bounds[j + 1]))
            assert valid[p * s:(p + 1) * s].tolist() == [True] * size + [False] * (s - size)
            slots[:, p * s:p * s + size] = video[:, bounds[j]:bounds[j + 1]]
            clean[:, p * s:p * s + size] = clean_video[:, bounds[j]:bounds[j + 1]]
        z = np.concatenate([region, slots], 1)
        t = np.concatenate([np.zeros((B, cf), np.float32), np.broadcast_to(tau, (B, fcl * s))], 1)
        got = np.asarray(padded(params, z, t, 0.5 * t, clean, jnp.int32(n)))[:, valid]
        assert got.shape == want.shape and np.abs(want).max() > 0.1
        np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max(), rtol=0)
    assert padded._cache_size() == 1
    with pytest.raises(ValueError, match="padded training layout takes"):
        model.apply({"params": params}, z[:, 1:], t[:, 1:], t[:, 1:], ctx, clean=clean, num_chunks=n)
    with pytest.raises(ValueError, match="needs the clean copy"):
        model.apply({"params": params}, z, t, t, ctx, num_chunks=n)


def test_bidirectional_path_is_the_wan_dit_where_the_rope_splits_agree():
    """At head dim 12 the FAR class's RoPE split is diffusers' (4:4:4 real dims), so the
    bidirectional path of a FAR network made from a Wan DiT (make_far_model: the reference's
    setup_far_model) is that DiT. (At head dim 16 the splits differ, see
    test_rope_split_and_compressed_positions: FAR follows its own class there.)"""
    wan_cfg = {k: v for k, v in FAR_CFG.items() if k not in ("chunk_partition", "full_chunk_limit")}
    wan = WanTransformer3D(**wan_cfg | {"attention_head_dim": 12, "num_layers": 1})
    wparams = _random_params(wan, seed=4)
    model, params = make_far_model(wan, wparams, chunk_partition=(1, 2), full_chunk_limit=2)
    assert isinstance(model, FarWanTransformer3D) and model.full_chunk_limit == 2
    np.testing.assert_array_equal(params["far_patch_embedding"]["kernel"], far.far_patch_kernel(
        wparams["patch_embedding"]["kernel"], (1, 2, 2), 4))
    np.testing.assert_array_equal(params["far_patch_embedding"]["bias"], wparams["patch_embedding"]["bias"])
    x, t, r, ctx = _data(3, seed=5)
    ours = jax.jit(lambda p: model.apply({"params": p}, x, t, r, ctx, causal=False))(params)
    theirs = jax.jit(lambda p: wan.apply({"params": p}, x, t, r, ctx))(wparams)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ interop
def _released_far_checkpoint(path, d=16, layers=2, ffn=16, c=4, text=8, freq=16, seed=0):
    """A tiny AnyFlow-FAR transformer folder in the released layout, written here by hand: the
    config the reference class's save_pretrained writes, bf16 tensors under the diffusers names."""
    import ml_dtypes
    shapes = {"patch_embedding.weight": (d, c, 1, 2, 2), "patch_embedding.bias": (d,),
              "far_patch_embedding.weight": (d, c, 1, 4, 4), "far_patch_embedding.bias": (d,),
              "condition_embedder.time_proj.weight": (6 * d, d), "condition_embedder.time_proj.bias": (6 * d,),
              "condition_embedder.text_embedder.linear_1.weight": (d, text),
              "condition_embedder.text_embedder.linear_1.bias": (d,),
              "condition_embedder.text_embedder.linear_2.weight": (d, d),
              "condition_embedder.text_embedder.linear_2.bias": (d,),
              "proj_out.weight": (4 * c, d), "proj_out.bias": (4 * c,), "scale_shift_table": (1, 2, d)}
    for emb in ("time_embedder", "delta_embedder"):
        shapes |= {f"condition_embedder.{emb}.linear_1.weight": (d, freq), f"condition_embedder.{emb}.linear_1.bias": (d,),
                   f"condition_embedder.{emb}.linear_2.weight": (d, d), f"condition_embedder.{emb}.linear_2.bias": (d,)}
    for i in range(layers):
        for a in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                shapes |= {f"blocks.{i}.{a}.{proj}.weight": (d, d), f"blocks.{i}.{a}.{proj}.bias": (d,)}
            shapes |= {f"blocks.{i}.{a}.norm_q.weight": (d,), f"blocks.{i}.{a}.norm_k.weight": (d,)}
        shapes |= {f"blocks.{i}.norm2.weight": (d,), f"blocks.{i}.norm2.bias": (d,),
                   f"blocks.{i}.ffn.net.0.proj.weight": (ffn, d), f"blocks.{i}.ffn.net.0.proj.bias": (ffn,),
                   f"blocks.{i}.ffn.net.2.weight": (d, ffn), f"blocks.{i}.ffn.net.2.bias": (d,),
                   f"blocks.{i}.scale_shift_table": (1, 6, d)}
    rng = np.random.RandomState(seed)
    tensors = {k: (0.2 * rng.randn(*s)).astype(ml_dtypes.bfloat16) for k, s in sorted(shapes.items())}
    config = {"_class_name": "FAR_Wan_Transformer3DModel", "_diffusers_version": "0.35.1", "added_kv_proj_dim": None,
              "attention_head_dim": d // 2, "chunk_partition": [1, 3, 3, 3, 3, 3, 3, 2], "compressed_patch_size": [1, 4, 4],
              "cross_attn_norm": True, "deltatime_type": "r", "eps": 1e-06, "ffn_dim": ffn, "freq_dim": freq,
              "full_chunk_limit": 3, "gate_value": 0.25, "image_dim": None, "in_channels": c, "init_far_model": True,
              "init_flowmap_model": True, "num_attention_heads": 2, "num_layers": layers, "out_channels": c,
              "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": text}
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    write_safetensors(os.path.join(path, "diffusion_pytorch_model.safetensors"), list(tensors.items()))
    return config, tensors


def test_released_far_checkpoint_loads_exports_and_reloads_bit_exactly(tmp_path):
    config, tensors = _released_far_checkpoint(str(tmp_path / "far"))
    model, params = load_transformer(tmp_path / "far", dtype=None)  # keep the stored bf16
    assert isinstance(model, FarWanTransformer3D) and model.flow_map and model.gate_value == 0.25
    assert (model.chunk_partition, model.full_chunk_limit, model.compressed_patch_size) == (
        (1, 3, 3, 3, 3, 3, 3, 2), 3, (1, 4, 4))
    save_transformer(tmp_path / "out", model, params)
    with open(tmp_path / "out" / "config.json") as fh:
        assert json.load(fh) == config  # the reference class's keys and values, nothing more
    written = SafetensorsFile(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    assert set(written.keys()) == set(tensors)
    for name, arr in tensors.items():
        got = written.read(name)
        assert got.dtype == arr.dtype and got.tobytes() == arr.tobytes(), name
    model2, params2 = load_transformer(tmp_path / "out")  # fp32 by default: bf16 values exactly
    assert model2.to_config() == model.to_config()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b)), params, params2)
    # ... and through an Orbax model checkpoint (what tools/convert_checkpoint.py writes)
    save_model(tmp_path / "orbax", model, params)
    model3, params3 = load_model(tmp_path / "orbax", dtype=None)
    assert isinstance(model3, FarWanTransformer3D) and model3.to_config() == model.to_config()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params3, params)
    # strict: a FAR config without its compressed patch embedding, or a FAR checkpoint as a Wan DiT
    os.remove(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    write_safetensors(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"),
                      [(k, v) for k, v in tensors.items() if not k.startswith("far_patch_embedding")])
    with pytest.raises(CheckpointError, match=r"missing tensors \(2\): \['far_patch_embedding.bias', "
                                              r"'far_patch_embedding.weight'\]"):
        load_transformer(tmp_path / "out")
    with pytest.raises(CheckpointError, match="cannot be loaded as a bidirectional Wan transformer"):
        load_transformer(tmp_path / "far", far=False)


def test_wan_checkpoint_as_a_new_far_network(tmp_path):
    """far=True on a Wan checkpoint: the reference's setup_far_model (trilinear kernel, copied bias)."""
    wan = WanTransformer3D(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8,
                           freq_dim=16, ffn_dim=16, num_layers=1, flow_map=True)
    wparams = _random_params(wan, seed=6)
    save_transformer(tmp_path / "wan", wan, wparams)
    model, params = load_transformer(tmp_path / "wan", far=True, far_fields=dict(full_chunk_limit=2))
    assert isinstance(model, FarWanTransformer3D) and model.full_chunk_limit == 2
    np.testing.assert_array_equal(params["far_patch_embedding"]["bias"], wparams["patch_embedding"]["bias"])
    np.testing.assert_array_equal(params["far_patch_embedding"]["kernel"], far.far_patch_kernel(
        wparams["patch_embedding"]["kernel"], (1, 2, 2), 4))
    save_transformer(tmp_path / "far", model, params)
    model2, params2 = load_transformer(tmp_path / "far")
    assert isinstance(model2, FarWanTransformer3D) and model2.to_config() == model.to_config()
    jax.tree.map(np.testing.assert_array_equal, params2, params)
