#!/usr/bin/env python
"""Convert a Wan2.1 / AnyFlow transformer between diffusers format and an Orbax checkpoint.

  # diffusers folder (config.json + safetensors) -> Orbax model checkpoint
  python tools/convert_checkpoint.py --src Wan2.1-T2V-1.3B-Diffusers/transformer --dst ckpt/wan13b
  # ... as a new flow-map student (delta embedder copied from the time embedder)
  python tools/convert_checkpoint.py --src .../transformer --dst ckpt/student --flow-map
  # Orbax model checkpoint -> diffusers folder (loadable by WanTransformer3DModel.from_pretrained
  # for teachers; AnyFlow layout for students)
  python tools/convert_checkpoint.py --src ckpt/wan13b --dst exported/transformer

The direction is detected from --src (or set with --to). Tensors keep their stored dtype (bf16
stays bf16) unless --dtype is given. The destination is written to a temporary sibling and
renamed into place, so a failed conversion leaves nothing behind; an existing destination is
only replaced with --overwrite.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="diffusers transformer folder or Orbax model checkpoint")
    ap.add_argument("--dst", required=True, help="destination folder (must not exist unless --overwrite)")
    ap.add_argument("--to", choices=("orbax", "diffusers"), default=None, help="output format (default: the other one)")
    ap.add_argument("--dtype", choices=("keep", "float32", "bfloat16", "float16"), default="keep",
                    help="parameter dtype of the output (default: keep the stored dtypes)")
    ap.add_argument("--flow-map", action="store_true",
                    help="diffusers -> orbax: build a new flow-map student from a teacher checkpoint")
    ap.add_argument("--gate-value", type=float, default=None, help="gate of a new flow-map student (default 0.25)")
    ap.add_argument("--deltatime-type", choices=("r", "t-r"), default=None)
    ap.add_argument("--no-scan", action="store_true", help="store blocks unstacked (default: stacked for nn.scan)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="diffusers output: shard size in GB")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    from anyflow_jax.checkpoints import model as checkpoint
    from anyflow_jax.checkpoints import diffusers as dif

    dtype = None if args.dtype == "keep" else jnp.dtype(args.dtype)
    src_is_orbax = checkpoint.is_model_checkpoint(args.src)
    to = args.to or ("diffusers" if src_is_orbax else "orbax")
    t0 = time.time()
    try:
        if os.path.exists(args.dst) and not args.overwrite:
            raise FileExistsError(f"{args.dst} already exists (use --overwrite to replace it)")
        if src_is_orbax:
            if args.flow_map or args.gate_value is not None or args.deltatime_type:
                raise ValueError("--flow-map/--gate-value/--deltatime-type apply to diffusers sources only")
            print(f"reading Orbax model checkpoint {args.src}", file=sys.stderr)
            model, params = checkpoint.load_model(args.src, dtype=dtype)
        else:
            print(f"reading diffusers transformer {args.src}", file=sys.stderr)
            model, params = dif.load_transformer(
                args.src, dtype=dtype, flow_map=True if args.flow_map else None, gate_value=args.gate_value,
                deltatime_type=args.deltatime_type, model_kwargs=dict(scan_layers=not args.no_scan),
                progress=True)
        kind = "flow-map student" if model.flow_map else "teacher"
        if to == "orbax":
            print(f"writing Orbax model checkpoint {args.dst} ({kind})", file=sys.stderr)
            checkpoint.save_model(args.dst, model, params, overwrite=args.overwrite)
        else:
            print(f"writing diffusers transformer {args.dst} ({kind})", file=sys.stderr)
            dif.save_transformer(args.dst, model, params, overwrite=args.overwrite, progress=True,
                                 max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    except (dif.CheckpointError, FileExistsError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - t0:.1f}s: {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
