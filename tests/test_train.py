"""The training CLI and loop: every stage on tiny toy settings, exact resume (in process, after
SIGKILL and after SIGTERM), mesh and device-count independence, two-process jax.distributed,
and clear errors on bad input."""
import os
import re
import shutil
import signal
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anyflow_jax.checkpoints.runs import read_run_file
from anyflow_jax.errors import RunError
from anyflow_jax.training import loop, steps
from anyflow_jax.training.run_checkpoints import RunCheckpointer
from runs_testlib import assert_trees_equal, logged_steps, metrics, restore_item, tiny, train_cli, wait_for


# ------------------------------------------------------------------------------ stages
@pytest.mark.slow
def test_toy_teacher_loss_falls(tiny_teacher):
    teacher_run = tiny_teacher  # conftest: 40 steps, lr 2e-3, checkpoints every 20
    rows = metrics(teacher_run)
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = np.mean([r["loss"] for r in rows[:8]])
    last = np.mean([r["loss"] for r in rows[-8:]])
    assert last < 0.75 * first, (first, last)
    assert RunCheckpointer(teacher_run, read_only=True).all_steps() == [20, 40]
    meta = read_run_file(teacher_run)
    assert meta["stage"] == "teacher" and meta["model"]["num_layers"] == 2


@pytest.mark.slow
def test_flow_map_starts_from_the_teacher_ema_and_runs(tiny_teacher, tiny_flow_map, tiny_last):
    teacher_run = tiny_teacher
    cfg = tiny("flow_map", steps=4)  # the config of conftest's tiny_flow_map
    cfg.init.student = teacher_run
    nets = loop.build_networks(cfg)
    params = nets.student_params
    ema = restore_item(teacher_run, 40, "ema_params")
    assert nets.student.flow_map
    assert_trees_equal(params["condition_embedder"]["delta_embedder"], ema["condition_embedder"]["time_embedder"])
    assert_trees_equal(params["blocks"], ema["blocks"])
    last = tiny_last["flow_map"]  # loop.train(cfg, ...) of this config, run once for the session
    assert last["step"] == 4 and np.isfinite(last["loss"])
    assert {"loss_diffusion", "loss_consistency", "loss_general", "grad_norm", "lr"} <= set(last)


@pytest.mark.slow
def test_on_policy_and_consistency_run_from_previous_stages(tiny_teacher, tiny_flow_map, tiny_consistency,
                                                            tiny_last, tmp_path):
    teacher_run, fm = tiny_teacher, tiny_flow_map
    cfg = tiny("on_policy", steps=3)
    cfg.init.student, cfg.init.teacher = fm, teacher_run
    last = loop.train(cfg, str(tmp_path / "on_policy"))
    assert last["step"] == 3
    for key in ("loss", "dmd/loss", "forward/loss", "critic/loss", "critic/grad_norm"):
        assert np.isfinite(last[key]), key
    for row in metrics(str(tmp_path / "on_policy")):
        assert row["rollout/num_steps"] in (2, 4) and 0 <= row["rollout/grad_step"] < row["rollout/num_steps"]
        assert 1 <= row["rollout/nfe"] <= 3
    critic = restore_item(str(tmp_path / "on_policy"), 3, "critic_params")
    teacher = restore_item(teacher_run, 40, "ema_params")
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree_util.tree_leaves(critic), jax.tree_util.tree_leaves(teacher)))
    assert moved > 0  # the critic started as the teacher and was trained

    # conftest's tiny_consistency: tiny("consistency", steps=3) from the tiny teacher
    last = tiny_last["consistency"]
    assert last["step"] == 3 and np.isfinite(last["loss"])


# ------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_resume_in_process_is_bit_exact(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    loop.train(tiny("teacher", steps=6), straight)
    loop.train(tiny("teacher", steps=3), split)
    loop.train(tiny("teacher", steps=6), split)
    for item in ("params", "opt_state", "ema_params", "meta"):
        assert_trees_equal(restore_item(straight, 6, item), restore_item(split, 6, item))


def _cli(workdir, steps, extra=()):
    return train_cli(workdir, steps, "--config.train.checkpoint_every=3", *extra)


