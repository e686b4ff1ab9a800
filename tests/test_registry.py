"""The stage registry and the typed config: a fifth stage needs one record and nothing else;
config mistakes fail early with one message naming the field."""
import json
import os
import re

import jax
import numpy as np
import pytest

from anyflow_jax import config as config_lib
from anyflow_jax import inference, losses, pipeline
from anyflow_jax import stages as stage_registry
from anyflow_jax.defaults import toy_config, wan_config
from anyflow_jax.errors import RunError
from anyflow_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, freq_dim=32)


def _tiny(c, steps=2):
    c.model.update(TINY_MODEL)
    c.data.update(dict(global_batch_size=4, num_frames=4))
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.train.update(dict(steps=steps, log_every=1, checkpoint_every=steps, tensorboard=False,
                        async_checkpointing=False))
    return c


@pytest.fixture
def fifth_stage():
    """A fifth stage, registered with one record: a teacher trained with a narrower time
    distribution (a different objective option) that the rest of the package has never seen."""
    record = stage_registry.register(stage_registry.Stage(
        name="narrow_teacher", objective=stage_registry.single_network(losses.flow_matching_loss),
        loss_fn=losses.flow_matching_loss, sampler="teacher", eval_name="narrow", random_init=True,
        loss_defaults=dict(shift=5.0, text_dropout=0.1, logit_std=0.5),
        config_defaults={"optim.lr": 1e-3, "train.steps": 7}))
    yield record
    stage_registry.unregister("narrow_teacher")
    assert "narrow_teacher" not in stage_registry.names()


@pytest.mark.slow
def test_a_fifth_stage_needs_one_record_and_nothing_else(fifth_stage, tmp_path):
    # configs: the schema's defaults plus the record's
    base = config_lib.default_config("narrow_teacher")
    assert base.loss.to_dict() == {"shift": 5.0, "text_dropout": 0.1, "logit_std": 0.5}
    assert base.optim.lr == 1e-3 and base.train.steps == 7
    c = toy_config("narrow_teacher")
    assert c.loss.shift == 1.0 and c.loss.logit_std == 0.5  # the toy's shift, the record's option
    assert "narrow_teacher" in stage_registry.names()
    assert pipeline.stage_config("narrow_teacher", str(tmp_path), {}).init.student == ""
    # train: the objective receives the record's options
    seen = {}
    original = fifth_stage.objective

    def spy(nets, batch, key, options):
        seen.update(options)
        return original(nets, batch, key, options)

    stage_registry.register(stage_registry.Stage(**{**fifth_stage.__dict__, "objective": spy}), replace=True)
    wd = str(tmp_path / "run")
    last = loop.train(_tiny(toy_config("narrow_teacher")), wd)
    assert last["step"] == 2 and np.isfinite(last["loss"])
    assert seen == {"shift": 1.0, "text_dropout": 0.1, "logit_std": 0.5}
    with open(os.path.join(wd, "run.json")) as fh:
        assert json.load(fh)["stage"] == "narrow_teacher"
    # sample: the record's sampler and default guidance
    gen = inference.load_generator(wd)
    assert gen.kind == "teacher" and gen.stage == "narrow_teacher"
    videos = inference.sample_videos(gen, [1, 2], gen.conditioning.contexts(["class3"]),
                                     neg_context=gen.conditioning.negative())
    assert set(videos) == {("class3", 0, 1), ("class3", 0, 2)}
    assert all(v.shape == (4, 16, 16, 1) and np.isfinite(v).all() for v in videos.values())


def test_builtin_records_match_the_reference_stages():
    assert stage_registry.names()[:4] == ("teacher", "flow_map", "on_policy", "consistency")
    on_policy = stage_registry.get("on_policy")
    assert on_policy.has_critic and on_policy.needs_teacher and on_policy.student_is_flow_map
    assert on_policy.steps_per_update == "critic"
    assert dict(on_policy.starts_from) == {"student": "flow_map", "teacher": "teacher"}
    assert stage_registry.get("consistency").sampler == "consistency"
    assert stage_registry.get("teacher").random_init and not stage_registry.get("flow_map").random_init
    assert {s: stage_registry.get(s).eval_name for s in stage_registry.names()[:4]} == {
        "teacher": "teacher", "flow_map": "anyflow_stage1", "on_policy": "anyflow", "consistency": "consistency"}
    with pytest.raises(RunError, match="config.stage='on_polciy' is not a known stage; did you mean 'on_policy'"):
        stage_registry.get("on_polciy")
    with pytest.raises(ValueError, match="already registered"):
        stage_registry.register(on_policy)
    # a record that contradicts itself is refused
    with pytest.raises(ValueError, match="student_is_flow_map"):
        stage_registry.register(stage_registry.Stage(
            name="bad", objective=stage_registry.single_network(losses.flow_map_loss), loss_fn=losses.flow_map_loss,
            sampler="teacher", eval_name="bad", student_is_flow_map=True, starts_from={"student": "teacher"}))
    assert "bad" not in stage_registry.names()


