"""Training with LoRA adapters (config.lora, docs/lora.md): only the adapter factors get gradients,
optimizer state and an EMA; the frozen base is stored once per run and stays bit for bit; a LoRA
run resumes bit-exactly; a LoRA stage 1 starts from a LoRA teacher run (its adapters continued,
the network exactly the teacher's EMA); sampling a LoRA workdir equals sampling the merged
parameters; stage 2's critic is an adapter on the teacher's base (slow).

Cheap on purpose: one tiny base (random weights, perturbed so the output head is not zero) saved
as a model checkpoint, a 2-step LoRA teacher from it shared by the module, the later stages'
starts checked without training them (trained, 1 step each, in the one slow test)."""
import dataclasses
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from model_testlib import perturbed
from anyflow_jax import config as config_lib
from anyflow_jax import inference, lora
from anyflow_jax.checkpoints import runs as run_files
from anyflow_jax.checkpoints.model import save_model
from anyflow_jax.errors import RunError
from anyflow_jax.training import loop, steps
from runs_testlib import assert_trees_equal, metrics, restore_item, tiny

RANK, ALPHA = 4, 8.0  # scale alpha / r = 2: a dropped or inverted scale shows
TEACHER_STEPS = 2
ATTN_FFN = 6  # adapted kernels of a teacher (scan layout): attn1 q/k/v/out, ffn net_0/net_2


def lora_config(stage, steps, **train):
    c = tiny(stage, steps=steps, checkpoint_every=1, **train)
    c.lora.update(dict(enabled=True, rank=RANK, alpha=ALPHA))
    return c


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _names(tree):
    return ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path) for path, _ in _leaves(tree)]


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """(path, params): the tiny toy model with random, perturbed weights as an Orbax model checkpoint."""
    model = loop.abstract_networks(config_lib.parse(tiny("teacher"))).student
    params = perturbed(model.init_params(jax.random.key(0)), 0, 0.05)
    path = str(tmp_path_factory.mktemp("lora_base") / "base")
    save_model(path, model, params)
    return path, params


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, base_checkpoint):
    """A 2-step LoRA teacher from the base, checkpoints at steps 1 and 2."""
    wd = str(tmp_path_factory.mktemp("lora_teacher") / "teacher")
    loop.train(_with_start(lora_config("teacher", TEACHER_STEPS), base_checkpoint[0]), wd)
    return wd


def _with_start(c, student="", teacher=""):
    c.init.student, c.init.teacher = student, teacher
    return c


# ------------------------------------------------------------------------------ config
def test_lora_config_is_validated_and_wan_defaults_to_the_reference():
    from anyflow_jax.defaults import wan_config
    for stage in ("teacher", "flow_map", "on_policy", "consistency"):
        c = wan_config("1.3b", stage)
        assert c.lora.enabled and c.lora.rank == 256 and c.lora.alpha == 256.0, stage
    c = tiny("teacher")
    assert not c.lora.enabled and c.lora.rank == 16  # the toy: full fine-tune by default
    for field, value, match in (("rank", 0, "config.lora.rank must be >= 1"),
                                ("alpha", -1.0, "config.lora.alpha must be positive"),
                                ("targets", ["teacher", "attn1.to_q"], "config.lora.targets: a named target set")):
        c = _with_start(tiny("flow_map"), "somewhere")
        c.lora[field] = value
        with pytest.raises(RunError, match=match):
            config_lib.parse(c)
    c = tiny("teacher")
    c.lora.enabled = True
    with pytest.raises(RunError, match="config.lora.enabled: stage 'teacher' starts from random weights"):
        config_lib.parse(c)
    c = _with_start(tiny("flow_map"), "somewhere")
    c.lora.critic_targets = ["critic"]
    with pytest.raises(RunError, match="config.lora.critic_targets is set but stage 'flow_map' has no critic"):
        config_lib.parse(c)


