"""The any-step sampling CLI (``python -m anyflow_jax.sample``) and its video writers.

The tiny teacher, flow-map and consistency checkpoints are the session's shared runs (conftest:
the teacher is trained for 40 steps, so the zero-initialised output head has moved and the
samples depend on the step count, the class and the guidance). Videos are read back with
imageio."""
import os
import subprocess
import sys

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax import inference
from anyflow_jax import sample as S
from anyflow_jax import video as V
from anyflow_jax.evaluation.harness import class_table
from anyflow_jax.inference import sample_keys
from runs_testlib import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F, H, W = 4, 16, 16  # tiny video shape (1 channel)


@pytest.fixture(scope="module")
def ckpts(tiny_teacher, tiny_flow_map, tiny_consistency):
    """The session's shared tiny runs (conftest); read only."""
    return {"teacher": tiny_teacher, "flow_map": tiny_flow_map, "consistency": tiny_consistency}


_GENERATORS = {}
_load = inference.load_generator


def load_generator(path, kind=None, **kw):
    """inference.load_generator with one Generator per checkpoint for the whole module, so the
    in-process CLI runs and the direct checks share compiled samplers (test speed only)."""
    key = (os.path.abspath(path), tuple(sorted(kw.items())))
    if key not in _GENERATORS:
        _GENERATORS[key] = _load(path, **kw)
    if kind is not None and kind != _GENERATORS[key].kind:
        return _load(path, kind=kind, **kw)  # the real check (raises)
    return _GENERATORS[key]


@pytest.fixture
def shared(monkeypatch):
    monkeypatch.setattr(inference, "load_generator", load_generator)


def sheet_size(rows, cols, scale, frames=F):
    """The contact-sheet layout, spelled out: 80 px label column, 20 px header, 8 px gaps around
    cells, 2 px between the frames of a strip."""
    cell_w = frames * W * scale + (frames - 1) * 2
    return 80 + 8 + cols * (cell_w + 8), 20 + 8 + rows * (H * scale + 8)


def cell(sheet, row, col, frame, scale, frames=F):
    cell_w = frames * W * scale + (frames - 1) * 2
    x = 80 + 8 + col * (cell_w + 8) + frame * (W * scale + 2)
    y = 20 + 8 + row * (H * scale + 8)
    return sheet[y:y + H * scale, x:x + W * scale]


def expected_gray(video, scale):
    """uint8 (F, H*s, W*s) of a float (F, H, W, 1) video in [-1, 1], computed independently."""
    u = np.clip(np.round((np.asarray(video, np.float64)[..., 0] + 1) * 127.5), 0, 255).astype(np.uint8)
    return u.repeat(scale, axis=1).repeat(scale, axis=2)


def check_outputs(out, ckpt, kind, classes, steps, scale, guidance, sheet_scale=None):
    """Every file is there and readable with the right frame count and size; gif and sheet are
    exact; the npy samples equal the generator run directly from the documented noise."""
    names = {f"class{c}_s0_steps{s}.{ext}" for c in classes for s in steps for ext in ("mp4", "gif", "npy")}
    assert set(os.listdir(out)) == names | {"contact_sheet.png"}
    gen = load_generator(ckpt)
    assert gen.kind == kind
    table, neg = class_table(gen)
    noise = S.initial_noise(0, 0, (F, H, W, 1))
    sheet_scale = sheet_scale or scale
    sheet = iio.imread(os.path.join(out, "contact_sheet.png"))
    assert sheet.shape == sheet_size(len(classes), len(steps), sheet_scale)[::-1] + (3,)
    for s_i, s in enumerate(steps):
        direct = np.asarray(gen.sample(np.stack([noise] * len(classes)), table[list(classes)], s,
                                       guidance=guidance, neg_context=neg,
                                       keys=sample_keys(0, [0] * len(classes))))
        for c_i, c in enumerate(classes):
            base = os.path.join(out, f"class{c}_s0_steps{s}")
            raw = np.load(base + ".npy")
            assert raw.shape == (F, H, W, 1) and raw.dtype == np.float32
            np.testing.assert_allclose(raw, direct[c_i], atol=2e-5)  # same noise for every step count
            want = expected_gray(raw, scale)
            gif = iio.imread(base + ".gif", index=None)
            assert gif.shape == (F, H * scale, W * scale)  # frame count and size
            np.testing.assert_array_equal(gif, want)  # grayscale gif is lossless
            mp4 = iio.imread(base + ".mp4", index=None, plugin="FFMPEG")
            assert mp4.shape == (F, H * scale, W * scale, 3)
            err = np.abs(mp4.astype(np.float32) - want[..., None].astype(np.float32))
            assert err.mean() < 6, err.mean()  # lossy H.264, but the same picture
            small = expected_gray(raw, sheet_scale)
            for k in range(F):
                got = cell(sheet, c_i, s_i, k, sheet_scale)
                np.testing.assert_array_equal(got, np.repeat(small[k][..., None], 3, -1))
    # conditioning and step count reach the sampler
    a = np.load(os.path.join(out, f"class{classes[0]}_s0_steps{steps[0]}.npy"))
    b = np.load(os.path.join(out, f"class{classes[1]}_s0_steps{steps[0]}.npy"))
    c = np.load(os.path.join(out, f"class{classes[0]}_s0_steps{steps[1]}.npy"))
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - c).max() > 1e-3
    return gen, table, neg, noise


