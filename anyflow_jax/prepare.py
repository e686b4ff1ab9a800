"""Training data from videos: ``python -m anyflow_jax.prepare --pipeline DIR (--videos DIR | --tars ...) --out DIR``.

  python -m anyflow_jax.prepare --pipeline Wan2.1-T2V-1.3B-Diffusers --videos clips/ \\
      --captions clips/captions.jsonl --out data/latents
  python -m anyflow_jax.prepare --pipeline Wan2.1-T2V-1.3B-Diffusers --tars shards/ --out data/latents \\
      --process-index 3 --process-count 8

Every input video with a caption becomes one training sample: the video is decoded, resampled to
``--fps`` (16), resized and centre-cropped to ``--height x --width`` (480 x 832) and cut to its first
``--frames`` (81) frames; the pipeline's Wan VAE encodes it (posterior mean, normalised with the
VAE's latents_mean/latents_std, channels-last) and its UMT5 text encoder the caption (512 tokens,
zero past the prompt's length). Samples go to ArrayRecord shards
``<out>/train-00000-of-000NN.array_record`` in the format of ``docs/data.md``, which the Wan
configs read (``--config.data.paths``); ``<out>/negative_embedding.npy`` (1, 512, d) is the
negative prompt's embedding (``--config.data.negative_embedding``). ``docs/prepare.md`` has the
details: inputs, shards, resuming, several processes, the files written.

Inputs that cannot become a sample (unreadable, too short, no caption, ...) are skipped, counted
and listed with their reason in ``<out>/skipped.jsonl``; one bad file never stops the run. A run
that is stopped (Ctrl-C, preemption, SIGKILL) continues where it stopped when the same command is
run again: finished shards are kept, unfinished ones are redone from their start.

Bad flags or a missing pipeline folder print one ``error: ...`` line and exit with status 2, before
anything is loaded; a run that produced no sample at all exits with status 1.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import glob
import hashlib
import io
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from anyflow_jax import cli
from anyflow_jax.cli import UsageError

FORMAT = "anyflow-prepare/1"
SETTINGS_FILE = "prepare.json"
MANIFEST_FILE = "manifest.json"  # = data.records.MANIFEST_FILE (read by training)
SKIPPED_FILE = "skipped.jsonl"
SAMPLES_FILE = "samples.jsonl"
NEGATIVE_FILE = "negative_embedding.npy"  # = data.records.NEGATIVE_FILE
PROGRESS_DIR = "progress"
SHARD_PATTERN = "train-{index:05d}-of-{count:05d}.array_record"

#: Wan2.1's standard (Chinese) negative prompt, the one whose UMT5 embedding the reference uses
#: for text dropout and the unconditional branch in training (``wan_negemb_cn.pth``).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，"
    "整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")

DTYPES = ("bfloat16", "float32")
RESIZE_MODES = ("crop", "stretch")


# ------------------------------------------------------------------------------ encoders
class Encoders(Protocol):
    """What ``prepare`` needs from a pipeline's encoders (tests may pass stand-ins to :func:`run`)."""

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings (B, L, D) float32, lengths (B,) int32)``, zeros past each length."""

    def encode_videos(self, videos: np.ndarray) -> np.ndarray:
        """uint8 ``(B, F, H, W, 3)`` -> normalised latents ``(B, 1 + (F - 1) // 4, H / 8, W / 8, z)`` float32."""


class WanEncoders:
    """The Wan pipeline folder's UMT5 text encoder and VAE encoder, in JAX.

    Calls are padded to ``batch_size`` so that each jitted program compiles once.
    """

    def __init__(self, pipeline: str, *, text_dtype: str = "bfloat16", vae_dtype: str = "float32",
                 batch_size: int = 1):
        import jax
        import jax.numpy as jnp

        from anyflow_jax.checkpoints.vae import load_vae
        from anyflow_jax.models.wan_vae import normalize_latents
        from anyflow_jax.text import PromptEncoder

        self.batch_size = int(batch_size)
        self.text = PromptEncoder.from_pipeline(pipeline, dtype=jnp.dtype(text_dtype))
        self.vae, self.vae_params = load_vae(os.path.join(pipeline, "vae"), dtype=jnp.dtype(vae_dtype))
        vae, vdt = self.vae, jnp.dtype(vae_dtype)

        def encode(params, video):
            x = (video.astype(jnp.float32) / 127.5 - 1.0).astype(vdt)  # uint8 -> [-1, 1]
            mean = vae.apply({"params": params}, x, method=vae.encode)
            return normalize_latents(vae, mean.astype(jnp.float32)).astype(jnp.float32)

        self._encode_videos = jax.jit(encode)

    def _padded(self, n: int) -> int:
        return max(self.batch_size, n)

    def encode_prompts(self, prompts):
        prompts = list(prompts)
        n = len(prompts)
        emb, lengths = self.text(prompts + [""] * (self._padded(n) - n))
        return np.asarray(emb, np.float32)[:n], np.asarray(lengths, np.int32)[:n]

    def encode_videos(self, videos):
        videos = np.asarray(videos)
        n = len(videos)
        if n < self._padded(n):
            videos = np.concatenate([videos, np.zeros((self._padded(n) - n,) + videos.shape[1:], videos.dtype)])
        return np.asarray(self._encode_videos(self.vae_params, videos), np.float32)[:n]


# ------------------------------------------------------------------------------ flags
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m anyflow_jax.prepare",
        description="Encode captioned videos with a Wan pipeline's VAE and UMT5 into ArrayRecord training shards.",
        formatter_class=_HelpFormatter)
    p.add_argument("--pipeline", required=True,
                   help="diffusers-format Wan2.1 pipeline folder (vae/, text_encoder/, tokenizer/)")
    src = p.add_argument_group("inputs (one of --videos or --tars)")
    src.add_argument("--videos", help="folder of videos; --captions names their captions")
    src.add_argument("--captions", help="captions file: JSONL {\"video\": relpath, \"caption\": text} or CSV with "
                                        "columns video,caption (default: the one captions.jsonl or captions.csv in "
                                        "--videos)")
    src.add_argument("--tars", nargs="+", metavar="TAR",
                     help="webdataset tar files (<key>.mp4 + <key>.json with 'captions'), or folders of them")
    p.add_argument("--out", required=True, help="output folder (created; a rerun resumes)")
    clip = p.add_argument_group("clips")
    clip.add_argument("--height", type=int, default=480, help="frame height (multiple of 16)")
    clip.add_argument("--width", type=int, default=832, help="frame width (multiple of 16)")
    clip.add_argument("--frames", type=int, default=81, help="frames per clip, 1 + 4k")
    clip.add_argument("--fps", type=float, default=16.0, help="frame rate the videos are resampled to")
    clip.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                      help="crop: keep the aspect ratio and cut the centre; stretch: scale the whole frame (as "
                           "the reference does)")
    enc = p.add_argument_group("encoding")
    enc.add_argument("--negative-prompt", default=None,
                     help="prompt of negative_embedding.npy (default: Wan2.1's standard Chinese negative prompt, "
                          "the one the reference trains with); '' for the empty prompt")
    enc.add_argument("--latent-dtype", choices=DTYPES, default="bfloat16", help="stored latents")
    enc.add_argument("--context-dtype", choices=DTYPES, default="bfloat16", help="stored text embeddings")
    enc.add_argument("--text-dtype", choices=DTYPES, default="bfloat16", help="UMT5 compute dtype")
    enc.add_argument("--vae-dtype", choices=DTYPES, default="float32", help="VAE compute dtype")
    enc.add_argument("--batch-size", type=int, default=1, help="videos per VAE / text-encoder call")
    work = p.add_argument_group("shards and processes")
    work.add_argument("--samples-per-shard", type=int, default=64,
                      help="inputs per shard (a shard holds fewer samples when some of its inputs are skipped)")
    work.add_argument("--process-index", type=int, default=0, help="this process's index; it prepares shards "
                                                                   "i, i + n, i + 2n, ...")
    work.add_argument("--process-count", type=int, default=1, help="number of processes sharing the work")
    work.add_argument("--decode-workers", type=int, default=2,
                      help="threads decoding videos ahead of the encoders (0: decode in the main thread)")
    work.add_argument("--tmp-dir", default=None, help="where tar members are unpacked for decoding "
                                                      "(default: the system's temporary folder)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                     help="always show the progress bar (default: only when stderr is a terminal; otherwise one "
                          "line per finished shard)")
    bar.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                     help="no progress bar and no per-shard lines")
    return p


