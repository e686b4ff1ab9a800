"""anyflow-jax against the PyTorch reference (diffusers' ``WanTransformer3DModel``), side by side.

One machine, the same weights on both sides: a diffusers model with random weights is written
with ``save_pretrained`` and read into ours with ``load_transformer``, so the name table and the
layout transforms are the ones real checkpoints go through. Sections:

- ``model``: forward and train step (MSE loss, AdamW) of the network alone, at the sizes of
  ``SIZES`` (``toy``: the embedded default's DiT and batch; ``mid``: the issue-12 size, 6 layers
  of 6 x 64 heads, ffn 1536, text 512, B=2 x 5x32x32x16 latents, 64 text tokens; ``1.3b``: the
  Wan2.1-1.3B widths with 2 layers and a small video). Ours runs ``jax.jit`` programs compiled
  ahead of time (``scan_layers=True``, ``remat_policy='none'``, ``xla`` attention, fp32); torch
  runs eager fp32 (``inference_mode`` for the forward; ``AdamW(foreach=True)``). Both sides'
  outputs and first losses are compared numerically. Each library runs in fresh processes of
  its own (``--rounds`` each, alternating), since in one process each slows the other down. The
  *matmul floor* is the section's matrix-multiplication FLOPs (``model_flops``; a train step
  counted as three forwards) at the rate of one 2048x2048 fp32 matmul measured on this machine:
  no implementation of the same math runs faster than that.
- ``stages``: the trainer's compiled step of each toy stage (``teacher``, ``flow_map``,
  ``on_policy`` with its critic step, ``consistency``), built through
  ``training.loop.build_run``/``compile_steps`` from a random toy teacher checkpoint (ours only:
  the reference has no JAX-comparable stage step here).
- ``sampling``: videos/s of the toy flow-map student at 1, 4 and 32 steps: our compiled
  ``sampling.sample`` against the same jumps ``z <- z - (t - r) u(z, t, r)`` on the same grid
  with the diffusers model carrying AnyFlow's two-time embedder (``interop.reference``).

Timing: one warm-up call, then ``--repeats`` timed calls per measurement; in the stages and
sampling sections torch and jax calls are interleaved call by call (so load from other processes
hits both); medians are reported. The
ratio is torch time / ours (> 1: we are faster); videos/s ratios are ours / torch.

Usage::

    python tools/benchmark.py                                   # everything, table to stdout
    python tools/benchmark.py --sections model --sizes mid --repeats 7 --json out.json
    python tools/benchmark.py --markdown table.md               # also write the table

Needs the test-only extras (torch, diffusers).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SECTIONS = ("model", "stages", "sampling")
STAGES = ("teacher", "flow_map", "on_policy", "consistency")
SAMPLE_STEPS = (1, 4, 32)

_TOY_ARCH = dict(patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1,
                 text_dim=32, freq_dim=64, ffn_dim=256, num_layers=4, rope_max_seq_len=64)
# name -> diffusers config, batch, latent (F, H, W) and text length; channels are in_channels.
SIZES = {
    "tiny": dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                             out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
                 batch=2, video=(2, 4, 4), text_len=3),  # for tests/test_benchmark.py
    "toy": dict(config=_TOY_ARCH, batch=16, video=(8, 16, 16), text_len=4),
    "mid": dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=64, in_channels=16,
                            out_channels=16, text_dim=512, freq_dim=256, ffn_dim=1536, num_layers=6,
                            rope_max_seq_len=1024),
                batch=2, video=(5, 32, 32), text_len=64),
    "1.3b": dict(config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                             out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=2,
                             rope_max_seq_len=1024),
                 batch=1, video=(5, 16, 16), text_len=64),
}
DEFAULT_SIZES = ("toy", "mid", "1.3b")
OPTIM = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def _median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def _tokens(size):
    (f, h, w), (pt, ph, pw) = size["video"], size["config"]["patch_size"]
    return (f // pt) * (h // ph) * (w // pw)


def _interleaved(fns: dict, repeats: int) -> dict:
    """Time every callable ``repeats`` times, alternating between them (the order flips each
    round); returns name -> list of seconds. Each callable must block until its result is ready."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def _params_count(tree) -> int:
    import jax
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# ------------------------------------------------------------------------------------ model
# The model section runs each library in processes of its own (``--worker torch|jax``): in one
# process the two interfere. Measured at the ``mid`` size on a quiet machine (docs/benchmarks.md):
# our train step took 2.95-3.06 s in a fresh process and 4.1-5.9 s once PyTorch's steps had run in
# the same process (and stayed slower), with 2.4-5.9 s of kernel time per step spent faulting in
# huge pages for XLA's 1.6 GB temporary buffer; PyTorch's own step went from 2.45 s to 3.2 s
# after ours had run.

