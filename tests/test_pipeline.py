"""The quick start's main job (the toy pipeline) on tiny settings: every stage runs from the
previous one's workdir, and a second run resumes instead of retraining."""
import json
import os

import pytest

from anyflow_jax import pipeline
from anyflow_jax.checkpoints.runs import read_run_file
from anyflow_jax.training.run_checkpoints import RunCheckpointer

TINY = ["model.num_layers=2", "model.num_attention_heads=2", "model.attention_head_dim=16", "model.ffn_dim=64",
        "model.freq_dim=32", "data.global_batch_size=8", "data.num_frames=4", "train.tensorboard=false",
        "mesh.fsdp=1", "eval.classifier_steps=20", "eval.metrics_samples=16", "eval.reference_steps=2"]


@pytest.mark.slow
def test_pipeline_chains_the_four_stages(tmp_path, capsys):
    root = str(tmp_path / "toy")
    args = ["--workdir", root, "--steps_scale", "0.005", "--eval_steps", ""]
    for o in TINY:
        args += ["--override", o]
    assert pipeline.main(args) == 0
    out = capsys.readouterr().out
    from anyflow_jax.defaults import TOY_STAGES
    # the toy's step counts times 0.005 (the teacher's 4000 -> 20)
    expected = {"teacher": round(TOY_STAGES["teacher"]["train.steps"] * 0.005), "flow_map": 2, "on_policy": 1,
                "consistency": 2}
    assert expected["teacher"] == 20
    for stage, steps in expected.items():
        assert f"== {stage} done" in out
        ck = RunCheckpointer(os.path.join(root, stage), read_only=True)
        assert ck.latest_step() == steps, stage
        meta = read_run_file(os.path.join(root, stage))
        assert meta["stage"] == stage and meta["model"]["num_layers"] == 2
    cfg = json.load(open(os.path.join(root, "on_policy", "run.json")))["config"]
    assert cfg["init"]["student"] == os.path.join(root, "flow_map")
    assert cfg["init"]["teacher"] == os.path.join(root, "teacher")
    assert cfg["loss"]["shift"] == 1.0 and cfg["loss"]["flow_map_options"]["shift"] == 1.0
    # stage 2 logs the any-step curve while it trains (here at its only step), with the classifier
    # the pipeline's evaluation uses
    last = [json.loads(line) for line in open(os.path.join(root, "on_policy", "metrics.jsonl"))][-1]
    assert {f"eval/{m}/steps{s}" for m in ("fd", "accuracy", "ode_distance") for s in (1, 4, 32)} <= set(last)
    assert cfg["eval"]["classifier_dir"] == os.path.join(root, "eval", "classifier")
    assert os.path.isdir(os.path.join(root, "eval", "classifier"))
    # running again resumes every stage at its end: nothing is retrained
    before = os.path.getmtime(os.path.join(root, "teacher", "metrics.jsonl"))
    assert pipeline.main(args) == 0
    assert os.path.getmtime(os.path.join(root, "teacher", "metrics.jsonl")) == before


def test_causal_flag_adds_the_far_pair_wired_to_the_teacher(tmp_path):
    root = str(tmp_path)
    assert pipeline.causal_stages() == ("far_flow_map", "far_on_policy")
    assert not set(pipeline.causal_stages()) & set(pipeline.ORDER)  # not in the default stages
    stage1, stage2 = (pipeline.stage_config(s, root, {}) for s in pipeline.causal_stages())
    assert stage1.init.student == f"{root}/teacher" and not stage1.init.teacher
    assert (stage2.init.student, stage2.init.teacher) == (f"{root}/far_flow_map", f"{root}/teacher")
    assert stage2.model.chunk_partition == (1, 3, 2, 2)


def test_pipeline_rejects_bad_arguments(tmp_path, capsys):
    assert pipeline.main(["--workdir", str(tmp_path), "--override", "model.nope=1", "--eval_steps", ""]) == 2
    assert "--override model.nope: config.model.nope is not a config field" in capsys.readouterr().err


