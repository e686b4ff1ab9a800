"""Test session setup.

Eight fake CPU devices are configured before JAX initialises so that sharding tests can build
real meshes; every other test runs on the default (first) device.

XLA compiles the test programs with its CPU backend optimisations lowered (``FAST_COMPILE_FLAGS``,
added to ``XLA_FLAGS`` and so passed to every subprocess): the programs are tiny and compiled
once or a few times each, so compile time dominates, and no test relies on the optimiser (bit-exact
checks compare runs made under the same flags; parity checks have tolerances). Set
``ANYFLOW_JAX_TEST_XLA_OPT=1`` to test with XLA's default optimisation instead.

JAX's persistent compilation cache is switched on for the session and, through the environment,
for every subprocess it starts (``python -m anyflow_jax.train`` and friends) and every
pytest-xdist worker: the same tiny programs are compiled by many tests and processes, and a cache
hit skips XLA's compilation. The cache lives in a fresh temporary folder per session (removed at
the end), unless ``JAX_COMPILATION_CACHE_DIR`` is already set, which is then used as it is.

The tiny trained runs that several test files need (teacher, stage-1 flow map, consistency
baseline) are session fixtures here, trained once per session even with pytest-xdist: they live
in a folder common to all workers, and a file lock lets the first worker that needs a run train it
while the others wait and then read it; see ``runs_testlib`` for the tiny config. Tests only read
them; a test that resumes or damages a run copies it first.
"""
import collections
import fcntl
import json
import os
import shutil
import sys
import tempfile

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                      # XLA's older CPU loop emitters: a tiny train step compiles in ~2 s instead of ~5.5 s
                      "--xla_cpu_use_fusion_emitters=false")

_flags = os.environ.get("XLA_FLAGS", "--xla_force_host_platform_device_count=8").split()
if not os.environ.get("ANYFLOW_JAX_TEST_XLA_OPT"):
    _flags += [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in {g.split("=")[0] for g in _flags}]
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="anyflow-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
# cache every program, however small or quick to compile (the defaults skip those under 1 s)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# The pytest-xdist workers and the CLI subprocesses the tests start run with huge-page malloc where it
# helps, as users' commands do (anyflow_jax.cli.hugepage_malloc), set here once so that no CLI run
# re-executes itself.
from anyflow_jax import cli as _cli  # noqa: E402  (imports no JAX)

os.environ.update(_cli.hugepage_malloc_env() or {})

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # runs_testlib, flowmap_testlib


def pytest_collection_modifyitems(config, items):
    """Test files with more slow tests first (each file's own order kept): pytest-xdist hands out
    whole files in this order (``--dist loadfile --no-loadscope-reorder``), so the long files start
    early and short ones fill the end, instead of a long file starting last and running alone."""
    def path(item):
        return item.nodeid.split("::", 1)[0]
    slow = collections.Counter(path(item) for item in items if item.get_closest_marker("slow"))
    if "not slow" in (config.getoption("markexpr") or ""):  # the quick loop: its own heavy files first
        slow = collections.Counter({f"tests/{name}": weight for name, weight in _QUICK_HEAVY.items()})
    first = {}
    for i, item in enumerate(items):
        first.setdefault(path(item), i)
    items.sort(key=lambda item: (-slow[path(item)], first[path(item)]))


# The quick loop's heaviest files (seconds of their non-slow tests on 2 cores, November 22): they
# start first so that the short files fill the end of both workers.
_QUICK_HEAVY = {"test_far_train.py": 28, "test_model.py": 26, "test_far_sampling.py": 24, "test_far.py": 24,
                "test_losses_flow_map.py": 22, "test_lora.py": 20, "test_wan_parity.py": 19,
                "test_text_to_video.py": 17, "test_splash.py": 14, "test_vae.py": 13, "test_lora_train.py": 12,
                "test_losses_backward_simulation.py": 11}


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# ------------------------------------------------------------------------------ shared tiny runs
# Settings chosen for every user: test_train asserts the teacher logged steps 1..40 and kept the
# checkpoints [20, 40]; test_sample and test_evaluate need an output head that has moved (samples
# depend on noise, class, step count and guidance). Read-only: copy before resuming or damaging.
TEACHER_STEPS = 40
FLOW_MAP_STEPS = 4
CONSISTENCY_STEPS = 3


