"""Deviceless ahead-of-time compilation for TPU topologies: memory fit and cost of the real steps.

With ``libtpu`` installed (``pip install -e .[tpu]``), JAX compiles for a TPU topology on any
machine: :func:`topology_devices` gives abstract TPU devices of a named slice (``v5p-64``,
``v6e-16``, ``v5p:2x2x1``, several slices), the run's mesh is built on them, and the trainer's own
step functions (:func:`anyflow_jax.training.loop.compile_steps`) and the inference sampler
(:class:`anyflow_jax.inference.Generator`) are lowered on ``jax.ShapeDtypeStruct`` inputs that
carry the run's shardings. Nothing is allocated; the compiler reports per-chip memory
(:func:`memory_report`) and cost (:func:`cost_report`).

The analytic FLOPs (:func:`analytic_flops`) count the matrix multiplications of the same step
traced once more with ``remat_policy="none"`` and ``attention_impl="xla"`` (so attention inside a
Pallas kernel is counted, and rematerialisation is not): the forward and backward of every
network call the stage makes. Scans count ``length`` times; of the branches of a ``cond`` the
largest counts (every conditional transition of the backward simulation's rollout is taken), so
for stages with data-dependent branches the analytic count is the worst case.

XLA's cost analysis counts the body of a loop once (the scanned layers, the rollout's
transitions, the sampler's steps) and a Pallas kernel as zero FLOPs. :func:`loop_corrected_costs`
counts every iteration: the same programs compiled with 1 and 2 unscanned layers and every
``lax.scan`` unrolled (:func:`unrolled_scans`), extrapolated linearly to the real layer count;
:func:`kernel_flops` adds the matmuls inside the kernels (the count with ``xla`` attention minus
the count with the kernels left out). The run is built by the trainer's own functions
(:func:`~anyflow_jax.training.loop.make_run_mesh`, :func:`~anyflow_jax.training.loop.abstract_networks`,
:func:`~anyflow_jax.training.loop.derive_layout`).

Library entry points: :func:`abstract_run`, :func:`abstract_batch`, :func:`compile_train`,
:func:`compile_sampler`, :func:`step_report`, :func:`loop_corrected_costs`, :func:`slice_names`.
``tools/aot_compile.py`` is the command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from anyflow_jax import config as config_lib
from anyflow_jax import parallel
from anyflow_jax.errors import RunError

GiB = 2 ** 30


# ----------------------------------------------------------------------------------- chips
@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Per-chip numbers of a TPU generation (Cloud TPU system-architecture pages)."""
    generation: str
    hbm_bytes: int  # HBM capacity per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    cores_per_chip: int  # TensorCores per chip: the "-N" of a v4/v5p slice name counts cores
    ndim: int  # torus dimensions of the slice topology


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 32 * GiB, 275e12, 1228e9, 2, 3),
    "v5p": ChipSpec("v5p", 95 * GiB, 459e12, 2765e9, 2, 3),
    "v5e": ChipSpec("v5e", 16 * GiB, 197e12, 819e9, 1, 2),
    "v6e": ChipSpec("v6e", 32 * GiB, 918e12, 1640e9, 1, 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


def _grid(chips: int, ndim: int) -> tuple[int, ...]:
    """Slice shape of ``chips`` (a power of two) as Cloud TPU names them: powers of two, as even
    as possible, smallest first (v5p: 4 -> 2x2x1, 16 -> 2x2x4, 64 -> 4x4x4; v6e: 8 -> 2x4)."""
    if chips < 1 or chips & (chips - 1):
        raise RunError(f"a TPU slice has a power-of-two number of chips, got {chips}")
    dims = [1] * ndim
    n = chips
    while n > 1:
        i = min(range(ndim), key=lambda j: (dims[j], j))
        dims[i] *= 2
        n //= 2
    if ndim == 3 and chips == 4:
        return (2, 2, 1)
    return tuple(sorted(dims))


def parse_topology(name: str) -> tuple[ChipSpec, str]:
    """``"v5p-64"`` (Cloud TPU slice name: TensorCores for v4/v5p, chips for v5e/v6e) or
    ``"v5p:4x4x2"`` (chip grid) -> (chip spec, the topology name libtpu takes)."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*)[-:](.+)", text)
    if not m:
        raise RunError(f"topology {name!r}: expected e.g. 'v5p-8', 'v6e-16' or 'v5p:2x2x1'")
    gen, rest = _ALIASES.get(m.group(1), m.group(1)), m.group(2)
    if gen not in CHIPS:
        raise RunError(f"topology {name!r}: unknown TPU generation {m.group(1)!r} (known: {', '.join(CHIPS)})")
    chip = CHIPS[gen]
    if not re.fullmatch(r"\d+(x\d+)*", rest):
        raise RunError(f"topology {name!r}: expected a size ('{gen}-8') or a chip grid ('{gen}:2x2"
                       f"{'x1' if chip.ndim == 3 else ''}')")
    if "x" in rest:
        dims = tuple(int(d) for d in rest.split("x"))
        if len(dims) != chip.ndim:
            raise RunError(f"topology {name!r}: {gen} slices have {chip.ndim} dimensions")
    else:
        count = int(rest)
        if count % chip.cores_per_chip:
            raise RunError(f"topology {name!r}: {gen}-N counts TensorCores ({chip.cores_per_chip} per chip)")
        try:
            dims = _grid(count // chip.cores_per_chip, chip.ndim)
        except RunError as e:
            raise RunError(f"topology {name!r}: {e}") from None
    return chip, f"{gen}:{'x'.join(str(d) for d in dims)}"


SMALLEST_SLICE_CHIPS = {"v4": 4, "v5p": 4, "v5e": 1, "v6e": 1}  # the smallest slice Cloud TPU offers


def slice_names(generation: str, max_chips: int = 1024) -> list[str]:
    """Cloud TPU slice names of ``generation`` (``"v5p"``, ``"v6e"``...), smallest first, up to
    ``max_chips`` chips: ``v5p-8, v5p-16, ...`` (TensorCores) or ``v6e-1, v6e-4, v6e-8, ...`` (chips)."""
    gen = _ALIASES.get(generation.strip().lower(), generation.strip().lower())
    if gen not in CHIPS:
        raise RunError(f"topology {generation!r}: unknown TPU generation (known: {', '.join(CHIPS)})")
    chip, chips, out = CHIPS[gen], SMALLEST_SLICE_CHIPS[gen], []
    while chips <= max_chips:
        out.append(f"{gen}-{chips * chip.cores_per_chip}")
        chips *= 4 if chips == 1 else 2  # 1, 4, 8, 16, ... (no 2-chip slices)
    return out


def topology_devices(name: str, slices: int = 1) -> tuple[ChipSpec, list]:
    """Abstract TPU devices of ``slices`` slices of topology ``name`` (needs ``libtpu``)."""
    from jax.experimental import topologies
    chip, topo = parse_topology(name)
    kwargs = {"num_slices": int(slices)} if slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(topo, platform="tpu", **kwargs)
    except Exception as e:  # libtpu missing or the name unknown to it
        raise RunError(f"cannot describe TPU topology {topo} x{slices} ({e}); deviceless TPU compilation needs "
                       f"libtpu pinned to the jax release: pip install -e .[tpu]") from None
    return chip, list(desc.devices)


# ----------------------------------------------------------------------------------- the run
def _read_config(config) -> config_lib.RunConfig:
    """The typed config; the starting checkpoints a stage needs are never read here, so empty
    ``config.init`` fields get a placeholder."""
    if isinstance(config, config_lib.RunConfig):
        return config
    from anyflow_jax import stages
    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    record = stages.get(config.stage)
    for field in record.starts_from:
        if not config.init.get(field):
            config.init[field] = "<not loaded: deviceless compilation>"
    return config_lib.parse(config)


def abstract_run(config, devices: Sequence[Any]):
    """A :class:`~anyflow_jax.training.loop.Run` whose networks, step spec, mesh and shardings
    are the trainer's for ``config`` on ``devices``, with no parameters, data or checkpoints:
    the trainer's own :func:`~anyflow_jax.training.loop.make_run_mesh`,
    :func:`~anyflow_jax.training.loop.abstract_networks` (the student is the stage's kind of
    network: a flow map when the stage trains one; the teacher/critic share the config's
    architecture) and :func:`~anyflow_jax.training.loop.derive_layout`."""
    from anyflow_jax.training import loop

    cfg = _read_config(config)
    mesh = loop.make_run_mesh(cfg, devices, allow_subset=False)
    nets = loop.abstract_networks(cfg, notes=["deviceless: no parameters"])
    layout = loop.derive_layout(cfg, mesh, nets)
    return loop.Run(cfg=cfg, record=cfg.record, workdir="", nets=nets, **layout.fields(), ckpt=None, writer=None,
                    data_iterator=None, negative=None, latest_step=None)


# Wan2.1 at 480x832, 81 frames: VAE latents (21, 60, 104, 16), UMT5 context (512, 4096).
WAN_480P_LATENTS = (21, 60, 104, 16)
WAN_CONTEXT_LENGTH = 512


def batch_shapes(cfg: config_lib.RunConfig, latent_shape: Sequence[int] | None = None,
                 context_length: int | None = None) -> tuple[tuple[int, ...], int, Any, Any]:
    """(latent (F, H, W, C), context length, latent dtype, context dtype) of one example."""
    d = cfg.data
    if d.source == "moving_digits":
        shape = (d.num_frames, d.height, d.width, int(cfg.model.get("in_channels", 1)))
        length, ldt = d.context_length, jnp.float32
    else:
        shape, length, ldt = WAN_480P_LATENTS, WAN_CONTEXT_LENGTH, jnp.bfloat16
    shape = tuple(latent_shape) if latent_shape else shape
    return shape, int(context_length or length), ldt, jnp.float32


def data_shards(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))


def abstract_batch(run, global_batch: int, latent_shape: Sequence[int] | None = None,
                   context_length: int | None = None) -> dict:
    """The trainer's batch (``x0``, ``context`` over the batch axes; ``neg_context`` replicated)
    as ``jax.ShapeDtypeStruct``s."""
    shards = data_shards(run.mesh)
    if global_batch % shards:
        raise RunError(f"global batch {global_batch} is not divisible by the data axes (data x fsdp = {shards})")
    shape, length, ldt, cdt = batch_shapes(run.cfg, latent_shape, context_length)
    text_dim = int(run.nets.student.text_dim)
    sd = jax.ShapeDtypeStruct
    return {"x0": sd((global_batch,) + shape, ldt, sharding=parallel.batch_sharding(run.mesh, 1 + len(shape))),
            "context": sd((global_batch, length, text_dim), cdt, sharding=parallel.batch_sharding(run.mesh, 3)),
            "neg_context": sd((1, length, text_dim), cdt, sharding=run.replicated)}


def abstract_frozen(run):
    """The steps' frozen argument as sharded ``jax.ShapeDtypeStruct``s: the frozen teacher's
    parameters (or ``None``), or with LoRA the frozen bases and teacher
    (:func:`~anyflow_jax.training.loop.abstract_frozen`)."""
    from anyflow_jax.training import loop
    return loop.abstract_frozen(run)


def compile_train(run, batch):
    """The stage's steps compiled by the trainer's own :func:`~anyflow_jax.training.loop.compile_steps`
    (same jit, shardings and donation) on abstract state, frozen teacher and batch."""
    from anyflow_jax.training import loop
    return loop.compile_steps(run, loop.abstract_state(run), abstract_frozen(run), batch)


def sampler_kind(run) -> str:
    return run.record.sampler


def _sampler_inputs(run, global_batch, latent_shape, context_length, guidance):
    shape, length, _, cdt = batch_shapes(run.cfg, latent_shape, context_length)
    mesh, text_dim = run.mesh, int(run.nets.student.text_dim)
    sd = jax.ShapeDtypeStruct
    noise = sd((global_batch,) + shape, jnp.float32, sharding=parallel.batch_sharding(mesh, 1 + len(shape)))
    ctx = sd((global_batch, length, text_dim), cdt, sharding=parallel.batch_sharding(mesh, 3))
    neg = ctx if guidance != 1.0 else None
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), global_batch))
    keys = sd(keys.shape, keys.dtype, sharding=parallel.batch_sharding(mesh, 1))
    return noise, ctx, neg, keys


def compile_sampler(run, *, steps: int = 4, global_batch: int | None = None, guidance: float | None = None,
                    latent_shape=None, context_length=None, shift: float = 5.0):
    """The inference sampler of the stage's model kind (:class:`anyflow_jax.inference.Generator`'s
    jitted function) for ``steps`` steps, lowered on the EMA parameters' shardings and a batch
    split over the data axes. Returns ``(compiled, lowered_fn, args)``."""
    from anyflow_jax import stages
    from anyflow_jax.inference import Generator
    from anyflow_jax.training import loop
    kind = sampler_kind(run)
    gen = Generator(kind=kind, stage=run.record.name, model=run.nets.student, params=None, path="<deviceless>",
                    data={}, shift=shift)
    g = stages.get_sampler(kind).default_guidance if guidance is None else float(guidance)
    fn = gen._fn(int(steps), g)
    gb = global_batch or data_shards(run.mesh)
    params = loop._abstract(loop._unboxed_abstract(run.nets.student), run.state_shardings.params)
    args = (params,) + _sampler_inputs(run, gb, latent_shape, context_length, g)
    with jax.set_mesh(run.mesh):
        compiled = fn.lower(*args).compile()
    return compiled, fn, args


def sampler_analytic_flops(run, args, *, steps: int = 4, guidance: float | None = None, shift: float = 5.0,
                           attention: str | None = "xla", kernels: bool = True) -> float:
    """Model FLOPs (all chips) of the sampler :func:`compile_sampler` compiled, counted on its
    matmuls with ``attention_impl='xla'`` (``args``: the abstract inputs it returned);
    ``attention=None``/``kernels=False`` as in :func:`analytic_flops`."""
    from anyflow_jax import stages
    from anyflow_jax.inference import Generator
    kind = sampler_kind(run)
    model = run.nets.student.clone(attention_impl=attention) if attention is not None else run.nets.student
    gen = Generator(kind=kind, stage=run.record.name, model=model, params=None, path="<deviceless>", data={},
                    shift=shift)
    g = stages.get_sampler(kind).default_guidance if guidance is None else float(guidance)
    strip = lambda t: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
    return jaxpr_dot_flops(jax.make_jaxpr(gen._fn(int(steps), g))(*strip(args)).jaxpr, kernels=kernels)


def sampler_kernel_flops(run, args, *, steps: int = 4) -> float:
    """The sampler's matmul FLOPs inside Pallas kernels (see :func:`kernel_flops`)."""
    if run.nets.student.attention_impl != "splash":
        return 0.0
    return (sampler_analytic_flops(run, args, steps=steps)
            - sampler_analytic_flops(run, args, steps=steps, attention=None, kernels=False))


