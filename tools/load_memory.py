"""Peak host memory of loading a multi-GB diffusers transformer onto 8 fake CPU devices:
the streaming sharded load (``load_transformer(..., mesh=...)``) against the host load followed by
``jax.device_put`` onto the same shardings.

A random checkpoint with the Wan2.1 1.3B widths (12 heads x 128, ffn 8960, text 4096, 30 layers;
bf16, about 2.8 GB, written as an index with shards like the released checkpoints) is written to a
temporary folder; each load then runs in a fresh subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` on a (data=1, fsdp=4, tensor=2) mesh.

Fake CPU devices live in host memory, so the loaded parameters themselves are resident in the
process (the bytes of every device's shards; replicated parameters count once per device). What
the table calls the loader's *overhead* is ``peak RSS - RSS before the load - resident params``:
the host memory the loader needed beyond its result. A loader that makes a full extra host copy
of the model shows an overhead of about the checkpoint size S or more.

Usage::

    python tools/load_memory.py                  # writes the table into docs/benchmarks.md
    python tools/load_memory.py --layers 4 --no-doc --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_PATH = os.path.join(ROOT, "docs", "benchmarks.md")
SECTION = "## Streaming checkpoint loads (CPU, 8 fake devices)"
WAN13B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096, freq_dim=256,
              in_channels=16, out_channels=16, patch_size=(1, 2, 2))
MODES = ("streaming", "host")


class _RandomTensor:
    """Random finite bf16 values of one tensor, made only when written."""

    def __init__(self, shape, seed):
        import ml_dtypes
        import numpy as np
        self.shape, self.seed, self.dtype = tuple(shape), seed, np.dtype(ml_dtypes.bfloat16)

    def __array__(self, dtype=None, copy=None):
        import numpy as np
        bits = np.random.default_rng(self.seed).integers(0, 1 << 16, size=self.shape, dtype=np.uint16)
        bits &= 0xBFFF  # top exponent bit cleared: |x| < 2, never inf or NaN
        return bits.view(self.dtype)


def write_checkpoint(path: str, layers: int, shard_gb: float) -> int:
    """A random diffusers transformer folder at ``path``; returns the bytes of its weights."""
    from anyflow_jax.checkpoints import diffusers as dif
    from anyflow_jax.checkpoints.safetensors_io import write_safetensors
    from anyflow_jax.models.wan import WanTransformer3D
    model = WanTransformer3D(**WAN13B, num_layers=layers)
    shapes = dif._expected_shapes(model)
    os.makedirs(path)
    with open(os.path.join(path, dif.CONFIG_NAME), "w") as fh:
        json.dump(model.to_config(), fh, indent=2)
    tensors = [(name, _RandomTensor(shape, i)) for i, (name, shape) in enumerate(sorted(shapes.items()))]
    limit = int(shard_gb * 1e9)
    shards, size = [[]], 0
    for name, t in tensors:
        nbytes = 2 * math.prod(t.shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(path, fname), shard)
        weight_map.update({name: fname for name, _ in shard})
    with open(os.path.join(path, dif.INDEX_NAME), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return total


def measure(path: str, mode: str) -> dict:
    """One load in this process (8 fake devices already set up by the caller's XLA_FLAGS)."""
    import gc

    import jax
    import numpy as np
    import psutil

    from anyflow_jax import parallel
    from anyflow_jax.checkpoints import diffusers as dif

    proc = psutil.Process()
    mesh = parallel.make_mesh(1, 4, 2)
    # the runtime up and running on every device before the baseline is taken
    jax.block_until_ready(jax.device_put(np.zeros((8, 8), np.float32), parallel.batch_sharding(mesh, 2)))
    gc.collect()
    before = proc.memory_info().rss
    t0 = time.perf_counter()
    if mode == "streaming":
        model, params = dif.load_transformer(path, dtype=None, mesh=mesh)
    else:
        model, host = dif.load_transformer(path, dtype=None)
        shardings = parallel.param_shardings(model.abstract_params(), mesh)
        params = jax.device_put(host, shardings)
        jax.block_until_ready(params)
        del host
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    after = proc.memory_info().rss
    resident = sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(params) for s in leaf.addressable_shards)
    logical = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
    return dict(mode=mode, seconds=seconds, rss_before=before, peak_rss=peak, rss_after=after,
                params_resident=resident, params_logical=logical,
                overhead=peak - before - resident)


def _child_env() -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append("--xla_force_host_platform_device_count=8")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def _gb(n):
    return f"{n / 1e9:.2f}"