def _check_pipeline(path: str) -> str:
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise UsageError(f"--pipeline {path} does not exist")
    if not os.path.isdir(full):
        raise UsageError(f"--pipeline {path} is not a folder")
    missing = [sub for sub in ("vae/config.json", "text_encoder/config.json", "tokenizer")
               if not os.path.exists(os.path.join(full, sub))]
    if missing:
        raise UsageError(f"--pipeline {path} is not a diffusers Wan pipeline folder: no {', '.join(missing)}")
    return full


def _find_captions(videos: str) -> str:
    found = [os.path.join(videos, f"captions{ext}") for ext in (".jsonl", ".csv")]
    found = [f for f in found if os.path.isfile(f)]
    if len(found) != 1:
        what = "no captions.jsonl or captions.csv" if not found else "both captions.jsonl and captions.csv"
        raise UsageError(f"--videos {videos} has {what}; name the captions file with --captions")
    return found[0]


def validate(args) -> dict:
    """Check every flag (nothing heavy is imported, nothing is written); returns the options."""
    if (args.frames - 1) % 4 or args.frames < 1:
        raise UsageError(f"--frames must be 1 + 4k (the VAE compresses time by 4), e.g. 81; got {args.frames}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value < 16 or value % 16:
            raise UsageError(f"{flag} must be a positive multiple of 16 (VAE factor 8 x patch 2), got {value}")
    if not math.isfinite(args.fps) or args.fps <= 0:
        raise UsageError(f"--fps must be positive, got {args.fps:g}")
    for flag, value, low in (("--samples-per-shard", args.samples_per_shard, 1), ("--batch-size", args.batch_size, 1),
                             ("--process-count", args.process_count, 1), ("--decode-workers", args.decode_workers, 0),
                             ("--process-index", args.process_index, 0)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.process_index >= args.process_count:
        raise UsageError(f"--process-index must be below --process-count ({args.process_count}), "
                         f"got {args.process_index}")
    if args.negative_prompt is None:
        args.negative_prompt = WAN_NEGATIVE_PROMPT
    opts: dict[str, Any] = {"pipeline": _check_pipeline(args.pipeline)}
    if (args.videos is None) == (args.tars is None):
        raise UsageError("give exactly one of --videos (with captions) or --tars")
    if args.videos is not None:
        if not os.path.isdir(args.videos):
            raise UsageError(f"--videos {args.videos} is not a folder" if os.path.exists(args.videos)
                             else f"--videos {args.videos} does not exist")
        captions = args.captions or _find_captions(args.videos)
        if not os.path.isfile(captions):
            raise UsageError(f"--captions {captions} does not exist")
        if os.path.splitext(captions)[1].lower() not in (".jsonl", ".csv"):
            raise UsageError(f"--captions {captions} must be a .jsonl or .csv file")
        opts.update(source="folder", videos=os.path.abspath(args.videos), captions=os.path.abspath(captions))
    else:
        if args.captions is not None:
            raise UsageError("--captions goes with --videos; tar samples carry their captions in <key>.json")
        from anyflow_jax.data import videos as vids
        try:
            opts.update(source="tars", tars=[os.path.abspath(t) for t in vids.expand_tar_paths(args.tars)])
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.tmp_dir is not None and not os.path.isdir(args.tmp_dir):
        raise UsageError(f"--tmp-dir {args.tmp_dir} is not a folder")
    out = os.path.abspath(os.path.expanduser(args.out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {args.out} cannot be created: {parent} is a file, not a folder")
    opts["out"] = out
    return opts


# ------------------------------------------------------------------------------ plan
def shard_name(index: int, count: int) -> str:
    return SHARD_PATTERN.format(index=index, count=count)


def marker_path(out: str, index: int, count: int) -> str:
    return os.path.join(out, PROGRESS_DIR, shard_name(index, count).replace(".array_record", ".done.json"))


def list_inputs(opts: dict):
    """The inputs in their fixed order (the same in every process) and the listing's skips."""
    from anyflow_jax.data import videos as vids
    try:
        if opts["source"] == "folder":
            return vids.list_folder(opts["videos"], opts["captions"])
        return vids.list_tars(opts["tars"])
    except ValueError as e:
        raise UsageError(str(e)) from None


def settings(args, opts: dict, listing, num_shards: int) -> dict:
    """What a resumed run (or another process) must agree on."""
    h = hashlib.sha256()
    for item in listing.inputs:
        h.update(json.dumps([item.key, item.caption, item.member]).encode("utf-8"))
    return {"format": FORMAT, "source": opts["source"], "frames": args.frames, "height": args.height,
            "width": args.width, "fps": args.fps, "resize": args.resize, "latent_dtype": args.latent_dtype,
            "context_dtype": args.context_dtype, "text_dtype": args.text_dtype, "vae_dtype": args.vae_dtype,
            "negative_prompt": args.negative_prompt, "samples_per_shard": args.samples_per_shard,
            "num_inputs": len(listing.inputs), "inputs_sha256": h.hexdigest(), "num_shards": num_shards}


def _write_json(path: str, obj, *, lines: bool = False) -> None:
    from anyflow_jax.fileio import atomic_write_bytes
    if lines:
        text = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in obj)
    else:
        text = json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def _check_settings(out: str, new: dict) -> None:
    path = os.path.join(out, SETTINGS_FILE)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh)
        except (OSError, ValueError) as e:
            raise UsageError(f"{path} is not readable ({e}); remove it or use a new --out") from None
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            what = "; ".join(f"{k}: {old.get(k)!r} there, {new[k]!r} now" for k in diff[:3])
            if "inputs_sha256" in diff or "num_inputs" in diff:
                what += " (the inputs or their captions changed)"
            raise UsageError(f"--out {out} holds a prepare run with other settings ({what}); rerun with the same "
                             f"flags and inputs to resume, or use a new --out")
        return
    _write_json(path, new)


def _read_marker(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _shard_done(out: str, index: int, count: int) -> dict | None:
    """The shard's done marker, if it is complete (its records file exists when it has samples)."""
    m = _read_marker(marker_path(out, index, count))
    if m is None or m.get("shard") != index:
        return None
    if m.get("file") and not os.path.isfile(os.path.join(out, m["file"])):
        return None
    return m


def _remove_stale_temporaries(out: str, index: int, count: int) -> None:
    """Temporary files a killed run left for this shard (records writer and atomic markers)."""
    name = shard_name(index, count)
    marker = marker_path(out, index, count)
    for pattern in (os.path.join(out, f".{name}.tmp-*"), f"{marker}.tmp-*"):
        for f in glob.glob(glob.escape(os.path.dirname(pattern)) + "/" + os.path.basename(pattern)):
            try:
                os.remove(f)
            except OSError:
                pass


# ------------------------------------------------------------------------------ work
def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``(item, fn(item))`` in order, with ``workers`` threads computing up to 2 x workers ahead."""
    if workers <= 0:
        for x in items:
            yield x, fn(x)
        return
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="prepare-decode")
    finished = False
    try:
        it = iter(items)
        pending = collections.deque((x, pool.submit(fn, x)) for x in itertools.islice(it, 2 * workers))
        while pending:
            x, fut = pending.popleft()
            for nxt in itertools.islice(it, 1):
                pending.append((nxt, pool.submit(fn, nxt)))
            yield x, fut.result()
        finished = True
    finally:
        # stopped early (an error, Ctrl-C): drop the queued decodes, do not wait for running ones
        pool.shutdown(wait=finished, cancel_futures=True)


def _decode(item, clip_kw: dict, tmp_dir: str | None):
    """``(caption, clip, None)`` or ``(None, None, SkipInput)``: never raises for one bad input."""
    from anyflow_jax.data import videos as vids
    try:
        caption = item.load_caption()
        return caption, item.load_clip(tmp_dir, **clip_kw), None
    except vids.SkipInput as e:
        return None, None, e
    except Exception as e:  # noqa: BLE001 - one bad input must never stop the run
        return None, None, vids.SkipInput(vids.UNREADABLE, f"{type(e).__name__}: {e}")


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _write_negative(out: str, encoders: Encoders, prompt: str, context_dtype: str) -> None:
    from anyflow_jax.fileio import atomic_write_bytes
    path = os.path.join(out, NEGATIVE_FILE)
    if os.path.exists(path):
        return
    emb, _ = encoders.encode_prompts([prompt])
    # rounded through the stored context dtype, so the negative matches the positives' precision;
    # stored as float32 (.npy has no bfloat16), shape (1, L, D) as the configs read it
    neg = np.asarray(emb[:1], np.float32).astype(_np_dtype(context_dtype)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, neg, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _merge(out: str, st: dict, listing, count: int) -> dict | None:
    """When every shard is done: write manifest.json, samples.jsonl and skipped.jsonl (the same
    content whichever process writes them) and return the manifest; else None."""
    markers = [_shard_done(out, s, count) for s in range(count)]
    if any(m is None for m in markers):
        return None
    skipped = [{"input": k, "reason": r, "detail": d} for k, r, d in listing.skipped]
    samples, shards = [], []
    for m in markers:
        skipped.extend(m["skipped"])
        if m["file"]:
            shards.append({"file": m["file"], "samples": len(m["samples"])})
            samples.extend({"file": m["file"], "index": i, **s} for i, s in enumerate(m["samples"]))
    reasons = collections.Counter(s["reason"] for s in skipped)
    shapes = next(({"latent_shape": m["latent_shape"], "context_shape": m["context_shape"]}
                   for m in markers if m["file"]), {})
    manifest = {"format": FORMAT, "settings": st, "num_samples": len(samples), "files": [s["file"] for s in shards],
                "shards": shards, "num_skipped": len(skipped), "skipped": dict(sorted(reasons.items())),
                "negative_embedding": NEGATIVE_FILE, **shapes}
    _write_json(os.path.join(out, SAMPLES_FILE), samples, lines=True)
    _write_json(os.path.join(out, SKIPPED_FILE), skipped, lines=True)
    _write_json(os.path.join(out, MANIFEST_FILE), manifest)
    return manifest


def _reasons_text(counter: dict) -> str:
    return ", ".join(f"{n} {r}" for r, n in sorted(counter.items(), key=lambda t: (-t[1], t[0])))


def _fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def run(args, *, encoders: Encoders | None = None, after_shard: Callable[[int], None] | None = None) -> str:
    """Validate, list, encode and write; returns the summary line.

    ``encoders`` replaces the pipeline's (tests); ``after_shard(index)`` is called after each shard
    this process finishes (tests stop a run there to check resuming).
    """
    opts = validate(args)
    out = opts["out"]
    listing = list_inputs(opts)
    n_inputs = len(listing.inputs)
    if n_inputs == 0:
        raise UsageError(f"no usable inputs: {len(listing.skipped)} skipped while listing "
                         f"({_reasons_text(collections.Counter(r for _, r, _ in listing.skipped)) or 'nothing found'})")
    per = args.samples_per_shard
    count = math.ceil(n_inputs / per)
    st = settings(args, opts, listing, count)

    from anyflow_jax.fileio import ensure_writable_dir
    try:
        ensure_writable_dir(out)
        os.makedirs(os.path.join(out, PROGRESS_DIR), exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: {e}") from None
    _check_settings(out, st)

    mine = list(range(args.process_index, count, args.process_count))
    todo = [s for s in mine if _shard_done(out, s, count) is None]
    resumed = len(mine) - len(todo)

    need_negative = not os.path.exists(os.path.join(out, NEGATIVE_FILE))
    if todo or need_negative:
        if encoders is None:
            cli.cpu_flags()
            try:
                encoders = WanEncoders(opts["pipeline"], text_dtype=args.text_dtype, vae_dtype=args.vae_dtype,
                                       batch_size=args.batch_size)
            except (ValueError, OSError, KeyError) as e:
                raise UsageError(f"--pipeline {args.pipeline}: cannot load its encoders: {e}") from None
        if need_negative:
            _write_negative(out, encoders, args.negative_prompt, args.context_dtype)

    from anyflow_jax.data.records import write_latent_records
    clip_kw = dict(fps=args.fps, num_frames=args.frames, height=args.height, width=args.width, resize=args.resize)
    shard_inputs = {s: listing.inputs[s * per:(s + 1) * per] for s in todo}
    work = [(s, item) for s in todo for item in shard_inputs[s]]
    lat_dtype, ctx_dtype = _np_dtype(args.latent_dtype), _np_dtype(args.context_dtype)

    from tqdm import tqdm
    show = args.progress
    shard_lines = show is None and not sys.stderr.isatty()
    written_now = skipped_now = videos_done = 0
    reasons_now: collections.Counter = collections.Counter()
    start = time.monotonic()
    with tqdm(total=len(work), unit="video", desc="prepare", dynamic_ncols=True,
              disable=True if not work else cli.progress_disable(show)) as bar:
        stream = _ordered_map(lambda si: _decode(si[1], clip_kw, args.tmp_dir), work, args.decode_workers)
        for s in todo:
            _remove_stale_temporaries(out, s, count)
            name = shard_name(s, count)
            kept: list[dict] = []
            skipped: list[dict] = []
            shapes: dict = {}

            def samples() -> Iterator[dict]:
                nonlocal videos_done
                batch: list = []

                def flush():
                    emb, lengths = encoders.encode_prompts([c for _, c, _ in batch])
                    lat = encoders.encode_videos(np.stack([v for _, _, v in batch]))
                    for i, (item, caption, _) in enumerate(batch):
                        n = int(lengths[i])
                        kept.append({"key": item.key, "caption": caption, "context_length": n})
                        sample = {"latents": lat[i].astype(lat_dtype), "context": emb[i].astype(ctx_dtype),
                                  "caption": caption, "key": item.key, "context_length": int(n)}
                        shapes.setdefault("latent_shape", list(sample["latents"].shape))
                        shapes.setdefault("context_shape", list(sample["context"].shape))
                        yield sample
                    batch.clear()

                for (_, item), (caption, clip, err) in itertools.islice(stream, len(shard_inputs[s])):
                    if err is not None:
                        skipped.append({"input": item.key, "reason": err.reason, "detail": err.detail})
                        reasons_now[err.reason] += 1
                    else:
                        batch.append((item, caption, clip))
                        if len(batch) == args.batch_size:
                            yield from flush()
                    videos_done += 1
                    bar.update(1)
                    bar.set_postfix_str(f"shard {s}, {sum(reasons_now.values())} skipped", refresh=False)
                if batch:
                    yield from flush()

            gen = samples()
            first = next(gen, None)
            if first is not None:
                write_latent_records(os.path.join(out, name), itertools.chain([first], gen))
            marker = {"shard": s, "file": name if kept else None, "samples": kept, "skipped": skipped,
                      "num_inputs": len(shard_inputs[s]), **shapes}
            _write_json(marker_path(out, s, count), marker)
            written_now += len(kept)
            skipped_now += len(skipped)
            if shard_lines:
                done = videos_done
                rate = done / max(time.monotonic() - start, 1e-9)
                eta = (len(work) - done) / rate if rate > 0 else float("nan")
                print(f"{name} done: {cli.plural(len(kept), 'sample')}, {len(skipped)} skipped "
                      f"({done}/{len(work)} videos, {rate:.2f} videos/s, ETA {_fmt_eta(eta)})", file=sys.stderr,
                      flush=True)
            if after_shard is not None:
                after_shard(s)

    manifest = _merge(out, st, listing, count)
    n = cli.plural
    this_run = f"this run: {written_now} written, {skipped_now} skipped in its shards"
    if resumed:
        this_run += f", {n(resumed, 'shard')} already done"
    if manifest is None:
        pending = sum(_shard_done(out, s, count) is None for s in range(count))
        return (f"process {args.process_index} of {args.process_count}: {n(len(mine), 'shard')} of {count} done "
                f"in {args.out} ({this_run}); {n(pending, 'shard')} of other processes not done yet")
    total, nskip = manifest["num_samples"], manifest["num_skipped"]
    if total == 0:
        raise NoSamples(f"no sample could be prepared: all {nskip} inputs were skipped "
                        f"({_reasons_text(manifest['skipped'])}); see {os.path.join(args.out, SKIPPED_FILE)}")
    skip = (f"skipped {nskip} ({_reasons_text(manifest['skipped'])}; see {os.path.join(args.out, SKIPPED_FILE)})"
            if nskip else "skipped 0")
    lat = "x".join(map(str, manifest.get("latent_shape", [])))
    ctx = "x".join(map(str, manifest.get("context_shape", [])))
    return (f"wrote {n(total, 'sample')} in {n(len(manifest['files']), 'shard')} to {args.out}, {skip} "
            f"[{this_run}; clips {args.frames}x{args.height}x{args.width} at {args.fps:g} fps -> latents {lat} "
            f"{args.latent_dtype}, context {ctx} {args.context_dtype}]")


class NoSamples(RuntimeError):
    """Every input was skipped."""


def _stop_on_sigterm() -> None:
    """SIGTERM (preemption) stops the run like Ctrl-C: the shard in progress is dropped (its
    temporary file removed), finished shards stay."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input, 1 no sample prepared, 75 stopped
    by SIGINT/SIGTERM: run the same command again to resume)."""
    from anyflow_jax.errors import EXIT_PREEMPTED
    cli.quiet_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:  # a real command line, not a call from Python
        _stop_on_sigterm()
    try:
        summary = run(args)
    except KeyboardInterrupt as e:
        what = str(e) or "SIGINT"
        print(f"error: stopped by {what}; finished shards are kept, run the same command again to resume",
              file=sys.stderr)
        return EXIT_PREEMPTED
    except UsageError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except NoSamples as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    from anyflow_jax.cli import hugepage_malloc
    hugepage_malloc()  # re-executes once with huge-page malloc where that helps (cli.py)
    sys.exit(main())
