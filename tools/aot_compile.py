"""Compile a config's real train steps and its sampler for a TPU slice, without a TPU.

  python tools/aot_compile.py --config configs/wan_t2v.py:14b,on_policy --topology v5p-64
  python tools/aot_compile.py --config configs/wan_t2v.py:1.3b,teacher --topology v5p-8 \\
      --config.model.attention_impl=splash --json out.json

Every step of the stage (the generator step, and the critic step of a stage with a critic) is
compiled by the trainer's own ``compile_steps`` (same jit, shardings, donation) on abstract
inputs on the config's mesh over the slice's chips; the sampler is the inference sampler of the
stage's model kind. Per chip it prints: argument, output, temporary and peak memory against the
chip's HBM; the compiler's FLOPs and bytes accessed; the analytic model FLOPs (forward and
backward of every network call of the step, no remat), the remat overhead, and the roofline
lower bound of the step time. Exit status 1, naming the largest buffers, when a program does
not fit in HBM. Needs libtpu pinned to the jax release: ``pip install -e .[tpu]``.

The batch is ``--batch_per_shard`` examples per data shard (data x fsdp mesh axes; default 1:
one 480p 81-frame video per shard), not the config's global batch: per-chip memory depends on
the per-shard batch, and a slice with fewer shards than the config's global batch needs more
examples per shard (``--global_batch`` sets the global batch directly).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # libtpu's init on a machine that is no TPU VM
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiling processes may share the machine
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/<x>.py[:arg]).",
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "TPU slice: v5p-64, v6e-16, v5p:2x2x1, ...")
_SLICES = flags.DEFINE_integer("slices", 1, "Number of slices (multi-slice).")
_PER_SHARD = flags.DEFINE_integer("batch_per_shard", 1, "Examples per data shard (data x fsdp).")
_GLOBAL = flags.DEFINE_integer("global_batch", None, "Global batch (overrides --batch_per_shard).")
_LATENTS = flags.DEFINE_string("latent_shape", None, "F,H,W,C of one latent video (default: 480p 81 frames "
                               "for Wan configs, the config's shape for the toy).")
_CONTEXT = flags.DEFINE_integer("context_length", None, "Text tokens (default 512 for Wan).")
_SAMPLER_STEPS = flags.DEFINE_integer("sampler_steps", 4, "Steps of the compiled sampler (0: no sampler).")
_TRAIN = flags.DEFINE_bool("train", True, "Compile the train steps.")
_ANALYTIC = flags.DEFINE_bool("analytic", True, "Count the analytic FLOPs (traces the step twice more).")
_BUFFERS = flags.DEFINE_integer("buffers", 8, "Largest buffers to name for a program that does not fit.")
_JSON = flags.DEFINE_string("json", None, "Also write the reports as JSON here.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    logging.getLogger("jax").setLevel(logging.ERROR)
    from anyflow_jax.errors import RunError
    from anyflow_jax.parallel import aot

    try:
        chip, devices = aot.topology_devices(_TOPOLOGY.value, _SLICES.value)
        run = aot.abstract_run(_CONFIG.value, devices)
        n = len(devices)
        shards = aot.data_shards(run.mesh)
        gb = _GLOBAL.value or shards * _PER_SHARD.value
        latents = tuple(int(x) for x in _LATENTS.value.split(",")) if _LATENTS.value else None
        batch = aot.abstract_batch(run, gb, latents, _CONTEXT.value)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = run.cfg.model
    print(f"{run.record.name} on {_TOPOLOGY.value} x{_SLICES.value} ({n} chips of {chip.generation}: "
          f"{chip.hbm_bytes / aot.GiB:.0f} GiB HBM, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
          f"{chip.hbm_bandwidth / 1e9:.0f} GB/s); mesh {dict(run.mesh.shape)}; global batch {gb} "
          f"(x0 {tuple(batch['x0'].shape)}); dtype {m.get('dtype')}, attention {m.get('attention_impl')}, "
          f"remat {m.get('remat_policy')}, scan_layers {m.get('scan_layers')}", flush=True)

    reports = []
    if _TRAIN.value:
        analytic = executed = {}
        if _ANALYTIC.value:
            t0 = time.perf_counter()
            analytic = aot.analytic_flops(run, batch)
            executed = aot.analytic_flops(run, batch, remat=True)
            print(f"analytic FLOPs counted in {time.perf_counter() - t0:.0f}s", flush=True)
        t0 = time.perf_counter()
        try:
            compiled = aot.compile_train(run, batch)
        except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory report
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            print(f"error: the {run.record.name} step does not fit in {chip.hbm_bytes / aot.GiB:.0f} GiB per chip; "
                  f"the compiler says: {' '.join(str(e).split())}", file=sys.stderr)
            print("largest arrays of the generator step before partitioning (global shapes):", file=sys.stderr)
            for b in aot.lowered_largest_arrays(run, batch, "generator", _BUFFERS.value):
                print(f"  {aot.format_bytes(b['bytes'])}  {b['shape']}  {b['op']}  {b['source']}", file=sys.stderr)
            return 1
        print(f"train steps compiled in {time.perf_counter() - t0:.0f}s", flush=True)
        for name in ("generator", "critic"):
            program = getattr(compiled, name)
            if program is None:
                continue
            reports.append(aot.step_report(f"{run.record.name} {name} step", program, chip, num_chips=n,
                                           analytic=analytic.get(name), executed=executed.get(name),
                                           buffers=_BUFFERS.value))
            print(aot.format_report(reports[-1]), flush=True)
    if _SAMPLER_STEPS.value:
        t0 = time.perf_counter()
        sampler, _, args = aot.compile_sampler(run, steps=_SAMPLER_STEPS.value, global_batch=gb,
                                               latent_shape=latents, context_length=_CONTEXT.value)
        print(f"sampler compiled in {time.perf_counter() - t0:.0f}s", flush=True)
        flops = aot.sampler_analytic_flops(run, args, steps=_SAMPLER_STEPS.value) if _ANALYTIC.value else None
        # no remat at inference: the analytic count is also what runs
        reports.append(aot.step_report(f"{aot.sampler_kind(run)} sampler, {_SAMPLER_STEPS.value} steps", sampler,
                                       chip, num_chips=n, buffers=_BUFFERS.value, analytic=flops, executed=flops))
        print(aot.format_report(reports[-1]), flush=True)

    if _JSON.value:
        meta = {"topology": _TOPOLOGY.value, "slices": _SLICES.value, "chips": n, "mesh": dict(run.mesh.shape),
                "stage": run.record.name, "global_batch": gb, "model": dict(m)}
        with open(_JSON.value, "w") as f:
            json.dump({"run": meta, "reports": reports}, f, indent=1, default=str)
    bad = [r for r in reports if not r["fits"]]
    if bad:
        for r in bad:
            top = "; ".join(f"{b['shape']} {aot.format_bytes(b['bytes'])} ({b['source'] or b['op']})"
                            for b in r.get("largest_buffers", [])[:3])
            print(f"error: {r['program']} does not fit: needs {aot.format_bytes(r['required_bytes'])} per chip of "
                  f"{aot.format_bytes(r['hbm_bytes'])} HBM; largest buffers: {top}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
