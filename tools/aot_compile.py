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
not fit in HBM; 2 on bad input (one ``error:`` line). Needs libtpu pinned to the jax release:
``pip install -e .[tpu]``.

XLA's cost analysis counts the body of a loop once (the scanned layers, the rollout's
transitions, the sampler's steps); with ``--loop_corrected`` (default) every program is compiled
twice more, with 1 and 2 unscanned layers and every ``lax.scan`` unrolled, and the compiler's
FLOPs and bytes are extrapolated linearly to the config's layer count
(``aot.loop_corrected_costs``): the compiler / analytic FLOPs ratio and the roofline use those.

``--topology v5p`` (a generation without a size) compiles for its slices from the smallest up
(``v5p-8, v5p-16, ...``; ``v6e-1, v6e-4, v6e-8, ...``, up to ``--max_chips``) and reports the
smallest that fits, with the full report for it; slices the config's mesh cannot use are
skipped. ``--vae_decode`` adds the Wan2.1 VAE decode of one video (fp32, one latent frame per
scan step) compiled for one chip of the slice (with ``--notrain --sampler_steps 0`` alone).

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
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-8", "TPU slice: v5p-64, v6e-16, v5p:2x2x1, ...; a generation alone "
                                "(v5p, v6e) tries its slices from the smallest up and reports the smallest that fits.")
_SLICES = flags.DEFINE_integer("slices", 1, "Number of slices (multi-slice).")
_PER_SHARD = flags.DEFINE_integer("batch_per_shard", 1, "Examples per data shard (data x fsdp).")
_GLOBAL = flags.DEFINE_integer("global_batch", None, "Global batch (overrides --batch_per_shard).")
_LATENTS = flags.DEFINE_string("latent_shape", None, "F,H,W,C of one latent video (default: 480p 81 frames "
                               "for Wan configs, the config's shape for the toy).")
_CONTEXT = flags.DEFINE_integer("context_length", None, "Text tokens (default 512 for Wan).")
_SAMPLER_STEPS = flags.DEFINE_integer("sampler_steps", 4, "Steps of the compiled sampler (0: no sampler).")
_TRAIN = flags.DEFINE_bool("train", True, "Compile the train steps.")
_ANALYTIC = flags.DEFINE_bool("analytic", True, "Count the analytic FLOPs (traces the step twice more).")
_LOOP_CORRECTED = flags.DEFINE_bool("loop_corrected", True, "Also compile each program with 1 and 2 unscanned layers "
                                    "and every scan unrolled, and extrapolate the compiler's FLOPs and bytes to the "
                                    "config's layer count (XLA counts a loop body once).")
_MAX_CHIPS = flags.DEFINE_integer("max_chips", 256, "Largest slice tried by a search (--topology v5p: no size).")
_VAE = flags.DEFINE_bool("vae_decode", False, "Also compile the Wan2.1 VAE decode of one video (the latent shape "
                          "above; fp32, one latent frame per scan step) for one chip of the slice.")
_BUFFERS = flags.DEFINE_integer("buffers", 8, "Largest buffers to name for a program that does not fit.")
_JSON = flags.DEFINE_string("json", None, "Also write the reports as JSON here.")
flags.mark_flags_as_required(["config"])


class NoFit(Exception):
    """A program of the stage does not fit the slice (the message names the largest buffers)."""

    def __init__(self, message: str, reports=()):
        super().__init__(message)
        self.reports = list(reports)


