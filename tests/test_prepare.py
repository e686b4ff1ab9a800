"""``python -m anyflow_jax.prepare``: captioned videos -> ArrayRecord training shards.

Tiny mp4 files are written here with imageio (several frame rates, sizes and lengths, a corrupt
file, a caption-less one), next to a captions JSONL / CSV and a webdataset tar. The pipeline is
the tiny random Wan2.1 folder of ``wan_pipeline_testlib`` and the encoders are the real JAX ones
(UMT5 ``PromptEncoder``, Wan VAE); records are checked against a direct VAE encode of the same
clips and a direct ``PromptEncoder`` call. Clips are 5 frames of 32 x 32 (2 latent frames of 4 x 4).
"""
import collections
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import imageio.v2 as iio
import numpy as np
import pytest

from anyflow_jax import prepare as P
from anyflow_jax.data import ArrayRecordLatentSource, read_latent_records
from anyflow_jax.data import videos as V
from runs_testlib import subprocess_env
from wan_pipeline_testlib import shared_tiny_wan_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = ["--height", "32", "--width", "32", "--frames", "5"]
EXACT = ["--latent-dtype", "float32", "--context-dtype", "float32", "--text-dtype", "float32",
         "--vae-dtype", "float32"]


# ------------------------------------------------------------------------------ inputs
def write_video(path, frames, fps):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    iio.mimwrite(path, frames, fps=fps, codec="libx264", quality=9, macro_block_size=1,
                 ffmpeg_log_level="error")


def random_video(seed, n, h, w):
    """Smooth random colour fields (compress well, survive H.264 nearly unchanged)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    frames = []
    for i in range(n):
        a, b, c = rng.uniform(0, 255, 3)
        frames.append(np.stack([a * yy + 40 * i % 255, b * xx, c * (1 - xx * yy)], -1))
    return np.clip(frames, 0, 255).astype(np.uint8)


def index_video(n, h=32, w=48):
    """Frame i is uniformly grey at 6 i (the frame index survives compression)."""
    return np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 6, h * w * 3).reshape(n, h, w, 3)


# name: (frames, fps, height, width); at 16 fps, 5 frames need 0.25 s + one frame
GOOD = {"a.mp4": (12, 24, 40, 56), "sub/b.mp4": (8, 10, 48, 32), "c.mp4": (6, 16, 32, 32),
        "e.mp4": (20, 30, 36, 64), "f.mp4": (9, 12.5, 64, 64)}
CAPTIONS = {"a.mp4": "A red fox runs across a snowy field.", "sub/b.mp4": "Two children fly a kite.",
            "c.mp4": "A cat, a dog; and \"quotes\".", "e.mp4": "Clouds drift over green mountains.",
            "f.mp4": "Fish swim through a coral reef."}


@pytest.fixture(scope="module")
def pipeline():
    return shared_tiny_wan_pipeline()


@pytest.fixture(scope="module")
def encoders(pipeline):
    """The real encoders, one instance for the module (the CLI path is tested separately)."""
    return P.WanEncoders(pipeline, text_dtype="float32", vae_dtype="float32", batch_size=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Five good videos (captions.jsonl, in this order), plus: short.mp4 (3 frames: too short),
    corrupt.mp4 (not a video), nocap.mp4 (in the folder, not in the captions file), empty.mp4
    (empty caption), gone.mp4 (listed, missing) and one line that is not JSON."""
    root = tmp_path_factory.mktemp("videos")
    for i, (name, (n, fps, h, w)) in enumerate(GOOD.items()):
        write_video(str(root / name), random_video(i, n, h, w), fps)
    write_video(str(root / "short.mp4"), random_video(9, 3, 32, 32), 16)
    write_video(str(root / "nocap.mp4"), random_video(8, 8, 32, 32), 16)
    write_video(str(root / "empty.mp4"), random_video(7, 8, 32, 32), 16)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    lines = [{"video": "a.mp4", "caption": CAPTIONS["a.mp4"]}, {"video": "short.mp4", "caption": "too short"},
             {"video": "sub/b.mp4", "caption": CAPTIONS["sub/b.mp4"]}, {"video": "corrupt.mp4", "caption": "bad"},
             {"video": "c.mp4", "caption": CAPTIONS["c.mp4"]}, {"video": "empty.mp4", "caption": ""},
             {"video": "gone.mp4", "caption": "missing"}, {"video": "e.mp4", "caption": [CAPTIONS["e.mp4"], "x"]},
             {"video": "f.mp4", "caption": CAPTIONS["f.mp4"]}]
    with open(root / "captions.jsonl", "w") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
        fh.write("{not json\n")
    return root


