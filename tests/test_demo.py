"""The quick start's main job and the toy config."""
import importlib.util
import os

import jax.numpy as jnp
import pytest

from anyflow_jax import demo
from anyflow_jax.models.wan import WanTransformer3D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_and_checks_the_diagonal(capsys):
    assert demo.main(["--batch", "1", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "student u(z, t, r=t) == teacher u(z, t): True" in out
    assert "2 flow-map jumps" in out


def test_toy_config_builds_the_model():
    spec = importlib.util.spec_from_file_location("toy_model", os.path.join(ROOT, "configs", "toy_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = WanTransformer3D.from_config(mod.get_config().to_dict())
    assert model.inner_dim == 64 and model.in_channels == 1 and model.scan_layers
    assert model.dtype == jnp.float32