# periodic evaluators in the resume tests: the same samples at the same steps after a restart
EVAL_FLAGS = ("--config.eval.every=4", "--config.eval.steps=(1, 2)", "--config.eval.conditions=('class0', 'class5')",
              "--config.eval.videos=False")


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_is_bit_exact(tmp_path):
    ref, killed, termed = (str(tmp_path / n) for n in ("ref", "killed", "termed"))
    total = 12  # checkpoints at 3, 6, 9, 12; evaluations at 4, 8, 12
    # The uninterrupted reference runs while the first run is killed (the processes are independent:
    # each compiles the same programs, and the wait for the step-3 checkpoint is mostly Orbax latency).
    p_ref = _cli(ref, total, EVAL_FLAGS)

    # SIGKILL once five steps are logged, i.e. past the step-3 checkpoint, then resume: the records
    # logged after the last checkpoint exist, and the resumed run must not log them twice.
    p = _cli(killed, total, EVAL_FLAGS)
    wait_for(lambda: len(logged_steps(killed)) >= 5, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    latest = RunCheckpointer(killed, read_only=True).latest_step()
    assert latest is not None and latest < max(logged_steps(killed)) < total, (latest, logged_steps(killed))
    out = p_ref.communicate(timeout=300)[0]
    assert p_ref.returncode == 0, out
    assert f"process 0/1: finished at step {total}" in out
    p_killed = _cli(killed, total, EVAL_FLAGS)

    # SIGTERM mid-run (while the killed run resumes): the process saves the current step and exits
    # cleanly; then resume.
    p = _cli(termed, total, EVAL_FLAGS)
    wait_for(lambda: len(logged_steps(termed)) >= 2, p)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 75, out  # saved and stopped: the documented "preempted" status (README)
    stopped = RunCheckpointer(termed, read_only=True).latest_step()
    assert 2 <= stopped < total, stopped
    # the same story as test_preemption.py's SIGINT test: one line, no traceback, each step logged once
    assert out.count(f"stopped by SIGTERM at step {stopped}; checkpoint saved") == 1, out
    assert "finished" not in out and "Traceback" not in out
    assert logged_steps(termed) == list(range(1, stopped + 1))
    p = _cli(termed, total, EVAL_FLAGS)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    assert f"resumed from {termed}/checkpoints step {stopped}" in out
    assert logged_steps(termed) == list(range(1, total + 1))
    out = p_killed.communicate(timeout=300)[0]
    assert p_killed.returncode == 0, out
    assert f"resumed from {killed}/checkpoints step {latest}" in out
    assert logged_steps(killed) == list(range(1, total + 1))  # each step once

    evaluated = (4, 8, 12)
    for wd in (killed, termed):
        for item in ("params", "opt_state", "ema_params", "meta"):
            assert_trees_equal(restore_item(ref, total, item), restore_item(wd, total, item))
        # evaluations on the same schedule, bit-identical samples at every evaluated step
        assert sorted(os.listdir(os.path.join(wd, "eval"))) == [f"step_{k:08d}" for k in evaluated]
        for k in evaluated:
            with np.load(os.path.join(ref, "eval", f"step_{k:08d}", "samples.npz")) as a, \
                    np.load(os.path.join(wd, "eval", f"step_{k:08d}", "samples.npz")) as b:
                for key in ("steps1", "steps2"):
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{wd} step {k} {key}")


# ------------------------------------------------------------------------------ meshes
@pytest.mark.slow
def test_mesh_2x2x2_matches_one_device_and_checkpoints_move_between_them(tmp_path):
    def cfg(steps, mesh):
        c = tiny("teacher", steps=steps, checkpoint_every=3)
        c.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
        # periodic evaluators run on the training mesh, on the sharded EMA weights
        c.eval.update(dict(every=3, steps=(1, 2), conditions=("class0", "class4"), videos=False))
        return c

    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    loop.train(cfg(6, (1, 1, 1)), one)
    loop.train(cfg(3, (2, 2, 2)), eight)
    loss_one = [r["loss"] for r in metrics(one)]
    loss_eight = [r["loss"] for r in metrics(eight)]
    np.testing.assert_allclose(loss_eight, loss_one[:3], rtol=2e-4)
    for key in ("steps1", "steps2"):
        with np.load(os.path.join(one, "eval", "step_00000003", "samples.npz")) as a, \
                np.load(os.path.join(eight, "eval", "step_00000003", "samples.npz")) as b:
            np.testing.assert_allclose(b[key], a[key], atol=1e-3)
    # saved on 8 devices, resumed on 1
    loop.train(cfg(6, (1, 1, 1)), eight)
    np.testing.assert_allclose([r["loss"] for r in metrics(eight)], loss_one, rtol=2e-4)
    # saved on 1 device, resumed on 8
    one_to_eight = str(tmp_path / "one_to_eight")
    loop.train(cfg(3, (1, 1, 1)), one_to_eight)
    loop.train(cfg(6, (2, 2, 2)), one_to_eight)
    np.testing.assert_allclose([r["loss"] for r in metrics(one_to_eight)], loss_one, rtol=2e-4)
    a, b = restore_item(one, 6, "params"), restore_item(one_to_eight, 6, "params")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4)


