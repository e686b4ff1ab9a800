"""Stopping and resuming as a scheduler sees it: SIGINT and SIGTERM save and exit with status 75
(reported once, with the saved step), the pipeline stops and a rerun resumes the unfinished
stage, metrics are not duplicated by a resume, and every flag or config mistake of `train` and
`pipeline` is one `error:` line with status 2."""
import os
import re
import signal
import subprocess
import sys

import pytest

from anyflow_jax.errors import EXIT_PREEMPTED
from anyflow_jax.training.run_checkpoints import RunCheckpointer
from runs_testlib import ROOT, TINY_OVERRIDES, logged_steps, subprocess_env, train_cli, wait_for

ENV = subprocess_env(devices=1)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT])  # SIGTERM: test_train.py's resume test checks the same story
def test_a_signal_saves_and_exits_75_then_a_rerun_finishes(sig, tmp_path):
    wd = str(tmp_path / "run")
    p = train_cli(wd, 400, "--config.train.checkpoint_every=1000")
    wait_for(lambda: len(logged_steps(wd)) >= 3, p)
    p.send_signal(sig)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == EXIT_PREEMPTED, out
    saved = RunCheckpointer(wd, read_only=True).latest_step()
    assert saved is not None and 3 <= saved < 400, out
    name = signal.Signals(sig).name
    assert out.count(f"stopped by {name} at step {saved}; checkpoint saved") == 1, out
    assert "finished" not in out and "Traceback" not in out and "KeyboardInterrupt" not in out
    assert logged_steps(wd) == list(range(1, saved + 1))
    p = train_cli(wd, saved + 2, "--config.train.checkpoint_every=1000")
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    assert f"finished at step {saved + 2}" in out
    assert logged_steps(wd) == list(range(1, saved + 3))  # each step once
    # a quiet story: no parameter table (it is in a file), no TensorBoard warning, no "resumed" after "random init"
    assert "Trainable:" not in out and os.path.isfile(os.path.join(wd, "parameters.txt"))
    assert "TensorBoard" not in out and "random init" not in out and f"resumed from {wd}/checkpoints step {saved}" in out
    p = train_cli(wd, saved + 2)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0 and f"nothing to do, {wd} is already at step {saved + 2}" in out, out
    assert "loss" not in out.splitlines()[-1]


# Records logged after the last checkpoint and before a SIGKILL are not logged twice by the resumed
# run: test_train.py's SIGKILL/SIGTERM resume test checks it.


@pytest.mark.slow
def test_a_preempted_pipeline_stops_and_a_rerun_resumes_the_unfinished_stage(tmp_path):
    root = str(tmp_path / "toy")
    cmd = [sys.executable, "-m", "anyflow_jax.pipeline", "--workdir", root, "--stages", "teacher,flow_map",
           "--eval-steps", "", "--steps-scale", "0.2", *TINY_OVERRIDES]  # teacher 400 steps, flow map 80
    teacher = os.path.join(root, "teacher")
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(logged_steps(teacher)) >= 3, p)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == EXIT_PREEMPTED, out
    saved = RunCheckpointer(teacher, read_only=True).latest_step()
    assert saved < 400 and f"stopped by SIGTERM at step {saved}" in out
    assert "teacher done" not in out and not os.path.exists(os.path.join(root, "flow_map"))
    p = subprocess.run(cmd + ["--override=train.steps=6"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    # the teacher resumed from its checkpoint (not from scratch) and finished before stage 1 started
    assert f"resumed from {teacher}/checkpoints step {saved}" in p.stdout + p.stderr or saved >= 6
    assert RunCheckpointer(os.path.join(root, "flow_map"), read_only=True).latest_step() == 6


def test_train_help_shows_commands_that_exist():
    out = subprocess.run([sys.executable, "-m", "anyflow_jax.train", "--help"], env=ENV, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode in (0, 1)
    configs = set(re.findall(r"configs/[\w.]+\.py", out.stdout + out.stderr))
    assert "configs/toy.py" in configs
    assert all(os.path.isfile(os.path.join(ROOT, c)) for c in configs), configs


TRAIN_MISTAKES = [
    (["--config=configs/toy.py", "--config.train.stepz=3"],
     "config.train.stepz is not a config field; did you mean config.train.steps?"),
    (["--config=configs/nope.py"], "config file configs/nope.py does not exist"),
    (["--config=configs/toy.py:bogus"], "config.stage='bogus' is not a known stage"),
    (["--config=configs/toy.py", "--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config=configs/toy.py:flow_map", "--config.loss.shfit=2"], "did you mean config.loss.shift?"),
    (["--config=configs/toy.py", "--config.init.student=/nowhere", "--config.stage=flow_map"], "no such checkpoint"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", TRAIN_MISTAKES, ids=[m[:25] for _, m in TRAIN_MISTAKES])
def test_train_mistakes_are_one_line_with_status_2(args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "anyflow_jax.train", f"--workdir={tmp_path}/w", *args], env=ENV,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr
    assert "Traceback" not in out.stderr


PIPELINE_MISTAKES = [
    (["--override", "foo.bar=3"], "config.foo is not a config section"),
    (["--override", "train.stepz=3"], "did you mean config.train.steps?"),
    (["--override", "train.steps=abc"], "config.train.steps must be of type int"),
    (["--eval-steps", "1,x"], "--eval-steps must be integers"),
    (["--eval-samples", "5"], "--eval-samples must be >= 10"),
    (["--stages", "teacher,bogus"], "unknown stage 'bogus'"),
]


@pytest.mark.parametrize("args, message", PIPELINE_MISTAKES, ids=[m[:25] for _, m in PIPELINE_MISTAKES])
def test_pipeline_mistakes_are_one_line_before_any_work(args, message, tmp_path, capsys):
    from anyflow_jax import pipeline
    assert pipeline.main(["--workdir", str(tmp_path / "toy"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not os.path.exists(tmp_path / "toy")  # nothing trained, nothing written
