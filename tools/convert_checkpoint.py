#!/usr/bin/env python
"""Convert a Wan2.1 / AnyFlow transformer between diffusers format, an Orbax model checkpoint and
a training workdir (export only).

  # diffusers folder (config.json + safetensors) -> Orbax model checkpoint
  python tools/convert_checkpoint.py --src Wan2.1-T2V-1.3B-Diffusers/transformer --dst ckpt/wan13b
  # ... as a new flow-map student (delta embedder copied from the time embedder)
  python tools/convert_checkpoint.py --src .../transformer --dst ckpt/student --flow-map
  # Orbax model checkpoint -> diffusers folder (loadable by WanTransformer3DModel.from_pretrained
  # for teachers; AnyFlow layout for students)
  python tools/convert_checkpoint.py --src ckpt/wan13b --dst exported/transformer
  # training workdir -> diffusers folder (EMA weights of its newest intact checkpoint), or an
  # Orbax model checkpoint with --to orbax; --raw exports the raw trained weights instead
  python tools/convert_checkpoint.py --src runs/toy/on_policy --dst exported/anyflow
  python tools/convert_checkpoint.py --src runs/toy/on_policy --dst ckpt/anyflow --to orbax --raw

The kind of --src is detected from its files: run.json (training workdir), model.json (Orbax
model checkpoint) or config.json (diffusers transformer folder). The default output is diffusers
for a workdir or an Orbax checkpoint, Orbax for a diffusers folder. Tensors keep their stored
dtype (bf16 stays bf16) unless --dtype is given. The destination is written to a temporary
sibling and renamed into place, so a failed conversion leaves nothing behind. An existing
destination is only replaced with --overwrite, and only if it is a diffusers folder or an Orbax
model checkpoint (never a file, a training workdir, another folder, or the source itself). Every
error is one "error: ..." line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

# the files that mark each checkpoint kind (checked in this order, as anyflow_jax.checkpoints.runs does)
KIND_FILES = (("workdir", "run.json", "training workdir"),
              ("model", "model.json", "Orbax model checkpoint"),
              ("diffusers", "config.json", "diffusers transformer folder"))
KIND_NAMES = {kind: name for kind, _, name in KIND_FILES}


class UsageError(ValueError):
    """A problem with the command line or the paths it names (found before anything is read)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one "error:" line (no usage block), exit status 2 from main()
        raise UsageError(f"{message} (see --help)")


def _kind(path: str) -> str | None:
    for kind, marker, _ in KIND_FILES:
        if os.path.isfile(os.path.join(path, marker)):
            return kind
    return None


def _expected() -> str:
    return ", ".join(f"no {marker} ({name})" for _, marker, name in KIND_FILES)


def _check_src(src: str) -> str:
    """The kind of the source; a :class:`UsageError` when it is missing or no checkpoint."""
    if not os.path.lexists(src):
        raise UsageError(f"--src {src} does not exist")
    if not os.path.exists(src):
        raise UsageError(f"--src {src} is a broken symbolic link")
    if not os.path.isdir(src):
        raise UsageError(f"--src {src} is a file, not a checkpoint folder; expected a training workdir, an Orbax "
                         f"model checkpoint or a diffusers transformer folder")
    kind = _kind(src)
    if kind is None:
        raise UsageError(f"--src {src} is not a checkpoint: {_expected()}")
    return kind


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _check_dst(src: str, dst: str, overwrite: bool) -> None:
    """Refuse a destination that is (or contains) the source, or that --overwrite must not replace."""
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src:
        raise UsageError(f"--src and --dst are the same folder ({real_src}); the conversion would replace its "
                         f"own source: choose another --dst")
    if not os.path.lexists(dst):
        return
    if not overwrite:
        raise UsageError(f"--dst {dst} already exists (use --overwrite to replace it)")
    if _inside(real_src, real_dst):
        raise UsageError(f"--dst {dst} contains the source {src}; refusing to replace it")
    if os.path.islink(dst):
        raise UsageError(f"--dst {dst} is a symbolic link (to {real_dst}); refusing to replace it")
    if not os.path.isdir(dst):
        raise UsageError(f"--dst {dst} is a file, not a checkpoint folder; --overwrite only replaces a diffusers "
                         f"transformer folder or an Orbax model checkpoint")
    kind = _kind(dst)
    if kind in ("model", "diffusers") or not os.listdir(dst):
        return  # a checkpoint this tool writes, or an empty folder: nothing else is lost
    what = f"a {KIND_NAMES[kind]}" if kind else "a folder that is no checkpoint (it has files)"
    raise UsageError(f"--dst {dst} is {what}; --overwrite only replaces a diffusers transformer folder or an "
                     f"Orbax model checkpoint")


