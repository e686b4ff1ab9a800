"""Any-step sampling CLI: ``python -m anyflow_jax.sample --checkpoint DIR --steps 1,2,4 --out DIR``.

  python -m anyflow_jax.sample --checkpoint runs/toy/on_policy --steps 1,2,4,8,16,32 --out samples/anyflow
  python -m anyflow_jax.sample --checkpoint runs/toy/teacher --steps 4,32 --class 0,3,7 --num-samples 2 --out samples/t
  python -m anyflow_jax.sample --checkpoint ckpt/wan13b --kind flow_map --prompt-embedding cat.npy \\
      --negative-embedding neg.npy --video-shape 21,60,104,16 --format npy --steps 1,4 --out samples/cat
  python -m anyflow_jax.sample --checkpoint Wan2.1-T2V-1.3B-Diffusers --prompt "a cat surfing" --steps 1,2,4,8 \\
      --out samples/cat                          # a diffusers pipeline folder: prompt -> UMT5 -> DiT -> VAE -> mp4
  python -m anyflow_jax.sample --checkpoint runs/wan/on_policy --pipeline Wan2.1-T2V-1.3B-Diffusers \\
      --prompts-file prompts.txt --steps 1,4 --out samples/run   # our workdir + a pipeline's encoder and VAE
  python -m anyflow_jax.sample --checkpoint AnyFlow-FAR-Wan2.1-1.3B-Diffusers --prompt "a cat surfing" \\
      --task i2v --image first.png --steps 4 --out samples/i2v   # a FAR model: chunk by chunk, image-to-video

For every (condition, sample index, step count) it writes ``<out>/<cond>_s<i>_steps<n>.<fmt>``
(e.g. ``class3_s0_steps4.mp4``) and a ``contact_sheet.png`` (rows: conditions, first sample;
columns: step counts; each cell a strip of the video's frames). Sample ``i`` starts from the same
noise (a function of ``--seed`` and ``i`` only) for every step count and every condition, so
step counts are directly comparable.

**Text to video** (``--prompt`` / ``--prompts-file``): the checkpoint is a diffusers Wan2.1
pipeline folder (a teacher, or a released AnyFlow bidirectional student), or any other checkpoint
plus ``--pipeline <folder>`` for the UMT5 text encoder, tokenizer and Wan VAE
(``anyflow_jax.text_to_video``). Every prompt (and ``--negative-prompt``, for a teacher's CFG) is
encoded once, the latents ``(1 + (frames-1)/4, height/8, width/8, z)`` are sampled at every step
count, then decoded one video at a time. Files are ``prompt<k>_s<i>_steps<n>.mp4`` at 16 fps
(``--format npy`` adds the normalised latents), ``prompts.json`` maps ``prompt<k>`` to its text,
and the contact sheet shows shrunken frames.

The sampler follows the checkpoint's kind (``anyflow_jax.inference``): ``teacher`` -> Euler ODE
with CFG (guidance 3 by default), ``flow_map`` (AnyFlow stage 1 or 2) -> any-step flow-map jumps
(guidance 1: CFG is distilled in), ``consistency`` -> multistep consistency sampling. All
conditions (and samples) of one step count go through one batched ``Generator.sample`` call
(``--batch-size`` splits it).

**FAR (chunk-causal) checkpoints** sample chunk by chunk with the KV cache
(``anyflow_jax.flow.causal_sampling``), the same number of steps per chunk: ``--task t2v`` (the
default), ``i2v`` with ``--image`` (the first latent frame) or ``v2v`` with ``--video`` (the first
latent frames; their number must end on a chunk boundary of the model's ``chunk_partition``, e.g.
1, 4, 7, ... latent frames = 1, 13, 25, ... pixel frames for the released partition). An image or
video is resized to ``--height``/``--width`` and encoded with the pipeline folder's VAE (text-prompt
mode); a latent ``.npy`` (the model's normalised latent space) works everywhere. The context comes
back unchanged as the first frames of every sample. ``--task``/``--image``/``--video`` with a
bidirectional checkpoint is an error.

Bad input (steps that are not positive integers, a missing or wrong-kind checkpoint, an
unwritable output folder, an unknown class or format, ...) prints one ``error: ...`` line and
exits with status 2 before anything is written; every flag, the output folder included (it is
created with a probe file, then removed again), is checked before a model is loaded. The progress
bar is shown only when stderr is a terminal (``--progress`` / ``--no-progress`` force it on or
off), and absl/Orbax WARNING lines from reading checkpoints are silenced.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Sequence

import numpy as np

from anyflow_jax import cli
from anyflow_jax import video as vid
from anyflow_jax.cli import UsageError

NUM_CLASSES = 10
SHEET_NAME = "contact_sheet.png"
PROMPTS_NAME = "prompts.json"
CAUSAL_TASKS = ("t2v", "i2v", "v2v")


# ------------------------------------------------------------------------------ library
# The sampling library lives in anyflow_jax.inference (re-exported here for existing code).
def __getattr__(name):
    if name in ("initial_noise", "sample_keys", "sample_videos"):
        from anyflow_jax import inference
        return getattr(inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------ parsing
def parse_steps(text: str) -> list[int]:
    return cli.parse_steps(text, "--steps")


def parse_classes(text: str) -> list[int]:
    classes = cli.int_list(text, "--class")
    bad = [c for c in classes if not 0 <= c < NUM_CLASSES]
    if bad:
        raise UsageError(f"--class {bad[0]} is outside 0..{NUM_CLASSES - 1}")
    return classes


def parse_formats(text: str) -> list[str]:
    out = []
    for t in (t.strip().lower() for t in text.split(",")):
        if t not in vid.FORMATS:
            raise UsageError(f"unknown --format {t!r}; expected a comma-separated subset of {','.join(vid.FORMATS)}")
        if t not in out:
            out.append(t)
    return out


def parse_video_shape(text: str) -> tuple[int, int, int, int]:
    shape = [t.strip() for t in text.split(",")]
    if len(shape) != 4 or not all(re.fullmatch(r"\d+", t) for t in shape) or min(int(t) for t in shape) < 1:
        raise UsageError(f"--video-shape must be four positive integers F,H,W,C, got {text!r}")
    return tuple(int(t) for t in shape)


def check_output_dir(out: str) -> None:
    """Fail unless ``out`` is (or can be created as) a writable folder: creates it (and missing
    parents) and a probe file in it, then removes everything it created. ``os.access`` is not
    enough (root passes it everywhere, and it knows nothing of read-only mounts or ``/proc``)."""
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"output folder {out} exists and is not a folder")
    created = cli.missing_dirs(path)
    try:
        if created:
            parent = os.path.dirname(created[-1])
            if os.path.exists(parent) and not os.path.isdir(parent):
                raise UsageError(f"output folder {out} cannot be created: {parent} is a file, not a folder")
            try:
                os.makedirs(path)
            except OSError as e:
                raise UsageError(f"output folder {out} cannot be created: {e.strerror or e}") from None
        probe = os.path.join(path, f".write-probe-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            with open(probe, "x"):
                pass
            os.remove(probe)
        except OSError as e:
            raise UsageError(f"output folder {out} is not writable: {e.strerror or e}") from None
    finally:
        cli.remove_empty_dirs(created)


def check_checkpoint(path: str, kind: str | None = None) -> None:
    """Fail unless ``path`` exists and is a checkpoint of a known kind, and (for a training workdir,
    whose ``run.json`` names its stage) of the expected ``kind``; nothing is loaded."""
    if not os.path.exists(os.path.expanduser(path)):
        raise UsageError(f"--checkpoint {path} does not exist")
    from anyflow_jax.checkpoints import runs as run_files
    from anyflow_jax.errors import RunError
    full = os.path.abspath(os.path.expanduser(path))
    try:
        src_kind = run_files.checkpoint_kind(full)
    except RunError:
        raise UsageError(f"--checkpoint {run_files.not_a_checkpoint(path)}") from None
    if src_kind != "workdir" or kind is None:
        return
    try:
        stage, found = run_files.workdir_sampler(full)
    except (RunError, OSError, ValueError, KeyError) as e:
        raise UsageError(f"--checkpoint {path}: cannot read {run_files.RUN_FILE}: {e}") from None
    from anyflow_jax.stages import kind_matches
    if found is not None and not kind_matches(found, kind):  # the loader raises the same error, after loading
        raise UsageError(f"{full} is a {found} checkpoint (stage {stage}), not {kind}")


def check_writers(formats: Sequence[str]) -> None:
    """Fail unless the writers of ``formats`` are available (mp4 and gif need imageio-ffmpeg's ffmpeg)."""
    image = [f for f in formats if f in vid.IMAGE_FORMATS]
    if not image:
        return
    try:
        import imageio_ffmpeg
        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # ImportError, RuntimeError: no ffmpeg binary
        raise UsageError(f"--format {','.join(image)} needs ffmpeg (the imageio-ffmpeg package): "
                         f"{type(e).__name__}: {e}; use --format npy") from None


def _load_embedding(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} {path} is not a readable .npy file: {e}") from None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating) or min(arr.shape) < 1:
        raise UsageError(f"{what} {path} must be a float array of shape (L, D) or (1, L, D), "
                         f"got {arr.dtype} {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise UsageError(f"{what} {path} has non-finite values")
    return arr.astype(np.float32)


def _condition_name(path: str, taken: set) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(path))[0]).strip("._") or "prompt"
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}_{n}", n + 1
    taken.add(name)
    return name


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m anyflow_jax.sample",
                description="Sample videos from a teacher, AnyFlow flow-map or consistency checkpoint at any "
                            "step counts; writes one file per (condition, sample, step count) and format plus "
                            "a contact sheet comparing the step counts.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="training workdir, Orbax model checkpoint or diffusers transformer folder")
    p.add_argument("--steps", required=True, metavar="N,N,...", help="step counts, e.g. 1,2,4,8,16,32")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--class", dest="classes", metavar="C,C,...",
                      help="digit classes of a moving-digits run (default: all, 0..9)")
    cond.add_argument("--prompt-embedding", action="append", metavar="FILE.npy",
                      help="a text embedding (L, D) or (1, L, D); repeat for several prompts")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a text prompt (repeat for several); needs a Wan2.1 pipeline folder as --checkpoint or "
                        "--pipeline")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="text prompts, one per non-empty line (after the --prompt values)")
    p.add_argument("--negative-prompt", default="", metavar="TEXT",
                   help="negative prompt for classifier-free guidance (default: the empty prompt, as Wan's "
                        "pipeline)")
    p.add_argument("--pipeline", metavar="DIR",
                   help="diffusers Wan2.1 pipeline folder whose text_encoder/, tokenizer/ and vae/ to use "
                        "(default: --checkpoint when it is one)")
    p.add_argument("--height", type=int, default=None, help="video height in pixels for text prompts (default 480)")
    p.add_argument("--width", type=int, default=None, help="video width in pixels for text prompts (default 832)")
    p.add_argument("--frames", type=int, default=None, help="video frames for text prompts, 1 + 4k (default 81)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype of the transformer and the text encoder (default: the checkpoint's, "
                        "float32 for diffusers folders; the VAE decodes in float32)")
    p.add_argument("--negative-embedding", metavar="FILE.npy",
                   help="negative-prompt embedding (L, D) or (1, L, D) for guidance > 1 (default: the one the "
                        "run trained with, when known)")
    p.add_argument("--video-shape", metavar="F,H,W,C", help="video (latent) shape; default: the run's")
    p.add_argument("--num-samples", type=int, default=1, metavar="K", help="samples per condition (default 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--guidance", type=float, default=None, metavar="G",
                   help="CFG scale (default: 3 for a teacher, 1 for flow-map and consistency models)")
    p.add_argument("--kind", choices=("teacher", "flow_map", "consistency"),
                   help="expected checkpoint kind (checked; needed for a consistency model outside a workdir)")
    p.add_argument("--format", default=None, metavar="FMT,...",
                   help="comma-separated subset of mp4,gif,npy (default mp4,gif; mp4 for text prompts)")
    p.add_argument("--scale", type=int, default=None,
                   help="integer nearest-neighbour upscaling (default 8; 1 for text prompts)")
    p.add_argument("--fps", type=float, default=None, help="frames per second (default 8; 16 for text prompts)")
    p.add_argument("--sheet-scale", type=int, default=None, metavar="S",
                   help="upscaling of the contact-sheet frames (default: --scale, at most 4)")
    p.add_argument("--sheet-frames", type=int, default=8, metavar="N",
                   help="at most N evenly spaced frames per contact-sheet cell (default 8)")
    p.add_argument("--batch-size", type=int, default=0, metavar="B",
                   help="videos per model call (default 0: all conditions and samples of a step count at once)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    far = p.add_argument_group("causal (FAR) models", "chunk-by-chunk sampling of a FAR checkpoint (always used for "
                               "one); the context fills the first chunks and comes back unchanged")
    far.add_argument("--task", choices=CAUSAL_TASKS, default=None,
                     help="t2v (no context), i2v (--image: the first latent frame) or v2v (--video: the first "
                          "latent frames, ending on a chunk boundary); default: from --image/--video, else t2v")
    given = far.add_mutually_exclusive_group()
    given.add_argument("--image", metavar="FILE",
                       help="i2v context: an image (resized to --height/--width and encoded with the pipeline "
                            "folder's VAE) or a latent .npy (h, w, z) / (1, h, w, z) in the model's latent space")
    given.add_argument("--video", metavar="FILE",
                       help="v2v context: a video of 1 + 4k frames (all of them used, each resized to "
                            "--height/--width, encoded with the pipeline folder's VAE) or a latent .npy "
                            "(f, h, w, z); its latent frames must end on a chunk boundary")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                     help="always show the progress bar (default: only when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                     help="no progress bar")
    return p


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(os.path.expanduser(args.prompts_file), encoding="utf-8") as fh:
                prompts += [line.strip() for line in fh if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompts-file {args.prompts_file} cannot be read: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        if not prompts:
            raise UsageError(f"--prompts-file {args.prompts_file} has no prompts (one per non-empty line)")
    return prompts


def _json_field(path: str, field: str, what: str) -> int:
    import json
    try:
        with open(path) as fh:
            return int(json.load(fh)[field])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{what} {path} has no readable {field!r}: {type(e).__name__}: {e}") from None


def _validate_text(args, opts) -> None:
    """Text-prompt mode: the prompts, the pipeline folder, the pixel and latent shapes."""
    from anyflow_jax import text_to_video as t2v
    for flag, value in (("--class", args.classes), ("--prompt-embedding", args.prompt_embedding),
                        ("--video-shape", args.video_shape), ("--negative-embedding", args.negative_embedding)):
        if value:
            raise UsageError(f"{flag} cannot be combined with --prompt/--prompts-file" +
                             (" (use --frames, --height, --width)" if flag == "--video-shape" else ""))
    prompts = _read_prompts(args)
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise UsageError(f"--prompt {empty[0] + 1} is empty")
    opts["text_prompts"] = {f"prompt{k}": p for k, p in enumerate(prompts)}
    frames = t2v.DEFAULT_FRAMES if args.frames is None else args.frames
    height = t2v.DEFAULT_HEIGHT if args.height is None else args.height
    width = t2v.DEFAULT_WIDTH if args.width is None else args.width
    if not os.path.exists(os.path.expanduser(args.checkpoint)):
        raise UsageError(f"--checkpoint {args.checkpoint} does not exist")
    try:
        transformer, pipeline = t2v.resolve_checkpoint(args.checkpoint, args.pipeline)
    except t2v.PipelineError as e:
        raise UsageError(str(e)) from None
    z_dim = _json_field(os.path.join(pipeline, "vae", "config.json"), "z_dim", "the VAE config")
    try:
        opts["video_shape"] = t2v.latent_shape(frames, height, width, z_dim=z_dim)
    except ValueError as e:
        raise UsageError(f"--frames/--height/--width: {e}") from None
    opts["text_dim"] = _json_field(os.path.join(pipeline, "text_encoder", "config.json"), "d_model",
                                   "the text encoder config")
    opts["pixels"] = (frames, height, width)
    opts["transformer"], opts["pipeline"] = transformer, pipeline


def _validate(args) -> dict:
    text = bool(args.prompt or args.prompts_file)
    if not text:
        for flag, value in (("--pipeline", args.pipeline), ("--height", args.height), ("--width", args.width),
                            ("--frames", args.frames), ("--negative-prompt", args.negative_prompt)):
            if value:
                raise UsageError(f"{flag} is only used with text prompts (--prompt or --prompts-file)")
    if args.format is None:
        args.format = "mp4" if text else "mp4,gif"
    if args.scale is None:
        args.scale = 1 if text else 8
    if args.fps is None:
        from anyflow_jax.text_to_video import DEFAULT_FPS
        args.fps = float(DEFAULT_FPS) if text else 8.0
    opts = dict(steps=parse_steps(args.steps), formats=parse_formats(args.format), text_prompts=None)
    for name, value, low in (("--num-samples", args.num_samples, 1), ("--scale", args.scale, 1),
                             ("--sheet-frames", args.sheet_frames, 1), ("--batch-size", args.batch_size, 0),
                             ("--sheet-scale", 1 if args.sheet_scale is None else args.sheet_scale, 1),
                             ("--seed", args.seed, 0)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}, got {value}")
    if not math.isfinite(args.fps) or args.fps <= 0:
        raise UsageError(f"--fps must be positive, got {args.fps}")
    if args.guidance is not None and (not math.isfinite(args.guidance) or args.guidance < 1):
        raise UsageError(f"--guidance must be >= 1, got {args.guidance}")
    opts["sheet_scale"] = min(args.scale, 4) if args.sheet_scale is None else args.sheet_scale
    opts["classes"] = parse_classes(args.classes) if args.classes is not None else None
    opts["video_shape"] = parse_video_shape(args.video_shape) if args.video_shape else None
    opts["prompts"] = None
    if args.prompt_embedding:
        taken: set = set()
        opts["prompts"] = {_condition_name(f, taken): _load_embedding(f, "--prompt-embedding")
                           for f in args.prompt_embedding}
    opts["negative"] = _load_embedding(args.negative_embedding, "--negative-embedding") \
        if args.negative_embedding else None
    from anyflow_jax.text_to_video import is_pipeline
    full = os.path.abspath(os.path.expanduser(args.checkpoint))
    opts["transformer"] = os.path.join(full, "transformer") if is_pipeline(full) else args.checkpoint
    if text:
        _validate_text(args, opts)
    _validate_task(args, opts, text)
    check_writers(opts["formats"])
    check_checkpoint(opts["transformer"], args.kind)
    check_output_dir(args.out)
    return opts


def _resolve(gen, args, opts):
    """(conditions, row labels, negative, video shape, guidance) for a loaded generator."""
    from anyflow_jax.inference import default_guidance
    model = gen.model
    adapter = gen.conditioning
    if opts["prompts"] is not None:
        conditions = opts["prompts"]
        labels = list(conditions)
    else:
        if not adapter.names:
            raise UsageError(f"{gen.path}: this run has no named conditions (not a moving-digits run); use "
                             f"--prompt-embedding with --video-shape")
        wanted = [f"class{c}" for c in opts["classes"]] if opts["classes"] is not None else list(adapter.names)
        try:
            conditions = adapter.contexts(wanted)
        except ValueError as e:
            raise UsageError(str(e)) from None
        labels = [adapter.labels.get(n, n) for n in conditions]
    neg = opts["negative"] if opts["negative"] is not None else adapter.negative()
    shapes = {np.asarray(c).shape for c in conditions.values()}
    if len(shapes) > 1:
        raise UsageError(f"the prompt embeddings have different shapes {sorted(shapes)}; they must match to be batched")
    (length, dim), = shapes
    if dim != model.text_dim:
        raise UsageError(f"the prompt embeddings have width {dim}; the model expects text_dim={model.text_dim}")
    if neg is not None:
        neg = np.asarray(neg, np.float32).reshape((1,) + np.asarray(neg).shape[-2:])
        if neg.shape != (1, length, dim):
            raise UsageError(f"the negative embedding has shape {neg.shape[1:]}; the prompts have {(length, dim)} "
                             f"(pass a matching --negative-embedding)")

    if opts["video_shape"] is not None:
        shape = opts["video_shape"]
    else:
        try:
            shape = gen.video_shape()
        except ValueError:
            raise UsageError(f"{gen.path}: the video shape is unknown for this checkpoint; pass --video-shape "
                             f"F,H,W,C") from None
    if shape[3] != model.in_channels:
        raise UsageError(f"--video-shape has {shape[3]} channels; the model expects in_channels={model.in_channels}")
    pt, ph, pw = model.patch_size
    if opts.get("text_prompts") is not None and (shape[0] % pt or shape[1] % ph or shape[2] % pw):
        raise UsageError(f"--frames/--height/--width {'x'.join(map(str, opts['pixels']))} give latents "
                         f"{'x'.join(map(str, shape[:3]))}, not divisible by the model's patch size "
                         f"{tuple(model.patch_size)}: use sides that are multiples of {8 * max(ph, pw)}")
    if shape[0] % pt or shape[1] % ph or shape[2] % pw:
        raise UsageError(f"video shape {shape} is not divisible by the model's patch size {tuple(model.patch_size)} "
                         f"in (F, H, W)")

    guidance = default_guidance(gen.kind) if args.guidance is None else float(args.guidance)
    from anyflow_jax.stages import get_sampler
    if not get_sampler(gen.kind).supports_guidance and guidance != 1.0:
        raise UsageError(f"the {gen.kind} sampler has no classifier-free guidance; use --guidance 1, got {guidance:g}")
    if guidance != 1.0 and neg is None:
        raise UsageError(f"guidance {guidance:g} needs a negative embedding (--negative-embedding FILE.npy) "
                         f"or --guidance 1")
    image_formats = [f for f in opts["formats"] if f in vid.IMAGE_FORMATS]
    if image_formats and shape[3] not in (1, 3) and opts.get("text_prompts") is None:
        raise UsageError(f"--format {','.join(image_formats)} needs 1 or 3 channels, the samples have {shape[3]} "
                         f"(latents need a VAE decoder: sample from text prompts with --prompt and a pipeline "
                         f"folder); use --format npy")
    return conditions, labels, neg, tuple(shape), guidance


# ------------------------------------------------------------------------------ causal (FAR) sampling
def _validate_task(args, opts, text: bool) -> None:
    """``--task`` / ``--image`` / ``--video``: which task, and the context file (a latent ``.npy``
    is read here; an image or a video needs the pipeline folder's VAE, i.e. text-prompt mode)."""
    task = args.task or ("i2v" if args.image else "v2v" if args.video else None)
    opts["task"], opts["context_file"], opts["context_latents"] = task, None, None
    if task is None:
        return
    if task != "i2v" and args.image:
        raise UsageError(f"--image is the context of --task i2v, not {task}")
    if task != "v2v" and args.video:
        raise UsageError(f"--video is the context of --task v2v, not {task}")
    if task == "i2v" and not args.image:
        raise UsageError("--task i2v needs --image FILE (an image, or its latent .npy)")
    if task == "v2v" and not args.video:
        raise UsageError("--task v2v needs --video FILE (a video of 1 + 4k frames, or its latent .npy)")
    if task == "t2v":
        return
    flag, path = ("--image", args.image) if task == "i2v" else ("--video", args.video)
    if not os.path.isfile(os.path.expanduser(path)):
        raise UsageError(f"{flag} {path} does not exist")
    opts["context_file"] = (flag, os.path.expanduser(path))
    if path.lower().endswith(".npy"):
        try:
            arr = np.load(os.path.expanduser(path), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UsageError(f"{flag} {path} is not a readable .npy file: {e}") from None
        want = 3 if task == "i2v" else 4
        if arr.ndim == want + 1 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != want or not np.issubdtype(arr.dtype, np.floating) or min(arr.shape) < 1:
            form = "(h, w, z) or (1, h, w, z)" if task == "i2v" else "(f, h, w, z) or (1, f, h, w, z)"
            raise UsageError(f"{flag} {path} must hold float latents {form}, got {arr.dtype} {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise UsageError(f"{flag} {path} has non-finite values")
        opts["context_latents"] = (arr[None] if task == "i2v" else arr).astype(np.float32)
    elif not text:
        raise UsageError(f"{flag} {path}: an image or video context is encoded with a Wan pipeline's VAE, which "
                         f"needs text prompts (--prompt) with a pipeline folder; otherwise pass its latents as .npy")


def _allowed_context(model, frames: int) -> tuple[int, ...]:
    from anyflow_jax.flow.causal_sampling import chunk_bounds, context_lengths
    bounds = chunk_bounds(model.chunk_partition)
    if frames not in bounds[1:]:
        raise UsageError(f"the video has {frames} latent frames; a FAR model samples whole chunks of chunk_partition="
                         f"{list(model.chunk_partition)}: one of {list(bounds[1:])} latent frames (pixel frames "
                         f"{[1 + 4 * (b - 1) for b in bounds[1:]]})")
    return context_lengths(model.chunk_partition, frames)


def _read_pixels(flag: str, path: str, height: int, width: int, max_frames: int) -> np.ndarray:
    """uint8 ``(P, height, width, 3)``: an image (P = 1) or the frames of a video (at most
    ``max_frames + 1`` read: enough to tell that there are too many)."""
    from anyflow_jax.data import videos as dv
    if flag == "--image":
        from PIL import Image
        try:
            with Image.open(path) as img:
                frame = np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as e:
            raise UsageError(f"--image {path} is not a readable image: {e}") from None
        return dv.resize_frame(frame, height, width)[None]
    import imageio_ffmpeg
    dv._no_fork_hook()
    frames = []
    try:
        gen = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        meta = next(gen)
        w, h = meta["size"]
        for buf in gen:
            frames.append(dv.resize_frame(np.frombuffer(buf, np.uint8).reshape(h, w, 3), height, width))
            if len(frames) > max_frames:
                break
        gen.close()
    except Exception as e:  # noqa: BLE001 - any decoding failure is one error line
        raise UsageError(f"--video {path} is not a readable video: {dv._ffmpeg_message(e)}") from None
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)


def _encode_pixels(pipeline: str, pixels: np.ndarray, log=None) -> np.ndarray:
    """Normalised latents ``(f, h, w, z)`` of uint8 frames ``(P, H, W, 3)`` (posterior mean of the
    pipeline's Wan VAE, as the reference's ``vae_encode``)."""
    import jax
    import jax.numpy as jnp

    from anyflow_jax.checkpoints.vae import load_vae
    from anyflow_jax.models.wan_vae import normalize_latents
    if log:
        log(f"encoding the context with the VAE of {pipeline}")
    try:
        vae, params = load_vae(os.path.join(pipeline, "vae"), dtype=jnp.float32)
    except (ValueError, OSError) as e:
        raise UsageError(f"VAE of {pipeline}: {e}") from None
    x = jnp.asarray(pixels[None].astype(np.float32) / 127.5 - 1.0)  # uint8 -> [-1, 1]
    mean = jax.jit(lambda p, v: vae.apply({"params": p}, v, method=vae.encode))(params, x)
    return np.asarray(normalize_latents(vae, mean)[0], np.float32)


def _context_latents(model, opts, shape, log=None) -> np.ndarray | None:
    """The context latents ``(Fc, h, w, z)`` of ``--image`` / ``--video``, checked against the
    model's chunk partition and the video shape (one error naming the lengths allowed)."""
    allowed = _allowed_context(model, shape[0])
    if opts["context_file"] is None:
        return None
    flag, path = opts["context_file"]
    lat = opts["context_latents"]
    if lat is None:  # pixels: only in text-prompt mode (checked before loading)
        _, height, width = opts["pixels"]
        pixel_counts = [1 + 4 * (k - 1) for k in allowed]
        if flag == "--video" and not pixel_counts:
            raise UsageError(f"--video: a {shape[0]}-latent-frame video has no room for a context")
        pixels = _read_pixels(flag, path, height, width, max(pixel_counts or [1]))
        if flag == "--video" and len(pixels) not in pixel_counts:
            count = f"more than {max(pixel_counts)}" if len(pixels) > max(pixel_counts) else str(len(pixels))
            raise UsageError(f"--video {path} has {count} frames; a context must end "
                             f"on a chunk boundary of chunk_partition={list(model.chunk_partition)}: one of "
                             f"{pixel_counts} frames (latent frames {list(allowed)})")
        lat = _encode_pixels(opts["pipeline"], pixels, log)
    if tuple(lat.shape[1:]) != tuple(shape[1:]):
        raise UsageError(f"{flag} {path}: context latents of shape {tuple(lat.shape[1:])} (h, w, z); the video's "
                         f"latents are {tuple(shape[1:])}")
    if lat.shape[0] not in allowed:
        raise UsageError(f"{flag} {path} has {lat.shape[0]} latent frames; a context must end on a chunk boundary "
                         f"(before the last chunk) of chunk_partition={list(model.chunk_partition)}: one of "
                         f"{list(allowed)} latent frames")
    return lat


def _causal_task(gen, opts, shape, log=None):
    """``(description, context latents or None)`` of a FAR checkpoint's task (``None`` for a
    bidirectional one, which takes no ``--task``). The generator itself samples chunk by chunk
    (its causal sampler); the context latents, the same for every sample, fill the first
    chunks."""
    if not gen.causal:
        if opts["task"] is not None:
            raise UsageError(f"--task/--image/--video need a FAR (chunk-causal) checkpoint; {gen.path} is a "
                             f"bidirectional {gen.kind} model")
        return None
    ctx = _context_latents(gen.model, opts, shape, log)
    n = 0 if ctx is None else len(ctx)
    return (opts["task"] or "t2v") + (f" ({cli.plural(n, 'context latent frame')})" if n else ""), ctx


def _steps_label(s: int) -> str:
    return cli.plural(s, "step")


def _sheet_shrink(frame_hw: tuple[int, int], target: int = 96) -> int:
    """Integer stride that brings the larger side of a frame down to about ``target`` pixels."""
    return max(1, -(-max(frame_hw) // target))


def _write_all(out_dir, videos, conditions, labels, args, opts, shape, kind, decode=None) -> list[str]:
    """Write every file; returns their paths. On failure removes what it wrote.

    ``videos`` are the samples (float videos, or latents when ``decode`` is given); ``decode``
    maps a latent to its uint8 RGB video (the VAE)."""
    written: list[str] = []
    created = cli.missing_dirs(out_dir)
    image_formats = [f for f in opts["formats"] if f in vid.IMAGE_FORMATS]
    drawable = decode is not None or shape[3] in (1, 3)
    sheet_cells: dict = {}
    try:
        os.makedirs(out_dir, exist_ok=True)
        for (name, i, steps), v in videos.items():
            base = os.path.join(out_dir, f"{name}_s{i}_steps{steps}")
            if "npy" in opts["formats"]:
                vid.write_npy(base + ".npy", v)
                written.append(base + ".npy")
            if not drawable or (not image_formats and i != 0):
                continue
            frames = decode(v) if decode is not None else vid.to_uint8(v)
            if image_formats:
                u = vid.upscale(frames, args.scale)
                for fmt, writer in (("mp4", vid.write_mp4), ("gif", vid.write_gif)):
                    if fmt in opts["formats"]:
                        writer(base + "." + fmt, u, fps=args.fps)
                        written.append(base + "." + fmt)
            if i == 0:
                if decode is not None:  # real-size frames: shrink for the sheet
                    k = _sheet_shrink(frames.shape[1:3])
                    sheet_cells[(name, steps)] = frames[:, ::k, ::k]
                else:
                    sheet_cells[(name, steps)] = vid.upscale(frames, opts["sheet_scale"])
        if drawable:
            rows = [(label, [sheet_cells[(n, s)] for s in opts["steps"]]) for n, label in zip(conditions, labels)]
            sheet = vid.contact_sheet(rows, [_steps_label(s) for s in opts["steps"]],
                                      max_frames=args.sheet_frames, corner=kind)
            path = os.path.join(out_dir, SHEET_NAME)
            vid.write_png(path, sheet)
            written.append(path)
        if opts.get("text_prompts"):
            import json
            path = os.path.join(out_dir, PROMPTS_NAME)
            from anyflow_jax.fileio import atomic_write_bytes
            atomic_write_bytes(path, json.dumps(opts["text_prompts"], indent=2, ensure_ascii=False).encode())
            written.append(path)
    except BaseException:
        for p in written:
            if os.path.exists(p):
                os.remove(p)
        cli.remove_empty_dirs(created)
        raise
    return written


def _encode_text(args, opts) -> None:
    """Encode the prompts and the negative prompt once (UMT5); fills ``opts['prompts']`` and
    ``opts['negative']``."""
    from anyflow_jax import text_to_video as t2v
    names, texts = list(opts["text_prompts"]), list(opts["text_prompts"].values())
    try:
        ctx, neg = t2v.encode_prompts(opts["pipeline"], texts, args.negative_prompt, dtype=_dtype(args.dtype),
                                      log=_log(args))
    except (ValueError, OSError) as e:
        raise UsageError(f"text encoder of {opts['pipeline']}: {e}") from None
    if ctx.shape[-1] != opts["text_dim"]:
        raise UsageError(f"the text encoder gives width {ctx.shape[-1]}, its config says d_model={opts['text_dim']}")
    opts["prompts"] = dict(zip(names, ctx))
    opts["negative"] = neg


def _dtype(name):
    if name is None:
        return None
    import jax.numpy as jnp
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _log(args):
    """Stage messages on stderr (also in logs; ``--no-progress`` silences them)."""
    if getattr(args, "progress", None) is False:
        return None
    return lambda m: print(m, file=sys.stderr, flush=True)


def run(args) -> str:
    """Validate, load, sample and write; returns the summary line. Raises UsageError / ValueError."""
    opts = _validate(args)  # every flag is checked before a model is loaded; nothing is left written

    from tqdm import tqdm

    from anyflow_jax import inference
    text = opts["text_prompts"] is not None
    if text:
        _encode_text(args, opts)  # once per prompt, before the transformer takes the memory
    runtime = {"dtype": _dtype(args.dtype)} if args.dtype else None
    log = _log(args) if text else None
    if log:
        log(f"loading the transformer from {opts['transformer']}")
    try:
        gen = inference.load_generator(opts["transformer"], kind=args.kind, model_kwargs=runtime)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    conditions, labels, neg, shape, guidance = _resolve(gen, args, opts)
    if text:
        labels = [opts["text_prompts"][n] for n in conditions]
    task = _causal_task(gen, opts, shape, log=log)  # a FAR checkpoint samples chunk by chunk
    causal = f", causal {task[0]}" if task is not None else ""

    total = len(conditions) * args.num_samples * len(opts["steps"])
    disable = cli.progress_disable(getattr(args, "progress", None))
    with tqdm(total=total, unit="video", desc=f"sampling ({gen.kind})", dynamic_ncols=True, disable=disable) as bar:
        def progress(n, steps):
            bar.set_postfix_str(_steps_label(steps))
            bar.update(n)

        videos = inference.sample_videos(gen, opts["steps"], conditions, num_samples=args.num_samples, seed=args.seed,
                                         guidance=guidance, neg_context=neg, video_shape=shape,
                                         batch_size=args.batch_size or None, progress=progress,
                                         context_latents=task[1] if task is not None else None)
    bad = sum(int(not np.all(np.isfinite(v))) for v in videos.values())
    if bad:
        print(f"warning: {bad} of {len(videos)} samples have non-finite values", file=sys.stderr)

    decode, kind = None, gen.kind
    if text:
        del gen  # the transformer's memory goes to the VAE
        import gc
        gc.collect()
        from anyflow_jax.text_to_video import VideoDecoder
        if log:
            log(f"loading the VAE from {os.path.join(opts['pipeline'], 'vae')}")
        try:
            decoder = VideoDecoder.from_pipeline(opts["pipeline"])
        except (ValueError, OSError) as e:
            raise UsageError(f"VAE of {opts['pipeline']}: {e}") from None
        bar = tqdm(total=len(videos) if "mp4" in opts["formats"] or "gif" in opts["formats"] else
                   len(conditions) * len(opts["steps"]), unit="video", desc="decoding (VAE)", dynamic_ncols=True,
                   disable=disable)

        def decode(z):
            out = decoder(z)
            bar.update(1)
            return out
    out_dir = os.path.abspath(os.path.expanduser(args.out))
    try:
        written = _write_all(out_dir, videos, conditions, labels, args, opts, shape, kind, decode=decode)
    except OSError as e:
        raise UsageError(f"cannot write to {args.out}: {e.strerror or e}") from None
    finally:
        if decode is not None:
            bar.close()
    n_files = sum(not p.endswith((SHEET_NAME, PROMPTS_NAME)) for p in written)
    sheet = f" and {SHEET_NAME}" if any(p.endswith(SHEET_NAME) for p in written) else ""

    n = cli.plural
    what = (f"video {'x'.join(map(str, opts['pixels']))} (latent {'x'.join(map(str, shape))})" if text
            else f"video {'x'.join(map(str, shape))}")
    return (f"wrote {n(n_files, 'file')} ({','.join(opts['formats'])}) for {n(len(conditions), 'condition')} x "
            f"{n(args.num_samples, 'sample')} x steps {','.join(map(str, opts['steps']))}{sheet} to {args.out} "
            f"[{kind}{causal}, guidance {guidance:g}, seed {args.seed}, {what}]")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    cli.quiet_logs()  # no absl/Orbax WARNING lines while reading checkpoints
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        summary = run(args)
    except ValueError as e:  # UsageError, RunError, or e.g. a shape the model rejects: one line, status 2
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    from anyflow_jax.cli import hugepage_malloc
    hugepage_malloc()  # re-executes once with huge-page malloc where that helps (cli.py)
    sys.exit(main())
