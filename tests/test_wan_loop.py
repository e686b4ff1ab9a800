"""The real-data loop on a tiny Wan2.1 pipeline: mp4 files -> prepare -> train (teacher) -> sample.

Videos and captions are generated here; ``python -m anyflow_jax.prepare`` turns them into
ArrayRecord shards with the pipeline's VAE and UMT5; ``python -m anyflow_jax.train`` trains the
pipeline's transformer on them for a few steps with ``configs/wan_t2v.py`` (architecture fields
set to the tiny model's); ``python -m anyflow_jax.sample`` samples the trained workdir from a
text prompt with ``--pipeline`` for the encoder and the VAE.
"""
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from anyflow_jax import prepare, sample
from anyflow_jax.data.records import ArrayRecordLatentSource, resolve_record_paths
from runs_testlib import ROOT, subprocess_env
from wan_pipeline_testlib import TINY_TRANSFORMER, shared_tiny_wan_pipeline

pytestmark = pytest.mark.slow

CAPTIONS = ["A red fox runs across a snowy field.", "Two children fly a kite.", "Waves break on a rocky shore.",
            "A cat sleeps on a sofa.", "Rain falls on a quiet street."]

CONFIG = '''
from anyflow_jax.defaults import wan_config


def get_config():
    c = wan_config("1.3b", "teacher")
    c.model.update(dict(num_attention_heads={heads}, attention_head_dim={head_dim}, ffn_dim={ffn}, num_layers={layers},
                        text_dim={text_dim}, freq_dim={freq}, in_channels={z}, out_channels={z}, dtype="float32",
                        attention_impl="xla", remat_policy="none"))
    c.data.update(dict(paths=[{data!r}], global_batch_size=2, worker_count=0))
    c.train.update(dict(steps=3, checkpoint_every=3, log_every=1, async_checkpointing=False, tensorboard=False))
    c.init.student = {pipe!r}
    # a periodic evaluator at the last step: prompts from a file, latents decoded by the pipeline's VAE
    c.eval.update(dict(every=3, steps=(1, 2), prompts_file={prompts!r}, pipeline={pipe!r}))
    return c
'''


def _video(seed, n, h, w):
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    a, b, c = rng.uniform(40, 215, 3)
    frames = [np.stack([a * yy + 9 * i, b * xx, c * (1 - xx * yy)], -1) for i in range(n)]
    return np.clip(frames, 0, 255).astype(np.uint8)


def test_prepare_train_sample(tmp_path, capsys):
    pipe = shared_tiny_wan_pipeline()
    clips = tmp_path / "clips"
    clips.mkdir()
    with open(clips / "captions.jsonl", "w") as fh:
        for i, caption in enumerate(CAPTIONS):
            iio.imwrite(clips / f"v{i}.mp4", _video(i, 10 + i, 40, 40), fps=16, codec="libx264",
                        macro_block_size=1, ffmpeg_log_level="error")
            fh.write(json.dumps({"video": f"v{i}.mp4", "caption": caption}) + "\n")
        fh.write(json.dumps({"video": "missing.mp4", "caption": "gone"}) + "\n")
    data = tmp_path / "data"
    code = prepare.main(["--pipeline", pipe, "--videos", str(clips), "--out", str(data), "--height", "32",
                         "--width", "32", "--frames", "5", "--samples-per-shard", "2", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    files, negative = resolve_record_paths([str(data)])
    assert len(files) == 3 and negative == str(data / "negative_embedding.npy")
    src = ArrayRecordLatentSource(files, include_caption=True)
    keys = sorted(src[i]["key"] for i in range(len(src)))
    assert keys == [f"v{i}.mp4" for i in range(5)]  # every good input once, the missing one skipped
    assert [json.loads(line)["input"] for line in open(data / "skipped.jsonl")] == ["missing.mp4"]
    z = src[0]["latents"].shape[-1]
    assert src[0]["latents"].shape == (2, 4, 4, z)

    with open(os.path.join(pipe, "text_encoder", "config.json")) as fh:
        text_dim = json.load(fh)["d_model"]
    cfg = tmp_path / "tiny_wan.py"
    cfg.write_text(CONFIG.format(heads=TINY_TRANSFORMER["num_attention_heads"],
                                 head_dim=TINY_TRANSFORMER["attention_head_dim"], ffn=TINY_TRANSFORMER["ffn_dim"],
                                 layers=TINY_TRANSFORMER["num_layers"], freq=TINY_TRANSFORMER["freq_dim"],
                                 text_dim=text_dim, z=z, data=str(data), pipe=pipe,
                                 prompts=str(tmp_path / "prompts.txt")))
    (tmp_path / "prompts.txt").write_text(CAPTIONS[0] + "\n\n" + CAPTIONS[2] + "\n")
    workdir = tmp_path / "teacher"
    res = subprocess.run([sys.executable, "-m", "anyflow_jax.train", "--config", str(cfg), "--workdir", str(workdir)],
                         cwd=ROOT, env=subprocess_env(devices=1), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert os.path.isdir(workdir / "checkpoints" / "3")

    # the negative prompt of the run's negative embedding (what the evaluator's CFG uses; the CLI's
    # default is the empty prompt)
    code = sample.main(["--checkpoint", str(workdir), "--pipeline", pipe, "--prompt", CAPTIONS[0], "--steps", "1,2",
                        "--negative-prompt", prepare.WAN_NEGATIVE_PROMPT,
                        "--frames", "5", "--height", "32", "--width", "32", "--format", "mp4,npy", "--no-progress",
                        "--out", str(tmp_path / "samples")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "[teacher, guidance 3," in out  # the run's sampler and its default CFG with the negative prompt
    ev = workdir / "eval" / "step_00000003"
    assert json.loads((ev / "prompts.json").read_text()) == {"prompt0": CAPTIONS[0], "prompt1": CAPTIONS[2]}
    assert (ev / "contact_sheet.png").exists()
    with np.load(ev / "samples.npz") as saved:
        evaluated = {s: saved[f"steps{s}"] for s in (1, 2)}
    for steps in (1, 2):
        lat = np.load(tmp_path / "samples" / f"prompt0_s0_steps{steps}.npy")
        assert lat.shape == (2, 4, 4, z) and np.all(np.isfinite(lat))
        frames = iio.imread(tmp_path / "samples" / f"prompt0_s0_steps{steps}.mp4")
        assert frames.shape == (5, 32, 32, 3)
        # the evaluator's sample of the same prompt, noise (seed 0, sample 0), EMA weights and CFG;
        # its negative embedding is prepare's file, stored in the records' context dtype (bf16)
        np.testing.assert_allclose(evaluated[steps][0], lat, rtol=0, atol=1e-2)
        assert np.abs(evaluated[steps][1] - lat).max() > 0.05  # another prompt, another video
        assert iio.imread(ev / f"prompt1_s0_steps{steps}.mp4").shape == (5, 32, 32, 3)  # VAE-decoded
