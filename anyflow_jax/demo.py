"""A forward-pass tour of the embedded default: ``python -m anyflow_jax.demo``.

Builds the toy Wan DiT with random weights, exports it as a diffusers checkpoint, loads it back
as a teacher and as a new AnyFlow flow-map student, checks that the student equals the teacher
on the diagonal r = t, and takes a few flow-map jumps from noise. Training arrives with
``python -m anyflow_jax.train``; until then this is the main job of the quick start.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax.defaults import toy_model_config, toy_video_shape
from anyflow_jax.checkpoints.diffusers import load_transformer, save_transformer
from anyflow_jax.models.wan import WanTransformer3D


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="flow-map jumps from noise to data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        ap.error("--batch and --steps must be positive")

    cfg = toy_model_config().to_dict()
    teacher = WanTransformer3D.from_config(cfg)
    runtime = dict(dtype=teacher.dtype, attention_impl=teacher.attention_impl,
                   scan_layers=teacher.scan_layers, remat_policy=teacher.remat_policy)
    key = jax.random.key(args.seed)
    pkey, nkey, ckey, xkey = jax.random.split(key, 4)
    params = teacher.init_params(pkey)
    # the default init zeroes the output head; give it weights so the outputs mean something
    params["proj_out"]["kernel"] = 0.02 * jax.random.normal(nkey, params["proj_out"]["kernel"].shape)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
    print(f"toy Wan DiT: {cfg['num_layers']} layers, dim {teacher.inner_dim}, {n_params / 1e6:.2f}M parameters, "
          f"devices: {jax.devices()}")

    with tempfile.TemporaryDirectory() as tmp:
        save_transformer(f"{tmp}/transformer", teacher, params)
        teacher, tparams = load_transformer(f"{tmp}/transformer", model_kwargs=runtime)
        student, sparams = load_transformer(f"{tmp}/transformer", flow_map=True, model_kwargs=runtime)
    print("exported to diffusers format and loaded back as teacher and as flow-map student")

    f, h, w, c = toy_video_shape()
    b = args.batch
    z = jax.random.normal(xkey, (b, f, h, w, c))
    context = jax.random.normal(ckey, (b, 4, cfg["text_dim"]))
    t = jnp.full((b, f), 0.8)

    teacher_fn = jax.jit(lambda p, z, t, c: teacher.apply({"params": p}, z, t, None, c))
    student_fn = jax.jit(lambda p, z, t, r, c: student.apply({"params": p}, z, t, r, c))
    t0 = time.perf_counter()
    u_t = teacher_fn(tparams, z, t, context).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    u_t = teacher_fn(tparams, z, t, context).block_until_ready()
    run_ms = 1e3 * (time.perf_counter() - t0)
    u_diag = student_fn(sparams, z, t, t, context)
    u_jump = student_fn(sparams, z, t, t * 0.25, context)
    print(f"teacher forward {tuple(z.shape)} -> {tuple(u_t.shape)}: compile {compile_s:.1f}s, run {run_ms:.1f}ms")
    same = bool(jnp.array_equal(u_diag, u_t))
    print(f"student u(z, t, r=t) == teacher u(z, t): {same} (bit for bit)")
    print(f"student u(z, t, r=t/4) differs from the diagonal by {float(jnp.abs(u_jump - u_diag).max()):.3g}")

    grid = jnp.linspace(1.0, 0.0, args.steps + 1)
    shift = 5.0
    grid = shift * grid / (1 + (shift - 1) * grid)
    x = z
    for i in range(args.steps):
        ti = jnp.full((b, f), grid[i])
        ri = jnp.full((b, f), grid[i + 1])
        x = x - (grid[i] - grid[i + 1]) * student_fn(sparams, x, ti, ri, context)
    print(f"{args.steps} flow-map jumps on the shifted grid {[round(float(g), 3) for g in grid]}: "
          f"sample std {float(x.std()):.3f} (untrained weights: not a digit yet)")
    if not same:
        print("error: the flow-map student does not reproduce the teacher on the diagonal", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from anyflow_jax.cli import hugepage_malloc
    hugepage_malloc()  # re-executes once with huge-page malloc where that helps (cli.py)
    sys.exit(main())