def compile_slice(config, topology: str, *, sampler: bool = True, quiet: bool = False):
    """Compile the config's train steps (and sampler) for one slice; returns ``(meta, reports)``
    or raises :class:`NoFit` (or RunError for bad input)."""
    from anyflow_jax.errors import RunError
    from anyflow_jax.parallel import aot

    say = (lambda *a, **k: None) if quiet else print  # noqa: E731
    chip, devices = aot.topology_devices(topology, _SLICES.value)
    run = aot.abstract_run(config, devices)
    n = len(devices)
    shards = aot.data_shards(run.mesh)
    gb = _GLOBAL.value or shards * _PER_SHARD.value
    latents = tuple(int(x) for x in _LATENTS.value.split(",")) if _LATENTS.value else None
    batch = aot.abstract_batch(run, gb, latents, _CONTEXT.value)
    m = run.cfg.model
    say(f"{run.record.name} on {topology} x{_SLICES.value} ({n} chips of {chip.generation}: "
        f"{chip.hbm_bytes / aot.GiB:.0f} GiB HBM, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{chip.hbm_bandwidth / 1e9:.0f} GB/s); mesh {dict(run.mesh.shape)}; global batch {gb} "
        f"(x0 {tuple(batch['x0'].shape)}); dtype {m.get('dtype')}, attention {m.get('attention_impl')}, "
        f"remat {m.get('remat_policy')}, scan_layers {m.get('scan_layers')}", flush=True)
    meta = {"topology": topology, "slices": _SLICES.value, "chips": n, "mesh": dict(run.mesh.shape),
            "stage": run.record.name, "global_batch": gb, "model": dict(m), "compile_s": {}}

    reports = []
    steps = _SAMPLER_STEPS.value if sampler else 0
    if _TRAIN.value:
        t0 = time.perf_counter()
        say(f"compiling the {run.record.name} step" + (" and the critic step" if run.record.has_critic else "")
            + " (minutes for a Wan-size model on a CPU host) ...", flush=True)
        try:
            compiled = aot.compile_train(run, batch)
        except ValueError as e:  # the objective rejects the batch (e.g. too few examples for its split)
            raise RunError(f"{topology}: the {run.record.name} step rejects this batch (global batch {gb}): {e}") from None
        except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory report
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            lines = [f"the {run.record.name} step does not fit in {chip.hbm_bytes / aot.GiB:.0f} GiB per chip on "
                     f"{topology}; the compiler says: {' '.join(str(e).split())}",
                     "largest arrays of the generator step before partitioning (global shapes):"]
            for b in aot.lowered_largest_arrays(run, batch, "generator", _BUFFERS.value):
                lines.append(f"  {aot.format_bytes(b['bytes'])}  {b['shape']}  {b['op']}  {b['source']}")
            raise NoFit("\n".join(lines)) from None
        meta["compile_s"]["train"] = round(time.perf_counter() - t0, 1)
        say(f"train steps compiled in {time.perf_counter() - t0:.0f}s", flush=True)
        for name in ("generator", "critic"):
            program = getattr(compiled, name)
            if program is not None:
                reports.append(aot.step_report(f"{run.record.name} {name} step", program, chip, num_chips=n,
                                               buffers=_BUFFERS.value))
                reports[-1]["kind"] = name
        if not all(r["fits"] for r in reports):
            raise NoFit(_no_fit_message(reports), reports)
    sampler_args = None
    if steps:
        t0 = time.perf_counter()
        compiled_sampler, _, sampler_args = aot.compile_sampler(run, steps=steps, global_batch=gb,
                                                                latent_shape=latents, context_length=_CONTEXT.value)
        meta["compile_s"]["sampler"] = round(time.perf_counter() - t0, 1)
        say(f"sampler compiled in {time.perf_counter() - t0:.0f}s", flush=True)
        reports.append(aot.step_report(f"{aot.sampler_kind(run)} sampler, {steps} steps", compiled_sampler, chip,
                                       num_chips=n, buffers=_BUFFERS.value))
        reports[-1]["kind"] = "sampler"
        if not reports[-1]["fits"]:
            raise NoFit(_no_fit_message(reports), reports)

    if _VAE.value:
        t0 = time.perf_counter()
        vae, _, _ = aot.compile_vae_decode(devices[0], latent_shape=latents or aot.WAN_480P_LATENTS)
        meta["compile_s"]["vae_decode"] = round(time.perf_counter() - t0, 1)
        say(f"VAE decode compiled in {time.perf_counter() - t0:.0f}s", flush=True)
        reports.append(aot.step_report("Wan VAE decode, one video, fp32 (one chip)", vae, chip, num_chips=1,
                                       buffers=_BUFFERS.value))
        reports[-1]["kind"] = "vae_decode"
        say(aot.format_report(reports[-1]), flush=True)

    # the FLOPs: analytic (traced), and the compiler's with every loop counted
    if _ANALYTIC.value:
        t0 = time.perf_counter()
        analytic = aot.analytic_flops(run, batch) if _TRAIN.value else {}
        executed = aot.analytic_flops(run, batch, remat=True) if _TRAIN.value else {}
        if sampler_args is not None:
            # no remat at inference: the analytic count is also what runs
            analytic["sampler"] = executed["sampler"] = aot.sampler_analytic_flops(run, sampler_args, steps=steps)
        meta["compile_s"]["analytic"] = round(time.perf_counter() - t0, 1)
    corrected, kernel = {}, {}
    if _LOOP_CORRECTED.value:
        steps_executed = {k: v for k, v in executed.items() if k != "sampler"} if _ANALYTIC.value else None
        kernel = aot.kernel_flops(run, batch, executed=steps_executed) if _TRAIN.value else {}
        if sampler_args is not None:
            kernel["sampler"] = aot.sampler_kernel_flops(run, sampler_args, steps=steps)
        t0 = time.perf_counter()
        corrected = aot.loop_corrected_costs(config, devices, global_batch=gb, latent_shape=latents,
                                             context_length=_CONTEXT.value, train=_TRAIN.value, sampler_steps=steps)
        meta["compile_s"]["loop_corrected"] = round(time.perf_counter() - t0, 1)
        say(f"loop-corrected compiler FLOPs (1- and 2-layer compiles, scans unrolled) in "
            f"{time.perf_counter() - t0:.0f}s", flush=True)
    for r in reports:
        k = r["kind"]
        if k == "vae_decode":
            continue
        r.update(aot.flops_fields(r, chip, n, analytic=analytic.get(k) if _ANALYTIC.value else None,
                                  executed=executed.get(k) if _ANALYTIC.value else None, corrected=corrected.get(k),
                                  kernel=kernel.get(k)))
        say(aot.format_report(r), flush=True)
    return meta, reports