# ------------------------------------------------------------------------------ stage 0
def test_only_adapters_are_trained_the_base_stays_and_resume_is_bit_exact(tmp_path, base_checkpoint, teacher_run):
    path, start = base_checkpoint
    # checkpoints hold adapters only: 6 kernels x (A, B) for params and EMA, Adam's mu and nu of each
    for item in ("params", "ema_params"):
        names = _names(restore_item(teacher_run, TEACHER_STEPS, item))
        assert len(names) == 2 * ATTN_FFN and all(n.endswith(("lora_A", "lora_B")) for n in names), names
    opt = [x for _, x in _leaves(restore_item(teacher_run, TEACHER_STEPS, "opt_state")) if np.ndim(x) > 0]
    assert len(opt) == 2 * 2 * ATTN_FFN and all(RANK in x.shape[-2:] for x in opt)
    # the base is written once per run, not in the steps, and is the starting checkpoint bit for bit
    assert sorted(os.listdir(os.path.join(teacher_run, "checkpoints"))) == ["1", "2"]
    items = {n for n in os.listdir(os.path.join(teacher_run, "checkpoints", "2")) if "." not in n and n[0] != "_"}
    assert items == {"meta", "params", "ema_params", "opt_state", "data"}
    meta = run_files.read_run_file(teacher_run)
    model = loop.WanTransformer3D.from_config(meta["model"])
    assert_trees_equal(run_files.restore_base(teacher_run, model), start)
    assert meta["lora"] == {"rank": RANK, "alpha": ALPHA, "critic_targets": [],
                            "targets": ["/".join(t.path) for t in lora.wan_targets(model, "teacher")]}
    assert metrics(teacher_run)[-1]["grad_norm"] > 0  # gradients reach the adapters (B moved at step 1)
    with open(os.path.join(teacher_run, loop.PARAMETERS_FILE)) as fh:
        assert fh.read().startswith(f"LoRA adapters (rank {RANK}, alpha {ALPHA:g})")

    # resume in process from step 1 of a copy: the optimizer sees the 12 factors' gradients only,
    # the base is the same before and after the step, and step 2 equals the uninterrupted run's
    wd = str(tmp_path / "resumed")
    shutil.copytree(teacher_run, wd)
    shutil.rmtree(os.path.join(wd, "checkpoints", "2"))
    run = loop.build_run(_with_start(lora_config("teacher", TEACHER_STEPS), path), wd)
    try:
        assert run.latest_step == 1
        state = loop.restore_or_init(run)
        frozen = loop.place_frozen(run)
        batch = run.next_batch()
        seen = {}
        inner = run.spec.tx

        def update(grads, opt_state, params=None):
            seen["grads"] = grads
            return inner.update(grads, opt_state, params)
        spec = dataclasses.replace(run.spec, tx=optax.GradientTransformation(inner.init, update))
        jax.eval_shape(steps.make_generator_step(spec), state, frozen, batch)
        names = _names(seen["grads"])
        assert len(names) == 2 * ATTN_FFN and all(n.endswith(("lora_A", "lora_B")) for n in names), names
        before = jax.tree_util.tree_map(np.asarray, frozen.base)
        compiled = loop.compile_steps(run, state, frozen, batch)
        loop.run_loop(run, state, compiled, frozen, batch)
        assert_trees_equal(frozen.base, before)
        assert_trees_equal(frozen.base, start)
    finally:
        run.close()
    for item in ("params", "ema_params", "opt_state", "meta"):
        assert_trees_equal(restore_item(teacher_run, TEACHER_STEPS, item), restore_item(wd, TEACHER_STEPS, item))
    assert metrics(wd)[-1]["loss"] == metrics(teacher_run)[-1]["loss"]

    # resuming with LoRA switched off is refused before anything is loaded or compiled
    c = lora_config("teacher", TEACHER_STEPS + 2)
    c.init.student, c.lora.enabled = "unused", False
    with pytest.raises(RunError, match="incompatible checkpoint.*holds a LoRA .*config.lora.enabled=False"):
        loop.build_run(c, wd)


