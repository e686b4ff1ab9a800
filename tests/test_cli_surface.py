"""The command-line surface of ``sample`` and ``evaluate`` (and the workdir message of ``train``):
every flag, the output folder included, is checked before a model is loaded; error messages name
the actual problem; ``evaluate`` does not replace ``results.json`` without ``--overwrite`` and
leaves no empty output folder behind; step counts are pluralised; no progress bars or absl WARNING
lines end up in a log.

Most checks need no trained model: a folder with a ``run.json`` is a training workdir as far as
the cheap checks go, and ``load_generator`` is replaced by a function that fails the test if a
check let a run get that far. The runs that do load models use the session's tiny runs (conftest),
read only.
"""
import json
import os
import subprocess
import sys

import pytest

from anyflow_jax import cli, fileio, inference
from anyflow_jax import evaluate as ev
from anyflow_jax import sample as S
from anyflow_jax.errors import RunError
from anyflow_jax.evaluation import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An unwritable place even for root: /proc refuses new entries (mkdir and create say ENOENT).
PROC_MISSING = "/proc/anyflow-jax-no-such-entry/out"


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _fake_workdir(path, stage: str) -> str:
    """A folder that passes the cheap checkpoint checks (a ``run.json`` naming a stage) but has no
    checkpoint to load."""
    os.makedirs(path)
    with open(os.path.join(path, "run.json"), "w") as fh:
        json.dump({"stage": stage}, fh)
    return str(path)


