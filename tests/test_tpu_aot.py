"""Deviceless TPU compilation (anyflow_jax.parallel.aot): a tiny config's real on-policy train
steps (generator and critic, through the trainer's own compile_steps) and its 4-step sampler are
compiled with splash attention for a 4-chip v5p slice on this CPU machine, and the compiler's
memory analysis must be present and positive. Needs libtpu (requirements-test.txt; `pip install -e .[tpu]`)."""
import json
import os

import jax
import jax.numpy as jnp
import pytest

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # libtpu's init without a TPU VM
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest workers and other processes compile too

from anyflow_jax.defaults import toy_config  # noqa: E402
from anyflow_jax.errors import RunError  # noqa: E402
from anyflow_jax.parallel import aot  # noqa: E402

pytest.importorskip("libtpu", reason="deviceless TPU compilation needs libtpu (pip install -e .[tpu])")

TOPOLOGY = "v5p-8"  # 2x2x1: four chips


def test_topology_names():
    assert aot.parse_topology("v5p-8")[1] == "v5p:2x2x1"
    assert aot.parse_topology("v5p-16")[1] == "v5p:2x2x2"
    assert aot.parse_topology("v5p-64")[1] == "v5p:2x4x4"
    assert aot.parse_topology("v5p-128")[1] == "v5p:4x4x4"
    assert aot.parse_topology("v6e-8")[1] == "v6e:2x4"
    assert aot.parse_topology("v5litepod-16")[1] == "v5e:4x4"
    chip, name = aot.parse_topology("v5p:2x2x1")
    assert name == "v5p:2x2x1" and chip.hbm_bytes == 95 * aot.GiB
    for bad, words in (("v5p-6", "power-of-two"), ("v9x-8", "unknown TPU generation"), ("v5p-3", "TensorCores"),
                       ("tpu", "expected e.g."), ("v6e:2x2x2", "2 dimensions"), ("v5p-x8", "expected a size")):
        with pytest.raises(RunError, match=words):
            aot.parse_topology(bad)


def test_jaxpr_dot_flops_counts_scans_and_the_largest_branch():
    def f(x, w):
        def body(c, _):
            return c @ w, None
        y, _ = jax.lax.scan(body, x, None, length=5)
        return jax.lax.cond(y.sum() > 0, lambda a: a @ w @ w, lambda a: a @ w, y)
    x, w = jnp.zeros((3, 4)), jnp.zeros((4, 4))
    per_matmul = 2 * 3 * 4 * 4
    assert aot.jaxpr_dot_flops(jax.make_jaxpr(f)(x, w).jaxpr) == (5 + 2) * per_matmul


def test_matmuls_inside_pallas_kernels_can_be_left_out_of_the_count():
    """XLA's cost analysis counts a Pallas kernel as zero FLOPs; ``kernels=False`` counts the same
    way, so the xla-attention count minus it is the kernel's share (aot.kernel_flops)."""
    from anyflow_jax.models import attention
    b, s, h, d = 1, 256, 2, 128
    q = jax.ShapeDtypeStruct((b, s, h, d), jnp.float32)
    xla = jax.make_jaxpr(lambda q, k, v: attention._xla_attention(q, k, v, 0.1))(q, q, q).jaxpr
    splash = jax.make_jaxpr(lambda q, k, v: attention._splash_attention(q, k, v, 0.1))(q, q, q).jaxpr
    assert aot.jaxpr_dot_flops(xla) == 4 * b * h * s * s * d  # q k^T and p v
    assert aot.jaxpr_dot_flops(splash, kernels=False) == 0
    assert aot.jaxpr_dot_flops(splash) > 0  # the kernel body is a jaxpr with matmuls


@pytest.fixture(scope="module")
def tiny_on_policy():
    chip, devices = aot.topology_devices(TOPOLOGY)
    assert len(devices) == 4 and chip.generation == "v5p"
    c = toy_config("on_policy")
    c.data.global_batch_size = 4
    c.model.remat_policy = "full"
    c.model.attention_impl = "splash"  # the Pallas kernel, compiled for TPU (Mosaic)
    run = aot.abstract_run(c, devices)
    return chip, run, aot.abstract_batch(run, 4)