def _model_inputs(name: str, seed: int = 0) -> dict:
    size = SIZES[name]
    cfg = size["config"]
    f, h, w = size["video"]
    b, c, lt = size["batch"], cfg["in_channels"], size["text_len"]
    rng = np.random.RandomState(seed)
    return dict(x=rng.randn(b, f, h, w, c).astype(np.float32), target=rng.randn(b, f, h, w, c).astype(np.float32),
                tau=rng.rand(b).astype(np.float32), ctx=rng.randn(b, lt, cfg["text_dim"]).astype(np.float32))


def model_flops(name: str) -> float:
    """Matrix-multiplication FLOPs of one forward of the ``SIZES[name]`` network at its batch
    (2 per multiply-add; the linear layers, self- and cross-attention's ``q k^T`` and ``p v``, the
    patch embedding, the text projection, the per-frame time embedding and modulation, the output
    head; elementwise work not counted)."""
    size = SIZES[name]
    cfg = size["config"]
    f, h, w = size["video"]
    pt, ph, pw = cfg["patch_size"]
    b, lt = size["batch"], size["text_len"]
    heads, hd, ffn, layers = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    d = heads * hd
    lv = _tokens(size)
    tok, txt = b * lv, b * lt
    patch = pt * ph * pw
    macs = tok * cfg["in_channels"] * patch * d + tok * d * cfg["out_channels"] * patch  # patch embed, head
    macs += txt * (cfg["text_dim"] * d + d * d)  # text projection (two linears)
    macs += b * f * (cfg["freq_dim"] * d + d * d + d * 6 * d)  # time embedding and modulation, per frame
    per_layer = tok * (4 * d * d + 2 * d * d + 2 * d * ffn)  # self q k v o, cross q o, FFN
    per_layer += txt * 2 * d * d  # cross k v on the text tokens
    per_layer += b * heads * (2 * lv * lv * hd + 2 * lv * lt * hd)  # self and cross attention
    return 2.0 * (macs + layers * per_layer)


