"""Text to video through the sampling CLI on a tiny random diffusers-format Wan2.1 pipeline.

The pipeline folder (tiny transformer, Wan VAE, UMT5 encoder and a locally built tokenizer) is
made by ``tests/wan_pipeline_testlib.py``. The CLI's latents are checked against a step-by-step
computation with the PyTorch modules that diffusers loads from the same folder
(``WanPipeline.from_pretrained``: its tokenizer + UMT5 for the prompts, its transformer for the
Euler steps with CFG, its VAE for the pixels), from the same initial noise.
"""
import json
import os
import shutil

import imageio.v3 as iio
import numpy as np
import pytest

from anyflow_jax import sample
from anyflow_jax.inference import initial_noise
from wan_pipeline_testlib import make_tiny_wan_pipeline

FRAMES, HEIGHT, WIDTH = 5, 32, 48  # latents (2, 4, 6, z)
PROMPTS = ["A cat &amp;amp; a dog   play\nin the  snow", "cafÃ© on a rainy street at night"]
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return str(make_tiny_wan_pipeline(str(tmp_path_factory.mktemp("t2v") / "pipe"), seed=0))


def _cli(argv, capsys):
    code = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _shift_grid(n, shift=5.0):
    s = np.linspace(1.0, 0.0, n + 1, dtype=np.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


def _torch_reference(folder, prompts, negative, noise, steps, guidance):
    """Latents and decoded video by the diffusers/transformers modules, step by step."""
    import torch
    from diffusers import WanPipeline
    pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(prompts, negative_prompt=[negative] * len(prompts),
                                      do_classifier_free_guidance=guidance > 1, max_sequence_length=512,
                                      device=torch.device("cpu"))
        z = torch.from_numpy(np.ascontiguousarray(noise)).permute(0, 4, 1, 2, 3)  # (B, C, F, H, W)
        grid = _shift_grid(steps)
        for t, r in zip(grid[:-1], grid[1:]):
            ts = torch.full((z.shape[0],), float(np.float32(t)) * 1000.0)
            v = pipe.transformer(z, ts, pos, return_dict=False)[0]
            if guidance > 1:
                v_u = pipe.transformer(z, ts, neg, return_dict=False)[0]
                v = v_u + guidance * (v - v_u)
            z = z - float(np.float32(t) - np.float32(r)) * v
        cfg = pipe.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        video = pipe.vae.decode(z * std + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
    return z.permute(0, 2, 3, 4, 1).numpy(), video.permute(0, 2, 3, 4, 1).numpy()


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_prompt_to_mp4_matches_diffusers_step_by_step(pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _cli(["--checkpoint", pipeline, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                              "--negative-prompt", NEGATIVE, "--steps", "1,3", "--frames", FRAMES, "--height", HEIGHT,
                              "--width", WIDTH, "--format", "mp4,npy", "--seed", 7, "--guidance", 2.5,
                              "--no-progress", "--out", out], capsys)
    assert code == 0, err
    assert "teacher, guidance 2.5" in stdout and f"video {FRAMES}x{HEIGHT}x{WIDTH}" in stdout
    assert json.loads((out / "prompts.json").read_text()) == {"prompt0": PROMPTS[0], "prompt1": PROMPTS[1]}
    assert (out / "contact_sheet.png").is_file()

    from anyflow_jax.text_to_video import VideoDecoder
    decoder = VideoDecoder.from_pipeline(pipeline)
    z_dim = decoder.z_dim
    shape = (1 + (FRAMES - 1) // 4, HEIGHT // 8, WIDTH // 8, z_dim)
    noise = np.stack([initial_noise(7, 0, shape)] * 2)  # sample 0 of each prompt: the same noise
    for steps in (1, 3):
        ref_z, ref_video = _torch_reference(pipeline, PROMPTS, NEGATIVE, noise, steps, 2.5)
        for k in range(2):
            ours = np.load(out / f"prompt{k}_s0_steps{steps}.npy")
            assert ours.shape == shape
            assert _rel(ours, ref_z[k]) < 1e-4, (steps, k, _rel(ours, ref_z[k]))
            video = decoder.decode(ours)
            assert video.shape == (FRAMES, HEIGHT, WIDTH, 3)
            assert _rel(video, ref_video[k]) < 1e-4
            frames = iio.imread(out / f"prompt{k}_s0_steps{steps}.mp4", plugin="pyav") \
                if _has_pyav() else iio.imread(out / f"prompt{k}_s0_steps{steps}.mp4")
            assert frames.shape[:3] == (FRAMES, HEIGHT, WIDTH)
        # the two prompts differ, so their videos do
        assert _rel(np.load(out / f"prompt0_s0_steps{steps}.npy"), np.load(out / f"prompt1_s0_steps{steps}.npy")) > 1e-3
    meta = iio.immeta(out / "prompt0_s0_steps1.mp4")
    assert abs(float(meta["fps"]) - 16.0) < 1e-6


def _has_pyav():
    try:
        import av  # noqa: F401
        return True
    except ImportError:
        return False


def test_prompts_are_encoded_once_whatever_the_step_counts(pipeline, tmp_path, capsys, monkeypatch):
    from anyflow_jax import text
    calls = []
    original = text.PromptEncoder.__call__

    def counting(self, prompts):
        calls.append(list(prompts))
        return original(self, prompts)
    monkeypatch.setattr(text.PromptEncoder, "__call__", counting)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red fox\n\n  a blue whale  \n")
    code, stdout, err = _cli(["--checkpoint", pipeline, "--prompts-file", prompts_file, "--prompt", "a red fox",
                              "--steps", "1,2,4", "--frames", 1, "--height", 16, "--width", 16, "--guidance", 1,
                              "--format", "npy", "--no-progress", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    # one batch: the two distinct prompts and the negative prompt, each once
    assert sorted(t for c in calls for t in c) == sorted(["a red fox", "a blue whale", ""])
    names = json.loads((tmp_path / "o" / "prompts.json").read_text())
    # --prompt values first, then the file's lines
    assert names == {"prompt0": "a red fox", "prompt1": "a red fox", "prompt2": "a blue whale"}
    # the same prompt from the same noise gives the same latents
    for s in (1, 2, 4):
        np.testing.assert_array_equal(np.load(tmp_path / "o" / f"prompt0_s0_steps{s}.npy"),
                                      np.load(tmp_path / "o" / f"prompt1_s0_steps{s}.npy"))


@pytest.mark.slow
def test_anyflow_student_folder_and_transformer_plus_pipeline(pipeline, tmp_path, capsys):
    """A released-AnyFlow-layout folder (flow-map transformer) samples with guidance 1; a bare
    transformer folder samples with --pipeline for the encoder and VAE."""
    from anyflow_jax.interop.diffusers import load_transformer, save_transformer
    from anyflow_jax.models.wan import make_flow_map_student
    student_dir = tmp_path / "anyflow"
    shutil.copytree(pipeline, student_dir, ignore=shutil.ignore_patterns("transformer"))
    model, params = load_transformer(os.path.join(pipeline, "transformer"))
    student, sparams = make_flow_map_student(model, params)
    save_transformer(student_dir / "transformer", student, sparams)
    common = ["--steps", "2", "--frames", 5, "--height", 16, "--width", 32, "--format", "npy", "--no-progress"]
    code, stdout, err = _cli(["--checkpoint", student_dir, "--prompt", "waves", *common, "--out", tmp_path / "a"],
                             capsys)
    assert code == 0, err
    assert "[flow_map, guidance 1," in stdout
    code, stdout, err = _cli(["--checkpoint", os.path.join(pipeline, "transformer"), "--pipeline", pipeline,
                              "--prompt", "waves", "--guidance", 1, *common, "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    assert "[teacher, guidance 1," in stdout
    a, b = np.load(tmp_path / "a" / "prompt0_s0_steps2.npy"), np.load(tmp_path / "b" / "prompt0_s0_steps2.npy")
    assert a.shape == b.shape == (2, 2, 4, b.shape[-1])
    assert np.all(np.isfinite(a)) and np.abs(a).max() > 0.1


@pytest.mark.parametrize("extra, message", [
    (["--frames", "6"], "1 + 4k"),
    (["--height", "20"], "multiples of 8"),
    (["--height", "24"], "multiples of 16"),
    (["--class", "3"], "--class cannot be combined"),
    (["--video-shape", "2,4,4,4"], "use --frames, --height, --width"),
])
def test_bad_text_flags_one_line_errors(pipeline, tmp_path, capsys, extra, message):
    code, _, err = _cli(["--checkpoint", pipeline, "--prompt", "x", "--steps", "1", *extra, "--no-progress",
                         "--out", tmp_path / "o"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_pipeline_errors(pipeline, tmp_path, capsys):
    transformer = os.path.join(pipeline, "transformer")
    code, _, err = _cli(["--checkpoint", transformer, "--prompt", "x", "--steps", "1", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "text prompts need --pipeline" in err
    broken = tmp_path / "broken"
    shutil.copytree(pipeline, broken, ignore=shutil.ignore_patterns("vae", "tokenizer"))
    code, _, err = _cli(["--checkpoint", transformer, "--pipeline", broken, "--prompt", "x", "--steps", "1",
                         "--out", tmp_path / "o"], capsys)
    assert code == 2 and "tokenizer/, vae/" in err, err
    code, _, err = _cli(["--checkpoint", pipeline, "--pipeline", pipeline, "--steps", "1", "--class", "1",
                         "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--pipeline is only used with text prompts" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    code, _, err = _cli(["--checkpoint", pipeline, "--prompts-file", empty, "--steps", "1", "--out", tmp_path / "o"],
                        capsys)
    assert code == 2 and "has no prompts" in err
    assert not (tmp_path / "o").exists()


def _torch_vae_latents(folder, frames):
    """Normalised posterior-mean latents (f, h, w, z) of uint8 frames (P, H, W, 3) by diffusers'
    AutoencoderKLWan from ``folder``'s vae/."""
    import torch
    from diffusers import AutoencoderKLWan
    vae = AutoencoderKLWan.from_pretrained(os.path.join(folder, "vae"), torch_dtype=torch.float32)
    x = torch.from_numpy(frames.astype(np.float32) / 127.5 - 1.0).permute(3, 0, 1, 2)[None]  # (1, 3, P, H, W)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    m = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    s = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return ((mean - m) / s)[0].permute(1, 2, 3, 0).numpy()


@pytest.mark.slow
def test_far_pixel_context_is_the_vae_encoding_of_the_image_and_video(pipeline, tmp_path, capsys):
    """A FAR (chunk-causal) flow-map checkpoint in a pipeline folder samples image-to-video from a
    png and video-to-video from a 5-frame video: the pipeline's VAE encodes the pixels (the
    diffusers VAE's posterior mean, normalised, recomputed here) and the sample's first latent
    frames are that encoding; a video whose frames do not end on a chunk boundary is one error."""
    import imageio_ffmpeg
    from anyflow_jax.interop.diffusers import load_transformer, save_transformer
    from anyflow_jax.models.far_wan import make_far_model
    from anyflow_jax.models.wan import make_flow_map_student
    far_dir = tmp_path / "far"
    shutil.copytree(pipeline, far_dir, ignore=shutil.ignore_patterns("transformer"))
    model, params = load_transformer(os.path.join(pipeline, "transformer"))
    student, sparams = make_flow_map_student(model, params)
    far_model, far_params = make_far_model(student, sparams, chunk_partition=(1, 1, 1), full_chunk_limit=2,
                                           compressed_patch_size=(1, 4, 4))
    save_transformer(far_dir / "transformer", far_model, far_params)
    rng = np.random.RandomState(3)
    image = tmp_path / "first.png"
    iio.imwrite(image, rng.randint(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    common = ["--checkpoint", far_dir, "--prompt", "waves", "--steps", "2", "--frames", 9, "--height", HEIGHT,
              "--width", WIDTH, "--format", "npy", "--no-progress"]
    code, stdout, err = _cli([*common, "--image", image, "--out", tmp_path / "i2v"], capsys)
    assert code == 0, err
    assert "i2v (1 context latent frame)" in stdout, stdout
    got = np.load(tmp_path / "i2v" / "prompt0_s0_steps2.npy")
    assert got.shape[:3] == (3, HEIGHT // 8, WIDTH // 8)
    want = _torch_vae_latents(far_dir, iio.imread(image)[None])
    assert want.shape == got[:1].shape and np.abs(want).max() > 0.1
    assert _rel(got[:1], want) < 1e-4
    assert np.abs(got[1:] - got[:1]).max() > 0.1  # the generated frames are not the context

    def write_video(path, n):  # a lossless video (png frames), so the decoded pixels are the written ones
        frames = rng.randint(0, 256, (n, HEIGHT, WIDTH, 3), dtype=np.uint8)
        writer = imageio_ffmpeg.write_frames(str(path), (WIDTH, HEIGHT), codec="png", pix_fmt_in="rgb24",
                                             pix_fmt_out="rgb24", macro_block_size=1, output_params=["-an"])
        writer.send(None)
        for f in frames:
            writer.send(np.ascontiguousarray(f))
        writer.close()
        return frames
    frames = write_video(tmp_path / "clip.mov", 5)
    code, stdout, err = _cli([*common, "--video", tmp_path / "clip.mov", "--out", tmp_path / "v2v"], capsys)
    assert code == 0, err
    assert "v2v (2 context latent frames)" in stdout, stdout
    got = np.load(tmp_path / "v2v" / "prompt0_s0_steps2.npy")
    want = _torch_vae_latents(far_dir, frames)
    assert want.shape == got[:2].shape
    assert _rel(got[:2], want) < 1e-4
    for n, said in ((3, "has 3 frames"), (7, "has more than 5 frames")):
        write_video(tmp_path / f"bad{n}.mov", n)
        code, _, err = _cli([*common, "--video", tmp_path / f"bad{n}.mov", "--out", tmp_path / "bad"], capsys)
        assert code == 2 and f"{said}; a context must end on a chunk boundary" in err and "[1, 5]" in err, err
        assert not (tmp_path / "bad").exists()
