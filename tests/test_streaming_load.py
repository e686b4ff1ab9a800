"""Streaming sharded loads: a diffusers checkpoint (one file or an index with shards) loaded
straight onto a (data=1, fsdp=4, tensor=2) mesh of 8 fake CPU devices, each device's block read
from the file on its own; an Orbax model checkpoint restored onto the same mesh.

The checks run in a subprocess so that the 8 devices exist whatever the session's XLA_FLAGS are.
"""
import subprocess
import sys

import numpy as np
import pytest
from runs_testlib import ROOT, subprocess_env

from anyflow_jax.checkpoints.safetensors_io import (
    SafetensorsError,
    SafetensorsFile,
    write_safetensors,
)

CHECK = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
from anyflow_jax import parallel
from anyflow_jax.checkpoints import diffusers as dif, model as model_ckpt, runs
from anyflow_jax.checkpoints import safetensors_io as sio
from anyflow_jax.models.wan import WanTransformer3D

layout, tmp = sys.argv[1], sys.argv[2]
assert jax.device_count() == 8, jax.device_count()
SMALL = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
             text_dim=8, freq_dim=8, ffn_dim=16, num_layers=2, rope_max_seq_len=32)
mesh = parallel.make_mesh(1, 4, 2)

# every read goes through these: whole-tensor reads and the blocks read per tensor
full_reads, blocks, sizes = [], {}, {}
_read, _read_slice = sio.SafetensorsFile.read, sio.SafetensorsFile.read_slice
def read(self, name):
    full_reads.append(name)
    return _read(self, name)
def read_slice(self, name, index):
    out = _read_slice(self, name, index)
    blocks.setdefault(name, set()).add(sio._normalize_index(index, self.shape(name)))
    sizes.setdefault(name, []).append(out.nbytes)
    return out
sio.SafetensorsFile.read, sio.SafetensorsFile.read_slice = read, read_slice

def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8))

def check(path, scan, dtype, flow_map):
    kw = dict(dtype=dtype, flow_map=flow_map, model_kwargs=dict(scan_layers=scan))
    _, ref = dif.load_transformer(path, **kw)
    full_reads.clear(); blocks.clear(); sizes.clear()
    model, params = dif.load_transformer(path, mesh=mesh, **kw)
    assert not full_reads, f"whole-tensor reads in a sharded load: {full_reads[:5]}"
    want = parallel.param_shardings(model.abstract_params(), mesh)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref)
    n_split = 0
    for a, b, s in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
        same_bits(a, b)
        assert b.sharding == s, (b.sharding, s)
        assert b.sharding.is_equivalent_to(s, b.ndim)
        n_split += not b.sharding.is_fully_replicated
    assert n_split >= len(jax.tree_util.tree_leaves(params)) // 2, n_split
    # the blocks read from each tensor are exactly the source blocks of the devices' shards
    expected = {}
    store = dif._TensorStore(path)
    for e in dif.param_table(model):
        src = e.diffusers_name
        if flow_map and ".delta_embedder." in src and not any("delta_embedder" in n for n in store.names()):
            src = src.replace(".delta_embedder.", ".time_embedder.")
        arr = dif._get(params, dif._flax_path(model, e))
        for index in arr.sharding.devices_indices_map(arr.shape).values():
            key = dif._block_key(index, arr.shape)
            if e.layer is not None and scan:
                if not key[0][0] <= e.layer < key[0][1]:
                    continue
                key = key[1:]
            src_index = e.transform.source_index(tuple(slice(a, b) for a, b in key))[0]
            expected.setdefault(src, set()).add(sio._normalize_index(src_index, store.shape(src)))
    assert expected == blocks, sorted(set(expected) ^ set(blocks))[:5]
    # a tensor split over the mesh is never read whole
    for name, got in sizes.items():
        nbytes = int(np.prod(store.shape(name))) * store.dtype(name).itemsize
        if len(blocks[name]) > 1:
            assert max(got) < nbytes, (name, got, nbytes)
    return model, params

