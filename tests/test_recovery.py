"""Damaged checkpoints: resume and every reader detect a truncated or missing item, name the step
and the item, and use the newest intact step; resume sets the damaged step aside (never deletes
it); with no intact step there is one clear error and nothing on disk changes."""
import glob
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from anyflow_jax.checkpoints import model as model_ckpt
from anyflow_jax.checkpoints import runs
from anyflow_jax.checkpoints.diffusers import CheckpointError
from anyflow_jax.errors import RunError
from anyflow_jax.training import loop
from runs_testlib import ROOT, TINY_FLAGS, subprocess_env, tiny

# TensorStore leaves the failed read's future unretrieved when a truncated file is read: expected here.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"), pytest.mark.slow]


def cfg(steps):
    """The tiny teacher (runs_testlib), checkpointed every 2 steps, keeping 5."""
    return tiny("teacher", steps=steps, checkpoint_every=2, keep_checkpoints=5)


@pytest.fixture(scope="module")
def runs_6_and_8(tmp_path_factory):
    """A run checkpointed at steps 2, 4, 6, and an uninterrupted 8-step run to compare with."""
    base = tmp_path_factory.mktemp("recovery")
    six, eight = str(base / "six"), str(base / "eight")
    loop.train(cfg(6), six)
    loop.train(cfg(8), eight)
    return six, eight


def truncate_item(workdir, step, item):
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), item, "ocdbt.process_0", "d", "*"))
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as fh:
        fh.truncate(os.path.getsize(biggest) // 3)


def item(workdir, step, name):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), name))


def test_readers_skip_a_truncated_step_and_say_which(runs_6_and_8, tmp_path, caplog):
    wd = str(tmp_path / "run")
    shutil.copytree(runs_6_and_8[0], wd)
    truncate_item(wd, 6, "ema_params")
    with caplog.at_level(logging.WARNING):
        _, params, desc = runs.load_start(wd, runtime={}, field="config.init.student")
    assert desc.endswith("step 4 (ema_params)")
    text = caplog.text
    assert "checkpoint step 6" in text and "item 'ema_params'" in text and "damaged" in text
    assert "using step 4, the newest intact checkpoint" in text
    want = item(wd, 4, "ema_params")
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # raw weights of step 6 are intact: a reader of 'params' uses step 6
    assert runs.load_start(wd, runtime={}, use_ema=False, field="x")[2].endswith("step 6 (params)")
    # readers change nothing on disk
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4", "6"]
    # the sampling CLI reads the same way
    out = subprocess.run([sys.executable, "-m", "anyflow_jax.sample", "--checkpoint", wd, "--steps", "1", "--class",
                          "3", "--format", "npy", "--out", str(tmp_path / "samples")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "checkpoint step 6" in out.stderr and "'ema_params'" in out.stderr
    assert "Traceback" not in out.stderr


def test_resume_falls_back_to_the_newest_intact_step_exactly(runs_6_and_8, tmp_path, caplog):
    six, eight = runs_6_and_8
    wd = str(tmp_path / "run")
    shutil.copytree(six, wd)
    truncate_item(wd, 6, "params")
    shutil.rmtree(os.path.join(wd, "checkpoints", "4", "opt_state"))  # a deleted item
    with caplog.at_level(logging.WARNING):
        last = loop.train(cfg(8), wd)
    assert last["step"] == 8
    text = caplog.text
    assert "checkpoint step 6" in text and "item 'params'" in text
    assert "checkpoint step 4" in text and "item 'opt_state' is missing" in text
    assert "using step 2, the newest intact checkpoint" in text
    # set aside, not deleted
    aside = sorted(os.listdir(os.path.join(wd, "damaged")))
    assert [n.split("-")[0] for n in aside] == ["4", "6"]
    assert os.path.isdir(os.path.join(wd, "damaged", aside[1], "params"))
    # resumed from step 2, the result is the uninterrupted 8-step run, bit for bit
    for name in ("params", "ema_params", "opt_state"):
        a, b = item(wd, 8, name), item(eight, 8, name)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_no_intact_step_is_one_error_and_touches_nothing(runs_6_and_8, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(runs_6_and_8[0], wd)
    for step in (2, 4, 6):
        shutil.rmtree(os.path.join(wd, "checkpoints", str(step), "meta"))
    with pytest.raises(RunError, match=r"no intact checkpoint in .*step 6: item 'meta' is missing; step 4: .*step 2"):
        loop.train(cfg(8), wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4", "6"]
    assert not os.path.exists(os.path.join(wd, "damaged"))
    # the CLI: one line, exit 2
    flags = TINY_FLAGS + ["--config.train.steps=8", "--config.train.keep_checkpoints=5"]
    out = subprocess.run([sys.executable, "-m", "anyflow_jax.train", "--config", "configs/toy.py:teacher",
                          "--workdir", wd] + flags, cwd=ROOT, env=subprocess_env(devices=1), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no intact checkpoint" in errors[0] and "Traceback" not in out.stderr
    # all items gone in every step of a reader's item: one clear error naming them
    shutil.rmtree(os.path.join(wd, "checkpoints", "6", "ema_params"))
    truncate_item(wd, 4, "ema_params")
    shutil.rmtree(os.path.join(wd, "checkpoints", "2", "ema_params"))
    with pytest.raises(RunError, match=r"config.init.student=.*no intact checkpoint.*step 6: item 'ema_params' is "
                                       r"missing; step 4: item 'ema_params' cannot be read"):
        runs.load_start(wd, runtime={}, field="config.init.student")


def test_a_checkpoint_that_does_not_fit_is_not_called_damaged(runs_6_and_8, tmp_path):
    wd = str(tmp_path / "run")
    shutil.copytree(runs_6_and_8[0], wd)
    c = cfg(8)
    c.optim.trainable_patterns = ["blocks/"]  # the optimizer state changes shape
    with pytest.raises(RunError, match="incompatible checkpoint: step 6 .* opt_state that does not fit"):
        loop.train(c, wd)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4", "6"]
    assert not os.path.exists(os.path.join(wd, "damaged"))


def test_a_damaged_model_checkpoint_is_one_error(runs_6_and_8, tmp_path):
    model, params, _ = runs.load_start(runs_6_and_8[0], runtime={}, field="x")
    path = str(tmp_path / "model")
    model_ckpt.save_model(path, model, params)
    files = glob.glob(os.path.join(path, "params", "ocdbt.process_0", "d", "*"))
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(CheckpointError, match="the model checkpoint is damaged: its parameters cannot be read"):
        model_ckpt.load_model(path)
    shutil.rmtree(os.path.join(path, "params"))
    with pytest.raises(CheckpointError, match="the model checkpoint is damaged: params/ is missing"):
        model_ckpt.load_model(path)
