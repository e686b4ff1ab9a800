"""diffusers <-> Flax interop: export round trips, sharded files, dtypes, strict errors, the
converter tool, and atomic destinations."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from model_testlib import perturbed
from anyflow_jax import checkpoint
from anyflow_jax.interop import reference
from anyflow_jax.interop.diffusers import CheckpointError, load_transformer, param_table, save_transformer
from anyflow_jax.interop.safetensors_io import SafetensorsFile, write_safetensors
from anyflow_jax.models.wan import WanTransformer3D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _inputs(b=2, f=3, h=4, w=6, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(b, f, h, w, 4).astype(np.float32)
    t = rng.rand(b, f).astype(np.float32)
    r = (t * rng.rand(b, f)).astype(np.float32)
    ctx = rng.randn(b, 5, 16).astype(np.float32)
    return x, t, r, ctx


def _random_params(model, seed=0):
    """Random params with every tensor non-trivial (the default init zeroes biases and the head)."""
    params = model.init_params(jax.random.key(seed))
    return perturbed(params, seed + 1, 0.1)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "transformer"
    reference.random_diffusers_model(seed=1, **CFG).save_pretrained(path, safe_serialization=True)
    return path


def _tensors(path):
    f = SafetensorsFile(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    return {k: f.read(k) for k in f.keys()}


def _rewrite(src, dst, edit):
    """Copy a diffusers folder, editing its tensor dict with ``edit``."""
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as fh:
        cfg = fh.read()
    with open(os.path.join(dst, "config.json"), "w") as fh:
        fh.write(cfg)
    tensors = _tensors(src)
    edit(tensors)
    write_safetensors(os.path.join(dst, "diffusion_pytorch_model.safetensors"), sorted(tensors.items()))
    return dst


# ------------------------------------------------------------------------------ round trips
@pytest.mark.slow
def test_export_then_diffusers_from_pretrained_matches(tmp_path):
    from diffusers import WanTransformer3DModel
    model = WanTransformer3D(**CFG)
    params = _random_params(model)
    save_transformer(tmp_path / "export", model, params)
    tm = WanTransformer3DModel.from_pretrained(tmp_path / "export").eval()
    x, t, _, ctx = _inputs()
    ours = np.asarray(model.apply({"params": params}, x, t, None, ctx))
    theirs = reference.torch_forward(tm, x, t, ctx)
    assert np.abs(theirs).max() > 0.1
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # ... and our loader reads back exactly what we wrote
    model2, params2 = load_transformer(tmp_path / "export")
    assert model2.to_config() == model.to_config()
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


@pytest.mark.slow
def test_flow_map_student_export_roundtrip(tmp_path):
    model = WanTransformer3D(**CFG, flow_map=True, gate_value=0.3, deltatime_type="t-r", scan_layers=False)
    params = _random_params(model, seed=3)
    save_transformer(tmp_path / "student", model, params)
    with open(tmp_path / "student" / "config.json") as fh:
        cfg = json.load(fh)
    assert cfg["gate_value"] == 0.3 and cfg["deltatime_type"] == "t-r"
    names = set(SafetensorsFile(tmp_path / "student" / "diffusion_pytorch_model.safetensors").keys())
    assert "condition_embedder.delta_embedder.linear_1.weight" in names
    assert names == {e.diffusers_name for e in param_table(model)}
    model2, params2 = load_transformer(tmp_path / "student")  # scan layout by default
    assert model2.flow_map and model2.gate_value == pytest.approx(0.3) and model2.deltatime_type == "t-r"
    x, t, r, ctx = _inputs(seed=2)
    a = model.apply({"params": params}, x, t, r, ctx)
    b = model2.apply({"params": params2}, x, t, r, ctx)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_teacher_to_new_student_copies_time_embedder(teacher_dir):
    teacher, tparams = load_transformer(teacher_dir)
    student, sparams = load_transformer(teacher_dir, flow_map=True)
    assert not teacher.flow_map and "delta_embedder" not in tparams["condition_embedder"]
    assert student.flow_map and student.gate_value == 0.25 and student.deltatime_type == "r"
    jax.tree_util.tree_map(np.testing.assert_array_equal, sparams["condition_embedder"]["delta_embedder"],
                           tparams["condition_embedder"]["time_embedder"])
    x, t, r, ctx = _inputs(seed=5)
    diag = student.apply({"params": sparams}, x, t, t, ctx)
    np.testing.assert_array_equal(np.asarray(diag), np.asarray(teacher.apply({"params": tparams}, x, t, None, ctx)))
    off = student.apply({"params": sparams}, x, t, r, ctx)
    assert np.abs(np.asarray(off) - np.asarray(diag)).max() > 1e-4  # r matters off the diagonal


def test_sharded_index_roundtrip(tmp_path):
    model = WanTransformer3D(**CFG)
    params = _random_params(model, seed=4)
    save_transformer(tmp_path / "sharded", model, params, max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "diffusion_pytorch_model.safetensors.index.json" in files and len(shards) > 2
    _, params2 = load_transformer(tmp_path / "sharded")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_bf16_stays_bf16_unless_asked(tmp_path):
    import torch
    tm = reference.random_diffusers_model(seed=2, **CFG).to(torch.bfloat16)
    tm.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    _, kept = load_transformer(tmp_path / "bf16", dtype=None)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(kept)} == {jnp.dtype(jnp.bfloat16)}
    _, f32 = load_transformer(tmp_path / "bf16")
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(f32)} == {jnp.dtype(jnp.float32)}
    w = tm.proj_out.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(f32["proj_out"]["kernel"]), w.T)


# ------------------------------------------------------------------------------ bad input
def _expect_error(path, *fragments, **kw):
    with pytest.raises(CheckpointError) as info:
        load_transformer(path, **kw)
    for frag in fragments:
        assert frag in str(info.value), str(info.value)


def test_missing_tensor_is_named(teacher_dir, tmp_path):
    bad = _rewrite(teacher_dir, tmp_path / "bad", lambda t: t.pop("blocks.1.attn2.to_k.bias"))
    _expect_error(bad, "missing", "blocks.1.attn2.to_k.bias")


def test_extra_tensor_is_named(teacher_dir, tmp_path):
    bad = _rewrite(teacher_dir, tmp_path / "bad",
                   lambda t: t.__setitem__("blocks.0.attn1.lora_A.weight", np.zeros((2, 2), np.float32)))
    _expect_error(bad, "unexpected", "blocks.0.attn1.lora_A.weight")


def test_wrong_shape_is_named(teacher_dir, tmp_path):
    bad = _rewrite(teacher_dir, tmp_path / "bad",
                   lambda t: t.__setitem__("proj_out.weight", np.zeros((15, 24), np.float32)))
    _expect_error(bad, "proj_out.weight", "(15, 24)", "(16, 24)")


def test_not_a_diffusers_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path / "empty", "no config.json")
    _expect_error(tmp_path / "nope", "not a directory")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    _expect_error(tmp_path / "vae", "AutoencoderKLWan")


def test_truncated_safetensors(teacher_dir, tmp_path):
    bad = _rewrite(teacher_dir, tmp_path / "bad", lambda t: None)
    f = bad / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    _expect_error(bad, "truncated", "diffusion_pytorch_model.safetensors")


def test_student_checkpoint_cannot_load_as_teacher(tmp_path):
    model = WanTransformer3D(**CFG, flow_map=True)
    save_transformer(tmp_path / "s", model, _random_params(model))
    _expect_error(tmp_path / "s", "delta embedder", flow_map=False)


def test_save_refuses_wrong_params_and_writes_nothing(tmp_path):
    model = WanTransformer3D(**CFG)
    params = _random_params(model)
    params["proj_out"]["kernel"] = params["proj_out"]["kernel"][:, :3]
    with pytest.raises(CheckpointError, match="proj_out"):
        save_transformer(tmp_path / "out", model, params)
    assert os.listdir(tmp_path) == []


def test_save_never_clobbers_and_cleans_up_on_failure(tmp_path, monkeypatch):
    model = WanTransformer3D(**CFG)
    params = _random_params(model)
    save_transformer(tmp_path / "out", model, params)
    before = (tmp_path / "out" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        save_transformer(tmp_path / "out", model, params)
    # A failure half way through an overwrite keeps the old export and leaves no temp folder.
    import anyflow_jax.interop.diffusers as dif

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(dif, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        save_transformer(tmp_path / "out", model, params, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").read_bytes() == before


# ------------------------------------------------------------------------------ converter
def _convert(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_convert_tool_roundtrip_and_errors(teacher_dir, tmp_path):
    res = _convert("--src", teacher_dir, "--dst", tmp_path / "orbax", "--flow-map")
    assert res.returncode == 0, res.stderr
    model, params = checkpoint.load_model(tmp_path / "orbax")
    assert model.flow_map
    res = _convert("--src", tmp_path / "orbax", "--dst", tmp_path / "back")
    assert res.returncode == 0, res.stderr
    back = _tensors(tmp_path / "back")
    orig = _tensors(teacher_dir)
    assert set(back) == set(orig) | {k.replace("time_embedder", "delta_embedder") for k in orig if "time_embedder" in k}
    for k, v in orig.items():
        np.testing.assert_array_equal(back[k], v)
    # bad source: clear one-line error, exit code 2, nothing at the destination
    (tmp_path / "notdiffusers").mkdir()
    res = _convert("--src", tmp_path / "notdiffusers", "--dst", tmp_path / "never")
    assert res.returncode == 2 and "no config.json" in res.stderr
    assert not os.path.exists(tmp_path / "never")
    # existing destination is not touched
    res = _convert("--src", teacher_dir, "--dst", tmp_path / "back")
    assert res.returncode == 2 and "already exists" in res.stderr


def test_orbax_model_checkpoint_keeps_bf16_and_casts_on_request(tmp_path):
    model = WanTransformer3D(**CFG)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), _random_params(model))
    checkpoint.save_model(tmp_path / "m", model, params)
    _, kept = checkpoint.load_model(tmp_path / "m", dtype=None)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(kept)} == {jnp.dtype(jnp.bfloat16)}
    _, f32 = checkpoint.load_model(tmp_path / "m")
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(f32)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(np.asarray(f32["proj_out"]["kernel"]),
                                  np.asarray(params["proj_out"]["kernel"]).astype(np.float32))
    assert params["proj_out"]["kernel"].dtype == ml_dtypes.bfloat16