def _matmul_rate(n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of one jitted fp32 ``n x n`` matmul on this machine (the roofline's denominator)."""
    import jax
    import jax.numpy as jnp
    a = jnp.asarray(np.random.RandomState(1).randn(n, n).astype(np.float32))
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def _torch_worker(name: str, path: str, inputs: dict, repeats: int) -> dict:
    import torch
    from diffusers import WanTransformer3DModel
    tm = WanTransformer3DModel.from_pretrained(path).float()
    # channels-first latents, one timestep per sample (the Wan2.1 T2V path, the fastest)
    tx_ = torch.from_numpy(inputs["x"]).permute(0, 4, 1, 2, 3).contiguous()
    ttarget = torch.from_numpy(inputs["target"]).permute(0, 4, 1, 2, 3).contiguous()
    tt = torch.from_numpy(inputs["tau"] * 1000.0)
    tctx = torch.from_numpy(inputs["ctx"])
    topt = torch.optim.AdamW(tm.parameters(), lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"],
                             weight_decay=OPTIM["weight_decay"], foreach=True)

    def forward():
        tm.eval()
        with torch.inference_mode():
            return tm(tx_, tt, tctx, return_dict=False)[0]

    def step():
        tm.train()
        topt.zero_grad(set_to_none=True)
        out = tm(tx_, tt, tctx, return_dict=False)[0]
        loss = torch.mean((out - ttarget) ** 2)
        loss.backward()
        topt.step()
        return float(loss.detach())

    out = forward().permute(0, 2, 3, 4, 1).numpy()
    losses = [step(), step()]  # also the step's warm-up
    forward()  # warm-up
    times = _interleaved({"forward": forward, "train_step": step}, repeats)
    return dict(times=times, losses=losses, output=out, threads=torch.get_num_threads())


def _jax_worker(name: str, path: str, inputs: dict, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from anyflow_jax.checkpoints.diffusers import load_transformer
    model, params = load_transformer(path, model_kwargs=dict(scan_layers=True, remat_policy="none",
                                                             attention_impl="xla"))
    f = SIZES[name]["video"][0]
    jx, jtarget, jctx = jnp.asarray(inputs["x"]), jnp.asarray(inputs["target"]), jnp.asarray(inputs["ctx"])
    jt = jnp.asarray(np.repeat(inputs["tau"][:, None], f, axis=1))  # per-frame times, all frames share tau
    tx = optax.adamw(OPTIM["lr"], b1=OPTIM["b1"], b2=OPTIM["b2"], eps=OPTIM["eps"],
                     weight_decay=OPTIM["weight_decay"])
    opt_state = tx.init(params)

    def loss_fn(p, xx, tt_, cc, yy):
        return jnp.mean((model.apply({"params": p}, xx, tt_, None, cc) - yy) ** 2)

    def step(p, o, xx, tt_, cc, yy):
        loss, g = jax.value_and_grad(loss_fn)(p, xx, tt_, cc, yy)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    t0 = time.perf_counter()
    fwd = jax.jit(lambda p, xx, tt_, cc: model.apply({"params": p}, xx, tt_, None, cc)).lower(
        params, jx, jt, jctx).compile()
    fwd_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    jstep = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, jx, jt, jctx, jtarget).compile()
    step_compile = time.perf_counter() - t0
    out = np.asarray(fwd(params, jx, jt, jctx))
    state = {"p": params, "o": opt_state}

    def train_step():
        state["p"], state["o"], loss = jstep(state["p"], state["o"], jx, jt, jctx, jtarget)
        return float(loss)  # blocks

    def forward():
        jax.block_until_ready(fwd(state["p"], jx, jt, jctx))

    losses = [train_step(), train_step()]  # also the step's warm-up
    forward()  # warm-up
    times = _interleaved({"forward": forward, "train_step": train_step}, repeats)
    return dict(times=times, losses=losses, output=out, compile_s=dict(forward=fwd_compile, train_step=step_compile),
                matmul_flops_per_s=_matmul_rate(), params=_params_count(params))


def _worker_main(side: str, name: str, workdir: str, repeats: int, out_path: str) -> None:
    """One library's measurements in this process: reads the shared weights and inputs from
    ``workdir``, writes timings and losses (JSON) and the forward's output (``.npy``)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.getLogger("absl").setLevel(logging.WARNING)
    path = os.path.join(workdir, f"model_{name}")
    with np.load(os.path.join(workdir, f"inputs_{name}.npz")) as z:
        inputs = {k: z[k] for k in z.files}
    res = (_torch_worker if side == "torch" else _jax_worker)(name, path, inputs, repeats)
    np.save(out_path + ".npy", res.pop("output"))
    with open(out_path, "w") as fh:
        json.dump(res, fh)


def _run_worker(side: str, name: str, workdir: str, repeats: int, tag: str) -> dict:
    import subprocess
    out = os.path.join(workdir, f"{side}_{name}_{tag}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--sizes", name, "--workdir", workdir,
           "--repeats", str(repeats), "--json", out]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {side} worker for size {name} failed (exit {proc.returncode}):\n"
                         + proc.stdout[-4000:])
    with open(out) as fh:
        res = json.load(fh)
    res["output"] = np.load(out + ".npy")
    return res


def bench_model(name: str, repeats: int, workdir: str, seed: int = 0, rounds: int = 2) -> dict:
    """Forward and train step of both libraries at ``SIZES[name]``, each library in ``rounds``
    fresh processes of its own, run one after another and alternating (torch, jax, jax, torch,
    ...), ``repeats`` timed calls in each after its warm-up; medians over all the timed calls."""
    from anyflow_jax.interop import reference

    cfg = dict(SIZES[name]["config"])
    tm = reference.random_diffusers_model(seed=seed, scale=0.02 if cfg["text_dim"] > 1000 else 0.1, **cfg)
    tm.save_pretrained(os.path.join(workdir, f"model_{name}"), safe_serialization=True)
    del tm
    np.savez(os.path.join(workdir, f"inputs_{name}.npz"), **_model_inputs(name, seed))
    sides = {"torch": [], "jax": []}
    for r in range(rounds):
        for side in (("torch", "jax") if r % 2 == 0 else ("jax", "torch")):
            print(f"[benchmark]   {side} process {r + 1}/{rounds}", file=sys.stderr, flush=True)
            sides[side].append(_run_worker(side, name, workdir, repeats, f"r{r}"))
    t_runs, j_runs = sides["torch"], sides["jax"]
    size = SIZES[name]
    fwd_flops = model_flops(name)
    rate = _median([run["matmul_flops_per_s"] for run in j_runs])
    out = dict(size=name, config=cfg, batch=size["batch"], latents=[size["batch"], *size["video"], cfg["in_channels"]],
               tokens=_tokens(size), text_tokens=size["text_len"], params=j_runs[0]["params"], repeats=repeats,
               rounds=rounds, isolation="one process per library and round",
               matmul_flops_per_s=rate, forward_matmul_flops=fwd_flops)
    for k in ("forward", "train_step"):
        t_all = [x for run in t_runs for x in run["times"][k]]
        j_all = [x for run in j_runs for x in run["times"][k]]
        flops = fwd_flops * (1 if k == "forward" else 3)  # backward: two matmuls per forward matmul
        out[k] = dict(torch_s=_median(t_all), jax_s=_median(j_all),
                      compile_s=_median([run["compile_s"][k] for run in j_runs]),
                      torch_all=t_all, jax_all=j_all, torch_by_process=[run["times"][k] for run in t_runs],
                      jax_by_process=[run["times"][k] for run in j_runs], matmul_flops=flops,
                      floor_s=flops / rate)
        out[k]["ratio"] = out[k]["torch_s"] / out[k]["jax_s"]
    ref_out = t_runs[0]["output"]  # channels-last already
    out["check"] = dict(forward_max_abs_err=float(np.abs(ref_out - j_runs[0]["output"]).max()),
                        forward_max_abs=float(np.abs(ref_out).max()), torch_losses=t_runs[0]["losses"],
                        jax_losses=j_runs[0]["losses"], torch_threads=t_runs[0]["threads"])
    return out


# ----------------------------------------------------------------------------------- stages
def _toy_teacher_checkpoint(workdir: str) -> str:
    import jax

    from anyflow_jax.checkpoints.diffusers import save_transformer
    from anyflow_jax.models.wan import WanTransformer3D
    path = os.path.join(workdir, "toy_teacher")
    if not os.path.isdir(path):
        model = WanTransformer3D(**_TOY_ARCH)
        save_transformer(path, model, model.init_params(jax.random.key(0)))
    return path


def bench_stage(stage: str, repeats: int, workdir: str) -> dict:
    import jax

    from anyflow_jax.defaults import toy_config
    from anyflow_jax.training import loop

    teacher = _toy_teacher_checkpoint(workdir)
    c = toy_config(stage)
    for field in list(c.init.keys()):
        if field in ("student", "teacher") and c.init[field]:
            c.init[field] = teacher
    c.train.tensorboard = False
    c.train.async_checkpointing = False
    run = loop.build_run(c, os.path.join(workdir, f"stage_{stage}"))
    try:
        state = loop.restore_or_init(run)
        frozen = loop.place_frozen(run)
        run.nets.teacher_params = None
        batch = run.next_batch()
        t0 = time.perf_counter()
        compiled = loop.compile_steps(run, state, frozen, batch)
        compile_s = time.perf_counter() - t0
        holder = {"state": state}
        programs = {"generator": compiled.generator}
        if compiled.critic is not None:
            programs["critic"] = compiled.critic

        def runner(prog):
            def go():
                holder["state"], metrics = prog(holder["state"], frozen, batch)
                jax.block_until_ready(metrics)
            return go

        fns = {k: runner(p) for k, p in programs.items()}
        for go in fns.values():
            go()  # warm-up
        times = _interleaved(fns, repeats)
        return dict(stage=stage, batch=int(c.data.global_batch_size), compile_s=compile_s,
                    steps={k: dict(jax_s=_median(v), jax_all=v) for k, v in times.items()})
    finally:
        run.close()


# --------------------------------------------------------------------------------- sampling
def bench_sampling(repeats: int, workdir: str, batch: int, steps=SAMPLE_STEPS, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from anyflow_jax.checkpoints.diffusers import load_transformer
    from anyflow_jax.flow import sampling
    from anyflow_jax.interop import reference
    from anyflow_jax.models.wan import make_apply_fn

    cfg = dict(_TOY_ARCH)
    tm = reference.add_flow_map_embedder(reference.random_diffusers_model(seed=seed, **cfg), gate=0.25,
                                         deltatime_type="r").eval()
    path = os.path.join(workdir, "toy_student")
    reference.save_flow_map_model(tm, path)
    model, params = load_transformer(path, model_kwargs=dict(scan_layers=True, remat_policy="none"))
    apply_fn = make_apply_fn(model)
    f, h, w = SIZES["toy"]["video"]
    rng = np.random.RandomState(seed)
    noise = rng.randn(batch, f, h, w, cfg["in_channels"]).astype(np.float32)
    ctx = rng.randn(batch, SIZES["toy"]["text_len"], cfg["text_dim"]).astype(np.float32)
    shift = 1.0
    tnoise, tctx = torch.from_numpy(noise).permute(0, 4, 1, 2, 3).contiguous(), torch.from_numpy(ctx)
    jnoise, jctx = jnp.asarray(noise), jnp.asarray(ctx)
    rows = []
    for n in steps:
        grid = np.asarray(sampling.resolve_timesteps(n, None, shift), np.float32)

        def torch_sample(grid=grid):
            z = tnoise
            with torch.inference_mode():
                for t_i, r_i in zip(grid[:-1], grid[1:]):
                    tt = torch.full((batch,), float(t_i) * 1000.0)
                    tm._two_time.r_timestep = torch.full((batch,), float(r_i) * 1000.0)
                    u = tm(z, tt, tctx, return_dict=False)[0]
                    z = z - (float(t_i) - float(r_i)) * u
            return z

        t0 = time.perf_counter()
        prog = jax.jit(lambda p, z, cc, n=n: sampling.sample(apply_fn, p, z, cc, num_steps=n, shift=shift)).lower(
            params, jnoise, jctx).compile()
        compile_s = time.perf_counter() - t0
        ours = np.asarray(prog(params, jnoise, jctx))
        ref = torch_sample().permute(0, 2, 3, 4, 1).numpy()
        times = _interleaved({"torch": torch_sample,
                              "jax": lambda: jax.block_until_ready(prog(params, jnoise, jctx))}, repeats)
        tt_, tj = _median(times["torch"]), _median(times["jax"])
        rows.append(dict(steps=n, batch=batch, compile_s=compile_s, torch_s=tt_, jax_s=tj,
                         torch_videos_per_s=batch / tt_, jax_videos_per_s=batch / tj, ratio=tt_ / tj,
                         max_abs_err=float(np.abs(ours - ref).max()), max_abs=float(np.abs(ref).max()),
                         torch_all=times["torch"], jax_all=times["jax"]))
    return dict(model="toy flow-map student", params=_params_count(params), shift=shift, rows=rows)


# ------------------------------------------------------------------------------------ report
def environment() -> dict:
    import diffusers
    import flax
    import jax
    import jaxlib
    import torch
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as fh:
            mem = round(int(fh.readline().split()[1]) / 1024 ** 2, 1)
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {mem} GiB RAM",
                python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                flax=flax.__version__, torch=torch.__version__, diffusers=diffusers.__version__,
                torch_threads=torch.get_num_threads(), jax_backend=jax.default_backend(),
                loadavg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)


def markdown(results: dict) -> str:
    lines = []
    models = results.get("model", [])
    if models:
        lines += ["| size | params | tokens/video (B) | | PyTorch (s) | anyflow-jax (s) | ratio (torch / ours) "
                  "| our compile (s) | matmul floor (s) | check |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in models:
            chk = m["check"]
            for k, label in (("forward", "forward"), ("train_step", "train step (MSE, AdamW)")):
                r = m[k]
                if k == "forward":
                    check = f"max abs diff {chk['forward_max_abs_err']:.1e} (of {chk['forward_max_abs']:.2g})"
                else:
                    check = "first losses " + " / ".join(f"{a:.6g} vs {b:.6g}" for a, b in
                                                       zip(chk["torch_losses"], chk["jax_losses"]))
                lines.append(f"| {m['size']} | {m['params'] / 1e6:.1f}M | {m['tokens']} ({m['batch']}) | {label} "
                             f"| {r['torch_s']:.3f} | {r['jax_s']:.3f} | **{r['ratio']:.2f}x** | {r['compile_s']:.1f} "
                             f"| {r['floor_s']:.3f} | {check} |")
        lines.append("")
    stages = results.get("stages", [])
    if stages:
        lines += ["| toy stage | program | batch | anyflow-jax (s/step) | compile, all programs (s) |",
                  "|---|---|---|---|---|"]
        for s in stages:
            for k, v in s["steps"].items():
                lines.append(f"| {s['stage']} | {k} | {s['batch']} | {v['jax_s']:.3f} | {s['compile_s']:.1f} |")
        lines.append("")
    samp = results.get("sampling")
    if samp:
        lines += ["| sampling (toy flow map) | batch | PyTorch (videos/s) | anyflow-jax (videos/s) "
                  "| ratio (ours / torch) | our compile (s) | max abs diff |",
                  "|---|---|---|---|---|---|---|"]
        for r in samp["rows"]:
            lines.append(f"| {r['steps']} step{'s' if r['steps'] > 1 else ''} | {r['batch']} "
                         f"| {r['torch_videos_per_s']:.1f} | {r['jax_videos_per_s']:.1f} | **{r['ratio']:.2f}x** "
                         f"| {r['compile_s']:.1f} | {r['max_abs_err']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def _csv(value: str, allowed, what: str):
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"error: unknown {what} {bad}; expected some of {list(allowed)}")
    return items


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help=f"model sizes, comma list of {tuple(SIZES)}")
    ap.add_argument("--stages", default=",".join(STAGES), help="toy stages for the stages section")
    ap.add_argument("--sample-steps", default=",".join(map(str, SAMPLE_STEPS)), help="step counts to sample with")
    ap.add_argument("--sample-batch", type=int, default=16, help="videos per sampling call")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="model section: fresh processes per library, run alternating (each does --repeats calls)")
    ap.add_argument("--json", default=None, help="write all results (with every timing) here")
    ap.add_argument("--markdown", default=None, help="write the markdown table here")
    ap.add_argument("--worker", choices=("torch", "jax"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:  # one library's model measurements, in a process of its own (bench_model)
        _worker_main(args.worker, args.sizes, args.workdir, args.repeats, args.json)
        return {}
    sections = _csv(args.sections, SECTIONS, "sections")
    sizes = _csv(args.sizes, SIZES, "sizes")
    stages = _csv(args.stages, STAGES, "stages")
    sample_steps = [int(s) for s in args.sample_steps.split(",") if s.strip()]
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")
    if args.rounds < 1:
        raise SystemExit("error: --rounds must be >= 1")

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    logging.getLogger("absl").setLevel(logging.WARNING)
    results: dict = {"environment": environment(), "command": "python tools/benchmark.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "settings": dict(repeats=args.repeats, rounds=args.rounds, optimizer=OPTIM)}
    with tempfile.TemporaryDirectory(prefix="anyflow_bench_") as workdir:
        if "model" in sections:
            results["model"] = []
            for name in sizes:
                print(f"[benchmark] model {name} ...", file=sys.stderr, flush=True)
                results["model"].append(bench_model(name, args.repeats, workdir, rounds=args.rounds))
        if "stages" in sections:
            results["stages"] = []
            for stage in stages:
                print(f"[benchmark] toy stage {stage} ...", file=sys.stderr, flush=True)
                results["stages"].append(bench_stage(stage, args.repeats, workdir))
        if "sampling" in sections:
            print("[benchmark] sampling ...", file=sys.stderr, flush=True)
            results["sampling"] = bench_sampling(args.repeats, workdir, args.sample_batch, sample_steps)
    results["environment"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    table = markdown(results)
    results["markdown"] = table
    print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    return results


if __name__ == "__main__":
    from anyflow_jax.cli import hugepage_malloc
    hugepage_malloc()  # as the entry points do: both libraries' workers inherit it (docs/results.md)
    main()
