"""tools/convert_checkpoint.py: export from a training workdir (EMA or raw weights of the newest
intact checkpoint) to diffusers and Orbax; refusals that protect the source and existing files (one
"error:" line, exit status 2, nothing written); and the permissions of every export (the user's
umask, not 0700/0600)."""
import importlib.util
import os
import shutil
import stat

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from anyflow_jax import fileio
from anyflow_jax.checkpoints import diffusers as dif
from anyflow_jax.checkpoints import model as model_ckpt
from anyflow_jax.defaults import toy_config
from anyflow_jax.interop import reference
from anyflow_jax.models.wan import WanTransformer3D
from anyflow_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert)

TINY_MODEL = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, freq_dim=32)
SMALL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
             text_dim=8, freq_dim=8, ffn_dim=16, num_layers=1, rope_max_seq_len=32)


def tiny(stage, steps=2):
    """A tiny toy run checkpointed every step; EMA decay 0.5 from the first step (EMA != raw) and
    a large lr without warmup (the zero-initialised output head moves in two steps)."""
    c = toy_config(stage)
    c.model.update(TINY_MODEL)
    c.data.update(dict(global_batch_size=4, num_frames=4))
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.train.update(dict(steps=steps, log_every=1, checkpoint_every=1, keep_checkpoints=5, tensorboard=False,
                        async_checkpointing=False))
    c.optim.update(dict(lr=2e-2, warmup_steps=0))
    c.ema.update(dict(decay=0.5, warmup_steps=0))
    return c


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("convert") / "teacher")
    loop.train(tiny("teacher"), wd)
    return wd


@pytest.fixture(scope="module")
def flow_map_run(tmp_path_factory, teacher_run):
    wd = str(tmp_path_factory.mktemp("convert") / "flow_map")
    c = tiny("flow_map")
    c.init.student = teacher_run
    loop.train(c, wd)
    return wd


@pytest.fixture(scope="module")
def small_diffusers(tmp_path_factory):
    """A tiny diffusers transformer folder (random weights) to convert."""
    path = str(tmp_path_factory.mktemp("small") / "transformer")
    model = WanTransformer3D(**SMALL)
    dif.save_transformer(path, model, model.init_params(jax.random.key(0)))
    return path


def run(capsys, *args):
    """``main([...])`` -> (exit status, stderr lines that are not progress bars)."""
    code = convert.main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "tensor/s" not in line
             and "it/s" not in line and "tensor]" not in line and "|" not in line]
    return code, lines


def expect_error(capsys, tmp_path, *args, contains=(), after_reading=False):
    """One "error:" line, exit status 2, and nothing written under tmp_path. An error found before
    reading the source is the only line; one found while reading follows the "reading ..." line."""
    before = sorted(os.listdir(tmp_path))
    code, lines = run(capsys, *args)
    assert code == 2, lines
    assert lines and lines[-1].startswith("error: "), lines
    if after_reading:
        assert len(lines) == 2 and lines[0].startswith("reading "), lines
    else:
        assert len(lines) == 1, lines
    for frag in contains:
        assert frag in lines[-1], lines[-1]
    assert sorted(os.listdir(tmp_path)) == before
    return lines[-1]


def ckpt_item(workdir, step, item):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), item))


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [jax.tree_util.keystr(k) for k, _ in la] == [jax.tree_util.keystr(k) for k, _ in lb]
    for (_, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def trees_differ(a, b):
    return any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def toy_inputs(seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(2, 2, 8, 8, 1).astype(np.float32)
    t = rng.rand(2, 2).astype(np.float32)
    r = (t * rng.rand(2, 2)).astype(np.float32)
    ctx = rng.randn(2, 4, 32).astype(np.float32)
    return x, t, r, ctx


# ------------------------------------------------------------------------------ permissions
def modes(path):
    """{relative path: permission bits} of a folder and everything in it."""
    out = {".": stat.S_IMODE(os.stat(path).st_mode)}
    for d, dirs, files in os.walk(path):
        for n in dirs + files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, path)] = stat.S_IMODE(os.stat(p).st_mode)
    return out


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(mask):
        os.umask(mask)
    yield set_umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_exports_and_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    model = WanTransformer3D(**SMALL)
    params = model.init_params(jax.random.key(0))
    dif.save_transformer(tmp_path / "diffusers", model, params)
    model_ckpt.save_model(tmp_path / "orbax", model, params)
    fileio.atomic_write_bytes(str(tmp_path / "file.bin"), b"data")
    folder, file = 0o777 & ~mask, 0o666 & ~mask
    for export in ("diffusers", "orbax"):
        got = modes(tmp_path / export)
        assert got["."] == folder, (export, oct(got["."]))
        for rel, mode in got.items():
            want = folder if os.path.isdir(tmp_path / export / rel) else file
            assert mode == want, (export, rel, oct(mode), oct(want))
    assert stat.S_IMODE(os.stat(tmp_path / "file.bin").st_mode) == file
    # replacing an export keeps the umask too; nothing temporary is left
    dif.save_transformer(tmp_path / "diffusers", model, params, overwrite=True)
    assert stat.S_IMODE(os.stat(tmp_path / "diffusers").st_mode) == folder
    fileio.atomic_write_bytes(str(tmp_path / "file.bin"), b"new")
    assert (tmp_path / "file.bin").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["diffusers", "file.bin", "orbax"]