@pytest.mark.slow
def test_on_policy_steps_and_sampler_compile_for_tpu_without_a_tpu(tiny_on_policy):
    chip, run, batch = tiny_on_policy
    assert dict(run.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert run.mesh.devices.flat[0].platform == "tpu"
    compiled = aot.compile_train(run, batch)
    assert compiled.generator is not None and compiled.critic is not None
    assert "tpu_custom_call" in compiled.generator.as_text()  # splash attention is a Mosaic kernel
    # the analytic count of the generator step only (tracing the critic's too adds ~5 s)
    analytic = aot.analytic_flops(run, batch, programs=("generator",))["generator"]
    executed = aot.analytic_flops(run, batch, remat=True, programs=("generator",))["generator"]
    kernel = aot.kernel_flops(run, batch, programs=("generator",), executed={"generator": executed})["generator"]
    assert 0 < kernel < executed  # the splash kernels' matmuls, which the compiler counts as zero
    for name, program in (("generator", compiled.generator), ("critic", compiled.critic)):
        counts = dict(analytic=analytic, executed=executed) if name == "generator" else {}
        rep = aot.step_report(name, program, chip, num_chips=4, **counts)
        mem = rep["memory"]
        for field in ("argument", "output", "temp", "peak"):
            assert mem[field] > 0, (name, field, mem)
        assert rep["fits"] and rep["flops"] > 0 and rep["bytes_accessed"] > 0 and rep["roofline_s"] > 0
        assert "per chip" in aot.format_report(rep)
        if counts:
            assert rep["analytic_flops"] > 0 and rep["remat_overhead"] > 1.0  # full remat recomputes forwards
    # the trainer's state is donated: its buffers alias the outputs
    assert aot.memory_report(compiled.generator)["alias"] > 0

    sampler, _, args = aot.compile_sampler(run, steps=4)
    noise = args[1]
    assert noise.shape == (4, 8, 16, 16, 1) and noise.sharding.spec[0] == ("data", "fsdp")
    flops = aot.sampler_analytic_flops(run, args, steps=4)
    rep = aot.step_report("sampler", sampler, chip, num_chips=4, analytic=flops, executed=flops)
    assert all(rep["memory"][f] > 0 for f in ("argument", "output", "temp", "peak"))
    assert rep["flops"] > 0 and rep["analytic_flops"] > 0 and rep["remat_overhead"] == 1.0


def test_a_program_that_does_not_fit_names_its_largest_buffers(tiny_on_policy):
    chip, run, _ = tiny_on_policy
    mesh = run.mesh
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=sh)
    with jax.set_mesh(mesh):
        compiled = jax.jit(lambda a: jnp.tanh(a @ a) @ a).lower(x).compile()
    small = aot.dataclasses.replace(chip, hbm_bytes=1024)
    rep = aot.step_report("matmuls", compiled, small)
    assert not rep["fits"]
    buffers = rep["largest_buffers"]
    assert buffers and buffers[0]["bytes"] >= 256 * 256 * 4 and "f32[256,256]" in buffers[0]["shape"]
    assert "DOES NOT FIT" in aot.format_report(rep)


def test_largest_arrays_of_a_lowered_program_name_their_jax_op():
    lowered = jax.jit(lambda a: jnp.tanh(a @ a.T).sum(0)).lower(jax.ShapeDtypeStruct((64, 8), jnp.float32))
    rows = aot.hlo_largest_arrays(lowered.as_text(dialect="hlo", debug_info=True), 2)
    assert rows[0]["shape"] == "f32[64,64]" and rows[0]["bytes"] == 64 * 64 * 4
    assert rows[0]["source"].endswith(("dot_general", "tanh"))


def test_slice_names_of_a_generation_smallest_first():
    assert aot.slice_names("v5p", 64) == ["v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128"]
    assert aot.slice_names("v6e", 16) == ["v6e-1", "v6e-4", "v6e-8", "v6e-16"]
    assert [aot.parse_topology(n)[1] for n in aot.slice_names("v6e", 8)] == ["v6e:1x1", "v6e:2x2", "v6e:2x4"]
    with pytest.raises(RunError, match="unknown TPU generation"):
        aot.slice_names("v9x")


@pytest.mark.slow
def test_loop_corrected_flops_match_a_fully_unrolled_compile():
    """The extrapolation from 1 and 2 unscanned layers (every scan unrolled) gives the compiler's
    FLOPs of the whole program: equal, within 3%, to compiling the 3-layer model unrolled, and
    more than twice the scanned program's count (which counts the layer scan's body once), on CPU."""
    c = toy_config("teacher")
    c.data.global_batch_size = 2
    c.model.num_layers = 3  # extrapolated from 1 and 2 layers to 3 (the smallest that tests it)
    devices = jax.devices()[:1]
    run = aot.abstract_run(c, devices)
    assert run.nets.student.num_layers == 3 and run.nets.student.scan_layers
    corrected = aot.loop_corrected_costs(c, devices, global_batch=2, sampler_steps=2)
    assert set(corrected) == {"generator", "sampler"}
    full = aot.abstract_run(aot.layer_variant(c, 3), devices)
    assert not full.nets.student.scan_layers and full.nets.student.num_layers == 3
    scan = jax.lax.scan
    with aot.unrolled_scans():
        assert jax.lax.scan is not scan
        gen = aot.compile_train(full, aot.abstract_batch(full, 2)).generator
        sampler, _, _ = aot.compile_sampler(full, steps=2, global_batch=2)
    assert jax.lax.scan is scan  # the patch is undone
    for name, program in (("generator", gen), ("sampler", sampler)):
        want = aot.cost_report(program)["flops"]
        assert corrected[name]["flops"] == pytest.approx(want, rel=0.03), name
    scanned = aot.cost_report(aot.compile_train(run, aot.abstract_batch(run, 2)).generator)["flops"]
    print("corrected / scanned", corrected["generator"]["flops"] / scanned)
    assert corrected["generator"]["flops"] > 2.0 * scanned  # the scanned layers were counted once
    # and the corrected count agrees with the traced model FLOPs (no remat in the toy config)
    analytic = aot.analytic_flops(run, aot.abstract_batch(run, 2), programs=("generator",))["generator"]
    assert 1.0 < corrected["generator"]["flops"] / analytic < 1.3


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "aot_compile.py")