def main(argv=None) -> int:
    ap = _Parser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="The kind of --src is detected from its files: run.json (training workdir), model.json (Orbax model "
               "checkpoint), config.json (diffusers transformer folder). Errors: one 'error:' line, exit status 2, "
               "nothing written.")
    ap.add_argument("--src", required=True,
                    help="training workdir (run.json), Orbax model checkpoint (model.json) or diffusers transformer "
                         "folder (config.json)")
    ap.add_argument("--dst", required=True, help="destination folder (must not exist unless --overwrite)")
    ap.add_argument("--to", choices=("orbax", "diffusers"), default=None,
                    help="output format (default: diffusers for a workdir or an Orbax checkpoint, orbax for a "
                         "diffusers folder)")
    ap.add_argument("--raw", action="store_true",
                    help="workdir source: export the raw trained weights instead of the EMA weights")
    ap.add_argument("--dtype", choices=("keep", "float32", "bfloat16", "float16"), default="keep",
                    help="parameter dtype of the output (default: keep the stored dtypes)")
    ap.add_argument("--flow-map", action="store_true",
                    help="diffusers -> orbax: build a new flow-map student from a teacher checkpoint")
    ap.add_argument("--gate-value", type=float, default=None, help="gate of a new flow-map student (default 0.25)")
    ap.add_argument("--deltatime-type", choices=("r", "t-r"), default=None)
    ap.add_argument("--no-scan", action="store_true",
                    help="diffusers source: store blocks unstacked (default: stacked for nn.scan)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing destination (only a diffusers folder or an Orbax model checkpoint)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="diffusers output: shard size in GB")
    try:
        args = ap.parse_args(argv)
    except UsageError as e:
        return _error(e)
    args.src, args.dst = os.path.expanduser(args.src), os.path.expanduser(args.dst)

    t0 = time.time()
    try:
        # everything about the command line and the paths is checked before anything is read
        kind = _check_src(args.src)
        _check_dst(args.src, args.dst, args.overwrite)
        if kind != "diffusers":
            for flag, given in (("--flow-map", args.flow_map), ("--gate-value", args.gate_value is not None),
                                ("--deltatime-type", args.deltatime_type is not None), ("--no-scan", args.no_scan)):
                if given:
                    raise UsageError(f"{flag} applies to a diffusers source only; --src {args.src} is a "
                                     f"{KIND_NAMES[kind]}")
        if args.raw and kind != "workdir":
            raise UsageError(f"--raw applies to a training workdir source only; --src {args.src} is a "
                             f"{KIND_NAMES[kind]}")
        if args.max_shard_gb <= 0:
            raise UsageError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
        to = args.to or ("orbax" if kind == "diffusers" else "diffusers")
        code = _convert(args, kind, to)
    except ValueError as e:  # UsageError, RunError, CheckpointError
        return _error(e)
    except OSError as e:  # FileExistsError included
        return _error(e)
    if code == 0:
        print(f"done in {time.time() - t0:.1f}s: {args.dst}", file=sys.stderr)
    return code


def _error(e: BaseException) -> int:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def _convert(args, kind: str, to: str) -> int:
    import jax
    import jax.numpy as jnp

    from anyflow_jax.checkpoints import diffusers as dif
    from anyflow_jax.checkpoints import model as checkpoint
    from anyflow_jax.checkpoints import runs

    dtype = None if args.dtype == "keep" else jnp.dtype(args.dtype)
    exported = ""
    if kind == "workdir":
        meta = runs.read_run_file(args.src) or {}
        item = "params" if args.raw else "ema_params"
        print(f"reading {meta.get('stage', '?')} workdir {args.src} ({item}, newest intact checkpoint)",
              file=sys.stderr)
        model, params, desc = runs.load_start(args.src, runtime=dict(scan_layers=meta.get("scan_layers", True)),
                                              use_ema=not args.raw, field="--src")
        found = re.search(r" step (\d+) \((\w+)\)$", desc)
        step = found.group(1) if found else "?"
        weights = "raw weights (params)" if args.raw else "EMA weights (ema_params)"
        exported = f"step {step}, {weights}, of the {meta.get('stage', '?')} workdir {args.src}"
        if dtype is not None:
            params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    elif kind == "model":
        print(f"reading Orbax model checkpoint {args.src}", file=sys.stderr)
        model, params = checkpoint.load_model(args.src, dtype=dtype)
    else:
        print(f"reading diffusers transformer {args.src}", file=sys.stderr)
        model, params = dif.load_transformer(
            args.src, dtype=dtype, flow_map=True if args.flow_map else None, gate_value=args.gate_value,
            deltatime_type=args.deltatime_type, model_kwargs=dict(scan_layers=not args.no_scan), progress=True)
    what = "flow-map student" if model.flow_map else "teacher"
    if to == "orbax":
        print(f"writing Orbax model checkpoint {args.dst} ({what})", file=sys.stderr)
        checkpoint.save_model(args.dst, model, params, overwrite=args.overwrite)
    else:
        print(f"writing diffusers transformer {args.dst} ({what})", file=sys.stderr)
        dif.save_transformer(args.dst, model, params, overwrite=args.overwrite, progress=True,
                             max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    if exported:
        print(f"exported {exported}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
