"""Every shipped config validates before compilation and carries the reference settings."""
import importlib.util
import os

import pytest

from anyflow_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("teacher", "flow_map", "on_policy", "consistency")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("stage", STAGES)
def test_toy_configs_validate_and_document_their_command(stage):
    mod = _load("toy")
    cfg = mod.get_config(stage)
    assert cfg.stage == stage
    loop.validate_config(cfg)
    assert f"configs/toy.py:{stage}" in mod.__doc__


@pytest.mark.parametrize("size", ["1.3b", "14b"])
@pytest.mark.parametrize("stage", STAGES)
def test_wan_configs_carry_reference_hyperparameters(size, stage):
    mod = _load("wan_t2v")
    cfg = mod.get_config(f"{size},{stage}")
    assert cfg.stage == stage
    heads, layers, ffn, batch = {"1.3b": (12, 30, 8960, 32), "14b": (40, 40, 13824, 16)}[size]
    assert (cfg.model.num_attention_heads, cfg.model.num_layers, cfg.model.ffn_dim) == (heads, layers, ffn)
    assert cfg.model.attention_head_dim == 128 and cfg.model.text_dim == 4096
    assert cfg.data.global_batch_size == batch and cfg.data.source == "array_record"
    if stage == "on_policy":
        assert (cfg.optim.lr, cfg.optim.b1, cfg.optim.b2, cfg.optim.warmup_steps) == (2e-6, 0.0, 0.999, 0)
        assert (cfg.ema.decay, cfg.ema.warmup_steps, cfg.train.steps) == (0.99, 200, 1200)
        assert list(cfg.loss.steps_list) == [2, 4, 8, 16, 50] and cfg.loss.real_guidance_scale == 3.0
        assert cfg.loss.flow_map_options["fuse_guidance_scale"] == 3.0
    elif stage in ("teacher", "flow_map"):
        assert (cfg.optim.lr, cfg.optim.b1, cfg.optim.b2, cfg.optim.warmup_steps) == (5e-5, 0.9, 0.95, 1000)
        assert (cfg.ema.decay, cfg.ema.warmup_steps) == (0.999, 1000)
        assert cfg.train.steps == {"1.3b": 6000, "14b": 4000}[size]
        assert cfg.optim.grad_clip == 1.0 and cfg.optim.weight_decay == 0.0
    if stage == "flow_map":
        assert (cfg.loss.diffusion_ratio, cfg.loss.consistency_ratio, cfg.loss.delta) == (0.5, 0.25, 0.005)
        assert (cfg.loss.fuse_guidance_scale, cfg.loss.weighting, cfg.loss.text_dropout) == (3.0, "beta08", 0.1)
    cfg.init.student = cfg.init.teacher = "/some/checkpoint"  # paths are checked when the run starts
    loop.validate_config(cfg)
    assert f"configs/wan_t2v.py:" in mod.__doc__


def test_validation_names_the_field():
    cfg = _load("toy").get_config("teacher")
    cfg.train.steps = 0
    with pytest.raises(loop.RunError, match="config.train.steps must be >= 1"):
        loop.validate_config(cfg)
    cfg = _load("toy").get_config("flow_map")
    cfg.init.student = ""
    with pytest.raises(loop.RunError, match="config.init.student is empty"):
        loop.validate_config(cfg)
    cfg = _load("toy").get_config("on_policy")
    cfg.init.teacher = ""
    with pytest.raises(loop.RunError, match="config.init.teacher is empty"):
        loop.validate_config(cfg)
    cfg.init.teacher = "x"
    cfg.mesh.update(dict(data=16, fsdp=1, tensor=1))
    with pytest.raises(loop.RunError, match="config.mesh: .*needs 16 devices, have 8"):
        loop.validate_config(cfg)
    cfg.mesh.update(dict(data=3, fsdp=1, tensor=1))
    with pytest.raises(loop.RunError, match="global_batch_size=16 is not divisible by the data axes"):
        loop.validate_config(cfg)
