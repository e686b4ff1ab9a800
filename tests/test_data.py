"""Tests of anyflow_jax.data: moving digits, ArrayRecord latents, the Grain pipeline, global batches."""
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits

from anyflow_jax import data
from anyflow_jax.data import (
    ArrayRecordLatentSource,
    MovingDigitsSource,
    RecordFormatError,
    class_embeddings,
    global_batch,
    iterator_state_to_bytes,
    make_train_iterator,
    motion_params,
    negative_embedding,
    restore_iterator_state,
    split_indices,
    write_latent_records,
)

DIGITS = load_digits()


class IndexSource:
    """A tiny source whose samples carry their own index (to follow samples through the pipeline)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return dict(idx=np.asarray(i, np.int64), x=np.full((2, 3), i, np.float32))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def bounce_reference(start, velocity, frames, hi):
    """Step-by-step wall bounces (independent of the implementation's folding formula)."""
    p, v, out = np.array(start), np.array(velocity), []
    for _ in range(frames):
        out.append(p.copy())
        p = p + v
        for a in range(2):
            if p[a] < 0:
                p[a], v[a] = -p[a], -v[a]
            elif p[a] > hi[a]:
                p[a], v[a] = 2 * hi[a] - p[a], -v[a]
    return np.array(out)


# --------------------------------------------------------------------------- moving digits

def test_digits_deterministic_by_index():
    a, b = MovingDigitsSource(64, seed=3), MovingDigitsSource(64, seed=3)
    for i in (0, 17, 63):
        x, y = a[i], b[i]
        for k in ("latents", "label", "context"):
            np.testing.assert_array_equal(x[k], y[k])
    np.testing.assert_array_equal(a[np.int64(5)]["latents"], a[5]["latents"])
    np.testing.assert_array_equal(a[-1]["latents"], a[63]["latents"])
    # different indices and different seeds give different videos
    assert not np.array_equal(a[0]["latents"], a[1]["latents"])
    c = MovingDigitsSource(64, seed=4)
    differ = [not np.array_equal(a[i]["latents"], c[i]["latents"]) for i in range(8)]
    assert all(differ)


def test_digits_shape_range_and_content():
    src = MovingDigitsSource(40, seed=0)
    images = DIGITS.images / 16.0 * 2.0 - 1.0
    for i in range(40):
        s = src[i]
        assert s["latents"].shape == (8, 16, 16, 1) and s["latents"].dtype == np.float32
        assert s["label"].shape == () and s["label"].dtype == np.int32
        assert s["context"].shape == (4, 32) and s["context"].dtype == np.float32
        assert s["latents"].min() == -1.0 and s["latents"].max() <= 1.0
        m = src.motion(i)
        # rebuild the video from sklearn's images and the motion parameters
        expected = np.full((8, 16, 16), -1.0)
        for f, (r, c) in enumerate(m["positions"]):
            expected[f, r:r + 8, c:c + 8] = images[m["image_index"]]
        np.testing.assert_allclose(s["latents"][..., 0], expected, rtol=0, atol=1e-6)
        # the label is the class of the digit image used
        assert int(s["label"]) == int(DIGITS.target[m["image_index"]])
        np.testing.assert_array_equal(s["context"], src.embeddings[int(s["label"])])
    labels = {int(src[i]["label"]) for i in range(40)}
    assert len(labels) >= 8


def test_digits_bounce_inside_canvas():
    shape = (12, 14, 11, 1)   # non-square canvas, long videos: many bounces
    src = MovingDigitsSource(200, seed=7, video_shape=shape)
    hi = (shape[1] - 8, shape[2] - 8)
    bounced = 0
    for i in range(200):
        m = src.motion(i)
        np.testing.assert_array_equal(m["positions"], bounce_reference(m["start"], m["velocity"], 12, hi))
        np.testing.assert_array_equal(m["velocity"], data.DIRECTIONS[m["direction"]] * m["speed"])
        video = src[i]["latents"][..., 0]
        for f in range(12):
            r, c = m["positions"][f]
            assert 0 <= r <= hi[0] and 0 <= c <= hi[1]
            rows, cols = np.nonzero(video[f] > -1.0)
            assert rows.size > 0
            # every digit pixel lies in the digit's 8x8 box, which lies inside the canvas
            assert rows.min() >= r and rows.max() < r + 8 <= shape[1]
            assert cols.min() >= c and cols.max() < c + 8 <= shape[2]
        steps = np.diff(m["positions"], axis=0)
        bounced += bool(np.any(steps * m["velocity"] < 0))
    assert bounced > 50
    directions = {src.motion(i)["direction"] for i in range(200)}
    assert directions == set(range(8))


def test_digits_channels_and_motion_params():
    src = MovingDigitsSource(10, seed=2, video_shape=(3, 9, 10, 3))
    v = src[4]["latents"]
    assert v.shape == (3, 9, 10, 3)
    np.testing.assert_array_equal(v[..., 0], v[..., 2])
    m = motion_params(4, seed=2, video_shape=(3, 9, 10, 3), num_samples=10)
    for k in ("start", "velocity", "positions"):
        np.testing.assert_array_equal(m[k], src.motion(4)[k])
    assert m["image_index"] == src.motion(4)["image_index"]


def test_class_and_negative_embeddings():
    table = class_embeddings(10, 4, 32, seed=0)
    assert table.shape == (10, 4, 32) and table.dtype == np.float32
    np.testing.assert_array_equal(table, class_embeddings(10, 4, 32, seed=0))
    assert not np.allclose(table, class_embeddings(10, 4, 32, seed=1))
    assert 0.8 < table.std() < 1.2 and abs(table.mean()) < 0.1
    flat = table.reshape(10, -1)
    dists = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    assert dists[~np.eye(10, dtype=bool)].min() > 1.0
    neg = negative_embedding(4, 32, seed=0)
    assert neg.shape == (1, 4, 32) and neg.dtype == np.float32
    np.testing.assert_array_equal(neg, negative_embedding(4, 32, seed=0))
    assert np.linalg.norm(flat - neg.reshape(1, -1), axis=-1).min() > 1.0
    assert MovingDigitsSource(4).negative_context.shape == (1, 4, 32)
    src = MovingDigitsSource(4, context_length=3, text_dim=8)
    assert src[0]["context"].shape == (3, 8)


def test_splits_disjoint_and_used():
    train, test, every = split_indices("train"), split_indices("test"), split_indices("all")
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), every)
    assert len(every) == len(DIGITS.target)
    assert 0.15 < len(test) / len(every) < 0.25
    assert set(DIGITS.target[test]) == set(range(10))      # stratified: every class held out
    test_src = MovingDigitsSource(100, seed=0, split="test")
    used = {test_src.motion(i)["image_index"] for i in range(100)}
    assert used <= set(test.tolist())
    train_src = MovingDigitsSource(100, seed=0, split="train")
    assert {train_src.motion(i)["image_index"] for i in range(100)} <= set(train.tolist())
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        MovingDigitsSource(10, split="valid")


