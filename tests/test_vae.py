"""The Flax Wan VAE against diffusers' ``AutoencoderKLWan`` (fp32, CPU, tiny random configs).

Weights are written by diffusers' ``save_pretrained`` and read by our loader, so the name table,
the layout transforms and the network are checked together. Tiny sizes keep the real Wan2.1
compression (8x space, 4x time); frame counts 1, 5, 9 (= 1 + 4k) and non-square frames.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax.checkpoints.diffusers import CheckpointError
from anyflow_jax.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from anyflow_jax.checkpoints.vae import expected_shapes, load_vae, param_table
from anyflow_jax.models.wan_vae import WanVAE, denormalize_latents, normalize_latents
from vae_testlib import make_tiny_vae, random_torch_vae

TOL = 1e-4  # relative max error (max |ours - diffusers| / max |diffusers|)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _rel_err(out, ref):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _to_torch(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3)


def _to_np(t):
    return t.permute(0, 2, 3, 4, 1).detach().numpy()


def _torch_encode(vae, x):
    import torch
    with torch.no_grad():
        dist = vae.encode(_to_torch(x)).latent_dist
    return _to_np(dist.mean), _to_np(dist.logvar)


def _torch_decode(vae, z):
    import torch
    with torch.no_grad():
        return _to_np(vae.decode(_to_torch(z)).sample)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch vae, folder, flax model, params) for the tiny Wan2.1-layout VAE."""
    import torch
    path = make_tiny_vae(tmp_path_factory.mktemp("vae") / "vae", seed=0)
    from diffusers import AutoencoderKLWan
    tvae = AutoencoderKLWan.from_pretrained(path).eval()
    torch.set_num_threads(1)
    model, params = load_vae(path)
    return tvae, path, model, params


def _encode_fn(model, chunk=1):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_moments", chunk=chunk))


def _decode_fn(model, chunk=1, **kw):
    return jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode", chunk=chunk, **kw))


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("frames", [1, pytest.param(5, marks=pytest.mark.slow), 9])
def test_encode_decode_match_diffusers(tiny, frames):
    """encode = latent_dist.mean (and logvar), decode = decode(z).sample, with the default
    schedule (first frame, then 4 frames / 1 latent frame per scan step)."""
    tvae, _, model, params = tiny
    rng = np.random.RandomState(frames)
    x = rng.uniform(-1, 1, (2, frames, 16, 24, 3)).astype(np.float32)
    ref_mean, ref_logvar = _torch_encode(tvae, x)
    latents = 1 + (frames - 1) // 4
    assert ref_mean.shape == (2, latents, 2, 3, 4)  # the real 4x / 8x compression
    mean, logvar = (np.asarray(a) for a in _encode_fn(model)(params, x))
    err_m, err_v = _rel_err(mean, ref_mean), _rel_err(logvar, ref_logvar)
    print(f"F={frames}: encode mean rel err {err_m:.2e}, logvar {err_v:.2e}")
    assert err_m <= TOL and err_v <= TOL

    z = rng.randn(2, latents, 2, 3, 4).astype(np.float32)
    ref = _torch_decode(tvae, z)
    assert ref.shape == (2, frames, 16, 24, 3)
    assert 0.5 < np.mean(np.abs(ref) < 1.0)  # mostly unclamped: the comparison is informative
    out = np.asarray(_decode_fn(model)(params, z))
    err = _rel_err(out, ref)
    print(f"F={frames}: decode rel err {err:.2e}")
    assert err <= TOL


def test_long_videos_use_scan(tiny):
    """Chunks after the first run under one scan (a while loop), so the program does not grow with
    the video and its memory holds one chunk's activations plus the caches."""
    _, _, model, params = tiny
    z = jnp.zeros((1, 6, 2, 3, 4))
    x = jnp.zeros((1, 21, 16, 24, 3))
    dec = str(jax.make_jaxpr(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, z))
    enc = str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, x))
    assert dec.count("scan[") == 1 and enc.count("scan[") == 1
    assert "length=5" in dec and "length=5" in enc
    unchunked = str(jax.make_jaxpr(lambda p, z: model.apply({"params": p}, z, method="decode", chunk=None))(params, z))
    assert "scan[" not in unchunked


@pytest.mark.slow
def test_chunk_settings_match_diffusers(tiny):
    """Other chunk sizes (2 latent frames per step, a shorter last chunk, all at once) give
    diffusers' numbers: the carried caches reproduce the causal convolutions exactly."""
    tvae, _, model, params = tiny
    rng = np.random.RandomState(11)
    z = rng.randn(1, 6, 2, 3, 4).astype(np.float32)
    ref = _torch_decode(tvae, z)
    x = rng.uniform(-1, 1, (1, 21, 8, 16, 3)).astype(np.float32)
    ref_mean, _ = _torch_encode(tvae, x)
    for chunk in (2, 3, None):
        err = _rel_err(np.asarray(_decode_fn(model, chunk)(params, z)), ref)
        err_e = _rel_err(np.asarray(_encode_fn(model, chunk)(params, x)[0]), ref_mean)
        print(f"chunk={chunk}: decode {err:.2e}, encode {err_e:.2e}")
        assert err <= TOL and err_e <= TOL