# ------------------------------------------------------------------------------ CLI, every kind
@pytest.mark.slow
def test_teacher_cli_uses_the_ode_sampler_with_cfg3(ckpts, shared, tmp_path, capsys):
    out = str(tmp_path / "teacher")
    rc = S.main(["--checkpoint", ckpts["teacher"], "--steps", "1,2", "--class", "2,5", "--format", "mp4,gif,npy",
                 "--scale", "4", "--out", out])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip().splitlines()[-1].startswith("wrote 12 files (mp4,gif,npy) for 2 conditions")
    assert "[teacher, guidance 3," in captured.out
    gen, table, neg, noise = check_outputs(out, ckpts["teacher"], "teacher", (2, 5), (1, 2), 4, guidance=3.0)
    # the default really is CFG 3, not 1
    g1 = np.asarray(gen.sample(noise[None], table[[2]], 1, guidance=1.0))
    assert np.abs(np.load(os.path.join(out, "class2_s0_steps1.npy")) - g1[0]).max() > 1e-3


@pytest.mark.slow
def test_flow_map_cli_and_contact_sheet(ckpts, shared, tmp_path, capsys):
    out = str(tmp_path / "fm")
    rc = S.main(["--checkpoint", ckpts["flow_map"], "--kind", "flow_map", "--steps", "2,1", "--class", "7,0,3",
                 "--format", "gif,npy,mp4", "--scale", "5", "--out", out])
    assert rc == 0, capsys.readouterr().err
    # columns follow the order of --steps, rows the order of --class; the sheet's scale is capped at 4
    check_outputs(out, ckpts["flow_map"], "flow_map", (7, 0, 3), (2, 1), 5, guidance=1.0, sheet_scale=4)