EXPECTED_SKIPS = {"short.mp4": "too short", "corrupt.mp4": "unreadable", "empty.mp4": "no caption",
                  "nocap.mp4": "no caption", "gone.mp4": "missing video", "captions.jsonl:10": "bad captions line"}
ORDER = ["a.mp4", "sub/b.mp4", "c.mp4", "e.mp4", "f.mp4"]  # good inputs in captions order


def args_for(pipeline, out, *extra, src=None):
    argv = ["--pipeline", pipeline, "--out", str(out), *CLIP, *EXACT, "--no-progress", *(src or []), *extra]
    return P.build_parser().parse_args(argv)


def keys_of(out):
    """Every stored sample's key (from the done markers), with repetitions."""
    keys = []
    for f in sorted(glob.glob(os.path.join(out, P.PROGRESS_DIR, "*.done.json"))):
        keys += [s["key"] for s in json.load(open(f))["samples"]]
    return keys


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ------------------------------------------------------------------------------ frames
def test_resampling_by_timestamps_and_crop(tmp_path):
    # 30 fps -> 16 fps keeps source frames floor(j * 30 / 16); 10 fps repeats frames
    assert V.source_indices(6, 30, 16).tolist() == [0, 1, 3, 5, 7, 9]
    assert V.source_indices(6, 10, 16).tolist() == [0, 0, 1, 1, 2, 3]
    assert V.source_indices(4, 16, 16).tolist() == [0, 1, 2, 3]
    for fps, n in ((30, 12), (10, 6)):
        path = str(tmp_path / f"idx{fps}.mp4")
        write_video(path, index_video(n), fps)
        clip = V.load_clip(path, fps=16, num_frames=5, height=16, width=16)
        assert clip.shape == (5, 16, 16, 3) and clip.dtype == np.uint8
        got = np.round(clip.reshape(5, -1).mean(1) / 6).astype(int)
        assert got.tolist() == V.source_indices(5, fps, 16).tolist()
    V.load_clip(str(tmp_path / "idx10.mp4"), fps=16, num_frames=10, height=16, width=16)  # needs frames 0..5
    with pytest.raises(V.SkipInput, match="too short") as e:  # 13 frames at 16 fps need source frame 7
        V.load_clip(str(tmp_path / "idx10.mp4"), fps=16, num_frames=13, height=16, width=16)
    assert e.value.reason == V.TOO_SHORT

    # crop keeps the aspect ratio and cuts the centre; stretch keeps everything
    assert V.crop_box(64, 48, 32, 32) == (8.0, 0.0, 56.0, 48.0)
    assert V.crop_box(48, 64, 48, 32) == (0.0, 16.0, 48.0, 48.0)
    assert V.crop_box(64, 48, 32, 32, "stretch") == (0.0, 0.0, 64.0, 48.0)
    frame = np.zeros((40, 80, 3), np.uint8)
    frame[:, 12:68] = 200  # bright beyond the centre square (crop box x 20..60) by the filter support
    assert V.resize_frame(frame, 16, 16).min() == 200
    stretched = V.resize_frame(frame, 16, 16, "stretch")
    assert stretched[:, 0].max() < 5 and stretched[:, 8].min() >= 195


