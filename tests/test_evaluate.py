"""The evaluation harness: metrics on known cases, the real-video classifier, ``evaluate`` end to
end on tiny checkpoints of every kind, and the CLI's errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.linalg

from anyflow_jax import evaluate as ev
from anyflow_jax.evaluation import classifier as clf_lib
from anyflow_jax.evaluation import harness as ev_harness
from anyflow_jax.inference import initial_noise
from anyflow_jax.evaluation.metrics import conditional_accuracy, first_step_shift, frechet_distance, ode_distance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE4 = (4, 16, 16, 1)  # the tiny runs' video shape (frames 4)
SMALL_CLF = dict(train_samples=4096, train_steps=500, test_samples=512)


# ------------------------------------------------------------------------------ metrics
def _whitened(rng, n, d):
    """(n, d) with sample mean exactly 0 and unbiased sample covariance exactly I."""
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    chol = np.linalg.cholesky(np.cov(z, rowvar=False))
    return z @ np.linalg.inv(chol).T


def test_frechet_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).standard_normal((300, 16)) * 3 + 1
    assert abs(frechet_distance(f, f)) < 1e-9
    assert abs(frechet_distance(f, f[::-1].copy())) < 1e-9  # order does not matter


def test_frechet_of_a_shifted_set_is_the_squared_shift():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8))  # correlated features
    d = rng.standard_normal(8)
    assert frechet_distance(f, f + d) == pytest.approx(float(d @ d), rel=1e-8, abs=1e-9)
    assert frechet_distance(f + d, f) == pytest.approx(float(d @ d), rel=1e-8)


def test_frechet_of_constructed_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(2)
    n, dim = 400, 6
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = rng.uniform(0.5, 2.0, dim), rng.uniform(0.5, 2.0, dim)
    a = mu1 + _whitened(rng, n, dim) * s1   # exact sample mean mu1, covariance diag(s1^2)
    b = mu2 + _whitened(rng, n, dim) * s2
    want = float(np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2))
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)


def test_frechet_of_sampled_gaussians_is_close_to_the_closed_form():
    rng = np.random.default_rng(3)
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    a = rng.standard_normal((40000, 3)) * s1
    b = rng.standard_normal((40000, 3)) * s2 + np.array([1.0, 0.0, 0.0])
    want = 1.0 + np.sum((s1 - s2) ** 2)   # 1 + 0.25 + 1 = 2.25
    assert frechet_distance(a, b) == pytest.approx(want, abs=0.05)


def test_frechet_matches_the_sqrtm_formula_for_full_covariances():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((500, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((500, 5)) @ rng.standard_normal((5, 5)) + 0.3
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * np.real(scipy.linalg.sqrtm(c1 @ c2)))
    assert frechet_distance(a, b) == pytest.approx(float(want), rel=1e-7)
    # rank-deficient covariances (fewer samples than features) stay finite and non-negative
    assert frechet_distance(a[:3], b[:3]) >= 0


def test_frechet_rejects_bad_features():
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.full((5, 2), np.nan), np.zeros((5, 2)))


def test_conditional_accuracy_on_hand_made_arrays():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.0, 3.0, 1.0]])
    assert conditional_accuracy(logits, [1, 0, 2, 2]) == 0.75       # argmax = [1, 0, 2, 1]
    assert conditional_accuracy(np.array([3, 1, 4, 1, 5]), [3, 1, 4, 1, 9]) == 0.8
    assert conditional_accuracy(np.array([0, 0]), [1, 1]) == 0.0
    with pytest.raises(ValueError, match="predictions for"):
        conditional_accuracy(np.array([1, 2, 3]), [1, 2])
    with pytest.raises(ValueError, match="integers"):
        conditional_accuracy(np.array([0.2, 0.7]), [0, 1])


def test_ode_distance_is_the_mean_of_per_sample_rms():
    ref = np.zeros((2, 2, 2))
    s = ref.copy()
    s[0] += 1.0          # RMS 1
    s[1, 0, 0] = 4.0     # one of 4 elements off by 4: RMS sqrt(16 / 4) = 2
    assert ode_distance(s, ref) == pytest.approx(1.5)   # not the global RMS sqrt(20 / 8)
    assert ode_distance(ref, ref) == 0.0
    with pytest.raises(ValueError, match="shape"):
        ode_distance(np.zeros((2, 3)), np.zeros((2, 4)))


def test_first_step_shift_measures_how_far_frame_0_moves():
    v = np.full((2, 3, 8, 8, 1), -1.0)
    v[0, 0, 1, 1] = v[0, 1, 4, 5] = 1.0        # a bright pixel moves by (3, 4): 5 pixels
    v[1, 0, 2:4, 2:4] = v[1, 1, 2:4, 2:4] = 0.0  # a still blob: 0
    assert first_step_shift(v) == pytest.approx(2.5)
    v[1, 1] = -1.0  # an empty frame 1 counts as the canvas centre (3.5, 3.5); the blob is at (2.5, 2.5)
    assert first_step_shift(v) == pytest.approx((5.0 + np.hypot(1.0, 1.0)) / 2)
    with pytest.raises(ValueError, match="F >= 2"):
        first_step_shift(v[:, :1])


def test_motion_bayes_accuracy_counts_indistinguishable_videos():
    # On a canvas exactly the digit's size nothing moves: every video looks the same, so the best
    # guess is right 1 time in 8.
    assert clf_lib.motion_bayes_accuracy((4, 8, 8, 1)) == pytest.approx(1 / 8)
    # One frame shows no motion at all either, whatever the canvas.
    assert clf_lib.motion_bayes_accuracy((1, 16, 16, 1)) == pytest.approx(1 / 8)
    # Against a wall, into it and away from it look the same: below 1, well above chance.
    assert 0.7 < clf_lib.motion_bayes_accuracy((8, 16, 16, 1)) < 0.95


# ------------------------------------------------------------------------------ classifier
@pytest.mark.slow
def test_classifier_training_is_deterministic_and_round_trips(tmp_path):
    cfg = clf_lib.ClassifierConfig(video_shape=SHAPE4, train_samples=128, train_steps=5, batch_size=16,
                                   test_samples=32, width=4, embed_dim=8)
    a, b = clf_lib.train_classifier(cfg), clf_lib.train_classifier(cfg)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    c = clf_lib.train_classifier(clf_lib.ClassifierConfig(**{**cfg.to_dict(), "seed": 1}))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(c.params)))
    a.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["classifier.json", "classifier.msgpack"]  # no temporaries left
    back = clf_lib.TrainedClassifier.load(str(tmp_path))
    assert back.config == cfg and back.from_cache and back.held_out_accuracy == a.held_out_accuracy
    videos, _, _ = clf_lib.real_videos(12, split="test", seed=7, video_shape=SHAPE4)
    pa, pb = a.predict(videos), back.predict(videos)
    assert pa["features"].shape == (12, 8) and pa["digit_logits"].shape == (12, 10)
    assert pa["motion_logits"].shape == (12, 8)
    np.testing.assert_array_equal(pa["features"], pb["features"])
    with pytest.raises(ValueError, match="shape"):
        a.predict(np.zeros((2, 8, 16, 16, 1), np.float32))
    # load_or_train reuses a cache of the same config and retrains for another one
    assert clf_lib.load_or_train(str(tmp_path), cfg).from_cache
    other = clf_lib.ClassifierConfig(**{**cfg.to_dict(), "train_steps": 6})
    assert not clf_lib.load_or_train(str(tmp_path), other).from_cache
    assert clf_lib.TrainedClassifier.load(str(tmp_path)).config == other


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_runs(tiny_teacher, tiny_flow_map, tiny_consistency):
    """The session's shared tiny runs (conftest; read only): a teacher trained for 40 steps (lr
    2e-3, enough for u to depend on z and t), a stage-1 flow map and a consistency baseline."""
    return {"teacher": tiny_teacher, "stage1": tiny_flow_map, "consistency": tiny_consistency}


@pytest.fixture(scope="module")
def evaluated(tiny_runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval"))
    res = ev.evaluate(tiny_runs, [2, 1], 20, out, reference_steps=2, seed=3, chunk_size=8,
                      classifier_config=SMALL_CLF, progress=False, verbose=False)
    return out, res


@pytest.mark.slow
def test_the_classifier_learns_from_real_videos(evaluated):
    out, res = evaluated
    acc = res["classifier"]["held_out_accuracy"]
    # chance: digit 0.10, motion 0.125; the motion ceiling is ~0.84 (indistinguishable videos)
    assert acc["digit"] > 0.3, acc
    assert acc["motion"] > 0.5, acc
    assert acc["motion"] <= res["classifier"]["motion_bayes_accuracy"] + 0.05
    assert res["classifier"]["config"]["video_shape"] == list(SHAPE4)
    assert res["classifier"]["held_out_split"] == "test"
    back = clf_lib.TrainedClassifier.load(os.path.join(out, "classifier"))
    assert back.held_out_accuracy == acc and back.config.video_shape == SHAPE4


@pytest.mark.slow
def test_evaluate_writes_complete_finite_results(evaluated, tiny_runs):
    out, res = evaluated
    with open(os.path.join(out, ev.RESULTS_FILE)) as fh:
        disk = json.load(fh)
    assert disk["metrics"] == res["metrics"]
    for key in ("models", "steps", "metrics", "num_samples", "seeds", "classifier", "reference",
                "wall_seconds", "real_baseline", "video_shape"):
        assert key in disk, key
    assert disk["steps"] == [1, 2] and disk["num_samples"] == 20 and disk["seed"] == 3
    assert disk["video_shape"] == list(SHAPE4)
    assert {n: m["kind"] for n, m in disk["models"].items()} == {
        "teacher": "teacher", "stage1": "flow_map", "consistency": "consistency"}
    assert {n: m["guidance"] for n, m in disk["models"].items()} == {
        "teacher": 3.0, "stage1": 1.0, "consistency": 1.0}
    assert disk["reference"]["steps"] == 2 and disk["reference"]["guidance"] == 3.0
    assert disk["reference"]["teacher"] == os.path.abspath(tiny_runs["teacher"])
    for metric in ev.METRICS:
        assert set(disk["metrics"][metric]) == set(tiny_runs)
        for name in tiny_runs:
            vals = disk["metrics"][metric][name]
            assert set(vals) == {"1", "2"}
            assert all(np.isfinite(v) and v >= 0 for v in vals.values()), (metric, name, vals)
            if metric == "accuracy":   # a fraction of 20 samples
                assert all(0 <= v <= 1 and abs(v * 20 - round(v * 20)) < 1e-9 for v in vals.values())
    # The reference is the teacher's 2-step CFG-3 ODE from the same noise and classes, so the
    # teacher at 2 steps reproduces it exactly and at 1 step does not.
    assert disk["metrics"]["ode_distance"]["teacher"]["2"] == pytest.approx(0.0, abs=1e-6)
    assert disk["metrics"]["ode_distance"]["teacher"]["1"] > 1e-3
    assert disk["real_baseline"]["fd_real_vs_real"] > 0
    assert 0 <= disk["real_baseline"]["accuracy_real"] <= 1
    wall = disk["wall_seconds"]
    assert wall["total"] >= wall["classifier"] and set(wall["generation"]) == set(tiny_runs)
    with open(os.path.join(out, ev.PLOT_FILE), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    img = matplotlib.image.imread(os.path.join(out, ev.PLOT_FILE))
    assert img.ndim == 3 and img.shape[1] > 2 * img.shape[0]   # three panels side by side
    table = ev.format_table(disk)
    for metric in ev.METRICS:
        assert sum(ln.startswith(f"{metric}:") for ln in table.splitlines()) == 1
    rows = [ln for ln in table.splitlines() if ln.startswith("stage1 ")]
    assert len(rows) == 3
    assert rows[1].split()[1:] == [f"{disk['metrics']['accuracy']['stage1'][s]:.3f}" for s in ("1", "2")]


@pytest.mark.slow
def test_evaluate_metrics_match_an_independent_computation(evaluated, tiny_runs):
    import jax.numpy as jnp
    from anyflow_jax.inference import load_generator
    out, res = evaluated
    g = load_generator(tiny_runs["stage1"])
    table, _ = ev_harness.class_table(g)
    base = jax.random.fold_in(jax.random.key(3), 0)
    noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(base, i), SHAPE4, jnp.float32))
                      for i in range(20)])
    np.testing.assert_array_equal(noise, initial_noise(3, np.arange(20), SHAPE4))
    labels = np.arange(20) % 10
    x = np.asarray(g.sample(jnp.asarray(noise), jnp.asarray(table[labels]), 1))
    clf = clf_lib.TrainedClassifier.load(os.path.join(out, "classifier"))
    p = clf.predict(x)
    real, _, _ = clf_lib.real_videos(20, split="test", seed=3 + 10_000, video_shape=SHAPE4)
    m = res["metrics"]
    assert m["accuracy"]["stage1"]["1"] == conditional_accuracy(p["digit_logits"], labels)
    assert m["fd"]["stage1"]["1"] == pytest.approx(frechet_distance(p["features"], clf.features(real)), rel=1e-3)
    ref_file = os.path.join(out, res["reference"]["file"])
    assert m["ode_distance"]["stage1"]["1"] == pytest.approx(ode_distance(x, np.load(ref_file)), rel=1e-4)


@pytest.mark.slow
def test_evaluate_reuses_its_caches(evaluated, tiny_runs):
    out, res = evaluated
    again = ev.evaluate({"stage1": tiny_runs["stage1"]}, [1], 20, out, reference_teacher=tiny_runs["teacher"],
                        reference_steps=2, seed=3, chunk_size=8, classifier_config=SMALL_CLF,
                        progress=False, verbose=False, plot=False, overwrite=True)
    assert again["classifier"]["cached"] and again["reference"]["cached"]
    assert again["wall_seconds"]["classifier"] < 0.5 * res["wall_seconds"]["classifier"]
    for metric in ev.METRICS:
        assert again["metrics"][metric]["stage1"]["1"] == pytest.approx(res["metrics"][metric]["stage1"]["1"],
                                                                        rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_a_causal_model_gets_image_to_video_scores(evaluated, tiny_runs, tiny_far_flow_map, tmp_path):
    """A FAR checkpoint is evaluated for text-to-video like every model, and for image-to-video:
    it continues frame 0 of the real held-out videos (prompted with their digit, and with the null
    prompt), scored by the classifier; the scores equal an independent recomputation."""
    import jax.numpy as jnp
    from anyflow_jax.inference import load_generator
    out, _ = evaluated
    res = ev.evaluate({"teacher": tiny_runs["teacher"], "far": tiny_far_flow_map}, [1], 20, str(tmp_path / "ev"),
                      reference_steps=2, seed=3, chunk_size=8, classifier_config=SMALL_CLF, progress=False,
                      verbose=False, plot=False, classifier_dir=os.path.join(out, "classifier"))
    assert res["classifier"]["cached"]
    assert res["models"]["far"]["kind"] == "causal_flow_map"
    assert all(np.isfinite(res["metrics"][m]["far"]["1"]) for m in ev.METRICS)
    i2v = res["i2v"]
    assert set(i2v["metrics"]) == {"prompted", "unprompted"}
    for mode in ("prompted", "unprompted"):
        for metric in ev_harness.I2V_METRICS:
            assert set(i2v["metrics"][mode][metric]) == {"far"}  # causal models only
    # recompute: frame 0 of the FD set's real videos, the same noise, the video's digit as prompt
    g = load_generator(tiny_far_flow_map)
    table, neg = ev_harness.class_table(g)
    real, digits, _ = clf_lib.real_videos(20, split="test", seed=3 + 10_000, video_shape=SHAPE4)
    noise = initial_noise(3, np.arange(20), SHAPE4)
    clf = clf_lib.TrainedClassifier.load(os.path.join(out, "classifier"))
    real_feats = clf.features(real)
    for mode, ctx in (("prompted", table[digits]), ("unprompted", np.broadcast_to(neg, (20,) + neg.shape[1:]))):
        x = np.asarray(g.sample(jnp.asarray(noise), jnp.asarray(ctx), 1, context_latents=jnp.asarray(real[:, :1])))
        np.testing.assert_array_equal(x[:, :1], real[:, :1])  # the given frame is kept as it is
        p = clf.predict(x)
        m = i2v["metrics"][mode]
        assert m["digit_kept"]["far"]["1"] == conditional_accuracy(p["digit_logits"], digits)
        assert m["fd"]["far"]["1"] == pytest.approx(frechet_distance(p["features"], real_feats), rel=1e-3)
        conf = np.exp(p["motion_logits"] - p["motion_logits"].max(-1, keepdims=True))
        conf = (conf / conf.sum(-1, keepdims=True)).max(-1).mean()
        assert m["motion_confidence"]["far"]["1"] == pytest.approx(float(conf), rel=1e-5)
        assert m["first_step_shift"]["far"]["1"] == pytest.approx(first_step_shift(x), rel=1e-5)
    assert 0 < i2v["real_motion_confidence"] <= 1
    # real digits move 1-2 pixels a frame; frame 1 of another video is much further away
    assert 1.0 <= i2v["real_first_step_shift"] <= 2.9 < i2v["shift_unrelated"]
    table_text = ev.format_table(res)
    assert "image-to-video (prompted) digit_kept" in table_text and "image-to-video (unprompted) fd" in table_text


# ------------------------------------------------------------------------------ bad input
def test_parsers():
    assert ev.parse_models("a=/x, b=y/z") == {"a": "/x", "b": "y/z"}
    assert ev.parse_steps("4,1,2,2") == [1, 2, 4]
    for bad in ("teacher", "=x", "a=", "a=x,a=y", "a b=x"):
        with pytest.raises(ev.EvalError):
            ev.parse_models(bad)
    for bad in ("0", "-1", "1.5", "a", "", "1,,2", [True], [2.0]):
        with pytest.raises(ev.EvalError):
            ev.parse_steps(bad)


@pytest.mark.parametrize("args, message", [
    (["--models", "teacher"], "name=CHECKPOINT"),
    (["--models", "a=/no/such/ckpt"], "does not exist"),
    (["--models", "a=.", "--steps", "0,1"], ">= 1"),
    (["--models", "a=.", "--steps", "1.5"], "must be integers"),
    (["--models", "a=.", "--num-samples", "5"], ">= 10"),
    (["--models", "a=.", "--num-samples", "x"], "integer"),
    (["--out", "o"], "--models"),
])
def test_cli_errors(args, message, capsys, tmp_path):
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "o")]
    assert ev.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.slow
def test_cli_errors_on_checkpoints(tiny_runs, capsys, tmp_path):
    # a reference teacher that is not a teacher
    assert ev.main(["--models", f"s={tiny_runs['stage1']}", "--reference-teacher", tiny_runs["stage1"],
                    "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flow_map" in err[0] and "not teacher" in err[0], err
    # no teacher at all
    assert ev.main(["--models", f"s={tiny_runs['stage1']}", "--out", str(tmp_path / "o")]) == 2
    assert "reference teacher" in capsys.readouterr().err
    # an output folder that cannot be created
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert ev.main(["--models", f"teacher={tiny_runs['teacher']}", "--out", str(blocker / "o")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_cli_runs_as_a_module_with_exit_code_2():
    r = subprocess.run([sys.executable, "-m", "anyflow_jax.evaluate", "--models", "a=x", "--steps", "1,-2",
                        "--out", "unused"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --steps must be positive (>= 1), got -2 in '1,-2'"]
    assert not os.path.exists(os.path.join(ROOT, "unused"))
