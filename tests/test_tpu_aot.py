"""Deviceless TPU compilation (anyflow_jax.parallel.aot): a tiny config's real on-policy train
steps (generator and critic, through the trainer's own compile_steps) and its 4-step sampler are
compiled with splash attention for a 4-chip v5p slice on this CPU machine, and the compiler's
memory analysis must be present and positive. Needs libtpu (requirements-test.txt; `pip install -e .[tpu]`)."""
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
                       ("tpu", "expected e.g."), ("v6e:2x2x2", "2 dimensions")):
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