def test_captions_files_and_folder_listing(folder, tmp_path):
    rows, bad = V.read_captions(str(folder / "captions.jsonl"))
    assert [r[1] for r in rows][:3] == ["a.mp4", "short.mp4", "sub/b.mp4"]
    assert [(b[0], b[1]) for b in bad] == [("captions.jsonl:10", "bad captions line")]

    listing = V.list_folder(str(folder), str(folder / "captions.jsonl"))
    assert [i.key for i in listing.inputs] == ["a.mp4", "short.mp4", "sub/b.mp4", "corrupt.mp4", "c.mp4",
                                               "empty.mp4", "e.mp4", "f.mp4"]
    assert listing.inputs[6].caption == CAPTIONS["e.mp4"]          # a list caption: its first element
    assert {k: r for k, r, _ in listing.skipped} == {"captions.jsonl:10": "bad captions line",
                                                     "gone.mp4": "missing video", "nocap.mp4": "no caption"}

    csv_path = tmp_path / "caps.csv"
    csv_path.write_text(' Caption ,extra,VIDEO\n"a, b ""c""\nnext line",1,a.mp4\nx,2,\n\n"dup",3,a.mp4\n',
                        encoding="utf-8")
    rows, bad = V.read_captions(str(csv_path))
    assert rows[0][1:] == ("a.mp4", 'a, b "c"\nnext line')
    assert [b[1] for b in bad] == ["bad captions line"]
    listing = V.list_folder(str(folder), str(csv_path))
    assert [i.key for i in listing.inputs] == ["a.mp4"]
    assert ("a.mp4", "duplicate") in [(k, r) for k, r, _ in listing.skipped]
    (tmp_path / "nohdr.csv").write_text("a.mp4,hello\n")
    with pytest.raises(ValueError, match="header must name the columns video and caption"):
        V.read_captions(str(tmp_path / "nohdr.csv"))


def make_tar(path, folder, entries):
    """entries: key -> (video name in ``folder`` or None, json metadata or None)."""
    members = {}
    for key, (video, meta) in entries.items():
        if video is not None:
            members[f"{key}.mp4"] = (folder / video).read_bytes()
        if meta is not None:
            members[f"{key}.json"] = json.dumps(meta).encode()
    V.write_tar(str(path), members)