for scan in (True, False):
    m = WanTransformer3D(**SMALL, scan_layers=scan)
    p = m.init_params(jax.random.key(0))
    # non-zero everywhere (the output head and biases start at zero)
    rng = np.random.RandomState(1)  # host draws: no PRNG program per parameter shape
    p = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x) + 0.1 * rng.randn(*x.shape), x.dtype), p)
    path = f"{tmp}/transformer_{scan}"
    dif.save_transformer(path, m, p, dtype=jnp.bfloat16, max_shard_bytes=2048 if layout == "index" else 5 << 30)
    import os
    assert os.path.isfile(f"{path}/{dif.INDEX_NAME}") == (layout == "index")
    check(path, scan, jnp.float32, None)          # bf16 on disk -> fp32 blocks
    if scan:
        check(path, scan, None, True)             # stored dtype; a new flow-map student from a teacher
        # a new FAR network (far=True): far_patch_embedding resized on the devices, placed with the
        # FAR network's shardings, the same bits as the single-device load
        _, ref = dif.load_transformer(path, far=True, flow_map=True)
        fm, fp = dif.load_transformer(path, far=True, flow_map=True, mesh=mesh)
        want = parallel.param_shardings(fm.abstract_params(), mesh)
        assert jax.tree_util.tree_structure(fp) == jax.tree_util.tree_structure(want) and "far_patch_embedding" in fp
        jax.tree_util.tree_map(same_bits, ref, fp)
        assert all(a.sharding == s for a, s in zip(jax.tree_util.tree_leaves(fp), jax.tree_util.tree_leaves(want)))
        assert not fp["far_patch_embedding"]["kernel"].sharding.is_fully_replicated
    print("ok diffusers", layout, "scan" if scan else "unrolled", flush=True)

if layout == "single":
    # Orbax model checkpoints: restored onto the mesh; runs.load_start passes the mesh through
    m = WanTransformer3D(**SMALL)
    p = m.init_params(jax.random.key(2))
    model_ckpt.save_model(f"{tmp}/model", m, p)
    _, params = model_ckpt.load_model(f"{tmp}/model", mesh=mesh)
    want = parallel.param_shardings(m.abstract_params(), mesh)
    jax.tree_util.tree_map(same_bits, p, params)
    assert all(a.sharding == s for a, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)))
    for start in (f"{tmp}/model", f"{tmp}/transformer_True"):
        _, params, _ = runs.load_start(start, runtime=dict(scan_layers=True), mesh=mesh)
        assert all(a.sharding == s for a, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)))
    print("ok orbax", flush=True)
'''


# the single-file layout (an 8-device subprocess) runs in the full suite; the index layout in the quick loop too
@pytest.mark.parametrize("layout", [pytest.param("single", marks=pytest.mark.slow), "index"])
def test_sharded_load_reads_only_device_blocks(tmp_path, layout):
    proc = subprocess.run([sys.executable, "-c", CHECK, layout, str(tmp_path)], cwd=ROOT, env=subprocess_env(devices=8),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("ok diffusers") == 2
    assert ("ok orbax" in proc.stdout) == (layout == "single")


def test_read_slice_reads_only_the_block(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 5, 7)).astype(np.float32)
    write_safetensors(str(tmp_path / "x.safetensors"), [("s", np.float32(2.0).reshape(())), ("a", a)])
    f = SafetensorsFile(str(tmp_path / "x.safetensors"))
    seen = []
    f.on_read = lambda name, index, nbytes: seen.append((name, index, nbytes))
    for index in [(slice(1, 4), slice(2, 5), slice(0, 3)), (slice(2, 3),), (slice(None), slice(None), slice(6, 7)),
                  (slice(0, 6), slice(0, 5), slice(0, 7)), (slice(3, 3),)]:
        before = f.bytes_read
        got = f.read_slice("a", index)
        np.testing.assert_array_equal(got, a[index])
        assert f.bytes_read - before == got.nbytes
    assert f.read_slice("s", ()) == 2.0
    assert all(index is not None for _, index, _ in seen) and len(seen) == 6
    with pytest.raises(IndexError, match="step 1"):
        f.read_slice("a", (slice(0, 6, 2),))
    # a file cut short after its header is caught by the slice read too
    path = tmp_path / "x.safetensors"
    data = path.read_bytes()
    f = SafetensorsFile(str(path))
    path.write_bytes(data[:-40])
    with pytest.raises(SafetensorsError, match="truncated"):
        f.read_slice("a", (slice(5, 6),))


def test_sharding_arguments_are_checked_first(tmp_path):
    from anyflow_jax import parallel
    from anyflow_jax.checkpoints import diffusers as dif
    from anyflow_jax.checkpoints import model as model_ckpt
    with pytest.raises(ValueError, match="rules need a mesh"):
        dif.load_transformer(tmp_path, rules=parallel.DEFAULT_RULES)
    with pytest.raises(ValueError, match="either shardings or mesh"):
        dif.load_transformer(tmp_path, mesh=object(), shardings={})
    with pytest.raises(ValueError, match="rules need a mesh"):
        model_ckpt.load_model(tmp_path, rules=parallel.DEFAULT_RULES)