def compile_vae_decode(device, *, latent_shape: Sequence[int] = WAN_480P_LATENTS, batch: int = 1,
                       chunk: int | None = 1, dtype=jnp.float32, model_kwargs: dict | None = None):
    """The Wan2.1 VAE's decode (``WanVAE.decode``: first latent frame alone, the rest scanned in
    steps of ``chunk`` latent frames) compiled for one TPU chip ``device``, on latents
    ``(batch,) + latent_shape`` and fp32 parameters. Returns ``(compiled, model, args)``.
    ``model_kwargs`` override :class:`WanVAE` fields (default: Wan2.1's widths)."""
    from flax import linen as nn
    from anyflow_jax.models.wan_vae import WanVAE
    model = WanVAE(dtype=dtype, **dict(model_kwargs or {}))
    mesh = jax.sharding.Mesh(np.asarray([device]), ("x",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=rep),
                                    nn.meta.unbox(model.abstract_params()))
    z = jax.ShapeDtypeStruct((int(batch),) + tuple(latent_shape[:3]) + (model.z_dim,), jnp.float32, sharding=rep)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="decode", chunk=chunk))
    with jax.set_mesh(mesh):
        compiled = fn.lower(params, z).compile()
    return compiled, model, (params, z)


# ----------------------------------------------------------------------------------- analysis
def memory_report(compiled) -> dict[str, int]:
    """Per-chip bytes from the compiler: argument, output, alias, temp, generated code and the
    peak (``peak_memory_in_bytes`` where reported, else argument + output - alias + temp)."""
    m = compiled.memory_analysis()
    if m is None:
        raise RunError("the compiler reported no memory analysis")
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    peak = getattr(m, "peak_memory_in_bytes", None)
    out["peak"] = int(peak) if peak else out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def cost_report(compiled) -> dict[str, float]:
    """The compiler's per-chip ``flops`` and ``bytes accessed``."""
    c = compiled.cost_analysis()
    if isinstance(c, (list, tuple)):
        c = c[0] if c else {}
    c = c or {}
    return {"flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed", 0.0))}