def _snapshot(path):
    """Every file under ``path`` with its size and modification time."""
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), path)] = (st.st_size, st.st_mtime_ns)
    return out


def _shared_root(tmp_path_factory):
    """The folder of the shared runs: the session's temporary folder, or under pytest-xdist the
    parent of the workers' temporary folders, which all workers of a session share."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "tiny_runs"
        root.mkdir(exist_ok=True)
        return root
    return tmp_path_factory.mktemp("tiny_runs")


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory):
    """(folder of the shared runs, {workdir: snapshot after training}). At the end of the session every shared run must be exactly
    as its fixture left it (tests read them; a test that writes must work on a copy)."""
    root = _shared_root(tmp_path_factory)
    trained = {}
    yield root, trained
    changed = {wd: sorted(set(snap.items()) ^ set(_snapshot(wd).items())) for wd, snap in trained.items()}
    changed = {wd: diff for wd, diff in changed.items() if diff}
    assert not changed, f"a test modified a shared run (copy it with shutil.copytree first): {changed}"


def _train_shared(shared_runs, name, cfg):
    """Train ``cfg`` into the shared run ``name`` unless a process of this session already has
    (the lock serialises the workers; ``name.json`` beside the run records its result)."""
    root, trained = shared_runs
    wd, done = str(root / name), root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                from anyflow_jax.training import loop  # imported late: a broken library fails these tests, not collection
                shutil.rmtree(wd, ignore_errors=True)  # what a failed attempt left
                last = loop.train(cfg, wd)  # {name: float, "step": int} (JSON keeps both types)
                done.write_text(json.dumps({"last": last, "snapshot": sorted(_snapshot(wd).items())}))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    record = json.loads(done.read_text())
    trained[wd] = {k: tuple(v) for k, v in record["snapshot"]}
    return wd, record["last"]


@pytest.fixture(scope="session")
def tiny_last():
    """What ``loop.train`` returned for each shared run (its last step's metrics), by stage."""
    return {}


@pytest.fixture(scope="session")
def tiny_teacher(shared_runs, tiny_last):
    """A tiny teacher: 40 steps (lr 2e-3, 5 warmup steps), checkpoints at 20 and 40."""
    from runs_testlib import tiny
    cfg = tiny("teacher", steps=TEACHER_STEPS, checkpoint_every=20)
    cfg.optim.update(dict(lr=2e-3, warmup_steps=5))
    wd, tiny_last["teacher"] = _train_shared(shared_runs, "teacher", cfg)
    return wd


@pytest.fixture(scope="session")
def tiny_flow_map(shared_runs, tiny_teacher, tiny_last):
    """A tiny stage-1 flow map: 4 steps from the tiny teacher (toy stage-1 settings)."""
    from runs_testlib import tiny
    cfg = tiny("flow_map", steps=FLOW_MAP_STEPS)
    cfg.init.student = tiny_teacher
    wd, tiny_last["flow_map"] = _train_shared(shared_runs, "flow_map", cfg)
    return wd


@pytest.fixture(scope="session")
def tiny_consistency(shared_runs, tiny_teacher, tiny_last):
    """A tiny consistency-distillation baseline: 3 steps from the tiny teacher (toy settings)."""
    from runs_testlib import tiny
    cfg = tiny("consistency", steps=CONSISTENCY_STEPS)
    cfg.init.student = cfg.init.teacher = tiny_teacher
    wd, tiny_last["consistency"] = _train_shared(shared_runs, "consistency", cfg)
    return wd


@pytest.fixture(scope="session")
def tiny_far_flow_map(shared_runs, tiny_teacher, tiny_last):
    """A tiny causal stage-1 (FAR) flow map: 2 steps from the tiny teacher, chunks (1, 2, 1) (the
    tiny runs' 4 frames), window 2; a cheaper program than the toy's (no guidance fusion, text
    dropout or bidirectional branch; still one padded layout for 2 and 3 chunks)."""
    from runs_testlib import tiny
    cfg = tiny("far_flow_map", steps=2, checkpoint_every=2)
    cfg.model.update(dict(chunk_partition=(1, 2, 1), full_chunk_limit=2))
    cfg.loss.update(dict(fuse_guidance_scale=1.0, text_dropout=0.0, bidirectional_prob=0.0))
    cfg.init.student = tiny_teacher
    wd, tiny_last["far_flow_map"] = _train_shared(shared_runs, "far_flow_map", cfg)
    return wd
