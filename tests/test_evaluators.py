"""Periodic evaluators in the training loop (config.eval): schedule, files, values, failures."""
import json
import logging
import os
import struct

import numpy as np
import pytest

from anyflow_jax import inference
from anyflow_jax.errors import RunError
from anyflow_jax.training import evaluators as E
from anyflow_jax.training import loop
from runs_testlib import metrics, tiny


def _eval_cfg(stage="teacher", train_steps=5, **eval_kw):
    c = tiny(stage, steps=train_steps, checkpoint_every=5)
    # EMA = the weights and a quick learning rate: the output head (zero at init) moves within 5 steps
    c.ema.update(dict(decay=0.0, warmup_steps=0))
    c.optim.update(dict(lr=3e-3, warmup_steps=1))
    c.eval.update(dict(every=2, steps=[1, 3], conditions=["class1", "class7"], seed=4))
    c.eval.update(eval_kw)
    return c


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.mark.slow
def test_samples_on_schedule_equal_the_saved_ema_weights_samples(tmp_path):
    wd = str(tmp_path / "run")
    loop.train(_eval_cfg(every=3), wd)
    evals = sorted(os.listdir(os.path.join(wd, E.EVAL_DIR)))
    assert evals == ["step_00000003", "step_00000005"]  # every 3 steps and the last
    last = E.step_dir(wd, 5)
    files = set(os.listdir(last))
    assert {E.SAMPLES_FILE, E.SHEET_FILE} <= files
    assert {f"class{c}_s0_steps{s}.mp4" for c in (1, 7) for s in (1, 3)} <= files
    with np.load(os.path.join(last, E.SAMPLES_FILE)) as z:
        got = {s: z[f"steps{s}"] for s in (1, 3)}
        assert list(z["conditions"]) == ["class1", "class7"]
    # the same videos from the step-5 checkpoint's EMA weights through the inference API
    gen = inference.load_generator(wd)
    noise = inference.initial_noise(4, np.zeros(2, int), gen.video_shape())
    ctx = gen.conditioning.contexts(["class1", "class7"])
    c = np.stack([ctx["class1"], ctx["class7"]])
    for s in (1, 3):
        want = np.asarray(gen.sample(noise, c, s, neg_context=gen.conditioning.negative(),
                                     keys=inference.sample_keys(4, np.zeros(2, int))))
        np.testing.assert_allclose(got[s], want, rtol=1e-5, atol=1e-5)
    assert np.abs(got[1] - got[3]).max() > 1e-3  # step counts differ
    # earlier evaluations saw earlier weights, from the same noise
    with np.load(os.path.join(E.step_dir(wd, 3), E.SAMPLES_FILE)) as z:
        assert np.abs(z["steps3"] - got[3]).max() > 1e-4
    # the cost is logged at every evaluated step, with the training metrics of that step
    recs = {r["step"]: r for r in _records(wd)}
    for step in (3, 5):
        assert recs[step]["eval/seconds"] > 0 and 0 < recs[step]["eval/fraction"] < 1
        assert "loss" in recs[step]
    assert "eval/seconds" not in recs[4]


@pytest.mark.slow
def test_a_step_saved_by_a_stop_signal_is_evaluated_when_the_run_resumes(tmp_path, monkeypatch):
    """SIGTERM during step 4 (an evaluation step): the step is saved without its evaluation, and the
    resumed run evaluates it first, so the run's evaluations and records are an uninterrupted run's."""
    import signal

    from anyflow_jax.errors import Preempted
    from anyflow_jax.training import writers
    ref, wd = str(tmp_path / "ref"), str(tmp_path / "run")
    cfg = _eval_cfg(train_steps=6, every=4, steps=[1])  # evaluations at 4 and 6
    loop.train(cfg, ref)
    write = writers.JsonlWriter.write_scalars

    def signal_after_step_3(self, step, scalars):
        write(self, step, scalars)
        if step == 3:
            signal.raise_signal(signal.SIGTERM)  # handled by the loop at the end of step 4

    monkeypatch.setattr(writers.JsonlWriter, "write_scalars", signal_after_step_3)
    with pytest.raises(Preempted):
        loop.train(cfg, wd)
    monkeypatch.undo()
    assert "eval/seconds" not in {r["step"]: r for r in _records(wd)}[4]
    assert not os.path.exists(os.path.join(wd, E.EVAL_DIR))
    loop.train(cfg, wd)
    assert sorted(os.listdir(os.path.join(wd, E.EVAL_DIR))) == ["step_00000004", "step_00000006"]
    for step in (4, 6):
        with np.load(os.path.join(E.step_dir(ref, step), E.SAMPLES_FILE)) as a, \
                np.load(os.path.join(E.step_dir(wd, step), E.SAMPLES_FILE)) as b:
            np.testing.assert_array_equal(a["steps1"], b["steps1"])
    recs = _records(wd)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]  # step 4's record once, with its evaluation
    assert recs[3]["loss"] == _records(ref)[3]["loss"] and recs[3]["eval/seconds"] > 0
    # a resume from a step whose evaluation was logged does not evaluate it again
    cfg.train.steps = 8
    loop.train(cfg, wd)
    assert [r["step"] for r in _records(wd)] == list(range(1, 9))
    assert "eval/seconds" in _records(wd)[3] and "eval/seconds" in _records(wd)[7]
    assert loop.train(cfg, wd) == {"step": 8, "already_done": True}
    # stopped at the last step: the rerun has no step left to train but still owes its evaluation
    cfg.train.steps = 10

    def signal_after_step_9(self, step, scalars):
        write(self, step, scalars)
        if step == 9:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(writers.JsonlWriter, "write_scalars", signal_after_step_9)
    with pytest.raises(Preempted):
        loop.train(cfg, wd)
    monkeypatch.undo()
    assert not os.path.exists(E.step_dir(wd, 10))
    last = loop.train(cfg, wd)
    assert last["step"] == 10 and last["loss"] == _records(wd)[9]["loss"] and last["eval/seconds"] > 0
    assert os.path.isdir(E.step_dir(wd, 10)) and [r["step"] for r in _records(wd)] == list(range(1, 11))
    assert loop.train(cfg, wd) == {"step": 10, "already_done": True}