def _subjaxprs(params):
    for v in params.values():
        for x in (v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def jaxpr_dot_flops(jaxpr, *, kernels: bool = True) -> float:
    """FLOPs (2 per multiply-add) of the ``dot_general``s of a jaxpr, scans times their length,
    the largest branch of each ``cond``; a ``while`` body counts once. ``kernels=False`` leaves
    out Pallas kernels (``pallas_call``), whose FLOPs XLA's cost analysis does not see."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contract = math.prod(lhs[i] for i in lc)
            total += 2.0 * contract * math.prod(eqn.outvars[0].aval.shape)
        elif name == "pallas_call" and not kernels:
            continue
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_dot_flops(eqn.params["jaxpr"].jaxpr, kernels=kernels)
        elif name == "cond":
            total += max(jaxpr_dot_flops(b.jaxpr, kernels=kernels) for b in eqn.params["branches"])
        else:
            total += sum(jaxpr_dot_flops(j, kernels=kernels) for j in _subjaxprs(eqn.params))
    return total


def analytic_flops(run, batch, *, remat: bool = False, programs: Sequence[str] = ("generator", "critic"),
                   attention: str | None = "xla", kernels: bool = True) -> dict[str, float]:
    """FLOPs (whole step, all chips) of each step of the stage, counted on the matmuls of the
    step traced with ``attention_impl='xla'`` (attention in a Pallas kernel is counted too) and
    ``remat_policy='none'`` (the model FLOPs: forward and backward of every network call), or
    with the config's remat policy when ``remat`` (adds the rematerialised forwards).
    ``attention=None`` traces the config's attention; ``kernels=False`` leaves Pallas kernels out."""
    from anyflow_jax.training import loop, steps
    plain = {} if remat else {"remat_policy": "none"}
    if attention is not None:
        plain["attention_impl"] = attention
    spec = dataclasses.replace(
        run.spec, student=run.spec.student.clone(**plain),
        teacher=run.spec.teacher.clone(**plain) if run.spec.teacher is not None else None)
    state, frozen = loop.abstract_state(run), abstract_frozen(run)
    strip = lambda t: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
    args = (strip(state), strip(frozen), strip(batch))
    out = {}
    if "generator" in programs:
        out["generator"] = jaxpr_dot_flops(jax.make_jaxpr(steps.make_generator_step(spec))(*args).jaxpr,
                                           kernels=kernels)
    if run.record.has_critic and "critic" in programs:
        out["critic"] = jaxpr_dot_flops(jax.make_jaxpr(steps.make_critic_step(spec))(*args).jaxpr, kernels=kernels)
    return out


def kernel_flops(run, batch, *, programs: Sequence[str] = ("generator", "critic"),
                 executed: dict[str, float] | None = None) -> dict[str, float]:
    """FLOPs (all chips) of each step's matmuls inside Pallas kernels (splash attention), which
    XLA's cost analysis counts as zero: the step's count with ``attention_impl='xla'`` minus its
    count as configured with the kernels left out, both with the config's remat (the forward of
    a rematerialised kernel counts twice). Zero when the config uses no kernel. ``executed``:
    ``analytic_flops(run, batch, remat=True)`` when the caller has it (saves one trace per step)."""
    if "splash" not in {run.spec.student.attention_impl, getattr(run.spec.teacher, "attention_impl", None)}:
        return {k: 0.0 for k in programs if k == "generator" or (k == "critic" and run.record.has_critic)}
    xla = dict(executed or {})
    missing = tuple(k for k in programs if k not in xla)
    if missing:
        xla.update(analytic_flops(run, batch, remat=True, programs=missing))
    xla = {k: v for k, v in xla.items() if k in programs}
    own = analytic_flops(run, batch, remat=True, programs=programs, attention=None, kernels=False)
    return {k: xla[k] - own[k] for k in xla}


@contextlib.contextmanager
def unrolled_scans():
    """Every ``jax.lax.scan`` traced inside the block is fully unrolled (``unroll=True``): no XLA
    while loop is left, so the compiler's cost analysis counts every iteration (it counts a loop
    body once). Only for measuring: the programs are larger and slower to compile."""
    scan = jax.lax.scan

    def unrolled(f, init, xs=None, length=None, reverse=False, unroll=1, **kwargs):
        del unroll
        return scan(f, init, xs, length=length, reverse=reverse, unroll=True, **kwargs)

    jax.lax.scan = unrolled
    try:
        yield
    finally:
        jax.lax.scan = scan


def layer_variant(config, num_layers: int) -> config_lib.RunConfig:
    """``config`` with ``num_layers`` unscanned blocks (``scan_layers=False``), everything else
    equal; the replication check is off (a 1-layer model is mostly embeddings)."""
    cfg = _read_config(config)
    return dataclasses.replace(
        cfg, model={**cfg.model, "num_layers": int(num_layers), "scan_layers": False},
        train=dataclasses.replace(cfg.train, max_unsharded_fraction=1.0))


def loop_corrected_costs(config, devices: Sequence[Any], *, global_batch: int, latent_shape=None,
                         context_length=None, train: bool = True, sampler_steps: int = 0,
                         layers: tuple[int, int] = (1, 2)) -> dict[str, dict[str, float]]:
    """The compiler's per-chip FLOPs and bytes accessed of each program with every loop counted
    in full: the same programs compiled with ``layers`` = (a, b) unscanned blocks and every other
    ``lax.scan`` (rollout transitions, sampler steps) unrolled (:func:`unrolled_scans`), then
    extrapolated linearly to the config's layer count L: ``c(a) + (L - a) (c(b) - c(a)) / (b - a)``
    (every block costs the same). Keys: ``generator``, ``critic`` (stages with a critic),
    ``sampler`` (with ``sampler_steps``); values ``{"flops", "bytes_accessed", "at": {a: .., b: ..}}``."""
    a, b = layers
    full = abstract_run(config, devices)
    num_layers = int(full.nets.student.num_layers)
    measured: dict[int, dict[str, dict[str, float]]] = {}
    for n in (a, b):
        run = abstract_run(layer_variant(full.cfg, n), devices)
        out = measured[n] = {}
        with unrolled_scans():
            if train:
                compiled = compile_train(run, abstract_batch(run, global_batch, latent_shape, context_length))
                for name in ("generator", "critic"):
                    if getattr(compiled, name) is not None:
                        out[name] = cost_report(getattr(compiled, name))
            if sampler_steps:
                sampler, _, _ = compile_sampler(run, steps=sampler_steps, global_batch=global_batch,
                                                latent_shape=latent_shape, context_length=context_length)
                out["sampler"] = cost_report(sampler)
    result = {}
    for name in measured[a]:
        ca, cb = measured[a][name], measured[b][name]
        result[name] = {k: ca[k] + (num_layers - a) * (cb[k] - ca[k]) / (b - a) for k in ("flops", "bytes_accessed")}
        result[name]["at"] = {a: ca, b: cb}
        result[name]["num_layers"] = num_layers
    return result


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "c64": 8}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([0-9,]*)\][^ ]*\s+([\w\-]+)\(")
_OPNAME = re.compile(r'op_name="([^"]*)"')


def largest_buffers(compiled, n: int = 8) -> list[dict]:
    """The ``n`` largest per-chip arrays the compiled (partitioned) program produces, from its HLO:
    bytes, shape, HLO op and the JAX source op that made it."""
    try:
        text = compiled.as_text()
    except Exception:
        return []
    return hlo_largest_arrays(text, n)


def hlo_largest_arrays(text: str, n: int = 8) -> list[dict]:
    """The ``n`` largest arrays an HLO module's text defines (one row per shape and source op)."""
    found: dict[tuple, dict] = {}
    for line in text.splitlines():
        mm = _INSTR.match(line)
        if not mm or mm.group(2) not in _DTYPE_BYTES:
            continue
        dims = tuple(int(d) for d in mm.group(3).split(",") if d)
        size = _DTYPE_BYTES[mm.group(2)] * math.prod(dims)
        src = _OPNAME.search(line)
        src = src.group(1) if src else ""
        key = (mm.group(2), dims, src)
        if key not in found or found[key]["bytes"] < size:
            found[key] = {"bytes": size, "shape": f"{mm.group(2)}[{','.join(map(str, dims))}]",
                          "op": mm.group(4), "source": src}
    return sorted(found.values(), key=lambda r: -r["bytes"])[:n]


def lowered_largest_arrays(run, batch, program: str = "generator", n: int = 8) -> list[dict]:
    """For a step the compiler rejects (out of memory): the largest arrays of the step's program
    before partitioning (global shapes, with the JAX op that makes each), from the same step
    function lowered on the same sharded abstract inputs."""
    from anyflow_jax.training import loop, steps
    make = steps.make_generator_step if program == "generator" else steps.make_critic_step
    state, frozen = loop.abstract_state(run), abstract_frozen(run)  # eager ops: outside the TPU mesh
    with jax.set_mesh(run.mesh):
        lowered = jax.jit(make(run.spec)).lower(state, frozen, batch)
    return hlo_largest_arrays(lowered.as_text(dialect="hlo", debug_info=True), n)


def step_report(name: str, compiled, chip: ChipSpec, *, analytic: float | None = None,
                executed: float | None = None, corrected: dict[str, float] | None = None,
                kernel: float | None = None, num_chips: int = 1, buffers: int = 8) -> dict[str, Any]:
    """Memory, cost and roofline of one compiled program on ``chip``, all per chip.

    ``analytic``/``executed``: the step's model FLOPs without and with rematerialisation over all
    chips (:func:`analytic_flops`), divided by ``num_chips`` here. XLA's cost analysis counts the
    body of a loop (the scanned layers, the rollout, the sampler's steps) once and a Pallas
    kernel (splash attention) as zero FLOPs, so the compiler's own ``flops``/``bytes_accessed``
    of a scanned program are far below its work. ``corrected`` (per chip,
    :func:`loop_corrected_costs`): the compiler's figures with every loop counted; ``kernel``
    (all chips, :func:`kernel_flops`): the matmul FLOPs inside Pallas kernels. Then
    ``compiler_flops`` = corrected + kernel per chip, and ``compiler_over_analytic`` =
    compiler_flops / analytic (without ``corrected``: the uncorrected ratio, flagged
    ``loops_counted_once``); the remat overhead is ``executed / analytic``; the roofline bound
    is ``max(FLOPs / peak, bytes / bandwidth)`` with the corrected figures (else with the larger
    of the compiler's and the executed FLOPs: both lower bounds)."""
    mem = memory_report(compiled)
    cost = cost_report(compiled)
    need = max(mem["peak"], mem["argument"] + mem["output"] - mem["alias"] + mem["temp"])
    rep: dict[str, Any] = {"program": name, "memory": mem, "required_bytes": need, "hbm_bytes": chip.hbm_bytes,
                           "fits": need <= chip.hbm_bytes, "num_chips": num_chips, **cost}
    rep.update(flops_fields(rep, chip, num_chips, analytic=analytic, executed=executed, corrected=corrected,
                            kernel=kernel))
    if not rep["fits"]:
        rep["largest_buffers"] = largest_buffers(compiled, buffers)
    return rep


def flops_fields(cost: dict[str, float], chip: ChipSpec, num_chips: int = 1, *, analytic: float | None = None,
                 executed: float | None = None, corrected: dict[str, float] | None = None,
                 kernel: float | None = None) -> dict[str, Any]:
    """The FLOPs and roofline fields of :func:`step_report` from the compiler's per-chip ``cost``
    (``flops``, ``bytes_accessed``) and the counts described there."""
    rep: dict[str, Any] = {}
    n = max(num_chips, 1)
    flops, nbytes = cost["flops"], cost["bytes_accessed"]
    if corrected is not None:
        rep["loop_corrected_flops"] = float(corrected["flops"])
        rep["kernel_flops"] = (kernel or 0.0) / n
        rep["compiler_flops"] = flops = rep["loop_corrected_flops"] + rep["kernel_flops"]
        rep["loop_corrected_bytes_accessed"] = nbytes = float(corrected["bytes_accessed"])
    if analytic is not None:
        rep["analytic_flops"] = analytic / n
        rep["compiler_over_analytic"] = flops / rep["analytic_flops"] if analytic else float("nan")
        if corrected is None:
            rep["loops_counted_once"] = True
    if executed is not None:
        rep["executed_flops"] = executed / n
        if corrected is None:
            flops = max(flops, rep["executed_flops"])
        if analytic:
            rep["remat_overhead"] = executed / analytic
    rep["roofline_s"] = max(flops / chip.peak_flops, nbytes / chip.hbm_bandwidth)
    return rep


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def format_report(rep: dict[str, Any]) -> str:
    m = rep["memory"]
    hbm = rep["hbm_bytes"]
    need = rep["required_bytes"]
    lines = [f"[{rep['program']}] per chip ({rep['num_chips']} chips):",
             f"  memory: argument {format_bytes(m['argument'])}, output {format_bytes(m['output'])}, "
             f"alias {format_bytes(m['alias'])}, temp {format_bytes(m['temp'])}, compiler peak "
             f"{format_bytes(m['peak'])}; needs {format_bytes(need)} of {format_bytes(hbm)} HBM "
             f"({100 * need / hbm:.0f}%)" + ("" if rep["fits"] else "  DOES NOT FIT"),
             f"  compiler: {rep['flops']:.3e} FLOPs, {rep['bytes_accessed']:.3e} bytes accessed "
             f"(loop bodies counted once)"]
    if "compiler_flops" in rep:
        lines.append(f"  compiler, every loop iteration counted (layers extrapolated, scans unrolled): "
                     f"{rep['loop_corrected_flops']:.3e} FLOPs, {rep['loop_corrected_bytes_accessed']:.3e} bytes "
                     f"accessed; + {rep['kernel_flops']:.3e} matmul FLOPs inside Pallas kernels (counted as 0 by "
                     f"XLA) = {rep['compiler_flops']:.3e} FLOPs")
    if "analytic_flops" in rep:
        what = "compiler (loops counted once)" if rep.get("loops_counted_once") else "compiler"
        lines.append(f"  analytic model FLOPs (fwd+bwd of every network call, no remat): {rep['analytic_flops']:.3e}; "
                     f"{what} / analytic = {rep['compiler_over_analytic']:.2f}")
    if "executed_flops" in rep:
        lines.append(f"  with the config's remat: {rep['executed_flops']:.3e} FLOPs; remat overhead "
                     f"{rep.get('remat_overhead', float('nan')):.2f}x")
    lines.append(f"  roofline lower bound of the step: {rep['roofline_s'] * 1e3:.1f} ms")
    if rep.get("largest_buffers"):
        lines.append("  largest buffers (per chip):")
    for b in rep.get("largest_buffers", []):
        lines.append(f"    {format_bytes(b['bytes'])}  {b['shape']}  {b['op']}  {b['source']}")
    return "\n".join(lines)