def _regular_file(tmp_path, name="file") -> str:
    p = tmp_path / name
    p.write_text("x")
    return str(p)


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the checks must have stopped the run before."""
    def load_generator(*a, **kw):
        raise AssertionError(f"a model was loaded: load_generator{a}")
    monkeypatch.setattr(inference, "load_generator", load_generator)


# ------------------------------------------------------------------------------ sample: checks first
@pytest.mark.parametrize("where, message", [
    ("UNDER_FILE", "cannot be created: {file} is a file, not a folder"),
    ("FILE", "exists and is not a folder"),
    (PROC_MISSING, "cannot be created"),
    ("/proc", "is not writable"),
])
def test_sample_checks_the_output_folder_before_loading_a_model(tmp_path, capsys, no_loading, where, message):
    ckpt = _fake_workdir(tmp_path / "run", "flow_map")
    file = _regular_file(tmp_path)
    out = {"UNDER_FILE": os.path.join(file, "out"), "FILE": file}.get(where, where)
    before = sorted(os.listdir(tmp_path))
    assert S.main(["--checkpoint", ckpt, "--steps", "1", "--out", out]) == 2
    err = _one_error(capsys)
    assert f"output folder {out}" in err and message.format(file=file) in err, err
    assert sorted(os.listdir(tmp_path)) == before
    assert open(file).read() == "x"
    assert not os.path.exists(os.path.dirname(PROC_MISSING))


def test_sample_output_check_creates_a_probe_and_removes_what_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    S.check_output_dir(str(out))  # writable: no error, and nothing left behind
    assert os.listdir(tmp_path) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    S.check_output_dir(str(existing / "new"))
    S.check_output_dir(str(existing))
    assert os.listdir(existing) == ["keep.txt"]


def test_sample_checks_checkpoint_kind_and_writers_before_loading(tmp_path, capsys, no_loading):
    ckpt = _fake_workdir(tmp_path / "run", "flow_map")
    out = str(tmp_path / "out")
    assert S.main(["--checkpoint", ckpt, "--kind", "teacher", "--steps", "1", "--out", out]) == 2
    assert "is a flow_map checkpoint (stage flow_map), not teacher" in _one_error(capsys)
    file = _regular_file(tmp_path)
    assert S.main(["--checkpoint", file, "--steps", "1", "--out", out]) == 2
    err = _one_error(capsys)
    assert f"--checkpoint {file} is not a checkpoint (expected a training workdir" in err, err
    assert S.main(["--checkpoint", str(tmp_path / "nope"), "--steps", "1", "--out", out]) == 2
    assert "does not exist" in _one_error(capsys)
    assert not os.path.exists(out)


def test_sample_failure_after_the_checks_leaves_no_folders(tmp_path, capsys, monkeypatch):
    ckpt = _fake_workdir(tmp_path / "run", "flow_map")
    calls = []

    def load_generator(path, **kw):
        calls.append(path)
        raise ValueError("cannot load this one")
    monkeypatch.setattr(inference, "load_generator", load_generator)
    assert S.main(["--checkpoint", ckpt, "--steps", "1", "--out", str(tmp_path / "a" / "b")]) == 2
    assert "cannot load this one" in _one_error(capsys)
    assert calls == [ckpt] and os.listdir(tmp_path) == ["run"]


def test_sample_progress_flags(tmp_path):
    p = S.build_parser()
    base = ["--checkpoint", "c", "--steps", "1", "--out", "o"]
    assert p.parse_args(base).progress is None
    assert p.parse_args(base + ["--progress"]).progress is True
    assert p.parse_args(base + ["--no-progress"]).progress is False
    with pytest.raises(cli.UsageError):
        p.parse_args(base + ["--progress", "--no-progress"])


# ------------------------------------------------------------------------------ messages
def test_writable_dir_messages(tmp_path):
    file = _regular_file(tmp_path)
    with pytest.raises(OSError) as e:
        fileio.ensure_writable_dir(file)
    assert str(e.value) == f"{file} is a file, not a folder"
    with pytest.raises(OSError) as e:
        fileio.ensure_writable_dir(os.path.join(file, "x", "y"))
    assert str(e.value) == f"{file}/x/y is not writable: {file} is a file, not a folder"
    with pytest.raises(OSError, match=f"{PROC_MISSING} is not writable"):
        fileio.ensure_writable_dir(PROC_MISSING)
    assert fileio.ensure_writable_dir(str(tmp_path / "new")) == str(tmp_path / "new")


def test_train_workdir_that_is_a_file(tmp_path):
    file = _regular_file(tmp_path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from runs_testlib import tiny
    from anyflow_jax.training import loop
    with pytest.raises(RunError) as e:
        loop.build_run(tiny("teacher"), file)
    assert str(e.value) == f"workdir {file} is a file, not a folder"
    assert "File exists" not in str(e.value)


def test_train_cli_workdir_that_is_a_file(tmp_path):
    file = _regular_file(tmp_path)
    r = subprocess.run([sys.executable, "-m", "anyflow_jax.train", "--config", "configs/toy.py:teacher",
                        "--workdir", file], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: workdir {file} is a file, not a folder"], r.stderr


def test_evaluate_out_that_is_a_file(tmp_path, capsys, no_loading):
    teacher = _fake_workdir(tmp_path / "teacher", "teacher")
    file = _regular_file(tmp_path)
    assert ev.main(["--models", f"teacher={teacher}", "--out", file]) == 2
    err = _one_error(capsys)
    assert err == f"error: output folder {file} is a file, not a folder", err
    assert open(file).read() == "x"
    assert ev.main(["--models", f"teacher={teacher}", "--out", PROC_MISSING]) == 2
    assert f"output folder {PROC_MISSING} is not writable" in _one_error(capsys)


def test_evaluate_names_a_model_path_that_is_not_a_checkpoint(tmp_path, capsys, no_loading):
    file = _regular_file(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    teacher = _fake_workdir(tmp_path / "teacher", "teacher")
    out = str(tmp_path / "out")
    for models in (f"a={file}", f"teacher={teacher},a={file}", f"a={empty}"):
        assert ev.main(["--models", models, "--out", out]) == 2
        err = _one_error(capsys)
        bad = models.rpartition("=")[2]
        assert f"model 'a': {bad} is not a checkpoint (expected a training workdir" in err, err
        assert "teacher" not in err.split("(")[0]
    assert ev.main(["--models", f"teacher={teacher}", "--reference-teacher", file, "--out", out]) == 2
    assert f"reference teacher: {file} is not a checkpoint" in _one_error(capsys)
    stage1 = _fake_workdir(tmp_path / "stage1", "flow_map")
    assert ev.main(["--models", f"s={stage1}", "--reference-teacher", stage1, "--out", out]) == 2
    assert "is a flow_map checkpoint (stage flow_map), not teacher" in _one_error(capsys)
    assert not os.path.exists(out)


def test_failed_evaluate_removes_the_empty_output_folder_it_created(tmp_path, capsys):
    teacher = _fake_workdir(tmp_path / "teacher", "teacher")  # passes the checks, cannot be loaded
    out = tmp_path / "new" / "eval"
    assert ev.main(["--models", f"teacher={teacher}", "--out", str(out)]) == 2
    assert "model 'teacher': cannot load" in _one_error(capsys)
    assert not os.path.exists(tmp_path / "new")
    # a folder that was there before stays
    existing = tmp_path / "existing"
    existing.mkdir()
    assert ev.main(["--models", f"teacher={teacher}", "--out", str(existing)]) == 2
    capsys.readouterr()
    assert existing.is_dir() and os.listdir(existing) == []


def test_evaluate_does_not_replace_results_without_overwrite(tmp_path, capsys, no_loading):
    teacher = _fake_workdir(tmp_path / "teacher", "teacher")
    out = tmp_path / "eval"
    out.mkdir()
    results = out / ev.RESULTS_FILE
    results.write_text("old")
    assert ev.main(["--models", f"teacher={teacher}", "--out", str(out)]) == 2
    err = _one_error(capsys)
    assert err == f"error: {results} already exists (an earlier evaluation); pass --overwrite to replace it", err
    with pytest.raises(harness.ResultsExist, match="overwrite=True"):
        harness.evaluate({"teacher": teacher}, [1], 10, str(out))
    assert results.read_text() == "old" and os.listdir(out) == [ev.RESULTS_FILE]
    # with --overwrite the check passes (and the run goes on to load the models)
    with pytest.raises(AssertionError, match="a model was loaded"):
        ev.main(["--models", f"teacher={teacher}", "--out", str(out), "--overwrite"])
    assert results.read_text() == "old"


def test_evaluate_cli_passes_overwrite_and_progress(monkeypatch, tmp_path):
    seen = []

    def fake(models, steps, num, out, **kw):
        seen.append(kw)
        raise harness.EvalError("stop")
    monkeypatch.setattr(ev, "evaluate", fake)
    base = ["--models", "teacher=x", "--out", str(tmp_path / "o")]
    for extra in ([], ["--overwrite", "--progress"], ["--no-progress"]):
        assert ev.main(base + extra) == 2
    assert [(kw["overwrite"], kw["progress"]) for kw in seen] == [(False, None), (True, True), (False, False)]
    assert ev.main(base + ["--progress", "--no-progress"]) == 2


# ------------------------------------------------------------------------------ plurals
def _fake_results(steps):
    names = ("teacher", "s")
    return {"steps": list(steps), "num_samples": 10, "models": {n: {} for n in names},
            "metrics": {m: {n: {str(s): 0.5 for s in steps} for n in names} for m in ev.METRICS}}


def test_table_says_1_step():
    table = ev.format_table(_fake_results([1, 2, 4]))
    headers = [ln for ln in table.splitlines() if ln.startswith("model")]
    assert len(headers) == len(ev.METRICS)
    assert all(h.split()[1:] == ["1", "step", "2", "4"] for h in headers), headers
    assert "1 steps" not in table
    table = ev.format_table(_fake_results([2, 8]))
    assert all(ln.split()[1:] == ["2", "steps", "8"] for ln in table.splitlines() if ln.startswith("model"))
    assert cli.plural(1, "step") == "1 step" and cli.plural(0, "step") == "0 steps" \
        and cli.plural(32, "step") == "32 steps"


# ------------------------------------------------------------------------------ quiet logs (real runs)
def _quiet(stderr: str) -> None:
    lines = stderr.splitlines()
    assert not [ln for ln in lines if "WARNING" in ln], stderr
    assert "\r" not in stderr and "%|" not in stderr, stderr  # no progress bar in a log


@pytest.mark.slow
def test_sample_run_has_no_warning_lines_or_progress_bar(tiny_flow_map, tmp_path):
    out = tmp_path / "samples"
    r = subprocess.run([sys.executable, "-m", "anyflow_jax.sample", "--checkpoint", tiny_flow_map, "--steps", "1",
                        "--class", "0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    _quiet(r.stderr)
    assert sorted(os.listdir(out)) == ["class0_s0_steps1.gif", "class0_s0_steps1.mp4", S.SHEET_NAME]
    assert "wrote 2 files" in r.stdout and "1 condition x 1 sample x steps 1" in r.stdout


@pytest.mark.slow
def test_sample_progress_bar_only_when_asked(tiny_flow_map, tmp_path, capsys):
    # capsys's stderr is not a terminal: no bar by default, a bar with --progress
    args = ["--checkpoint", tiny_flow_map, "--steps", "1", "--class", "0", "--format", "npy"]
    assert S.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "sampling (" not in capsys.readouterr().err
    assert S.main(args + ["--out", str(tmp_path / "b"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "sampling (flow_map)" in err and "1 step" in err and "1 steps" not in err


_EVAL_SMALL_CLASSIFIER = (
    "import functools, sys\n"
    "from anyflow_jax import evaluate as ev\n"
    "from anyflow_jax.evaluation import harness\n"
    "ev.evaluate = functools.partial(harness.evaluate, classifier_config=dict(train_samples=64, train_steps=2, "
    "test_samples=32, batch_size=8))\n"
    "sys.exit(ev.main(sys.argv[1:]))\n")


@pytest.mark.slow
def test_evaluate_run_has_no_warning_lines_or_progress_bar(tiny_teacher, tiny_flow_map, tmp_path):
    """The real CLI ``main`` (only the classifier is made tiny, for test time)."""
    out = tmp_path / "eval"
    cmd = [sys.executable, "-c", _EVAL_SMALL_CLASSIFIER, "--models", f"teacher={tiny_teacher},s={tiny_flow_map}",
           "--steps", "1", "--num-samples", "10", "--reference-steps", "2", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    _quiet(r.stderr)
    assert "1 step" in r.stdout and "1 steps" not in r.stdout, r.stdout
    assert os.path.isfile(out / ev.RESULTS_FILE)
    # a second run refuses to replace the results, with one error line
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {out / ev.RESULTS_FILE} already exists (an earlier evaluation); pass --overwrite to replace it"]


def test_library_progress_default_is_terminal_only():
    assert cli.progress_disable(None) is None   # tqdm: disabled when the stream is not a terminal
    assert cli.progress_disable(True) is False and cli.progress_disable(False) is True
    import inspect
    sig = inspect.signature(harness.evaluate)
    assert sig.parameters["progress"].default is None and sig.parameters["overwrite"].default is False


# --- huge-page malloc re-execution (cli.hugepage_malloc) ------------------------------------------

def _thp(tmp_path, mode_line: str) -> str:
    path = tmp_path / "thp_enabled"
    path.write_text(mode_line + "\n")
    return str(path)


@pytest.mark.skipif(not cli.glibc_has_hugetlb_tunable(),
                    reason="the tunable exists on Linux with glibc >= 2.35 only")
def test_hugepage_malloc_env_decisions(tmp_path):
    madvise = _thp(tmp_path, "always [madvise] never")
    env = cli.hugepage_malloc_env({"PATH": "/bin"}, thp_path=madvise)
    assert env["GLIBC_TUNABLES"] == cli.HUGEPAGE_TUNABLE and env["PATH"] == "/bin"
    # the user's other tunables are kept, the new one appended
    env = cli.hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp_path=madvise)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + cli.HUGEPAGE_TUNABLE
    # no re-execution: opted out, already set (by the user or by the re-executed process),
    # THP always (nothing to gain) or never (nothing to ask for), no THP file at all
    assert cli.hugepage_malloc_env({cli.HUGEPAGE_OPT_OUT: "0"}, thp_path=madvise) is None
    assert cli.hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp_path=madvise) is None
    assert cli.hugepage_malloc_env(env, thp_path=madvise) is None
    assert cli.hugepage_malloc_env({}, thp_path=_thp(tmp_path, "[always] madvise never")) is None
    assert cli.hugepage_malloc_env({}, thp_path=_thp(tmp_path, "always madvise [never]")) is None
    assert cli.hugepage_malloc_env({}, thp_path=str(tmp_path / "absent")) is None


def test_hugepage_malloc_reexecutes_the_same_command_once(tmp_path):
    """A real re-execution: a ``python -c`` program calls it, comes back as a new process image
    with the tunable set and the same arguments, and does not re-execute a second time."""
    madvise = _thp(tmp_path, "always [madvise] never")
    code = ("import os, sys; from anyflow_jax import cli; "
            f"cli._THP_ENABLED = {madvise!r}; "
            "print('start', flush=True); "
            "cli.hugepage_malloc(); "
            "print('tunables', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", cli.HUGEPAGE_OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", code, "a", "b c"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    if cli.glibc_has_hugetlb_tunable():
        assert lines == ["start", "start", f"tunables {cli.HUGEPAGE_TUNABLE} ['a', 'b c']"]
    else:  # nothing to gain: the command runs on in the same process
        assert lines == ["start", "tunables None ['a', 'b c']"]
    # opted out: one process
    env[cli.HUGEPAGE_OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-c", code, "a"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.stdout.splitlines() == ["start", "tunables None ['a']"], out.stderr