# ------------------------------------------------------------------------------ multi-process
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed(tmp_path):
    port = _free_port()
    wd = str(tmp_path / "mp")
    procs = [
        _cli(wd, 4, extra=[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                           "--config.mesh.fsdp=-1"])
        for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    finals = []
    for i, out in enumerate(outs):
        # searched, not anchored: stderr shares the pipe and may leave a partial line before it
        found = re.search(rf"process {i}/2: finished at step 4 with loss (\S+)", out)
        assert found, out
        finals.append(float(found.group(1)))
    assert np.isfinite(finals[0]) and finals[0] == finals[1]
    assert RunCheckpointer(wd, read_only=True).latest_step() == 4


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_fail_clearly(tmp_path):
    c = tiny("teacher")
    c.stage = "distill"
    with pytest.raises(ValueError, match="config.stage='distill'"):
        loop.train(c, str(tmp_path / "a"))

    c = tiny("flow_map")
    c.init.student = str(tmp_path / "nowhere")
    with pytest.raises(RunError, match="no such checkpoint"):
        loop.train(c, str(tmp_path / "b"))
    c.init.student = str(tmp_path)
    with pytest.raises(RunError, match="not a starting checkpoint"):
        loop.train(c, str(tmp_path / "b"))

    c = tiny("teacher")
    c.data.global_batch_size = 6
    c.mesh.update(dict(data=2, fsdp=2, tensor=1))
    with pytest.raises(RunError, match="global_batch_size=6 is not divisible by the data axes"):
        loop.train(c, str(tmp_path / "c"))

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunError, match="not writable"):
        loop.train(tiny("teacher"), str(blocker / "workdir"))

    c = tiny("flow_map")
    c.loss.bogus = 1
    with pytest.raises(RunError, match=r"config.loss.bogus is not an option of flow_map_loss"):
        loop.train(c, str(tmp_path / "e"))


@pytest.mark.slow
def test_bad_workdirs_and_starting_checkpoints_fail_clearly(tmp_path, tiny_teacher, tiny_flow_map):
    teacher_run = str(tmp_path / "teacher")  # resumed below: a copy of the shared run
    shutil.copytree(tiny_teacher, teacher_run)
    # resuming a workdir with a different architecture
    c = tiny("teacher", steps=40)
    c.model.num_layers = 3
    with pytest.raises(RunError, match="incompatible checkpoint.*num_layers"):
        loop.train(c, teacher_run)
    # a consistency run pointed at a flow-map student as its teacher
    fm = tiny_flow_map
    c = tiny("consistency")
    c.init.student, c.init.teacher = teacher_run, fm
    with pytest.raises(RunError, match="config.init.teacher is a flow-map student"):
        loop.train(c, str(tmp_path / "d"))


def test_cli_reports_errors_in_one_line(tmp_path):
    p = _cli(str(tmp_path / "w"), 2, extra=["--config.stage=bogus"])
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2
    assert "error: config.stage='bogus' is not a known stage" in out
    assert "Traceback" not in out


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = steps.make_generator_step

    def poisoned(spec):
        step_fn = original(spec)

        def step(state, frozen, batch):
            new, m = step_fn(state, frozen, batch)
            m = dict(m)
            m["loss"] = jnp.where(state.step == 4, jnp.nan, m["loss"])
            return new, m
        return step

    monkeypatch.setattr(steps, "make_generator_step", poisoned)
    wd = str(tmp_path / "nan")
    with pytest.raises(loop.NonFiniteLoss, match=r"non-finite loss \(nan\) at step 5.*last good checkpoint is step 3"):
        loop.train(tiny("teacher", steps=8, checkpoint_every=3), wd)
    ck = RunCheckpointer(wd, read_only=True)
    assert ck.all_steps() == [3]
    params = restore_item(wd, 3, "params")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))