@pytest.mark.slow
def test_scan_memory_does_not_grow_with_frames(tiny):
    """XLA's memory analysis: with the scan, temporaries grow from 3 to 9 latent frames by less
    than the decoded video itself (the stacked chunk outputs); decoding all frames at once grows
    with the activations of every frame."""
    _, _, model, params = tiny

    def analysis(frames, chunk):
        z = jax.ShapeDtypeStruct((1, frames, 4, 4, 4), jnp.float32)
        return _decode_fn(model, chunk).lower(params, z).compile().memory_analysis()

    s3, s9, a3, a9 = analysis(3, 1), analysis(9, 1), analysis(3, None), analysis(9, None)
    video = s9.output_size_in_bytes - s3.output_size_in_bytes
    grow_scan = s9.temp_size_in_bytes - s3.temp_size_in_bytes
    grow_all = a9.temp_size_in_bytes - a3.temp_size_in_bytes
    print(f"temp growth 3 -> 9 latent frames: scan {grow_scan}, all at once {grow_all}; video {video}")
    assert grow_scan <= video
    assert grow_all > 5 * video


@pytest.mark.slow
def test_tiled_decode_matches_diffusers_tiling(tiny):
    """decode(tile=, overlap=) = diffusers' enable_tiling decode (then clamped), with edge tiles of
    several shapes; and it differs from the untiled decode (the test can tell them apart)."""
    tvae, _, model, params = tiny
    z = np.random.RandomState(5).randn(1, 2, 6, 7, 4).astype(np.float32)
    tvae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                       tile_sample_stride_width=24)
    try:
        ref = np.clip(_torch_decode(tvae, z), -1.0, 1.0)
    finally:
        tvae.disable_tiling()
    out = np.asarray(_decode_fn(model, tile=(4, 4), overlap=(1, 1))(params, z))
    err = _rel_err(out, ref)
    untiled = _torch_decode(tvae, z)
    print(f"tiled decode rel err {err:.2e}; tiled vs untiled max diff {np.abs(ref - untiled).max():.2f}")
    assert err <= TOL
    assert np.abs(ref - untiled).max() > 0.1