# ------------------------------------------------------------------------------ sampling
def test_sampling_a_lora_workdir_equals_sampling_the_merged_params(teacher_run):
    straight = teacher_run
    gen = inference.load_generator(straight)
    meta = run_files.read_run_file(straight)
    model = gen.model
    base = run_files.restore_base(straight, model)
    adapters, step = run_files.restore_run_item(
        straight, "ema_params", run_files.abstract_run_adapters(model, meta["lora"], "ema_params"))
    assert step == TEACHER_STEPS
    q = adapters["blocks"]["attn1"]["to_q"]["kernel"]
    assert isinstance(q, lora.LoraWeights) and q.alpha == ALPHA
    merged = lora.merge(base, adapters)
    assert_trees_equal(gen.params, merged)
    w = np.asarray(base["blocks"]["attn1"]["to_q"]["kernel"])
    np.testing.assert_allclose(np.asarray(merged["blocks"]["attn1"]["to_q"]["kernel"]),
                               w + ALPHA / RANK * np.asarray(q.lora_A) @ np.asarray(q.lora_B), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(q.lora_B)).max() > 0  # trained: the merged network differs from the base
    f, h, w_, c = gen.video_shape()
    noise = inference.initial_noise(0, np.arange(2), (f, h, w_, c))
    context = np.stack([gen.conditioning.contexts()[k] for k in ("class1", "class7")]).astype(np.float32)
    ours = np.asarray(gen.sample(noise, context, 2, guidance=1.0))
    gen.params = merged
    np.testing.assert_array_equal(np.asarray(gen.sample(noise, context, 2, guidance=1.0)), ours)
    gen.params = base
    assert np.abs(np.asarray(gen.sample(noise, context, 2, guidance=1.0)) - ours).max() > 0


# ------------------------------------------------------------------------------ stages 1 and 2
def test_later_lora_stages_start_from_a_lora_teacher_run(teacher_run):
    teacher_model, teacher_params, _ = run_files.load_start(teacher_run, runtime={})
    teacher_ema = restore_item(teacher_run, TEACHER_STEPS, "ema_params")
    # stage 1: the teacher's EMA adapters continue (its 6 kernels; the embedders' adapters will
    # start fresh), so the student starts as the teacher's EMA network exactly
    nets = loop.build_networks(config_lib.parse(_with_start(lora_config("flow_map", 1), teacher_run)))
    assert nets.student.flow_map
    assert sorted(lora.adapter_paths(nets.adapters)) == sorted(
        tuple(p.split("/")) for p in run_files.read_run_file(teacher_run)["lora"]["targets"])
    assert_trees_equal(nets.adapters, teacher_ema)
    start = lora.merge(nets.student_params, nets.adapters)
    assert_trees_equal(start["blocks"], teacher_params["blocks"])
    assert_trees_equal(start["condition_embedder"]["delta_embedder"],
                       teacher_params["condition_embedder"]["time_embedder"])
    assert_trees_equal(nets.student_params["blocks"], run_files.restore_base(teacher_run, teacher_model)["blocks"])
    # stage 2: the real score is base + EMA adapter merged once; the critic is an adapter on the
    # teacher's base starting from the teacher's EMA adapter
    nets = loop.build_networks(config_lib.parse(_with_start(lora_config("on_policy", 1), teacher_run, teacher_run)))
    assert_trees_equal(nets.teacher_params, teacher_params)
    assert_trees_equal(nets.critic_params, run_files.restore_base(teacher_run, teacher_model))
    assert_trees_equal(nets.critic_adapters, teacher_ema)
    # a full fine-tune may start from a LoRA run too: it gets the merged network
    nets = loop.build_networks(config_lib.parse(_with_start(tiny("flow_map"), teacher_run)))
    assert nets.adapters is None
    assert_trees_equal(nets.student_params["blocks"], teacher_params["blocks"])


@pytest.mark.slow
def test_lora_flow_map_then_on_policy_train(tmp_path, teacher_run):
    fm = str(tmp_path / "flow_map")
    loop.train(_with_start(lora_config("flow_map", 1), teacher_run), fm)
    meta = run_files.read_run_file(fm)
    student = loop.WanTransformer3D.from_config(meta["model"])
    assert student.flow_map and len(meta["lora"]["targets"]) == ATTN_FFN + 4  # + time/delta embedder linears
    assert len(_names(restore_item(fm, 1, "ema_params"))) == 2 * (ATTN_FFN + 4)
    assert np.isfinite(metrics(fm)[-1]["loss"])
    teacher_model = loop.WanTransformer3D.from_config(run_files.read_run_file(teacher_run)["model"])
    assert_trees_equal(run_files.restore_base(fm, student)["blocks"],
                       run_files.restore_base(teacher_run, teacher_model)["blocks"])

    cfg = _with_start(lora_config("on_policy", 1), fm, teacher_run)
    nets = loop.build_networks(config_lib.parse(cfg))
    assert_trees_equal(nets.adapters, restore_item(fm, 1, "ema_params"))  # the student continues stage 1's
    wd = str(tmp_path / "on_policy")
    last = loop.train(cfg, wd)
    assert last["step"] == 1
    for key in ("loss", "critic/loss", "critic/grad_norm"):
        assert np.isfinite(last[key]), key
    assert len(_names(restore_item(wd, 1, "critic_params"))) == 2 * ATTN_FFN
    assert_trees_equal(run_files.restore_base(wd, teacher_model, "critic_params"),
                       run_files.restore_base(teacher_run, teacher_model))


