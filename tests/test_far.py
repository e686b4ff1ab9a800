"""FAR building blocks (models/far.py): chunk layout, compressed patch-embedding init, RoPE of
compressed frames and the training mask with the clean copy, each against its closed form or
the PyTorch operation the reference uses."""
import numpy as np
import pytest

from anyflow_jax.checkpoints.diffusers import _conv3d
from anyflow_jax.models import far
from anyflow_jax.models.wan import rope_tables


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