def test_digits_index_errors():
    src = MovingDigitsSource(10)
    with pytest.raises(IndexError, match="index 10 out of range"):
        src[10]
    with pytest.raises(IndexError, match="out of range"):
        src[-11]
    with pytest.raises(TypeError, match="integer"):
        src[1.5]
    with pytest.raises(ValueError, match="canvas"):
        MovingDigitsSource(10, video_shape=(4, 6, 16, 1))


# --------------------------------------------------------------------------- ArrayRecord

def _samples(n, seed=0, lat_shape=(2, 4, 4, 3), dtype=ml_dtypes.bfloat16, caption=True):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = dict(latents=rng.standard_normal(lat_shape).astype(dtype),
                 context=rng.standard_normal((5, 6)).astype(np.float32), label=i % 10)
        if caption:
            s["caption"] = f"sample {i} \u00e9"
        out.append(s)
    return out


def test_array_record_round_trip(tmp_path):
    a, b = tmp_path / "a.array_record", tmp_path / "b.array_record"
    sa, sb = _samples(5, 0), _samples(3, 1)
    assert write_latent_records(a, sa) == 5
    assert write_latent_records(str(b), iter(sb)) == 3
    assert sorted(os.listdir(tmp_path)) == ["a.array_record", "b.array_record"]  # no temp files
    src = ArrayRecordLatentSource([a, b], include_caption=True)
    assert len(src) == 8 and src.latent_shape == (2, 4, 4, 3) and src.context_shape == (5, 6)
    for i, ref in enumerate(sa + sb):
        got = src[i]
        assert got["latents"].dtype == ml_dtypes.bfloat16
        assert got["context"].dtype == np.float32
        np.testing.assert_array_equal(got["latents"].view(np.uint16), ref["latents"].view(np.uint16))
        np.testing.assert_array_equal(got["context"], ref["context"])
        assert got["caption"] == ref["caption"] and int(got["label"]) == ref["label"]
    # default: no caption (strings cannot become jax arrays); optional dtype cast
    plain = ArrayRecordLatentSource(str(a), dtype=np.float32)
    assert set(plain[0]) == {"latents", "context", "label"}
    assert plain[0]["latents"].dtype == np.float32
    np.testing.assert_array_equal(plain[4]["latents"], sa[4]["latents"].astype(np.float32))
    # overwrite in place; float32 latents without optional keys
    f32 = [dict(latents=np.ones((1, 2, 2, 1), np.float32) * k, context=np.zeros((2, 3), np.float32))
           for k in range(2)]
    write_latent_records(a, f32)
    got = data.read_latent_records(a)
    assert len(got) == 2 and set(got[1]) == {"latents", "context"}
    np.testing.assert_array_equal(got[1]["latents"], f32[1]["latents"])
    # picklable (Grain worker processes) and usable in the pipeline
    import pickle
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[7]["context"], sb[2]["context"])
    batch = next(make_train_iterator(ArrayRecordLatentSource(b), global_batch_size=2, seed=0))
    assert batch["latents"].shape == (2, 2, 4, 4, 3) and batch["context"].shape == (2, 5, 6)


