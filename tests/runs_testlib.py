"""Test helpers for tiny training runs: the tiny toy-model config (as a config and as CLI flags)
and readers of a run's metrics and checkpoints. The shared trained runs built with ``tiny`` are
the session fixtures in ``conftest.py``."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from anyflow_jax.defaults import toy_config

TINY_MODEL = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, freq_dim=32)
TINY_FLAGS = [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()] + [
    "--config.data.global_batch_size=8", "--config.data.num_frames=4", "--config.train.tensorboard=False",
    "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1", "--config.train.log_every=1",
    "--config.train.async_checkpointing=False"]


def tiny(stage, steps=6, **train):
    """The toy config of ``stage`` on a tiny model (2 layers, width 32), batch 8 of 4 frames, one
    device, a checkpoint every 3 steps; ``train`` overrides ``config.train`` fields."""
    c = toy_config(stage)
    c.model.update(TINY_MODEL)
    c.data.update(dict(global_batch_size=8, num_frames=4))
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.train.update(dict(steps=steps, log_every=1, checkpoint_every=3, tensorboard=False, async_checkpointing=False))
    c.train.update(train)
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