def test_no_stage_name_comparisons_outside_the_registry():
    """Stage-specific behaviour lives in the records: no `stage == "x"` / `stage in (...)`."""
    pattern = re.compile(r"""(stage|\.name)\s*(==|!=)\s*["']|(stage|\.name)\s+(not\s+)?in\s*[\(\[{]\s*["']""")
    offenders = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "anyflow_jax")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path) as fh:
                    for i, line in enumerate(fh, 1):
                        if pattern.search(line.split("#")[0]):
                            offenders.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert offenders == []


# ------------------------------------------------------------------------------ typed config
def test_parse_reads_every_toy_and_wan_config_into_the_schema():
    for stage in ("teacher", "flow_map", "on_policy", "consistency"):
        for c in (toy_config(stage), wan_config("1.3b", stage), wan_config("14b", stage)):
            c.init.update(dict(student=c.init.student or "ckpt/student", teacher=c.init.teacher or "ckpt/teacher"))
            run = config_lib.parse(c)
            assert isinstance(run.train, config_lib.TrainConfig) and run.stage == stage
            assert (run.critic_optim is not None) == (stage == "on_policy")
            assert run.optim.lr == c.optim.lr and run.data.global_batch_size == c.data.global_batch_size
    c = wan_config("14b", "on_policy")
    c.init.update(dict(student="ckpt/student", teacher="ckpt/teacher"))
    run = config_lib.parse(c)
    assert run.loss["steps_list"] == (2, 4, 8, 16, 50) and run.critic_optim.b1 == 0.0
    assert run.critic_optim.trainable_patterns and run.mesh.tensor == 4


@pytest.mark.parametrize("field, value, message", [
    ("train.stepz", 3, "config.train.stepz is not a config field; did you mean config.train.steps?"),
    ("train.steps", "abc", "config.train.steps must be an integer, got 'abc'"),
    ("train.steps", 0, "config.train.steps must be >= 1, got 0"),
    ("train.tensorboard", "yes", "config.train.tensorboard must be true or false"),
    ("optim.lr", -1.0, "config.optim.lr must be positive"),
    ("data.source", "webdataset", "config.data.source='webdataset'"),
    ("loss.shfit", 3.0, "config.loss.shfit is not an option of flow_map_loss; did you mean config.loss.shift?"),
    ("init.student", "", "config.init.student is empty"),
    ("optim.schedule", "step", "config.optim.schedule must be one of constant, cosine, linear, got 'step'"),
])
def test_config_mistakes_name_the_field(field, value, message):
    c = toy_config("flow_map").to_dict()  # a ConfigDict refuses values of another type itself
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(RunError) as e:
        config_lib.parse(c)
    assert message in str(e.value)


def test_decaying_schedule_ends_at_train_steps_unless_told():
    c = toy_config("flow_map")
    c.optim.schedule = "cosine"
    run = config_lib.parse(c)
    assert run.optim.decay_steps == c.train.steps == 400
    c.optim.decay_steps = 300
    assert config_lib.parse(c).optim.decay_steps == 300
    c.optim.decay_steps = c.optim.warmup_steps  # nothing left to decay over
    with pytest.raises(RunError, match=r"config.optim.schedule='cosine' decays to 0 at config.optim.decay_steps \(20\)"):
        config_lib.parse(c)


def test_config_unknown_section_and_renamed_dmd_option():
    c = toy_config("teacher")
    c.trian = {"steps": 3}
    with pytest.raises(RunError, match=r"config.trian is not a config field; did you mean config.train\?"):
        config_lib.parse(c)
    c = wan_config("1.3b", "on_policy")
    c.loss.dmd_batch_size = 2
    with pytest.raises(RunError, match="config.loss.dmd_batch_size .*renamed dmd_num_samples"):
        config_lib.parse(c)


def test_unsharded_parameter_guard(tmp_path):
    assert jax.device_count() == 8
    c = _tiny(toy_config("teacher"))
    c.mesh.update(dict(data=1, fsdp=4, tensor=2))
    c.data.global_batch_size = 8
    c.train.max_unsharded_fraction = 0.0  # nothing may be replicated: norms and biases are
    with pytest.raises(RunError, match=r"of the parameters are replicated on the mesh .*max_unsharded_fraction=0.0"):
        loop.build_run(c, str(tmp_path / "a")).close()
    c.train.max_unsharded_fraction = config_lib.TrainConfig().max_unsharded_fraction  # the default passes
    loop.build_run(c, str(tmp_path / "b")).close()
