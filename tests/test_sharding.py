"""Parameters placed by the logical rules over an (fsdp, tensor) mesh of 8 fake CPU devices; the
sharded forward equals the single-device forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model_testlib import perturbed
from anyflow_jax import parallel
from anyflow_jax.models.wan import WanTransformer3D

CFG = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
           ffn_dim=32, num_layers=2, rope_max_seq_len=32, flow_map=True)


def test_make_mesh_and_errors():
    assert len(jax.devices()) == 8
    mesh = parallel.make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 12 devices"):
        parallel.make_mesh(data=3, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="at most one"):
        parallel.make_mesh(data=-1, fsdp=-1)


def test_logical_to_spec_rules():
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    assert parallel.logical_to_spec(("embed", "heads"), (24, 24), mesh) == P("fsdp", "tensor")
    assert parallel.logical_to_spec(("layers", "mlp", "embed"), (2, 32, 24), mesh) == P(None, "tensor", "fsdp")
    # a dimension the mesh axis does not divide stays replicated
    assert parallel.logical_to_spec(("embed", "heads"), (6, 24), mesh) == P(None, "tensor")
    with pytest.raises(ValueError, match="no sharding rule"):
        parallel.logical_to_spec(("bogus",), (8,), mesh)


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_sharded_forward_equals_single_device(scan):
    model = WanTransformer3D(**CFG, scan_layers=scan)
    params = perturbed(model.init_params(jax.random.key(0)), 1, 0.1)
    rng = np.random.RandomState(0)
    x = rng.randn(4, 3, 4, 6, 4).astype(np.float32)
    t = rng.rand(4, 3).astype(np.float32)
    r = (t * rng.rand(4, 3)).astype(np.float32)
    ctx = rng.randn(4, 5, 16).astype(np.float32)

    def fwd(p, x, t, r, c):
        return model.apply({"params": p}, x, t, r, c)

    single = np.asarray(jax.jit(fwd)(params, x, t, r, ctx))

    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    shardings = parallel.param_shardings(model.abstract_params(), mesh)
    sharded = parallel.shard_params(params, shardings)
    prefix = ("blocks",) if scan else ("blocks_0",)
    q = sharded
    for k in prefix + ("attn1", "to_q", "kernel"):
        q = q[k]
    assert q.sharding.spec == (P(None, "fsdp", "tensor") if scan else P("fsdp", "tensor"))
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[-1] == 12
    assert parallel.unsharded_fraction(sharded) < 0.1
    batch = [jax.device_put(a, parallel.batch_sharding(mesh, a.ndim)) for a in (x, t, r, ctx)]
    with jax.set_mesh(mesh):
        step = jax.jit(fwd, in_shardings=(shardings,) + tuple(b.sharding for b in batch),
                       out_shardings=parallel.batch_sharding(mesh, 5))
        out = step(sharded, *batch)
    assert out.sharding.spec == P(("data", "fsdp"), None, None, None, None)
    np.testing.assert_allclose(np.asarray(out), single, atol=2e-5, rtol=0)