def test_override_values_are_yaml_with_scientific_notation_as_floats():
    got = pipeline.parse_overrides(["optim.lr=2e-3", "a=1E5", "b=-.5e+2", "c=0.5", "d=true", "e=[1, 2]", "f=e5",
                                    "g=1e-3x"])
    assert got == {"optim.lr": 0.002, "a": 100000.0, "b": -50.0, "c": 0.5, "d": True, "e": [1, 2], "f": "e5",
                   "g": "1e-3x"}
    assert isinstance(got["optim.lr"], float)
    cfg = pipeline.stage_config("teacher", "runs/x", {"optim.lr": got["optim.lr"]})
    assert cfg.optim.lr == 0.002


@pytest.mark.slow
def test_seeds_run_one_pipeline_each(tmp_path, capsys):
    root = str(tmp_path / "toy")
    args = ["--workdir", root, "--stages", "teacher", "--steps_scale", "0.002", "--eval_steps", "", "--seeds", "3,5"]
    for o in TINY:
        args += ["--override", o]
    assert pipeline.main(args) == 0
    runs = {k: json.load(open(os.path.join(root, f"seed{k}", "teacher", "run.json")))["config"] for k in (3, 5)}
    assert [(c["seed"], c["data"]["seed"]) for c in runs.values()] == [(3, 3), (5, 5)]
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(root, f"seed{k}", "teacher", "metrics.jsonl"))]
              for k in (3, 5)]
    assert losses[0] != losses[1]
    assert not os.path.exists(os.path.join(root, "teacher"))


def test_aggregate_over_seeds(tmp_path):
    from anyflow_jax.evaluation import harness

    def res(fd1, acc):
        m = {"fd": {"a": {"1": fd1, "4": fd1 / 2}}, "accuracy": {"a": {"1": acc, "4": None}},
             "ode_distance": {"a": {"1": 0.3, "4": 0.2}}}
        return {"models": {"a": {}}, "steps": [1, 4], "num_samples": 64, "metrics": m,
                "real_baseline": {"fd_real_vs_real": 20.0, "accuracy_real": 0.9}}
    agg = harness.aggregate({0: res(100.0, 0.5), 1: res(200.0, 0.7), 2: res(300.0, 0.6)})
    cell = agg["metrics"]["fd"]["a"]["1"]
    assert (cell["mean"], cell["std"], cell["min"], cell["max"], cell["n"]) == (200.0, 100.0, 100.0, 300.0, 3)
    assert agg["metrics"]["accuracy"]["a"]["4"] is None and agg["seeds"] == [0, 1, 2]
    table = harness.format_aggregate(agg)
    assert "200 ± 100" in table and "0.600 ± 0.100" in table
    harness.plot_results(agg, str(tmp_path / "s.png"))
    assert os.path.getsize(tmp_path / "s.png") > 1000
    # the causal models' image-to-video scores are aggregated the same way
    runs = {}
    for seed, kept in ((0, 0.4), (1, 0.6)):
        r = res(100.0, 0.5)
        r["i2v"] = {"protocol": "p", "real_motion_confidence": 0.8 + seed / 10, "real_first_step_shift": 1.7,
                    "shift_unrelated": 4.0, "metrics": {
            mode: {m: {"far": {"1": kept, "4": kept / 2}} for m in harness.I2V_METRICS} for mode in harness.I2V_PROMPTS}}
        runs[seed] = r
    agg = harness.aggregate(runs)
    cell = agg["i2v"]["metrics"]["unprompted"]["digit_kept"]["far"]["1"]
    assert cell["mean"] == pytest.approx(0.5) and cell["values"] == [0.4, 0.6]
    assert agg["i2v"]["real_motion_confidence"] == pytest.approx(0.85)
    assert "image-to-video (unprompted) digit_kept" in harness.format_aggregate(agg)
    assert "i2v" not in harness.aggregate({0: res(1.0, 0.1), 1: runs[1]})  # only when every seed has it
    other = res(1.0, 0.1)
    other["steps"] = [1, 2]
    with pytest.raises(harness.EvalError, match="seed 9: the evaluation has other models or step counts"):
        harness.aggregate({0: res(1.0, 0.1), 9: other})