def test_array_record_errors(tmp_path):
    good = tmp_path / "good.array_record"
    write_latent_records(good, _samples(2))
    missing = tmp_path / "missing.array_record"
    with pytest.raises(RecordFormatError, match="missing.array_record"):
        ArrayRecordLatentSource([good, missing])
    garbage = tmp_path / "garbage.array_record"
    garbage.write_bytes(b"not an array record" * 10)
    with pytest.raises(RecordFormatError, match="garbage.array_record"):
        ArrayRecordLatentSource(garbage)
    truncated = tmp_path / "truncated.array_record"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(RecordFormatError, match="truncated.array_record"):
        ArrayRecordLatentSource(truncated)
    other = tmp_path / "other.array_record"
    write_latent_records(other, _samples(2, lat_shape=(2, 4, 4, 2)))
    with pytest.raises(RecordFormatError, match=r"other.array_record: records do not match .*"
                                                r"latents: other.array_record \(\(2, 4, 4, 2\)"):
        ArrayRecordLatentSource([good, other])
    # a file whose records are not in our format
    from array_record.python import array_record_module
    foreign = tmp_path / "foreign.array_record"
    w = array_record_module.ArrayRecordWriter(str(foreign), "group_size:1")
    w.write(b"\x93hello")
    w.close()
    with pytest.raises(RecordFormatError, match="foreign.array_record: record 0"):
        ArrayRecordLatentSource(foreign)
    with pytest.raises(IndexError, match="out of range"):
        ArrayRecordLatentSource(good)[2]
    # the writer rejects inconsistent or malformed samples and leaves nothing behind
    bad = tmp_path / "bad.array_record"
    mixed = _samples(1) + _samples(1, lat_shape=(2, 4, 4, 1))
    with pytest.raises(ValueError, match="sample 1 does not match sample 0"):
        write_latent_records(bad, mixed)
    with pytest.raises(ValueError, match="missing \\['context'\\]"):
        write_latent_records(bad, [dict(latents=np.zeros((1, 2, 2, 1), np.float32))])
    with pytest.raises(ValueError, match="dtype int32 not supported"):
        write_latent_records(bad, [dict(latents=np.zeros((1, 2, 2, 1), np.int32),
                                        context=np.zeros((2, 2), np.float32))])
    with pytest.raises(ValueError, match="no samples"):
        write_latent_records(bad, [])
    assert not any(p.name.startswith(".bad") or p.name == "bad.array_record" for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- pipeline

def test_iterator_deterministic_and_epochs():
    src = MovingDigitsSource(50, seed=0)
    a = take(make_train_iterator(src, global_batch_size=4, seed=11), 4)
    b = take(make_train_iterator(src, global_batch_size=4, seed=11), 4)
    assert_batches_equal(a, b)
    assert a[0]["latents"].shape == (4, 8, 16, 16, 1) and a[0]["context"].shape == (4, 4, 32)
    assert a[0]["label"].dtype == np.int32
    c = take(make_train_iterator(src, global_batch_size=4, seed=12), 4)
    assert not np.array_equal(a[0]["latents"], c[0]["latents"])
    # one epoch visits every sample once; shuffle=False keeps source order
    idx = np.concatenate([x["idx"] for x in make_train_iterator(
        IndexSource(12), global_batch_size=4, seed=5, num_epochs=1)])
    assert sorted(idx.tolist()) == list(range(12)) and idx.tolist() != list(range(12))
    idx = np.concatenate([x["idx"] for x in make_train_iterator(
        IndexSource(12), global_batch_size=4, seed=5, num_epochs=2, shuffle=False)])
    assert idx.tolist() == list(range(12)) * 2
    # repeat forever: each epoch reshuffled
    stream = np.concatenate([x["idx"] for x in take(make_train_iterator(
        IndexSource(12), global_batch_size=4, seed=5), 6)])
    assert sorted(stream[:12].tolist()) == sorted(stream[12:].tolist()) == list(range(12))
    assert stream[:12].tolist() != stream[12:].tolist()


def test_iterator_state_round_trip():
    src = MovingDigitsSource(30, seed=1)
    it = make_train_iterator(src, global_batch_size=4, seed=3)
    take(it, 5)
    state = it.get_state()
    raw = iterator_state_to_bytes(it)
    after = take(it, 3)
    fresh = make_train_iterator(src, global_batch_size=4, seed=3)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), after)
    fresh2 = restore_iterator_state(make_train_iterator(src, global_batch_size=4, seed=3), raw)
    assert_batches_equal(take(fresh2, 3), after)
    # a state from another pipeline is refused with the reason
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        make_train_iterator(src, global_batch_size=4, seed=4).set_state(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        make_train_iterator(src, global_batch_size=8, seed=3).set_state(state)
    with pytest.raises(ValueError, match="different data pipeline"):
        make_train_iterator(MovingDigitsSource(30, seed=2), global_batch_size=4, seed=3).set_state(state)
    with pytest.raises(ValueError, match="not valid JSON"):
        restore_iterator_state(fresh, b"{oops")


def test_iterator_orbax_checkpoint(tmp_path):
    import grain
    import orbax.checkpoint as ocp
    src = IndexSource(40)
    it = make_train_iterator(src, global_batch_size=4, seed=9)
    take(it, 5)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    # Grain's own handler (one file per process) and, alternatively, the state as plain JSON
    mngr.save(5, args=ocp.args.Composite(data=data.orbax_save_args(it),
                                         data_json=ocp.args.JsonSave(it.get_state())))
    mngr.wait_until_finished()
    assert (tmp_path / "ckpt" / "5" / "data" / "process_0-of-1.json").exists()
    after = take(it, 3)
    fresh = make_train_iterator(src, global_batch_size=4, seed=9)
    restored = mngr.restore(5, args=ocp.args.Composite(data=data.orbax_restore_args(fresh)))
    assert restored["data"] is fresh
    assert_batches_equal(take(fresh, 3), after)
    assert isinstance(data.orbax_save_args(it), grain.checkpoint.CheckpointSave)
    # the JSON copy restores on another process count (here: process 1 of 2)
    state = mngr.restore(5, args=ocp.args.Composite(data_json=ocp.args.JsonRestore()))["data_json"]
    half = make_train_iterator(src, global_batch_size=4, seed=9, process_index=1, process_count=2)
    half.set_state(state)
    np.testing.assert_array_equal(next(half)["idx"], after[0]["idx"][2:])
    mngr.close()


def test_per_process_shares():
    src, g, seed = IndexSource(37), 6, 21
    single = take(make_train_iterator(src, global_batch_size=g, seed=seed), 8)
    its = [make_train_iterator(src, global_batch_size=g, seed=seed, process_index=p, process_count=2)
           for p in range(2)]
    for step in range(8):
        parts = [next(it) for it in its]
        assert parts[0]["x"].shape == (3, 2, 3)
        assert not set(parts[0]["idx"].tolist()) & set(parts[1]["idx"].tolist())
        for k in ("idx", "x"):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), single[step][k])
    # the state does not depend on the process count: a 2-process state resumes on 1 process
    state = its[0].get_state()
    one = make_train_iterator(src, global_batch_size=g, seed=seed)
    one.set_state(state)
    rest = take(make_train_iterator(src, global_batch_size=g, seed=seed), 10)[8:]
    assert_batches_equal(take(one, 2), rest)
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by process_count=4"):
        make_train_iterator(src, global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=2"):
        make_train_iterator(src, global_batch_size=6, seed=0, process_index=2, process_count=2)


def test_finite_epochs_same_step_count_on_every_process():
    # 10 samples, local batch 2 -> 5 local batches; with 2 processes both must stop after 2 steps
    lens = [len(list(make_train_iterator(IndexSource(10), global_batch_size=4, seed=0, num_epochs=1,
                                         process_index=p, process_count=2))) for p in range(2)]
    assert lens == [2, 2]


# --------------------------------------------------------------------------- global batches

def test_global_batch_on_mesh():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    batch = next(make_train_iterator(MovingDigitsSource(16), global_batch_size=8, seed=0))
    out = global_batch(batch, mesh)
    for k in batch:
        assert isinstance(out[k], jax.Array)
        np.testing.assert_array_equal(np.asarray(out[k]), batch[k])
        assert out[k].sharding.spec == P(("data", "fsdp"))
        # 4 batch shards of 2 rows, each replicated over the 2 'tensor' devices
        assert {s.data.shape[0] for s in out[k].addressable_shards} == {2}
        for s in out[k].addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), batch[k][s.index])
            assert s.data.shape[1:] == batch[k].shape[1:]
    rows = {(s.index[0].start, s.device.id) for s in out["label"].addressable_shards}
    assert sorted({r for r, _ in rows}) == [0, 2, 4, 6] and len(rows) == 8
    # a single named axis works too
    assert global_batch({"a": np.arange(8)}, mesh, "data")["a"].sharding.spec == P(("data",))
    with pytest.raises(ValueError, match="does not split over the 4 batch shards"):
        global_batch({"a": np.zeros((6, 2))}, mesh)
    with pytest.raises(ValueError, match="not mesh axes"):
        global_batch({"a": np.zeros((8, 2))}, mesh, ("data", "model"))
    with pytest.raises(TypeError, match="caption"):
        global_batch({"caption": np.array(["a"] * 8)}, mesh)