def _tool(*args):
    import subprocess
    import sys
    env = dict(os.environ, TPU_WORKER_HOSTNAMES="localhost", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, cwd=ROOT, check=False,
                          timeout=900)


@pytest.mark.slow
def test_cli_searches_the_smallest_slice_and_reports_memory_and_flops(tmp_path):
    """`--topology v5p` (no size) tries v5p-8 (4 chips: the config's 8-way data mesh does not fit
    on it, skipped) then v5p-16, which fits; the JSON has the program's memory and FLOPs. Each
    TPU compile costs 10-20 s even at toy size, so this runs one: no sampler (``--sampler_steps
    0``) and no loop correction (``--noloop_corrected``, its 1- and 2-layer compiles); both are
    checked in process above."""
    out = tmp_path / "aot.json"
    p = _tool("--config", "configs/toy.py:teacher", "--topology", "v5p", "--max_chips", "16", "--sampler_steps", "0", "--noloop_corrected",
              "--config.mesh.data=8", "--config.mesh.fsdp=1", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [t["topology"] for t in result["search"]] == ["v5p-8", "v5p-16"]
    assert not result["search"][0]["fits"] and "8 devices, have 4" in result["search"][0]["why"]
    assert result["smallest_slice"] == "v5p-16" and result["search"][1]["fits"]
    assert result["run"]["chips"] == 8 and result["run"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    reports = {r["kind"]: r for r in result["reports"]}
    assert set(reports) == {"generator"}
    for kind, r in reports.items():
        for field in ("argument", "output", "temp", "peak"):
            assert r["memory"][field] > 0, (kind, field)
        assert r["fits"] and 0 < r["required_bytes"] < r["hbm_bytes"] == 95 * aot.GiB
        assert r["flops"] > 0 and r["analytic_flops"] > 0 and r["roofline_s"] > 0
        # without loop correction the 4 scanned layers are counted once, and the report says so
        assert "loop_corrected_flops" not in r and r["loops_counted_once"], kind
        assert 0.2 < r["compiler_over_analytic"] < 0.5, kind
    assert "smallest v5p slice" in p.stdout and "v5p-8: skipped" in p.stdout


@pytest.mark.parametrize("topology, words", [("v9x-8", "unknown TPU generation 'v9x'"),
                                             ("v9x", "unknown TPU generation"),
                                             ("v5p-6", "power-of-two"), ("v5p-big", "expected a size")])
def test_cli_bad_topology_is_one_error_line(topology, words):
    p = _tool("--config", "configs/toy.py:teacher", "--topology", topology)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0] and topology in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_vae_decode_compiles_for_one_tpu_chip():
    chip, devices = aot.topology_devices(TOPOLOGY)
    # narrow widths (the compile path and the memory analysis are what is tested; real widths: the tool)
    compiled, model, (params, z) = aot.compile_vae_decode(devices[0], latent_shape=(2, 4, 4),
                                                          model_kwargs=dict(base_dim=8, num_res_blocks=1))
    assert z.shape == (1, 2, 4, 4, model.z_dim) and devices[0].platform == "tpu"
    rep = aot.step_report("vae decode", compiled, chip)
    assert all(rep["memory"][f] > 0 for f in ("argument", "output", "temp")) and rep["fits"]
    assert rep["memory"]["output"] >= 5 * 32 * 32 * 3 * 4  # 1 + 4 frames of 32x32 RGB, fp32
    # the decoder's fp32 parameters are arguments (at these narrow widths TPU tile padding inflates
    # small kernels, so no upper bound here; docs/benchmarks.md has the real-width figures)
    decoder = 4 * sum(x.size for x in jax.tree_util.tree_leaves(params["decoder"]))
    assert decoder <= rep["memory"]["argument"]