@pytest.mark.slow
def test_lora_far_stage_trains_far_patch_embedding_in_full(tmp_path, teacher_run):
    """The FAR stages train ``far_patch_embedding`` in full next to the adapters (the reference's
    ``param_names_to_optimize``; ``config.lora.train_in_full``, the FAR records' default): a
    :class:`lora.DenseDelta` per leaf in the checkpoints, with optimizer state and EMA, recorded
    in ``run.json``; the base keeps the resized start; the generator merges it; causal stage 2
    continues it."""
    cfg = _with_start(lora_config("far_flow_map", 2), teacher_run)
    cfg.model.update(dict(chunk_partition=(1, 2, 1), full_chunk_limit=2))
    cfg.loss.update(dict(fuse_guidance_scale=1.0, text_dropout=0.0, bidirectional_prob=0.0, long_context_ratio=1.0))
    assert tuple(cfg.lora.train_in_full) == ("far_patch_embedding",)
    start = loop.build_networks(config_lib.parse(cfg))
    wd = str(tmp_path / "far_flow_map")
    loop.train(cfg, wd)
    meta = run_files.read_run_file(wd)
    assert meta["lora"]["full"] == ["far_patch_embedding/bias", "far_patch_embedding/kernel"]
    params = restore_item(wd, 2, "params")
    names = _names(params)
    assert "far_patch_embedding/kernel/delta" in names and "far_patch_embedding/bias/delta" in names
    delta = np.asarray(params["far_patch_embedding"]["kernel"]["delta"])
    assert np.abs(delta).max() > 0  # trained (it starts at zero)
    opt_names = _names(restore_item(wd, 2, "opt_state"))
    assert sum("far_patch_embedding/kernel" in n for n in opt_names) == 2  # Adam's mu and nu
    student = loop.far_wan.model_from_config(meta["model"])
    base = run_files.restore_base(wd, student)
    assert_trees_equal(base["far_patch_embedding"], start.student_params["far_patch_embedding"])
    gen = inference.load_generator(wd)
    ema = restore_item(wd, 2, "ema_params")["far_patch_embedding"]
    for k in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(gen.params["far_patch_embedding"][k]),
                                      np.asarray(base["far_patch_embedding"][k]) + np.asarray(ema[k]["delta"]))
    # causal stage 2 continues the offsets (its default trains them too)
    cfg2 = _with_start(lora_config("far_on_policy", 1), wd, teacher_run)
    cfg2.model.update(dict(chunk_partition=(1, 2, 1), full_chunk_limit=2))
    nets = loop.build_networks(config_lib.parse(cfg2))
    kept = nets.adapters["far_patch_embedding"]["kernel"]
    assert isinstance(kept, lora.DenseDelta)
    np.testing.assert_array_equal(np.asarray(kept.delta), np.asarray(ema["kernel"]["delta"]))
    # a trainable pattern that leaves the offsets out is one clear error
    bad = _with_start(lora_config("far_flow_map", 1), teacher_run)
    bad.model.update(dict(chunk_partition=(1, 2, 1), full_chunk_limit=2))
    bad.optim.trainable_patterns = [r"attn1/"]
    with pytest.raises(RunError, match="train_in_full trains far_patch_embedding/bias, far_patch_embedding/kernel "
                                       "but config.optim.trainable_patterns leaves it out"):
        loop.build_run(bad, str(tmp_path / "bad"))
    # without the option the offsets are merged into the base: the network starts the same
    cfg2.lora.train_in_full = ()
    nets = loop.build_networks(config_lib.parse(cfg2))
    assert "far_patch_embedding" not in (nets.adapters or {})
    np.testing.assert_array_equal(np.asarray(nets.student_params["far_patch_embedding"]["kernel"]),
                                  np.asarray(gen.params["far_patch_embedding"]["kernel"]))