def test_array_record_corruption_detected_on_read(tmp_path):
    path = tmp_path / "big.array_record"
    rng = np.random.default_rng(0)
    write_latent_records(path, [dict(latents=rng.standard_normal((4, 8, 8, 4)).astype(np.float32),
                                     context=np.zeros((2, 3), np.float32)) for _ in range(60)])
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    src = ArrayRecordLatentSource(path)     # the index is intact; the damaged chunk fails on read
    with pytest.raises(RecordFormatError, match=r"big.array_record: cannot read record \d+ .*hash mismatch"):
        for i in range(len(src)):
            src[i]


def test_iterator_with_worker_processes():
    src = MovingDigitsSource(20, seed=0)
    ref = take(make_train_iterator(src, global_batch_size=4, seed=2), 4)
    it = make_train_iterator(src, global_batch_size=4, seed=2, worker_count=1)
    try:
        got = take(it, 2)
        state = it.get_state()
        got += take(it, 2)
        assert_batches_equal(got, ref)
        with pytest.raises(ValueError, match="worker_count: saved 1, now 0"):
            make_train_iterator(src, global_batch_size=4, seed=2).set_state(state)
    finally:
        it.close()


_TWO_PROCESS_WORKER = r'''
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
from anyflow_jax.data import MovingDigitsSource, global_batch, make_train_iterator
src = MovingDigitsSource(50, seed=0)
mine = make_train_iterator(src, global_batch_size=8, seed=1, process_index=jax.process_index(),
                           process_count=jax.process_count())
single = make_train_iterator(src, global_batch_size=8, seed=1)   # what one process would see
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
total = jax.jit(lambda x: x.sum(), out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
for step in range(3):
    local, ref = next(mine), next(single)
    assert local["latents"].shape[0] == 4
    g = global_batch(local, mesh)
    for k in ref:
        assert g[k].shape == ref[k].shape, (k, g[k].shape)
        for s in g[k].addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), ref[k][s.index])
    print("STEP", step, float(total(g["latents"])), float(ref["latents"].sum()), flush=True)
jax.distributed.shutdown()
'''