@pytest.mark.slow
def test_a_failing_evaluator_is_logged_and_training_goes_on(tmp_path, monkeypatch, caplog):
    def broken(self, step, state):
        raise RuntimeError("disk full")
    monkeypatch.setattr(E.SampleEvaluator, "__call__", broken)
    wd = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        out = loop.train(_eval_cfg(train_steps=4), wd)
    assert out["step"] == 4
    assert "evaluator 'samples' failed at step 2, training goes on: RuntimeError: disk full" in caplog.text
    assert "the evaluators have taken" not in caplog.text  # a failing evaluator costs nothing
    recs = {r["step"]: r for r in metrics(wd)}
    assert sorted(recs) == [1, 2, 3, 4] and recs[2]["eval/failed/samples"] == 1.0
    assert not os.path.isdir(E.step_dir(wd, 2))


def test_expensive_evaluators_are_reported_once(caplog, monkeypatch):
    clock = iter(range(100))  # a fake clock: each evaluation takes 1 s
    monkeypatch.setattr(E.time, "perf_counter", lambda: float(next(clock)))
    def ev(step, state):
        return {"eval/x": float(step)}
    ev.name = "x"
    evs = E.Evaluators([ev], every=1, total=3)
    with caplog.at_level(logging.WARNING):
        out = [evs(k, None, train_seconds=3.0) for k in (1, 2, 3)]
    assert [(o["eval/x"], o["eval/seconds"], o["eval/fraction"]) for o in out] == [(k, 1.0, 0.25) for k in (1, 2, 3)]
    assert caplog.text.count("the evaluators have taken") == 0  # 25%: at the bound
    with caplog.at_level(logging.WARNING):
        out = [evs(k, None, train_seconds=1.0) for k in (4, 5)]
    assert [o["eval/fraction"] for o in out] == [0.5, 0.5]
    assert caplog.text.count("the evaluators have taken 29%") == 1  # 4 s of 14 s at step 4, said once


def _tensorboard_images(logdir):
    """(tag, step, height, width) of every image summary in the event files under ``logdir``."""
    from tensorboardX.proto import event_pb2
    out = []
    for name in sorted(os.listdir(logdir)):
        if "tfevents" not in name:
            continue
        with open(os.path.join(logdir, name), "rb") as fh:
            data = fh.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("image"):
                    out.append((v.tag, ev.step, v.image.height, v.image.width))
    return out


@pytest.mark.slow
def test_contact_sheets_go_to_tensorboard(tmp_path):
    from PIL import Image
    wd = str(tmp_path / "run")
    c = _eval_cfg(train_steps=2, videos=False)
    c.train.tensorboard = True
    loop.train(c, wd)
    assert not any(f.endswith(".mp4") for f in os.listdir(E.step_dir(wd, 2)))  # videos=False
    sheet = Image.open(os.path.join(E.step_dir(wd, 2), E.SHEET_FILE))
    images = _tensorboard_images(wd)
    assert [(tag, step) for tag, step, _, _ in images] == [("eval/contact_sheet", 2)]
    assert images[0][2:] == (sheet.height, sheet.width)


@pytest.mark.slow
def test_metrics_evaluator_logs_the_any_step_curve(tmp_path, tiny_teacher):
    """A run with a frozen teacher and ``eval.metrics``: FD, accuracy and the distance to the
    teacher's ODE solution at every step count."""
    wd = str(tmp_path / "cm")
    c = _eval_cfg("consistency", train_steps=2, metrics=True, metrics_samples=16, classifier_steps=30,
                  reference_steps=3, classifier_dir=str(tmp_path / "clf"))
    c.init.student = c.init.teacher = tiny_teacher
    loop.train(c, wd)
    rec = {r["step"]: r for r in metrics(wd)}[2]
    for s in (1, 3):
        assert rec[f"eval/fd/steps{s}"] > 0
        assert 0 <= rec[f"eval/accuracy/steps{s}"] <= 1
        assert rec[f"eval/ode_distance/steps{s}"] > 0
    assert os.path.isdir(str(tmp_path / "clf"))  # the classifier is trained once, there


def test_bad_eval_config_is_named_before_training(tmp_path):
    for kw, msg in ((dict(steps=[0, 2]), "config.eval.steps must be positive integers"),
                    (dict(every=-1), "config.eval.every must be >= 0"),
                    (dict(guidance=0.5), "config.eval.guidance must be >= 1"),
                    (dict(conditions=["class11"]), "config.eval.conditions: unknown condition 'class11'")):
        wd = tmp_path / f"run{len(msg)}"
        with pytest.raises(RunError, match=msg):
            loop.train(_eval_cfg(**kw), str(wd))
        assert not (wd / "checkpoints").exists() or not os.listdir(wd / "checkpoints")
