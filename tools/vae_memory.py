"""Peak memory of Wan VAE decoding on CPU: chunked scan (the default) vs all frames at once.

Uses the real Wan2.1 VAE widths (base_dim 96, z_dim 16, dim_mult [1,2,4,4], num_res_blocks 2,
attention in the mid block, temperal_downsample [False,True,True]) with random weights.

Two kinds of numbers:

1. XLA's own memory analysis of the compiled decode (``jax.jit(...).lower(...).compile()
   .memory_analysis()``), without executing it, for the full 480p / 81-frame latent
   ``(1, 21, 60, 104, 16)`` and for the executed shapes below: temporary buffers, arguments,
   output.
2. Executed decodes, each in a fresh subprocess, reporting the process' peak resident set size
   (``ru_maxrss``) after the decode, next to the peak before it (Python, JAX, the parameters).

Usage::

    python tools/vae_memory.py                        # defaults below, writes docs/benchmarks.md
    python tools/vae_memory.py --run-latents 2x30x52,3x30x52 --analysis-latents 21x60x104
    python tools/vae_memory.py --no-doc --json out.json

The executed runs default to small latents (the full 81-frame 480p decode takes hours on a
2-core CPU); the analysis covers the full size.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_downsample=(False, True, True))
DOC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")
SECTION = "## Wan VAE decode memory (CPU)"


def _parse_latents(text):
    out = []
    for item in filter(None, text.split(",")):
        f, h, w = (int(v) for v in item.lower().split("x"))
        out.append((f, h, w))
    return out


def _chunk_arg(text):
    return None if text in ("none", "None", "all") else int(text)


def _model():
    from anyflow_jax.models.wan_vae import WanVAE
    return WanVAE(**WAN21_VAE)


def _random_params(model, seed=0):
    """Random fp32 parameters of the right shapes, drawn with NumPy (no model compile)."""
    import jax
    import numpy as np
    from flax import linen as nn
    abstract = nn.meta.unbox(model.abstract_params())
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return np.ones(leaf.shape, np.float32)
        if name.endswith("['bias']"):
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map(jax.numpy.asarray, jax.tree_util.tree_map_with_path(draw, abstract))


def _decode_fn(model, chunk):
    import jax
    return jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode", chunk=chunk))


def _analysis(compiled):
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    return {k: int(getattr(ma, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                              "output_size_in_bytes", "alias_size_in_bytes",
                                              "generated_code_size_in_bytes")}


def analyse(latents, chunk):
    """Compile (without running) the decode of ``latents`` = (f, h, w) and return XLA's numbers."""
    import jax
    import jax.numpy as jnp
    model = _model()
    f, h, w = latents
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                      __import__("flax").linen.meta.unbox(model.abstract_params()))
    z = jax.ShapeDtypeStruct((1, f, h, w, model.z_dim), jnp.float32)
    t0 = time.time()
    compiled = _decode_fn(model, chunk).lower(abstract, z).compile()
    res = {"latents": [1, f, h, w, model.z_dim], "chunk": chunk, "compile_s": round(time.time() - t0, 1)}
    res.update(_analysis(compiled) or {})
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:  # XLA counts a loop body once: only the chunk=None decode (no scan) is the whole decode
        res["flops"] = float(cost.get("flops", 0.0))
        res["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    return res


def worker(latents, chunk):
    """Executed decode in this process; prints one JSON line."""
    import jax
    import numpy as np
    model = _model()
    params = _random_params(model)
    f, h, w = latents
    z = np.random.default_rng(1).standard_normal((1, f, h, w, model.z_dim)).astype(np.float32)
    jax.block_until_ready(params)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn = _decode_fn(model, chunk)
    t0 = time.time()
    compiled = fn.lower(params, z).compile()
    t1 = time.time()
    out = compiled(params, z)
    out.block_until_ready()
    t2 = time.time()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {"latents": [1, f, h, w, model.z_dim], "video": list(out.shape), "chunk": chunk,
           "peak_rss_before_decode": rss_before, "peak_rss": rss_after,
           "compile_s": round(t1 - t0, 1), "run_s": round(t2 - t1, 1),
           "finite": bool(np.isfinite(np.asarray(out)).all())}
    res.update(_analysis(compiled) or {})
    print("RESULT " + json.dumps(res), flush=True)


def _run_worker(latents, chunk, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "x".join(map(str, latents)),
           "--chunk", "none" if chunk is None else str(chunk)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"latents": [1, *latents, 16], "chunk": chunk, "error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"latents": [1, *latents, 16], "chunk": chunk, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def _gib(n):
    return f"{n / 2**30:.2f}"


def _chunk_name(c):
    return "all frames at once" if c is None else f"scan, {c} latent frame{'s' if c != 1 else ''}/step"


def render(results, command):
    lines = [SECTION, "",
             f"Command: `{command}`", "",
             f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores ({_cpu_name()}), "
             f"{_mem_total()} RAM, shared with other jobs; jax {results['versions']['jax']}, "
             f"flax {results['versions']['flax']}. Date: {results['date']}.", "",
             "Model: the real Wan2.1 VAE widths (base_dim 96, z_dim 16, dim_mult [1,2,4,4], "
             "num_res_blocks 2, attention in the mid block, temperal_downsample [False,True,True]), "
             "random fp32 weights, fp32 compute, batch 1. `chunk` is `WanVAE.decode(..., chunk=)`: "
             "the first latent frame is decoded alone, the rest under `nn.scan` in steps of `chunk` "
             "latent frames carrying the causal-conv caches; `None` decodes the rest in one step.", "",
             "### XLA memory analysis (compiled, not executed)", "",
             "| latents (f, h, w) | video frames x pixels | decode | XLA temp (GiB) | arguments (GiB) "
             "| output (GiB) | compile (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["analysis"]:
        _, f, h, w, _ = r["latents"]
        if "temp_size_in_bytes" not in r:
            lines.append(f"| {f}x{h}x{w} | {1 + 4 * (f - 1)} x {8 * h}x{8 * w} | {_chunk_name(r['chunk'])} "
                         f"| {r.get('error', 'n/a')} | | | |")
            continue
        lines.append(f"| {f}x{h}x{w} | {1 + 4 * (f - 1)} x {8 * h}x{8 * w} | {_chunk_name(r['chunk'])} "
                     f"| {_gib(r['temp_size_in_bytes'])} | {_gib(r['argument_size_in_bytes'])} "
                     f"| {_gib(r['output_size_in_bytes'])} | {r['compile_s']} |")
    lines += ["", "### Executed decodes (peak resident memory of a fresh process)", "",
              "| latents (f, h, w) | video | decode | peak RSS before decode (GiB) | peak RSS after (GiB) "
              "| XLA temp (GiB) | compile (s) | run (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        _, f, h, w, _ = r["latents"]
        if "error" in r:
            lines.append(f"| {f}x{h}x{w} | | {_chunk_name(r['chunk'])} | {r['error']} | | | | |")
            continue
        lines.append(f"| {f}x{h}x{w} | {r['video'][1]} x {r['video'][2]}x{r['video'][3]} | {_chunk_name(r['chunk'])} "
                     f"| {_gib(r['peak_rss_before_decode'])} | {_gib(r['peak_rss'])} "
                     f"| {_gib(r.get('temp_size_in_bytes', 0))} | {r['compile_s']} | {r['run_s']} |")
    lines += ["", _auto_note(results), "", results.get("note", "").strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def _auto_note(results):
    """Plain-words reading of the numbers: what was executed, what was only analysed."""
    notes = ["'Peak RSS after' is the whole process (Python, JAX, the random parameters and their "
             "device copies, the output), the 'before' column its share before the decode; 'XLA temp' "
             "is the compiler's buffer for intermediates of that decode."]
    executed = {tuple(r["latents"][1:4]) for r in results["runs"] if "error" not in r}
    scan_runs = [r for r in results["runs"] if "error" not in r and r["chunk"] is not None]
    analysed = []
    for r in results["analysis"]:
        if "temp_size_in_bytes" in r and tuple(r["latents"][1:4]) not in analysed + list(executed):
            analysed.append(tuple(r["latents"][1:4]))
    for f, h, w in analysed:
        msg = f"The {f}x{h}x{w} latent ({1 + 4 * (f - 1)} frames, {8 * h}x{8 * w}) was compiled and analysed, not executed"
        if scan_runs:
            best = min(scan_runs, key=lambda x: x["run_s"] / (x["video"][1] * x["video"][2] * x["video"][3]))
            per = best["run_s"] / (best["video"][1] * best["video"][2] * best["video"][3])
            est = per * (1 + 4 * (f - 1)) * 64 * h * w
            msg += (f" (at the speed of the executed scan runs it would take about {est / 3600:.1f} h of this "
                    f"shared 2-core CPU)")
        notes.append(msg + ".")
    by_size = {}
    for r in results["analysis"]:
        if "temp_size_in_bytes" in r:
            by_size.setdefault(r["chunk"], []).append((r["latents"][1], r["temp_size_in_bytes"], r["latents"][2:4]))
    scan = sorted(by_size.get(1, []))
    if len(scan) >= 2 and scan[0][2] == scan[-1][2]:
        notes.append(f"With the scan, XLA's temporaries for {scan[-1][0]} latent frames "
                     f"({_gib(scan[-1][1])} GiB) are those for {scan[0][0]} ({_gib(scan[0][1])} GiB): memory is "
                     "one chunk's activations plus the carried causal-conv caches, whatever the video length.")
    return " ".join(notes)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_total():
    try:
        with open("/proc/meminfo") as fh:
            kb = int(re.search(r"MemTotal:\s+(\d+)", fh.read()).group(1))
        return f"{kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        return "unknown"


def write_doc(section_text, path=DOC_PATH):
    """Insert or replace this tool's section in docs/benchmarks.md (other sections are kept)."""
    text = open(path).read() if os.path.isfile(path) else "# Benchmarks\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip() + "\n\n" + section_text
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
        end = len(text) if nxt is None else start + len(SECTION) + nxt.start()
        text = text[:start] + section_text + ("\n" if end < len(text) else "") + text[end:]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--analysis-latents", default="21x60x104",
                    help="comma-separated f x h x w latents for the compile-only memory analysis")
    ap.add_argument("--run-latents", default="2x60x104,3x60x104",
                    help="comma-separated f x h x w latents for executed decodes")
    ap.add_argument("--chunks", default="1,none", help="decode chunk settings to compare")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per executed decode")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--note", default="", help="text appended to the doc section")
    ap.add_argument("--from-json", default=None,
                    help="re-render the doc section from a --json file of an earlier run (no measuring)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", default="1", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        worker(_parse_latents(args.worker)[0], _chunk_arg(args.chunk))
        return

    command = "python " + " ".join(["tools/vae_memory.py"] + (argv if argv is not None else sys.argv[1:]))
    if args.from_json:
        with open(args.from_json) as fh:
            results = json.load(fh)
        section = render(results, results.get("command", command))
        print(section)
        if not args.no_doc:
            write_doc(section)
        return

    import flax
    import jax
    chunks = [_chunk_arg(c) for c in args.chunks.split(",")]
    results = {"date": datetime.date.today().isoformat(),
               "versions": {"jax": jax.__version__, "flax": flax.__version__},
               "config": {k: list(v) if isinstance(v, tuple) else v for k, v in WAN21_VAE.items()},
               "analysis": [], "runs": [], "note": args.note, "command": command}
    for lat in _parse_latents(args.analysis_latents):
        for c in chunks:
            try:
                r = analyse(lat, c)
            except Exception as e:  # noqa: BLE001 - report and go on
                r = {"latents": [1, *lat, 16], "chunk": c, "error": f"{type(e).__name__}: {e}"[:200]}
            print(json.dumps(r), flush=True)
            results["analysis"].append(r)
    for lat in _parse_latents(args.run_latents):
        for c in chunks:
            r = _run_worker(lat, c, args.timeout)
            print(json.dumps(r), flush=True)
            results["runs"].append(r)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    section = render(results, command)
    print(section)
    if not args.no_doc:
        write_doc(section)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