@pytest.mark.slow
def test_wan22_residual_layout_matches_diffusers(tmp_path):
    """The Wan2.2 layout: residual down/up blocks with average/duplicate shortcuts, a separate
    decoder width and 2x2 patchification."""
    tvae = random_torch_vae(seed=3, base_dim=8, decoder_base_dim=12, dim_mult=[1, 2, 2],
                            temperal_downsample=[True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2)
    tvae.save_pretrained(tmp_path / "vae22", safe_serialization=True)
    model, params = load_vae(tmp_path / "vae22")
    assert model.is_residual and model.patch_size == 2 and model.spatial_factor == 8
    rng = np.random.RandomState(2)
    x = rng.uniform(-1, 1, (1, 9, 16, 24, 3)).astype(np.float32)
    err = _rel_err(np.asarray(_encode_fn(model)(params, x)[0]), _torch_encode(tvae, x)[0])
    z = rng.randn(1, 3, 2, 3, 4).astype(np.float32)
    err_d = _rel_err(np.asarray(_decode_fn(model)(params, z)), _torch_decode(tvae, z))
    print(f"Wan2.2 layout: encode {err:.2e}, decode {err_d:.2e}")
    assert err <= TOL and err_d <= TOL


# ------------------------------------------------------------------------------ loader
def _rewrite(path, edit):
    """Rewrite the folder's safetensors file with ``edit(dict name -> array)`` applied."""
    f = SafetensorsFile(os.path.join(path, WEIGHTS))
    tensors = {n: np.array(f.read(n)) for n in f.keys()}
    edit(tensors)
    write_safetensors(os.path.join(path, WEIGHTS), list(tensors.items()))


def test_loader_is_strict(tiny, tmp_path):
    _, src, model, _ = tiny
    names = set(expected_shapes(model))
    assert len(param_table(model)) == len(names)
    bad = str(tmp_path / "bad")
    shutil.copytree(src, bad)

    def damage(t):
        del t["decoder.up_blocks.0.upsamplers.0.time_conv.weight"]
        del t["encoder.mid_block.attentions.0.norm.gamma"]
        t["decoder.extra_head.weight"] = np.zeros((3,), np.float32)
        t["encoder.conv_in.weight"] = np.zeros((8, 3, 3, 3, 1), np.float32)

    _rewrite(bad, damage)
    with pytest.raises(CheckpointError) as e:
        load_vae(bad)
    msg = str(e.value)
    for name in ("decoder.up_blocks.0.upsamplers.0.time_conv.weight", "encoder.mid_block.attentions.0.norm.gamma",
                 "decoder.extra_head.weight", "encoder.conv_in.weight"):
        assert name in msg, (name, msg)
    assert "missing tensors (2)" in msg and "unexpected tensors (1)" in msg
    assert "(8, 3, 3, 3, 1)" in msg and "(8, 3, 3, 3, 3)" in msg


def test_loader_sharded_and_config_checks(tiny, tmp_path):
    """A sharded folder loads to the same parameters; a non-VAE config is refused by name."""
    _, src, _, params = tiny
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(os.path.join(src, "config.json"), sharded / "config.json")
    f = SafetensorsFile(os.path.join(src, WEIGHTS))
    names = sorted(f.keys())
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        write_safetensors(str(sharded / fname), [(n, f.read(n)) for n in part])
        weight_map.update({n: fname for n in part})
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, p2 = load_vae(sharded)
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), params, p2)
    assert all(jax.tree_util.tree_leaves(same))
    # the conv layout: torch (O, I, kt, kh, kw) -> (kt, kh, kw, I, O)
    w = np.asarray(f.read("decoder.conv_out.weight"))
    np.testing.assert_array_equal(np.asarray(params["decoder"]["conv_out"]["kernel"]), w.transpose(2, 3, 4, 1, 0))

    cfg = json.loads((sharded / "config.json").read_text())
    cfg["_class_name"] = "WanTransformer3DModel"
    (sharded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="AutoencoderKLWan"):
        load_vae(sharded)
    cfg["_class_name"] = "AutoencoderKLWan"
    cfg["mystery_option"] = 1
    (sharded / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mystery_option"):
        load_vae(sharded)


def test_every_parameter_has_logical_names(tiny):
    from anyflow_jax.parallel import DEFAULT_RULES, logical_names, make_mesh, param_shardings
    _, _, model, _ = tiny
    boxed = model.abstract_params()
    names = logical_names(boxed)  # fails naming any parameter without logical names
    flat = jax.tree_util.tree_flatten_with_path(names, is_leaf=lambda x: isinstance(x, tuple))[0]
    kernels = [n for path, n in flat if jax.tree_util.keystr(path).endswith("['kernel']")]
    assert len(kernels) > 50 and all(n[-2:] == ("conv_in", "conv_out") for n in kernels)
    mesh = make_mesh(1, 1, 1, jax.devices()[:1], allow_subset=True)
    param_shardings(boxed, mesh, DEFAULT_RULES)  # every name has a rule in the default rules


def test_frame_count_must_be_one_plus_4k(tiny):
    _, _, model, params = tiny
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        model.apply({"params": params}, jnp.zeros((1, 6, 16, 16, 3)), method="encode")


# ------------------------------------------------------------------------------ latent scaling
def test_normalize_denormalize(tiny):
    """Round trip, per channel on the last axis, and equal to WanPipeline's formula
    ``latents / (1 / std) + mean`` (channels-first in diffusers)."""
    import torch
    tvae, _, model, _ = tiny
    mean_c = np.asarray(model.latents_mean, np.float32)
    std_c = np.asarray(model.latents_std, np.float32)
    assert np.ptp(mean_c) > 0.1 and np.ptp(std_c) > 0.1  # non-trivial statistics
    z = np.random.RandomState(0).randn(2, 3, 2, 5, 4).astype(np.float32)
    den = np.asarray(denormalize_latents(model, z))
    # the pipeline, verbatim in spirit: channels-first tensors, std inverted then divided
    cfg = tvae.config
    lm = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
    ls = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
    pipe = _to_np(_to_torch(z) / ls + lm)
    np.testing.assert_allclose(den, pipe, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(den[..., 2], z[..., 2] * std_c[2] + mean_c[2], rtol=1e-6)
    back = np.asarray(normalize_latents(model, den))
    np.testing.assert_allclose(back, z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(normalize_latents(model, mean_c + std_c)), np.ones(4), rtol=1e-6)


def test_from_config_round_trip():
    model = WanVAE(base_dim=8, z_dim=4, dim_mult=(1, 2), temperal_downsample=(True,),
                   latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    again = WanVAE.from_config(json.loads(json.dumps(model.to_config())))
    assert again == model
    with pytest.raises(ValueError, match="latents_mean"):
        WanVAE.from_config({**model.to_config(), "latents_mean": [0.0] * 3})