@pytest.mark.slow
def test_consistency_cli_as_a_subprocess(ckpts, tmp_path):
    out = str(tmp_path / "cm")
    env = subprocess_env()  # one device
    proc = subprocess.run([sys.executable, "-m", "anyflow_jax.sample", "--checkpoint", ckpts["consistency"],
                           "--steps", "1,2", "--class", "1,8", "--format", "npy,gif,mp4", "--scale", "2",
                           "--sheet-scale", "1", "--progress", "--out", out],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[consistency, guidance 1," in proc.stdout.strip().splitlines()[-1]
    assert "100%" in proc.stderr  # the progress bar ran to the end
    check_outputs(out, ckpts["consistency"], "consistency", (1, 8), (1, 2), 2, guidance=1.0, sheet_scale=1)


@pytest.mark.slow
def test_seed_repeat_prompt_embedding_and_samples(ckpts, shared, tmp_path, capsys):
    gen = load_generator(ckpts["flow_map"])
    table, _ = class_table(gen)
    emb = tmp_path / "digit4.npy"
    np.save(emb, table[4][None])  # (1, L, D), same as class 4
    a, b, c = (str(tmp_path / n) for n in "abc")
    common = ["--checkpoint", ckpts["flow_map"], "--steps", "2", "--format", "gif,npy", "--num-samples", "2"]
    assert S.main(common + ["--class", "4", "--seed", "1", "--out", a]) == 0
    assert S.main(common + ["--prompt-embedding", str(emb), "--seed", "1", "--out", b]) == 0
    assert S.main(common + ["--class", "4", "--seed", "2", "--out", c]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(a)) == ["class4_s0_steps2.gif", "class4_s0_steps2.npy", "class4_s1_steps2.gif",
                                     "class4_s1_steps2.npy", "contact_sheet.png"]
    assert sorted(os.listdir(b)) == sorted(n.replace("class4", "digit4") for n in os.listdir(a))
    for i in (0, 1):
        for ext in ("npy", "gif"):
            with open(f"{a}/class4_s{i}_steps2.{ext}", "rb") as fa, open(f"{b}/digit4_s{i}_steps2.{ext}", "rb") as fb:
                assert fa.read() == fb.read()  # same seed and condition -> identical files
    s0, s1 = np.load(f"{a}/class4_s0_steps2.npy"), np.load(f"{a}/class4_s1_steps2.npy")
    other = np.load(f"{c}/class4_s0_steps2.npy")
    assert np.abs(s0 - s1).max() > 0.1 and np.abs(s0 - other).max() > 0.1  # per-sample and per-seed noise
    np.testing.assert_array_equal(S.initial_noise(1, 0, (F, H, W, 1)), S.initial_noise(1, 0, (F, H, W, 1)))


# ------------------------------------------------------------------------------ bad input
def _ok(ckpts, tmp_path, **over):
    args = {"--checkpoint": ckpts["flow_map"], "--steps": "1", "--class": "3", "--out": str(tmp_path / "out")}
    args.update(over)
    argv = []
    for k, v in args.items():
        if v is not None:
            argv += [k, v]
    return argv


def _regular_file(tmp_path):
    p = tmp_path / "afile"
    p.write_text("x")
    return str(p)


BAD = [  # (arguments changed from a valid command, expected message)
    (dict(**{"--steps": "4,x"}), "--steps must be integers, got 'x'"),
    (dict(**{"--steps": "0"}), "--steps must be positive"),
    (dict(**{"--steps": "2.5"}), "--steps must be integers, got '2.5'"),
    (dict(**{"--steps": "1,-4"}), "--steps must be positive (>= 1), got -4"),
    (dict(**{"--steps": "1,,2"}), "--steps must be a comma-separated list"),
    (dict(**{"--class": "3,10"}), "--class 10 is outside 0..9"),
    (dict(**{"--class": "-1"}), "--class -1 is outside 0..9"),
    (dict(**{"--format": "mp4,avi"}), "unknown --format 'avi'"),
    (dict(**{"--guidance": "0.5"}), "--guidance must be >= 1"),
    (dict(**{"--scale": "0"}), "--scale must be >= 1"),
    (dict(**{"--checkpoint": "MISSING"}), "does not exist"),
    (dict(**{"--kind": "teacher"}), "is a flow_map checkpoint (stage flow_map), not teacher"),
    (dict(**{"--checkpoint": "TEACHER", "--kind": "flow_map"}),
     "is a teacher checkpoint (stage teacher), not flow_map"),
    (dict(**{"--checkpoint": "CONSISTENCY", "--guidance": "3"}), "consistency sampler has no classifier-free guidance"),
    (dict(**{"--out": "UNDER_FILE"}), "cannot be created"),
    (dict(**{"--out": "FILE"}), "exists and is not a folder"),
    (dict(**{"--class": None, "--prompt-embedding": "WIDE_EMB"}), "the model expects text_dim=32"),
    (dict(**{"--class": None, "--prompt-embedding": "BATCH_EMB"}),
     "must be a float array of shape (L, D) or (1, L, D)"),
    (dict(**{"--video-shape": "4,16,16,3"}), "the model expects in_channels=1"),
    (dict(**{"--steps": None}), "the following arguments are required: --steps"),
]


@pytest.mark.slow  # the shared trained checkpoints (conftest)
@pytest.mark.parametrize("over,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(ckpts, tmp_path, capsys, over, message):
    subs = {"MISSING": str(tmp_path / "nope"), "TEACHER": ckpts["teacher"], "CONSISTENCY": ckpts["consistency"],
            "UNDER_FILE": os.path.join(_regular_file(tmp_path), "out"), "FILE": _regular_file(tmp_path)}
    if "WIDE_EMB" in over.values():
        np.save(tmp_path / "wide.npy", np.zeros((4, 48), np.float32))
        subs["WIDE_EMB"] = str(tmp_path / "wide.npy")
    if "BATCH_EMB" in over.values():
        np.save(tmp_path / "batch.npy", np.zeros((2, 4, 32), np.float32))
        subs["BATCH_EMB"] = str(tmp_path / "batch.npy")
    over = {k: subs.get(v, v) for k, v in over.items()}
    before = sorted(os.listdir(tmp_path))
    rc = S.main(_ok(ckpts, tmp_path, **over))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written (no out folder, no partial files)
    if over.get("--out") == subs["FILE"]:
        assert open(subs["FILE"]).read() == "x"


@pytest.mark.slow
def test_bad_input_leaves_an_existing_output_folder_untouched(ckpts, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    rc = S.main(["--checkpoint", ckpts["teacher"], "--kind", "consistency", "--steps", "1", "--out", str(out)])
    assert rc == 2 and "not consistency" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_bad_input_exit_status_of_the_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "anyflow_jax.sample", "--checkpoint", str(tmp_path), "--steps", "0",
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --steps must be positive (>= 1), got 0 in '0'"]
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------------ sample_videos
class FakeGenerator:
    """Records the calls; the "sample" is noise + steps + the context's first entry."""
    kind = "flow_map"

    def __init__(self):
        self.calls = []

    def video_shape(self):
        return (3, 2, 2, 1)

    def sample(self, noise, context, steps, *, guidance=None, neg_context=None, keys=None):
        noise, context = np.asarray(noise), np.asarray(context)
        self.calls.append(dict(noise=noise, context=context, steps=steps, guidance=guidance, neg=neg_context))
        return noise + steps + context[:, 0, 0][:, None, None, None, None]


def test_sample_videos_batches_per_step_count_with_shared_noise():
    gen = FakeGenerator()
    conds = {"a": np.full((2, 5), 10.0, np.float32), "b": np.full((1, 2, 5), 20.0, np.float32)}
    out = S.sample_videos(gen, [1, 4, 2], conds, num_samples=2, seed=7)
    assert [c["steps"] for c in gen.calls] == [1, 4, 2]  # one batched call per step count
    assert all(c["noise"].shape == (4, 3, 2, 2, 1) for c in gen.calls)
    for c in gen.calls[1:]:
        np.testing.assert_array_equal(c["noise"], gen.calls[0]["noise"])  # the same noise for every step count
    n0, n1 = S.initial_noise(7, 0, (3, 2, 2, 1)), S.initial_noise(7, 1, (3, 2, 2, 1))
    assert np.abs(n0 - n1).max() > 0.1 and np.abs(n0 - S.initial_noise(8, 0, (3, 2, 2, 1))).max() > 0.1
    assert sorted(out) == sorted((n, i, s) for n in "ab" for i in (0, 1) for s in (1, 2, 4))
    for (n, i, s), v in out.items():
        np.testing.assert_allclose(v, (n0 if i == 0 else n1) + s + (10 if n == "a" else 20), rtol=1e-6)
    # chunks of 3, uint8 output, a condition's noise does not depend on the other conditions
    gen2 = FakeGenerator()
    out2 = S.sample_videos(gen2, [3], {"b": conds["b"]}, num_samples=2, seed=7, batch_size=1, output="uint8")
    assert [c["noise"].shape[0] for c in gen2.calls] == [1, 1]
    np.testing.assert_array_equal(out2[("b", 1, 3)], V.to_uint8(n1 + 23))
    with pytest.raises(ValueError, match="steps must be positive"):
        S.sample_videos(gen, [0], conds)


# ------------------------------------------------------------------------------ video writers
def test_to_uint8_and_upscale():
    v = np.array([-1.0, 0.0, 1.0, 2.0, -3.0, 0.5, np.nan], np.float32).reshape(1, 1, 7, 1)
    np.testing.assert_array_equal(V.to_uint8(v).ravel(), [0, 128, 255, 255, 0, 191, 128])
    u = V.upscale(np.arange(4, dtype=np.uint8).reshape(1, 2, 2, 1), 3)
    assert u.shape == (1, 6, 6, 1) and u[0, 5, 5, 0] == 3 and u[0, 2, 3, 0] == 1


def test_gif_keeps_identical_frames_and_odd_sizes(tmp_path):
    static = np.zeros((5, 7, 9, 1), np.uint8)
    static[:, 2:5, 3:6] = 200
    V.write_gif(str(tmp_path / "s.gif"), static)
    back = iio.imread(tmp_path / "s.gif", index=None)
    assert back.shape == (5, 7, 9)  # Pillow's writer would merge these into one frame
    np.testing.assert_array_equal(back, static[..., 0])
    rgb = np.zeros((3, 8, 8, 3), np.uint8)
    rgb[:, :4, :, 0] = 255
    rgb[:, 4:, :, 2] = 255
    V.write_gif(str(tmp_path / "c.gif"), rgb)
    back = iio.imread(tmp_path / "c.gif", index=None)
    assert back.shape[:3] == (3, 8, 8) and np.abs(back[..., :3].astype(int) - rgb).max() <= 8
    V.write_mp4(str(tmp_path / "o.mp4"), static)  # odd size: padded to even for yuv420p
    assert iio.imread(tmp_path / "o.mp4", index=None, plugin="FFMPEG").shape == (5, 8, 10, 3)
    assert sorted(os.listdir(tmp_path)) == ["c.gif", "o.mp4", "s.gif"]  # no temporary files left


def test_frame_indices_of_long_videos():
    assert V.frame_indices(4, 8) == [0, 1, 2, 3]
    assert V.frame_indices(81, 5) == [0, 20, 40, 60, 80]
    assert V.frame_indices(10, 1) == [0]


def test_every_step_count_runs_one_compiled_sampler():
    """``sample_videos`` at 1..32 steps traces and compiles the generator's sampler once, and each
    step count gives the static-step-count sampler's videos."""
    from anyflow_jax.inference import Generator
    from anyflow_jax.models.wan import WanTransformer3D
    from model_testlib import perturbed
    model = WanTransformer3D(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8,
                             freq_dim=16, ffn_dim=16, num_layers=1, rope_max_seq_len=16, flow_map=True)
    gen = Generator(kind="flow_map", stage="flow_map", model=model, params=perturbed(model.init_params(jax.random.key(0))),
                    path="tiny", data={})
    conds = {"a": np.linspace(-1, 1, 3 * 8, dtype=np.float32).reshape(3, 8)}
    steps = [1, 2, 4, 8, 16, 32]
    out = S.sample_videos(gen, steps, conds, num_samples=2, seed=3, video_shape=(2, 4, 4, 4))
    assert gen.traces == 1 and gen._program(1.0)._cache_size() == 1
    noise = jnp.asarray(S.initial_noise(3, np.arange(2), (2, 4, 4, 4)))
    ctx = jnp.asarray(np.stack([conds["a"]] * 2))
    for n in (1, 4):
        want = np.asarray(gen._fn(n, 1.0)(gen.params, noise, ctx, None, S.sample_keys(3, np.arange(2))))
        for i in range(2):
            np.testing.assert_allclose(out[("a", i, n)], want[i], rtol=1e-5, atol=1e-6)
    assert np.abs(out[("a", 0, 1)] - out[("a", 0, 32)]).max() > 1e-3  # the step count is not ignored