def _no_fit_message(reports) -> str:
    from anyflow_jax.parallel import aot
    out = []
    for r in reports:
        if r["fits"]:
            continue
        top = "; ".join(f"{b['shape']} {aot.format_bytes(b['bytes'])} ({b['source'] or b['op']})"
                        for b in r.get("largest_buffers", [])[:3])
        out.append(f"{r['program']} does not fit: needs {aot.format_bytes(r['required_bytes'])} per chip of "
                   f"{aot.format_bytes(r['hbm_bytes'])} HBM; largest buffers: {top}")
    return "\n".join(out)


def main(argv):
    del argv
    logging.getLogger("jax").setLevel(logging.ERROR)
    from anyflow_jax.errors import RunError
    from anyflow_jax.parallel import aot

    topology = _TOPOLOGY.value.strip()
    result: dict = {}
    try:
        if "-" in topology or ":" in topology:
            meta, reports = compile_slice(_CONFIG.value, topology)
        else:  # a generation: its slices from the smallest up, until one fits
            names = aot.slice_names(topology, _MAX_CHIPS.value)
            tried = result["search"] = []
            for name in names:
                try:
                    meta, reports = compile_slice(_CONFIG.value, name)
                except NoFit as e:
                    first = str(e).splitlines()[0]
                    tried.append({"topology": name, "fits": False, "why": first,
                                  "needs": {r["program"]: r["required_bytes"] for r in e.reports}})
                    print(f"{name}: does not fit: {first}", flush=True)
                    continue
                except RunError as e:  # e.g. the config's mesh does not divide this slice
                    tried.append({"topology": name, "fits": False, "why": str(e)})
                    print(f"{name}: skipped: {e}", flush=True)
                    continue
                tried.append({"topology": name, "fits": True})
                result["smallest_slice"] = name
                print(f"{name}: the smallest {topology} slice this config fits", flush=True)
                break
            else:
                print(f"error: no {topology} slice up to {_MAX_CHIPS.value} chips fits this config "
                      f"(tried {', '.join(names)})", file=sys.stderr)
                _write_json(result)
                return 1
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NoFit as e:
        for line in str(e).splitlines():
            print(line if line.startswith(("  ", "largest")) else f"error: {line}", file=sys.stderr)
        result.update({"run": {"topology": topology}, "reports": e.reports})
        _write_json(result)
        return 1
    result.update({"run": meta, "reports": reports})
    _write_json(result)
    return 0


def _write_json(result):
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
