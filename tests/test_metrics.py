"""anyflow_jax.training.writers: writers (CLU, tensorboardX or console + JSON lines), progress,
parameter overview."""
import glob
import json
import logging
import os
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax.training import writers as metrics

LOGGER = "anyflow_jax.training.writers"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(caplog, level):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


def _read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _event_files(workdir):
    return sorted(glob.glob(os.path.join(os.fspath(workdir), "**", "events.out.tfevents.*"),
                            recursive=True))


def _read_events(path):
    """The ``Event`` protos of a TFRecord file (length u64 LE, crc u32, data, crc u32)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    with open(path, "rb") as fh:
        while True:
            header = fh.read(8)
            if not header:
                break
            assert len(header) == 8, "truncated record header"
            (length,) = struct.unpack("<Q", header)
            fh.read(4)  # crc of the length
            data = fh.read(length)
            assert len(data) == length, "truncated record"
            fh.read(4)  # crc of the data
            events.append(Event.FromString(data))
    return events


def _scalar_value(value):
    if value.HasField("simple_value"):
        return value.simple_value
    t = value.tensor
    if t.float_val:
        return t.float_val[0]
    if t.double_val:
        return t.double_val[0]
    return np.frombuffer(t.tensor_content, dtype=np.float32)[0].item()


def _scalars(workdir):
    """``{tag: {step: value}}`` over all event files under ``workdir``, plus all tags seen."""
    out, tags = {}, set()
    for path in _event_files(workdir):
        for ev in _read_events(path):
            if not ev.HasField("summary"):
                continue
            for v in ev.summary.value:
                tags.add(v.tag)
                plugin = v.metadata.plugin_data.plugin_name
                if v.HasField("simple_value") or plugin == "scalars":
                    out.setdefault(v.tag, {})[ev.step] = _scalar_value(v)
    return out, tags


@pytest.fixture
def no_tensorboard(monkeypatch):
    """Make `clu.metric_writers` and `tensorboardX` unimportable (as without TensorFlow and
    tensorboardX) and reset the warn-once flag."""
    monkeypatch.setitem(sys.modules, "clu.metric_writers", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setattr(metrics, "_FALLBACK_WARNED", False)


@pytest.fixture
def no_tensorflow(monkeypatch):
    """The real environment (TensorFlow is not a dependency), with the warn-once flag reset."""
    if metrics._tensorflow_installed():
        pytest.skip("TensorFlow is installed: the CLU path is taken")
    monkeypatch.setattr(metrics, "_FALLBACK_WARNED", False)


# ----------------------------------------------------------------------------- writers
def test_fallback_writer_writes_json_lines_and_warns_once(tmp_path, caplog, no_tensorboard):
    caplog.set_level(logging.INFO, logger=LOGGER)
    workdir = tmp_path / "run"
    w = metrics.create_writer(workdir)
    w.write_scalars(1, {"loss": jnp.float32(0.5), "lr": 1e-4})
    w.write_scalars(2, {"loss": np.array(0.25), "count": np.int32(3)})
    w.write_hparams({"lr": 5e-5, "betas": (0.9, 0.95)})
    w.flush()
    w.close()
    # a second writer in the same process (e.g. an eval writer) appends and does not warn again
    w2 = metrics.create_writer(workdir)
    w2.write_scalars(3, {"loss": 0.125})
    w2.close()

    assert _read_jsonl(workdir / metrics.METRICS_FILE) == [
        {"step": 1, "loss": 0.5, "lr": pytest.approx(1e-4)},
        {"step": 2, "loss": 0.25, "count": 3},
        {"step": 3, "loss": 0.125},
    ]
    assert json.loads((workdir / metrics.HPARAMS_FILE).read_text()) == {"lr": 5e-5, "betas": [0.9, 0.95]}
    assert _event_files(workdir) == []
    warnings = _records(caplog, logging.WARNING)
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "clu.metric_writers" in msg and "tensorboardX" in msg and "metrics.jsonl" in msg
    assert "ModuleNotFoundError" in msg
    info = [r.getMessage() for r in _records(caplog, logging.INFO)]
    assert "[1] loss=0.5, lr=0.0001" in info and "[2] count=3, loss=0.25" in info
    with pytest.raises(ValueError, match="'v' is not a scalar"):
        metrics.create_writer(workdir).write_scalars(4, {"v": np.zeros(3)})


def test_without_tensorflow_writes_tensorboard_events_with_tensorboardx(tmp_path, caplog,
                                                                        no_tensorflow):
    caplog.set_level(logging.INFO, logger=LOGGER)
    workdir = tmp_path / "run"
    w = metrics.create_writer(workdir, tensorboard=True)
    w.write_scalars(0, {"loss": jnp.float32(0.5), "lr": 1e-4})
    w.write_scalars(10, {"loss": np.array(0.25), "count": np.int32(3)})
    w.write_scalars(20, {"loss": 0.125})
    w.write_hparams({"lr": 5e-5, "betas": (0.9, 0.95), "name": "toy", "ema": True})
    w.write_texts(20, {"note": "hello"})
    w.close()

    assert _records(caplog, logging.WARNING) == []
    files = _event_files(workdir)
    assert len(files) == 1 and os.path.dirname(files[0]) == os.fspath(workdir)
    scalars, tags = _scalars(workdir)
    assert scalars["loss"] == {0: 0.5, 10: 0.25, 20: 0.125}
    assert scalars["lr"] == {0: pytest.approx(1e-4)}
    assert scalars["count"] == {10: 3.0}
    assert "_hparams_/session_start_info" in tags and any(t.startswith("note") for t in tags)
    # console and JSON lines as before
    info = [r.getMessage() for r in _records(caplog, logging.INFO)]
    assert "[0] loss=0.5, lr=0.0001" in info and "[10] count=3, loss=0.25" in info
    assert [r["step"] for r in _read_jsonl(workdir / metrics.METRICS_FILE)] == [0, 10, 20]
    assert json.loads((workdir / metrics.HPARAMS_FILE).read_text())["name"] == "toy"


def test_tensorboard_flush_puts_events_on_disk_and_writers_do_not_clobber(tmp_path, no_tensorflow):
    w = metrics.create_writer(tmp_path)
    w.write_scalars(3, {"x": 1.5})
    w.flush()
    assert _scalars(tmp_path)[0] == {"x": {3: 1.5}}  # on disk before close
    w.write_scalars(4, {"x": 2.5})  # after a flush, writing goes on
    # a second writer on the same workdir in the same second (e.g. an eval writer) gets its own file
    w2 = metrics.create_writer(tmp_path)
    w2.write_scalars(5, {"y": 7.0})
    w2.close()
    w.close()
    assert _scalars(tmp_path)[0] == {"x": {3: 1.5, 4: 2.5}, "y": {5: 7.0}}
    assert len(set(_event_files(tmp_path))) == len(_event_files(tmp_path)) >= 2


def test_tensorboard_off_gives_console_and_jsonl_without_warning(tmp_path, caplog, no_tensorflow):
    caplog.set_level(logging.INFO, logger=LOGGER)
    w = metrics.create_writer(tmp_path, tensorboard=False)
    w.write_scalars(5, {"a": 2.0})
    w.close()
    assert _records(caplog, logging.WARNING) == []
    assert _event_files(tmp_path) == []
    assert _read_jsonl(tmp_path / metrics.METRICS_FILE) == [{"step": 5, "a": 2.0}]
    assert "[5] a=2" in [r.getMessage() for r in _records(caplog, logging.INFO)]


def test_tensorboard_off_without_any_backend_does_not_warn(tmp_path, caplog, no_tensorboard):
    caplog.set_level(logging.INFO, logger=LOGGER)
    w = metrics.create_writer(tmp_path, tensorboard=False)
    w.write_scalars(5, {"a": 2.0})
    w.close()
    assert _records(caplog, logging.WARNING) == []
    assert _read_jsonl(tmp_path / metrics.METRICS_FILE) == [{"step": 5, "a": 2.0}]


def test_nonzero_process_writes_nothing(tmp_path, caplog, no_tensorboard):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    workdir = tmp_path / "proc1"
    w = metrics.create_writer(workdir, process_index=1)
    w.write_scalars(1, {"loss": 1.0})
    w.write_hparams({"lr": 1.0})
    w.flush()
    w.close()
    assert not workdir.exists()
    assert [r for r in caplog.records if r.name == LOGGER] == []


def _fake_clu(monkeypatch, calls):
    class FakeCluWriter:
        def write_scalars(self, step, scalars):
            calls.append(("scalars", step, dict(scalars)))

        def write_hparams(self, hparams):
            calls.append(("hparams", dict(hparams)))

        def flush(self):
            calls.append(("flush",))

        def close(self):
            calls.append(("close",))

    def create_default_writer(logdir, *, just_logging=False, asynchronous=True, collection=None):
        calls.append(("create", logdir, just_logging))
        return FakeCluWriter()

    fake = types.ModuleType("clu.metric_writers")
    fake.create_default_writer = create_default_writer
    monkeypatch.setitem(sys.modules, "clu.metric_writers", fake)


def test_clu_writer_used_when_tensorflow_installed(tmp_path, caplog, monkeypatch):
    calls = []
    _fake_clu(monkeypatch, calls)
    monkeypatch.setattr(metrics, "_tensorflow_installed", lambda: True)
    monkeypatch.setattr(metrics, "_FALLBACK_WARNED", False)
    caplog.set_level(logging.INFO, logger=LOGGER)
    w = metrics.create_writer(tmp_path)
    w.write_scalars(7, {"loss": 0.5})
    w.write_hparams({"lr": 1.0})
    w.flush()
    w.close()
    assert calls == [("create", os.fspath(tmp_path), False), ("scalars", 7, {"loss": 0.5}),
                     ("hparams", {"lr": 1.0}), ("flush",), ("close",)]
    assert _records(caplog, logging.WARNING) == []
    # neither our console writer (CLU logs) nor tensorboardX is added, but JSON lines are written
    assert _records(caplog, logging.INFO) == []
    assert _event_files(tmp_path) == []
    assert _read_jsonl(tmp_path / metrics.METRICS_FILE) == [{"step": 7, "loss": 0.5}]


def test_clu_writers_not_imported_without_tensorflow(tmp_path, caplog, monkeypatch, no_tensorflow):
    calls = []
    _fake_clu(monkeypatch, calls)
    caplog.set_level(logging.INFO, logger=LOGGER)
    w = metrics.create_writer(tmp_path)
    w.write_scalars(1, {"x": 2.0})
    w.close()
    assert calls == []  # TensorFlow is checked before clu.metric_writers is touched
    assert _scalars(tmp_path)[0] == {"x": {1: 2.0}}
    assert _records(caplog, logging.WARNING) == []


def test_broken_clu_with_tensorflow_falls_back_to_tensorboardx(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(metrics, "_tensorflow_installed", lambda: True)
    monkeypatch.setitem(sys.modules, "clu.metric_writers", None)
    monkeypatch.setattr(metrics, "_FALLBACK_WARNED", False)
    caplog.set_level(logging.INFO, logger=LOGGER)
    w = metrics.create_writer(tmp_path)
    w.write_scalars(2, {"x": 4.0})
    w.close()
    assert _scalars(tmp_path)[0] == {"x": {2: 4.0}}
    assert _records(caplog, logging.WARNING) == []
    assert any("clu.metric_writers failed" in r.getMessage() for r in _records(caplog, logging.INFO))


def test_importing_writers_does_not_import_tensorflow_tensorboardx_or_clu_writers(tmp_path):
    code = (
        "import sys\n"
        "def bad():\n"
        "    return sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'tensorboardX')\n"
        "                  or k.startswith(('clu.metric_writers', 'clu.periodic_actions')))\n"
        "import anyflow_jax.training.writers as m\n"
        "print('AFTER_IMPORT', bad())\n"
        "import anyflow_jax.training.optim\n"
        "w = m.create_writer(sys.argv[1], tensorboard=False); w.write_scalars(1, {'x': 1.0}); w.close()\n"
        "p = m.Progress(10); p(1); p.summary(1)\n"
        "m.parameter_overview({'a': __import__('numpy').zeros((2, 3))})\n"
        "print('AFTER_USE', bad())\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "AFTER_IMPORT []" in res.stdout, res.stdout
    assert "AFTER_USE []" in res.stdout, res.stdout


# ----------------------------------------------------------------------------- progress
class FakeClock:
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


def test_progress_rate_eta_and_cadence_with_fake_clock(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = FakeClock()
    p = metrics.Progress(100, every_steps=10, every_secs=None, clock=clock)
    assert p.summary(0)["steps_per_sec"] == 0.0 and np.isnan(p.summary(0)["eta_sec"])
    lines = {}
    for step in range(1, 21):
        clock.t += 0.5 if step <= 10 else 0.25  # 2 steps/s, then 4 steps/s
        out = p(step)
        if out is not None:
            lines[step] = out
    assert sorted(lines) == [10, 20]
    assert lines[10] == "step 10/100 (10.0%), 2 steps/s, ETA 45s"
    assert lines[20] == "step 20/100 (20.0%), 4 steps/s, ETA 20s"
    assert [r.getMessage() for r in _records(caplog, logging.INFO)] == [lines[10], lines[20]]
    # summary: the last report's rate when no step passed, else the current window
    assert p.summary(20) == {"steps_per_sec": 4.0, "eta_sec": 20.0}
    clock.t += 2.0
    assert p.summary(25) == {"steps_per_sec": 2.5, "eta_sec": 30.0}
    assert p(25) is None  # not due: summary does not restart the window
    clock.t += 1.0  # 10 steps in 3 s since the report at step 20
    assert p(30) == "step 30/100 (30.0%), 3.333 steps/s, ETA 21s"
    assert p.summary(30) == {"steps_per_sec": pytest.approx(10 / 3), "eta_sec": pytest.approx(21.0)}


def test_progress_every_secs_resume_and_final_report():
    clock = FakeClock(0.0)
    p = metrics.Progress(1000, start_step=900, every_steps=None, every_secs=30.0, clock=clock, log=False)
    outs = {}
    for step in range(901, 1001):
        clock.t += 1.0  # 1 step/s
        out = p(step)
        if out is not None:
            outs[step] = out
    # reports every 30 s of this run's own steps, plus the final step
    assert sorted(outs) == [930, 960, 990, 1000]
    assert outs[930] == "step 930/1000 (93.0%), 1 steps/s, ETA 1m10s"
    assert outs[1000] == "step 1000/1000 (100.0%), 1 steps/s, ETA 0s"
    assert p.summary(1000) == {"steps_per_sec": 1.0, "eta_sec": 0.0}
    assert p(1000) is None  # the final report is made once
    with pytest.raises(ValueError, match="start_step"):
        metrics.Progress(10, start_step=11)


def test_progress_restart_excludes_compile_time():
    clock = FakeClock(0.0)
    p = metrics.Progress(50, every_steps=5, every_secs=None, clock=clock, log=False)
    clock.t += 120.0  # ahead-of-time compilation
    p.restart(0)
    clock.t += 2.5
    assert p(5) == "step 5/50 (10.0%), 2 steps/s, ETA 22s"


def test_format_duration():
    assert metrics.format_duration(3725.2) == "1h02m05s"
    assert metrics.format_duration(340) == "5m40s"
    assert metrics.format_duration(7.4) == "7s"
    assert metrics.format_duration(float("nan")) == "?"


# ----------------------------------------------------------------------------- parameters
def _tree():
    return {"blocks": {"kernel": jnp.ones((30, 40)), "bias": jnp.zeros((40,))},
            "head": {"kernel": jax.ShapeDtypeStruct((7, 3), jnp.float32)}}


def test_count_params_and_overview_total():
    tree = _tree()
    assert metrics.count_params(tree) == 30 * 40 + 40 + 21
    mask = {"blocks": {"kernel": True, "bias": False}, "head": {"kernel": True}}
    assert metrics.count_params(tree, mask) == 1221
    text = metrics.parameter_overview(tree, mask=mask)
    assert "Total: 1,261" in text
    assert "blocks/kernel" in text and "(30, 40)" in text and "head/kernel" in text
    assert "Trainable: 1,221 of 1,261 (96.83%)" in text


def test_overview_fallback_table(monkeypatch):
    import clu.parameter_overview as po

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(po, "get_parameter_overview", broken)
    text = metrics.parameter_overview(_tree())
    lines = text.splitlines()
    assert lines[1].split("|")[1:-1] == [" Name          ", " Shape    ", " Dtype   ", " Size  "]
    assert any("blocks/kernel" in ln and "(30, 40)" in ln and "1,200" in ln for ln in lines)
    assert lines[-1] == "Total: 1,261"
    assert metrics.parameter_overview(_tree(), max_lines=1).count("float32") == 1


def test_overview_of_boxed_flax_params():
    from flax import linen as nn
    boxed = {"dense": {"kernel": nn.Partitioned(jnp.ones((4, 5)), names=("embed", "mlp"))}}
    assert metrics.count_params(boxed) == 20
    assert "Total: 20" in metrics.parameter_overview(boxed)
