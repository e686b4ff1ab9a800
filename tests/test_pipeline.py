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
    expected = {"teacher": 10, "flow_map": 2, "on_policy": 1, "consistency": 2}
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


def test_pipeline_rejects_bad_arguments(tmp_path, capsys):
    assert pipeline.main(["--workdir", str(tmp_path), "--override", "model.nope=1", "--eval_steps", ""]) == 2
    assert "--override model.nope: config.model.nope is not a config field" in capsys.readouterr().err