def _table(results, size) -> str:
    lines = [("| load | peak RSS (GB) | RSS before load (GB) | resident params (GB) "
              "| overhead = peak - before - params (GB) | overhead / S | time (s) |"), "|---|---|---|---|---|---|---|"]
    names = {"streaming": "streaming: `load_transformer(path, dtype=None, mesh=mesh)`",
             "host": "host: `load_transformer(path, dtype=None)` then `jax.device_put(params, shardings)`"}
    for r in results:
        lines.append(f"| {names[r['mode']]} | {_gb(r['peak_rss'])} | {_gb(r['rss_before'])} | {_gb(r['params_resident'])} "
                     f"| {_gb(r['overhead'])} | {r['overhead'] / size:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def _write_doc(text: str) -> None:
    doc = "# Benchmarks\n"
    if os.path.isfile(DOC_PATH):
        with open(DOC_PATH) as fh:
            doc = fh.read()
    start = doc.find(SECTION)
    if start >= 0:  # replace this tool's own section only
        nxt = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + ("\n" + doc[nxt + 1:] if nxt >= 0 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    with open(DOC_PATH, "w") as fh:
        fh.write(doc.rstrip("\n") + "\n")


def main(argv=None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30, help="transformer blocks (30: Wan2.1 1.3B)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="largest safetensors shard (GB)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary checkpoint (default: the system's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--no-doc", action="store_true", help=f"do not write {SECTION!r} into docs/benchmarks.md")
    ap.add_argument("--measure", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure[0], args.measure[1])), flush=True)
        return 0

    tmp = tempfile.mkdtemp(prefix="anyflow-load-memory-", dir=args.tmp)
    try:
        path = os.path.join(tmp, "transformer")
        t0 = time.perf_counter()
        size = write_checkpoint(path, args.layers, args.shard_gb)
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        print(f"wrote {path}: {len(files)} shards, {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
        results = []
        for mode in MODES:
            cmd = [sys.executable, os.path.abspath(__file__), "--measure", path, mode]
            proc = subprocess.run(cmd, env=_child_env(), cwd=ROOT, capture_output=True, text=True, check=False)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"the {mode} load failed (exit {proc.returncode})")
            results.append(json.loads(line[0][len("RESULT "):]))
            r = results[-1]
            print(f"{mode}: peak {_gb(r['peak_rss'])} GB, before {_gb(r['rss_before'])} GB, params "
                  f"{_gb(r['params_resident'])} GB, overhead {_gb(r['overhead'])} GB ({r['overhead'] / size:.3f} S), "
                  f"{r['seconds']:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(checkpoint_bytes=size, layers=args.layers, results=results), fh, indent=2)
    command = "python tools/load_memory.py" + ("" if argv is None else " " + " ".join(argv))
    if argv is None and len(sys.argv) > 1:
        command = "python tools/load_memory.py " + " ".join(sys.argv[1:])
    import flax
    import jax
    text = "\n\n".join([
        SECTION,
        f"Command: `{command}`",
        (f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, "
         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB RAM, shared with other jobs; "
         f"jax {jax.__version__}, flax {flax.__version__}. Date: {datetime.date.today().isoformat()}."),
        (f"Checkpoint: random bf16 weights with the Wan2.1 1.3B widths (12 heads x 128, ffn 8960, text 4096, "
        f"{args.layers} layers), diffusers layout with an index and {len(files)} shards; S = {_gb(size)} GB of "
        f"tensors. Loaded with `dtype=None` (bf16 kept, scan-stacked layers) onto a (data=1, fsdp=4, tensor=2) mesh "
        f"of 8 fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`), each load in a fresh process."),
        _table(results, size),
        ("The 8 fake CPU devices live in host memory, so the loaded parameters are themselves resident in the "
        "process ('resident params': every device's shards, replicated parameters counted once per device). "
        "'Overhead' is what the loader needed beyond its result: peak RSS (`ru_maxrss`) minus the RSS just "
        "before the load (Python, JAX, the runtime) minus the resident params. The streaming load reads each "
        "device's block of each tensor straight from the safetensors files (transposes applied to the block, "
        "per-layer tensors assembled into the scan-stacked block) and places it on its device before the next "
        "is read, so its overhead stays far below S: no full extra host copy of the model, nor of any sharded "
        "tensor, is made (what remains is about one device's block of the largest parameter, a scan-stacked "
        "FFN kernel, plus fixed costs). The host path first builds the whole model on one device (a full copy, S) and then places its shards, so its overhead is about S or more. "
        "On a real accelerator the resident params are in device memory and the host needs only the overhead."),
    ])
    if not args.no_doc:
        _write_doc(text)
        print(f"wrote {SECTION!r} into {DOC_PATH}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