@pytest.mark.slow
def test_global_batch_two_processes(tmp_path):
    """Two real processes (jax.distributed on localhost, 4 CPU devices each): every process loads
    its own half, and the assembled global batch is the single-process batch."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_TWO_PROCESS_WORKER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from runs_testlib import subprocess_env
    env = subprocess_env()  # the session's XLA compile flags; the script sets 4 devices
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port)], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs, errs = [], []
    try:
        for p in procs:
            # stdout apart from stderr: runtime warnings on stderr must not split the STEP lines
            out, err = p.communicate(timeout=180)
            outs.append(out)
            errs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out, err in zip(procs, outs, errs):
        assert p.returncode == 0, (out + err)[-3000:]
    lines = [[ln for ln in out.splitlines() if ln.startswith("STEP")] for out in outs]
    assert len(lines[0]) == 3 and lines[0] == lines[1]        # both processes agree
    for ln in lines[0]:
        _, _, got, ref = ln.split()
        assert float(got) == float(ref)                        # global sum == single-process sum


def test_resolve_record_paths_reads_prepare_folders(tmp_path):
    import json

    from anyflow_jax.data import RecordFormatError, resolve_record_paths
    folder = tmp_path / "prepared"
    folder.mkdir()
    with pytest.raises(RecordFormatError, match="without manifest.json"):
        resolve_record_paths([str(folder)])
    (folder / "manifest.json").write_text(json.dumps({"files": []}))
    with pytest.raises(RecordFormatError, match="lists no record files"):
        resolve_record_paths(str(folder))
    (folder / "manifest.json").write_text(json.dumps({"files": ["train-00000-of-00002.array_record",
                                                                "train-00001-of-00002.array_record"]}))
    files, neg = resolve_record_paths([str(folder), "/elsewhere/x.array_record"])
    assert files == [str(folder / "train-00000-of-00002.array_record"),
                     str(folder / "train-00001-of-00002.array_record"), "/elsewhere/x.array_record"]
    assert neg is None  # no negative embedding in the folder
    (folder / "negative_embedding.npy").write_bytes(b"")
    assert resolve_record_paths([str(folder)])[1] == str(folder / "negative_embedding.npy")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(RecordFormatError, match="unreadable manifest"):
        resolve_record_paths([str(folder)])


def test_records_carry_key_and_context_length(tmp_path):
    from anyflow_jax.data import ArrayRecordLatentSource, decode_sample, encode_sample, write_latent_records
    lat, ctx = np.zeros((2, 2, 2, 4), np.float32), np.ones((6, 8), np.float32)
    rec = decode_sample(encode_sample({"latents": lat, "context": ctx, "key": "clips/a.mp4", "context_length": 3}))
    assert rec["key"] == "clips/a.mp4" and int(rec["context_length"]) == 3
    with pytest.raises(ValueError, match="key must be a str"):
        encode_sample({"latents": lat, "context": ctx, "key": 7})
    path = str(tmp_path / "k.array_record")
    write_latent_records(path, [{"latents": lat, "context": ctx, "key": f"v{i}", "context_length": i + 1}
                                for i in range(3)])
    assert set(ArrayRecordLatentSource(path)[1]) == {"latents", "context"}  # descriptive keys stay out of batches
    full = ArrayRecordLatentSource(path, include_caption=True)[2]
    assert full["key"] == "v2" and int(full["context_length"]) == 3