def test_webdataset_listing_and_captions(folder, tmp_path):
    make_tar(tmp_path / "s0.tar", folder, {"000": ("a.mp4", {"captions": ["first", "second"]}),
                                           "001": ("c.mp4", {"captions": "whole string"}),
                                           "002": ("c.mp4", None), "003": (None, {"captions": ["x"]}),
                                           "004": ("c.mp4", {"caption": "fallback"}),
                                           "005": ("c.mp4", {"captions": []})})
    listing = V.list_tars([str(tmp_path / "s0.tar")])
    assert [i.key for i in listing.inputs] == ["s0.tar/000", "s0.tar/001", "s0.tar/002", "s0.tar/004", "s0.tar/005"]
    assert [(k, r) for k, r, _ in listing.skipped] == [("s0.tar/003", "missing video")]
    got = {}
    for item in listing.inputs:
        try:
            got[item.key] = item.load_caption()
        except V.SkipInput as e:
            got[item.key] = e.reason
    assert got == {"s0.tar/000": "first", "s0.tar/001": "whole string", "s0.tar/002": "no caption",
                   "s0.tar/004": "fallback", "s0.tar/005": "no caption"}
    np.testing.assert_array_equal(listing.inputs[0].load_clip(fps=16, num_frames=5, height=32, width=32),
                                  V.load_clip(str(folder / "a.mp4"), fps=16, num_frames=5, height=32, width=32))
    assert V.webdataset_key("dir/abc.seg.mp4") == ("dir/abc", "seg.mp4")


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_prepare_cli_end_to_end(pipeline, folder, tmp_path, capsys):
    """The real CLI: records decode, latents equal a direct VAE encode of the same clips, contexts
    equal the PromptEncoder's output, every bad input is skipped with its reason."""
    import jax.numpy as jnp

    from anyflow_jax.checkpoints.vae import load_vae
    from anyflow_jax.models.wan_vae import normalize_latents
    from anyflow_jax.text import PromptEncoder

    out = tmp_path / "out"
    rc = P.main(["--pipeline", pipeline, "--videos", str(folder), "--out", str(out), *CLIP, *EXACT,
                 "--samples-per-shard", "3", "--negative-prompt", "bad quality", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = captured.out.strip()
    assert summary.startswith(f"wrote 5 samples in 3 shards to {out}, skipped 6 (")
    for part in ("2 no caption", "1 too short", "1 unreadable", "1 missing video", "1 bad captions line"):
        assert part in summary
    assert "latents 2x4x4x4 float32, context 512x32 float32" in summary
    assert "this run: 5 written, 3 skipped in its shards;" in summary

    # 8 listed inputs in 3 shards of 3: [a, short, b], [corrupt, c, empty], [e, f]
    files = sorted(glob.glob(str(out / "train-*.array_record")))
    assert [os.path.basename(f) for f in files] == [f"train-0000{i}-of-00003.array_record" for i in range(3)]
    src = ArrayRecordLatentSource(files, include_caption=True)
    assert len(src) == 5 and src.counts == [2, 1, 2]
    samples = read_jsonl(out / P.SAMPLES_FILE)
    assert [s["key"] for s in samples] == ORDER

    vae, params = load_vae(os.path.join(pipeline, "vae"))
    text = PromptEncoder.from_pipeline(pipeline, dtype=jnp.float32)
    emb, lengths = text([CAPTIONS[k] for k in ORDER])
    for i, key in enumerate(ORDER):
        rec = src[i]
        assert rec["caption"] == CAPTIONS[key]
        clip = V.load_clip(str(folder / key), fps=16, num_frames=5, height=32, width=32)
        mean = vae.apply({"params": params}, jnp.asarray(clip[None], jnp.float32) / 127.5 - 1.0, method=vae.encode)
        want = np.asarray(normalize_latents(vae, mean))[0]
        assert rec["latents"].shape == (2, 4, 4, vae.z_dim) and rec["latents"].dtype == np.float32
        np.testing.assert_allclose(rec["latents"], want, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(rec["context"], np.asarray(emb[i]), atol=1e-5, rtol=1e-5)
        assert samples[i]["context_length"] == int(lengths[i])
        assert not np.any(rec["context"][int(lengths[i]):])
    neg = np.load(out / P.NEGATIVE_FILE)
    assert neg.shape == (1, 512, 32) and neg.dtype == np.float32
    np.testing.assert_allclose(neg[0], np.asarray(text(["bad quality"])[0][0]), atol=1e-5)

    skipped = read_jsonl(out / P.SKIPPED_FILE)
    assert {s["input"]: s["reason"] for s in skipped} == EXPECTED_SKIPS
    assert all(s["detail"] for s in skipped)
    manifest = json.load(open(out / P.MANIFEST_FILE))
    assert manifest["num_samples"] == 5 and manifest["files"] == [os.path.basename(f) for f in files]
    assert manifest["skipped"] == dict(collections.Counter(EXPECTED_SKIPS.values()))
    assert manifest["latent_shape"] == [2, 4, 4, 4] and manifest["context_shape"] == [512, 32]

    # the same command again: nothing to redo, same files
    before = {f: os.stat(f).st_mtime_ns for f in files}
    assert P.main(["--pipeline", pipeline, "--videos", str(folder), "--out", str(out), *CLIP, *EXACT,
                   "--samples-per-shard", "3", "--negative-prompt", "bad quality", "--no-progress"]) == 0
    assert "this run: 0 written, 0 skipped in its shards, 3 shards already done" in capsys.readouterr().out
    assert {f: os.stat(f).st_mtime_ns for f in files} == before


def test_tars_batched_bfloat16(pipeline, encoders, folder, tmp_path):
    """Webdataset tars (a folder of them), batch 2 with padding, bfloat16 storage (the defaults)."""
    tars = tmp_path / "tars"
    tars.mkdir()
    make_tar(tars / "s0.tar", folder, {"000": ("a.mp4", {"captions": [CAPTIONS["a.mp4"], "other"]}),
                                       "001": ("corrupt.mp4", {"captions": ["bad"]}),
                                       "002": ("c.mp4", {"captions": CAPTIONS["c.mp4"]})})
    make_tar(tars / "s1.tar", folder, {"000": ("f.mp4", {"captions": [CAPTIONS["f.mp4"]]}),
                                       "001": ("e.mp4", {"url": "no caption here"})})
    out = tmp_path / "out"
    enc2 = P.WanEncoders.__new__(P.WanEncoders)  # the module's encoders, batch 2
    enc2.__dict__.update(encoders.__dict__, batch_size=2)
    argv = ["--pipeline", pipeline, "--tars", str(tars), "--out", str(out), *CLIP, "--batch-size", "2",
            "--samples-per-shard", "3", "--no-progress", "--decode-workers", "0"]
    summary = P.run(P.build_parser().parse_args(argv), encoders=enc2)
    assert summary.startswith(f"wrote 3 samples in 2 shards to {out}, skipped 2 (1 no caption, 1 unreadable;")
    assert "bfloat16" in summary
    recs = read_latent_records(str(out / "train-00000-of-00002.array_record")) + \
        read_latent_records(str(out / "train-00001-of-00002.array_record"))
    keys = [s["key"] for s in read_jsonl(out / P.SAMPLES_FILE)]
    assert keys == ["s0.tar/000", "s0.tar/002", "s1.tar/000"]
    assert [r["caption"] for r in recs] == [CAPTIONS["a.mp4"], CAPTIONS["c.mp4"], CAPTIONS["f.mp4"]]
    clips = np.stack([V.load_clip(str(folder / n), fps=16, num_frames=5, height=32, width=32)
                      for n in ("a.mp4", "c.mp4", "f.mp4")])
    want = encoders.encode_videos(clips)
    emb, _ = encoders.encode_prompts([r["caption"] for r in recs])
    for r, w, e in zip(recs, want, emb):
        assert r["latents"].dtype.name == "bfloat16" and r["context"].dtype.name == "bfloat16"
        np.testing.assert_allclose(r["latents"].astype(np.float32), w, atol=0.02 * np.abs(w).max())
        np.testing.assert_allclose(r["context"].astype(np.float32), e, atol=0.01 * np.abs(e).max())
    assert {s["input"]: s["reason"] for s in read_jsonl(out / P.SKIPPED_FILE)} == {
        "s0.tar/001": "unreadable", "s1.tar/001": "no caption"}


class Stop(Exception):
    pass


def test_stopped_run_resumes_without_loss_or_duplicates(pipeline, encoders, folder, tmp_path):
    out = tmp_path / "out"
    src = ["--videos", str(folder), "--samples-per-shard", "2"]  # 8 inputs -> 4 shards
    args = args_for(pipeline, out, src=src)

    def stop(shard):
        raise Stop(shard)

    with pytest.raises(Stop):
        P.run(args, encoders=encoders, after_shard=stop)
    assert sorted(os.listdir(out / P.PROGRESS_DIR)) == ["train-00000-of-00004.done.json"]
    assert glob.glob(str(out / "train-*")) == [str(out / "train-00000-of-00004.array_record")]
    assert not os.path.exists(out / P.MANIFEST_FILE)
    first = os.stat(out / "train-00000-of-00004.array_record").st_mtime_ns
    # a half-written shard a killed run left behind (never under its final name): removed on resume
    (out / ".train-00001-of-00004.array_record.tmp-deadbeef").write_bytes(b"partial")

    summary = P.run(args, encoders=encoders)
    assert "1 shard already done" in summary and summary.startswith("wrote 5 samples in 4 shards")
    keys = keys_of(out)
    assert sorted(keys) == sorted(ORDER) and len(keys) == len(set(keys))
    assert os.stat(out / "train-00000-of-00004.array_record").st_mtime_ns == first
    assert not glob.glob(str(out / ".*tmp*"))
    files = sorted(glob.glob(str(out / "train-*.array_record")))
    assert len(ArrayRecordLatentSource(files)) == 5

    # resuming with other settings is refused, naming the difference
    with pytest.raises(P.UsageError, match="other settings.*frames: 5 there, 9 now"):
        P.run(args_for(pipeline, out, "--frames", "9", src=src), encoders=encoders)


def test_two_processes_split_the_shards(pipeline, encoders, folder, tmp_path):
    out = tmp_path / "out"
    src = ["--videos", str(folder), "--samples-per-shard", "2", "--process-count", "2"]
    s1 = P.run(args_for(pipeline, out, "--process-index", "1", src=src), encoders=encoders)
    assert s1.startswith("process 1 of 2: 2 shards of 4 done") and "2 shards of other processes not done" in s1
    assert sorted(os.path.basename(f) for f in glob.glob(str(out / P.PROGRESS_DIR / "*"))) == [
        "train-00001-of-00004.done.json", "train-00003-of-00004.done.json"]
    assert not os.path.exists(out / P.MANIFEST_FILE)
    one = keys_of(out)
    s0 = P.run(args_for(pipeline, out, "--process-index", "0", src=src), encoders=encoders)
    assert s0.startswith("wrote 5 samples in 4 shards")   # the last process to finish writes the manifest
    both = keys_of(out)
    zero = [k for k in both if k not in one]
    assert not set(zero) & set(one) and sorted(both) == sorted(ORDER) and len(both) == 5

    single = tmp_path / "single"
    P.run(args_for(pipeline, single, src=src[:-2]), encoders=encoders)
    assert read_jsonl(single / P.SAMPLES_FILE) == read_jsonl(out / P.SAMPLES_FILE)
    assert read_jsonl(single / P.SKIPPED_FILE) == read_jsonl(out / P.SKIPPED_FILE)
    for f in sorted(glob.glob(str(single / "train-*.array_record"))):
        a, b = read_latent_records(f), read_latent_records(str(out / os.path.basename(f)))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x["latents"], y["latents"])
            np.testing.assert_array_equal(x["context"], y["context"])


def test_all_inputs_bad(pipeline, encoders, folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(folder / "corrupt.mp4", bad / "x.mp4")
    shutil.copy(folder / "short.mp4", bad / "y.mp4")
    (bad / "captions.csv").write_text("video,caption\nx.mp4,one\ny.mp4,two\n")
    with pytest.raises(P.NoSamples, match=r"all 2 inputs were skipped \(1 too short, 1 unreadable\)"):
        P.run(args_for(pipeline, tmp_path / "out", src=["--videos", str(bad)]), encoders=encoders)
    assert {s["input"]: s["reason"] for s in read_jsonl(tmp_path / "out" / P.SKIPPED_FILE)} == {
        "x.mp4": "unreadable", "y.mp4": "too short"}


def test_usage_errors_are_one_line(pipeline, folder, tmp_path, capsys):
    base = ["--pipeline", pipeline, "--videos", str(folder), "--out", str(tmp_path / "o")]
    cases = [
        (["--frames", "6"], "--frames must be 1 + 4k"),
        (["--height", "40"], "--height must be a positive multiple of 16"),
        (["--fps", "0"], "--fps must be positive"),
        (["--samples-per-shard", "0"], "--samples-per-shard must be >= 1"),
        (["--process-index", "2", "--process-count", "2"], "--process-index must be below --process-count"),
        (["--tars", str(folder)], "give exactly one of --videos (with captions) or --tars"),
        (["--captions", str(tmp_path / "none.jsonl")], "does not exist"),
    ]
    for extra, message in cases:
        assert P.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (extra, err)
    for argv, message in (
            (["--pipeline", str(tmp_path / "nope"), "--videos", str(folder), "--out", str(tmp_path / "o")],
             "--pipeline {} does not exist".format(tmp_path / "nope")),
            (["--pipeline", str(folder), "--videos", str(folder), "--out", str(tmp_path / "o")],
             "is not a diffusers Wan pipeline folder: no vae/config.json, text_encoder/config.json, tokenizer"),
            (["--pipeline", pipeline, "--videos", str(tmp_path), "--out", str(tmp_path / "o")],
             "has no captions.jsonl or captions.csv"),
            (["--pipeline", pipeline, "--videos", str(folder), "--out", str(folder / "a.mp4")],
             "exists and is not a folder")):
        assert P.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert not os.path.exists(tmp_path / "o")


def test_stopped_by_a_signal_exits_75(pipeline, folder, tmp_path, capsys, monkeypatch):
    def stopped(args, **kw):  # what the SIGTERM handler (or Ctrl-C) raises in the middle of a run
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(P, "run", stopped)
    assert P.main(["--pipeline", pipeline, "--videos", str(folder), "--out", str(tmp_path / "o")]) == 75
    assert capsys.readouterr().err == ("error: stopped by SIGTERM; finished shards are kept, run the same "
                                       "command again to resume\n")


def test_tiny_wan_pipeline_loads_in_diffusers(pipeline):
    import diffusers

    pipe = diffusers.WanPipeline.from_pretrained(pipeline)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "flow_prediction" and pipe.scheduler.config.use_flow_sigmas
    assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model
    assert pipe.transformer.config.in_channels == pipe.transformer.config.out_channels == pipe.vae.config.z_dim
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)


# ------------------------------------------------------------------------------ SIGKILL
@pytest.mark.slow
def test_sigkilled_subprocess_resumes(pipeline, encoders, folder, tmp_path):
    """A real ``python -m anyflow_jax.prepare`` is SIGKILLed in the middle of its second shard
    (its next input is a FIFO nobody writes, so it waits there deterministically): shard 0 is
    done, shard 1 exists only as a temporary file. The rerun redoes shard 1 only."""
    vids = tmp_path / "vids"
    vids.mkdir()
    names = [f"v{i}.mp4" for i in range(6)]
    for i, name in enumerate(names):
        if name != "v3.mp4":
            write_video(str(vids / name), random_video(20 + i, 8, 32, 32), 16)
    os.mkfifo(vids / "v3.mp4")
    (vids / "captions.jsonl").write_text("".join(json.dumps({"video": n, "caption": f"clip {n}"}) + "\n"
                                                 for n in names))
    out = tmp_path / "out"
    argv = ["--pipeline", pipeline, "--videos", str(vids), "--out", str(out), *CLIP, "--samples-per-shard", "2",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "anyflow_jax.prepare", *argv], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    marker = out / P.PROGRESS_DIR / "train-00000-of-00003.done.json"
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate()[0] if proc.poll() is not None else "timed out"
        deadline = time.monotonic() + 60
        while not glob.glob(str(out / ".train-00001-of-00003.array_record.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.05)  # shard 1's first sample is written, the second (the FIFO) blocks
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the ffmpeg it started
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert glob.glob(str(out / ".train-00001-of-00003.array_record.tmp-*"))
    assert sorted(os.path.basename(f) for f in glob.glob(str(out / "train-*"))) == ["train-00000-of-00003.array_record"]
    done0 = os.stat(out / "train-00000-of-00003.array_record").st_mtime_ns

    os.remove(vids / "v3.mp4")
    write_video(str(vids / "v3.mp4"), random_video(23, 8, 32, 32), 16)
    summary = P.run(P.build_parser().parse_args(argv), encoders=encoders)
    assert summary.startswith("wrote 6 samples in 3 shards") and "1 shard already done" in summary
    keys = keys_of(out)
    assert sorted(keys) == names and len(set(keys)) == 6
    assert os.stat(out / "train-00000-of-00003.array_record").st_mtime_ns == done0
    assert not glob.glob(str(out / ".*tmp*"))
    assert len(ArrayRecordLatentSource(sorted(glob.glob(str(out / "train-*.array_record"))))) == 6