def test_converted_checkpoint_is_readable_by_others(small_diffusers, tmp_path, capsys, umask):
    umask(0o022)
    code, lines = run(capsys, "--src", small_diffusers, "--dst", tmp_path / "a" / "orbax")
    assert code == 0, lines
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "orbax").st_mode) == 0o755
    code, lines = run(capsys, "--src", tmp_path / "a" / "orbax", "--dst", tmp_path / "diffusers")
    assert code == 0, lines
    assert stat.S_IMODE(os.stat(tmp_path / "diffusers").st_mode) == 0o755


def test_failed_export_removes_the_parent_folders_it_created(tmp_path, monkeypatch):
    model = WanTransformer3D(**SMALL)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(dif, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        dif.save_transformer(tmp_path / "new" / "deeper" / "out", model, model.init_params(jax.random.key(0)))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ refusals
def test_same_source_and_destination_is_refused_before_reading(small_diffusers, tmp_path, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the source was read")
    monkeypatch.setattr(dif, "load_transformer", never)
    before = {n: os.path.getmtime(os.path.join(small_diffusers, n)) for n in os.listdir(small_diffusers)}
    os.symlink(small_diffusers, tmp_path / "link")
    monkeypatch.chdir(os.path.dirname(small_diffusers))
    spellings = [small_diffusers, small_diffusers + "/", "transformer", "./transformer/", str(tmp_path / "link"),
                 os.path.join(small_diffusers, "..", "transformer")]
    for dst in spellings:
        for to in ("orbax", "diffusers"):
            line = expect_error(capsys, tmp_path, "--src", small_diffusers, "--dst", dst, "--to", to, "--overwrite",
                                contains=("same folder",))
            assert os.path.realpath(small_diffusers) in line
    # the other way round too (source spelled through the link, destination plain)
    expect_error(capsys, tmp_path, "--src", tmp_path / "link", "--dst", small_diffusers, "--overwrite",
                 contains=("same folder",))
    assert {n: os.path.getmtime(os.path.join(small_diffusers, n)) for n in os.listdir(small_diffusers)} == before


@pytest.mark.slow
def test_overwrite_replaces_only_checkpoint_folders(small_diffusers, teacher_run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    line = expect_error(capsys, tmp_path, "--src", small_diffusers, "--dst", tmp_path / "notes.txt", "--overwrite",
                        contains=("is a file", "notes.txt"))
    assert "diffusers transformer folder or an Orbax model checkpoint" in line
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    expect_error(capsys, tmp_path, "--src", small_diffusers, "--dst", tmp_path / "photos", "--overwrite",
                 contains=("is a folder that is no checkpoint",))
    assert os.listdir(tmp_path / "photos") == ["cat.jpg"]
    # a training workdir is never replaced by an export
    run_copy = tmp_path / "run"
    shutil.copytree(teacher_run, run_copy)
    expect_error(capsys, tmp_path, "--src", small_diffusers, "--dst", run_copy, "--overwrite",
                 contains=("is a training workdir",))
    assert os.path.isfile(run_copy / "run.json")
    # a folder that contains the source is never replaced
    (tmp_path / "outer").mkdir()
    shutil.copytree(small_diffusers, tmp_path / "outer" / "transformer")
    (tmp_path / "outer" / "model.json").write_text("{}")
    expect_error(capsys, tmp_path, "--src", tmp_path / "outer" / "transformer", "--dst", tmp_path / "outer",
                 "--overwrite", contains=("contains the source",))
    # without --overwrite an existing destination is kept, whatever it is
    expect_error(capsys, tmp_path, "--src", small_diffusers, "--dst", tmp_path / "notes.txt",
                 contains=("already exists", "--overwrite"))
    # a diffusers folder or an Orbax model checkpoint is replaced
    code, lines = run(capsys, "--src", small_diffusers, "--dst", tmp_path / "exp", "--to", "diffusers")
    assert code == 0, lines
    for to in ("orbax", "diffusers"):
        code, lines = run(capsys, "--src", small_diffusers, "--dst", tmp_path / "exp", "--to", to, "--overwrite")
        assert code == 0, lines
    assert model_ckpt.is_model_checkpoint(tmp_path / "exp") is False  # the last export is diffusers
    assert os.path.isfile(tmp_path / "exp" / "config.json")


def test_source_errors_say_what_is_wrong(small_diffusers, tmp_path, capsys):
    expect_error(capsys, tmp_path, "--src", tmp_path / "missing", "--dst", tmp_path / "out",
                 contains=("missing does not exist",))
    (tmp_path / "empty").mkdir()
    line = expect_error(capsys, tmp_path, "--src", tmp_path / "empty", "--dst", tmp_path / "out",
                        contains=("is not a checkpoint",))
    for frag in ("run.json", "training workdir", "model.json", "Orbax model checkpoint", "no config.json",
                 "diffusers transformer folder"):
        assert frag in line
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    expect_error(capsys, tmp_path, "--src", tmp_path / "weights.safetensors", "--dst", tmp_path / "out",
                 contains=("is a file, not a checkpoint folder",))
    # options that do not apply to the source
    expect_error(capsys, tmp_path, "--src", small_diffusers, "--dst", tmp_path / "out", "--raw",
                 contains=("--raw applies to a training workdir source only", "diffusers transformer folder"))
    # command-line mistakes are one line as well
    expect_error(capsys, tmp_path, "--src", small_diffusers, contains=("--dst",))
    expect_error(capsys, tmp_path, "--src", small_diffusers, "--dst", tmp_path / "out", "--to", "onnx",
                 contains=("--to",))
    # a damaged diffusers folder: the loader's message, still one line and nothing written
    bad = tmp_path / "bad"
    shutil.copytree(small_diffusers, bad)
    os.remove(bad / "diffusion_pytorch_model.safetensors")
    expect_error(capsys, tmp_path, "--src", bad, "--dst", tmp_path / "out", contains=("no safetensors files",),
                 after_reading=True)


@pytest.mark.slow
def test_workdir_only_options_and_empty_workdir(teacher_run, tmp_path, capsys):
    expect_error(capsys, tmp_path, "--src", teacher_run, "--dst", tmp_path / "out", "--flow-map",
                 contains=("--flow-map applies to a diffusers source only", "training workdir"))
    expect_error(capsys, tmp_path, "--src", teacher_run, "--dst", tmp_path / "out", "--no-scan",
                 contains=("--no-scan",))
    (tmp_path / "fresh").mkdir()
    shutil.copy(os.path.join(teacher_run, "run.json"), tmp_path / "fresh" / "run.json")
    expect_error(capsys, tmp_path, "--src", tmp_path / "fresh", "--dst", tmp_path / "out",
                 contains=("no checkpoint yet",), after_reading=True)


# ------------------------------------------------------------------------------ workdir export
@pytest.mark.slow
def test_teacher_workdir_to_diffusers_matches_diffusers_and_ema(teacher_run, tmp_path, capsys):
    from diffusers import WanTransformer3DModel
    code, lines = run(capsys, "--src", teacher_run, "--dst", tmp_path / "exported")
    assert code == 0, lines
    text = "\n".join(lines)
    assert "exported step 2, EMA weights (ema_params), of the teacher workdir" in text, text
    assert "writing diffusers transformer" in text and "(teacher)" in text
    ema, raw = ckpt_item(teacher_run, 2, "ema_params"), ckpt_item(teacher_run, 2, "params")
    assert trees_differ(ema, raw)
    model, params = dif.load_transformer(tmp_path / "exported", dtype=None)
    assert not model.flow_map
    assert_trees_equal(params, ema)
    # diffusers loads it as a plain Wan transformer and computes what we compute
    tm = WanTransformer3DModel.from_pretrained(tmp_path / "exported").eval()
    x, t, _, ctx = toy_inputs()
    ours = np.asarray(model.apply({"params": params}, x, t, None, ctx))
    theirs = reference.torch_forward(tm, x, t, ctx)
    assert np.abs(theirs).max() > 1e-2
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    # --raw: the raw trained weights
    code, lines = run(capsys, "--src", teacher_run, "--dst", tmp_path / "raw", "--raw")
    assert code == 0, lines
    assert "exported step 2, raw weights (params)" in "\n".join(lines)
    assert_trees_equal(dif.load_transformer(tmp_path / "raw", dtype=None)[1], raw)


@pytest.mark.slow
def test_workdir_to_orbax_and_newest_intact_step(teacher_run, tmp_path, capsys):
    code, lines = run(capsys, "--src", teacher_run, "--dst", tmp_path / "orbax", "--to", "orbax")
    assert code == 0, lines
    assert "exported step 2, EMA weights (ema_params)" in "\n".join(lines)
    model, params = model_ckpt.load_model(tmp_path / "orbax", dtype=None)
    assert not model.flow_map and model.num_layers == TINY_MODEL["num_layers"]
    assert_trees_equal(params, ckpt_item(teacher_run, 2, "ema_params"))
    code, lines = run(capsys, "--src", teacher_run, "--dst", tmp_path / "orbax_raw", "--to", "orbax", "--raw",
                      "--dtype", "bfloat16")
    assert code == 0, lines
    _, raw16 = model_ckpt.load_model(tmp_path / "orbax_raw", dtype=None)
    want = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(jax.numpy.bfloat16), ckpt_item(teacher_run, 2, "params"))
    assert_trees_equal(raw16, want)
    # a damaged newest step: the EMA weights of the newest intact one (step 1) are exported
    wd = tmp_path / "run"
    shutil.copytree(teacher_run, wd)
    shutil.rmtree(wd / "checkpoints" / "2" / "ema_params")
    code, lines = run(capsys, "--src", wd, "--dst", tmp_path / "from_step1")
    assert code == 0, lines
    assert "exported step 1, EMA weights (ema_params)" in "\n".join(lines)
    assert_trees_equal(dif.load_transformer(tmp_path / "from_step1", dtype=None)[1], ckpt_item(wd, 1, "ema_params"))
    assert sorted(os.listdir(wd / "checkpoints")) == ["1", "2"]  # the reader changed nothing


@pytest.mark.slow
def test_flow_map_workdir_to_diffusers_is_an_anyflow_student(flow_map_run, tmp_path, capsys):
    import torch
    from diffusers import WanTransformer3DModel
    from anyflow_jax.checkpoints.safetensors_io import SafetensorsFile
    code, lines = run(capsys, "--src", flow_map_run, "--dst", tmp_path / "student")
    assert code == 0, lines
    assert "exported step 2, EMA weights (ema_params), of the flow_map workdir" in "\n".join(lines)
    model, params = dif.load_transformer(tmp_path / "student", dtype=None)
    assert model.flow_map
    assert_trees_equal(params, ckpt_item(flow_map_run, 2, "ema_params"))
    # the PyTorch reference of AnyFlow's two-time model, with the exported weights, agrees
    tm = WanTransformer3DModel.from_pretrained(tmp_path / "student").eval()
    tm = reference.add_flow_map_embedder(tm, gate=model.gate_value, deltatime_type=model.deltatime_type)
    f = SafetensorsFile(str(tmp_path / "student" / "diffusion_pytorch_model.safetensors"))
    prefix = "condition_embedder.delta_embedder."
    delta = {k[len(prefix):]: torch.from_numpy(np.array(f.read(k))) for k in f.keys() if k.startswith(prefix)}
    tm.condition_embedder.delta_embedder.load_state_dict(delta)
    x, t, r, ctx = toy_inputs(seed=1)
    ours = np.asarray(model.apply({"params": params}, x, t, r, ctx))
    theirs = reference.torch_forward(tm, x, t, ctx, r=r)
    assert np.abs(theirs).max() > 1e-2
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
