"""Test helpers for tiny training runs: the tiny toy-model config (as a config, as ``train`` CLI
flags and as ``pipeline`` overrides), the training CLI as a child process (and waiting on it),
and readers of a run's metrics and checkpoints. The shared trained runs built with ``tiny`` are
the session fixtures in ``conftest.py``."""
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from anyflow_jax.defaults import toy_config

TINY_MODEL = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, freq_dim=32)
TINY_FLAGS = [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()] + [
    "--config.data.global_batch_size=8", "--config.data.num_frames=4", "--config.train.tensorboard=False",
    "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1", "--config.train.log_every=1",
    "--config.train.async_checkpointing=False"]
TINY_OVERRIDES = [f"--override=model.{k}={v}" for k, v in TINY_MODEL.items()] + [
    "--override=data.global_batch_size=8", "--override=data.num_frames=4", "--override=train.tensorboard=false",
    "--override=mesh.data=1", "--override=mesh.fsdp=1", "--override=mesh.tensor=1", "--override=train.log_every=1",
    "--override=train.async_checkpointing=false"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(stage, steps=6, **train):
    """The toy config of ``stage`` on a tiny model (2 layers, width 32), batch 8 of 4 frames, one
    device, a checkpoint every 3 steps; ``train`` overrides ``config.train`` fields."""
    c = toy_config(stage)
    c.model.update(TINY_MODEL)
    c.data.update(dict(global_batch_size=8, num_frames=4))
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.train.update(dict(steps=steps, log_every=1, checkpoint_every=3, tensorboard=False, async_checkpointing=False))
    c.train.update(train)
    # no periodic evaluators (tests/test_evaluators.py covers them): the toy's on_policy record
    # would otherwise train or read a classifier under the working directory's runs/toy/
    c.eval.every = 0
    if stage == "on_policy":
        c.loss.steps_list = [2, 4]
        c.critic_loss.steps_list = [2, 4]
    return c


def metrics(workdir):
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        for line in fh:
            row = json.loads(line)
            rows[row["step"]] = row  # the last record of a step wins (a resume may repeat steps)
    return [rows[k] for k in sorted(rows)]


def restore_item(workdir, step, item):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), item))


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------ child processes
def subprocess_env(devices=None):
    """The environment of a child JAX process: the session's (conftest's XLA compile flags and
    compilation cache included) on CPU, with ``devices`` fake CPU devices instead of the session's
    8 (None: JAX's default, one)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def train_cli(workdir, steps, *extra, stage="teacher"):
    """``python -m anyflow_jax.train`` of the tiny ``stage`` config on one device, started
    (stdout and stderr merged into ``proc.stdout``); ``extra`` flags come last."""
    cmd = [sys.executable, "-m", "anyflow_jax.train", f"--config={ROOT}/configs/toy.py:{stage}",
           f"--workdir={workdir}", f"--config.train.steps={steps}", *TINY_FLAGS, *extra]
    return subprocess.Popen(cmd, env=subprocess_env(devices=1), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def logged_steps(workdir):
    """The step of every complete record in ``metrics.jsonl``, in file order ([] before the file
    exists; a line still being written is not counted)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        lines = fh.read().split("\n")[:-1]
    return [json.loads(line)["step"] for line in lines if line.strip()]


def wait_for(pred, proc, timeout=240):
    """Poll ``pred()`` until it holds; fail (with the output) if ``proc`` exits first or after
    ``timeout`` seconds (killing it)."""
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"exited early:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)
