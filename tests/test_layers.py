"""Layers point one way: the flow math, objectives, networks and checkpoints never reach the
trainer, the evaluation or the entry points; sampling never needs the trainer; configs import no
training code. Checked on the static import graph (function-level imports included) and, for
the configs, in a fresh interpreter."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "anyflow_jax")
ENTRY_POINTS = ("anyflow_jax.train", "anyflow_jax.sample", "anyflow_jax.evaluate", "anyflow_jax.pipeline",
                "anyflow_jax.demo", "anyflow_jax.prepare")


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _modules():
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                out[_module_name(os.path.join(dirpath, f))] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _imports(path, name):
    """anyflow_jax modules imported anywhere in the file (any nesting level)."""
    tree = ast.parse(open(path).read())
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _closure(name):
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        for dep in GRAPH.get(m, ()):
            # importing a.b.c runs a/__init__ and a/b/__init__ too
            parts = dep.split(".")
            for i in range(1, len(parts) + 1):
                p = ".".join(parts[:i])
                if p in MODULES and p not in seen:
                    seen.add(p)
                    todo.append(p)
    return seen


def _forbidden(mods, prefixes):
    return sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_lower_layers_never_reach_training_evaluation_or_entry_points():
    lower = [m for m in MODULES if m.split(".")[1:2] and m.split(".")[1] in ("flow", "losses", "models", "checkpoints")
             or m in ("anyflow_jax.schedule", "anyflow_jax.sampling", "anyflow_jax.stages", "anyflow_jax.config",
                      "anyflow_jax.text")]
    assert len(lower) > 15
    banned = ("anyflow_jax.training", "anyflow_jax.evaluation", "anyflow_jax.inference") + ENTRY_POINTS
    bad = {m: _forbidden(_closure(m), banned) for m in lower}
    assert {m: b for m, b in bad.items() if b} == {}


def test_sampling_and_inference_never_need_the_trainer():
    for m in ("anyflow_jax.inference", "anyflow_jax.sample", "anyflow_jax.flow.sampling",
              "anyflow_jax.evaluation.harness", "anyflow_jax.text_to_video", "anyflow_jax.text",
              "anyflow_jax.prepare"):
        assert _forbidden(_closure(m), ("anyflow_jax.training",)) == [], m


def test_the_graph_sees_function_level_imports():
    # the trainer is imported lazily inside functions of the pipeline: the graph must see it
    assert "anyflow_jax.training.loop" in _closure("anyflow_jax.pipeline")
    assert "anyflow_jax.flow.apply" in _closure("anyflow_jax.losses")


def test_configs_import_no_training_code():
    code = ("import importlib.util, sys\n"
            "for name in ('toy', 'wan_t2v', 'toy_model'):\n"
            "    spec = importlib.util.spec_from_file_location(name, f'configs/{name}.py')\n"
            "    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); mod.get_config()\n"
            "print(sorted(m for m in sys.modules if m.startswith(('anyflow_jax.training', 'anyflow_jax.evaluation'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_moved_modules_keep_their_old_names():
    from anyflow_jax import checkpoint, losses, sampling, schedule  # noqa: F401
    from anyflow_jax.checkpoints import diffusers, model
    from anyflow_jax.flow import sampling as flow_sampling
    from anyflow_jax.flow import schedule as flow_schedule
    from anyflow_jax.interop import diffusers as old_diffusers
    from anyflow_jax.interop.diffusers import load_transformer, save_transformer
    assert sampling is flow_sampling and schedule is flow_schedule
    assert checkpoint is model and old_diffusers is diffusers
    assert load_transformer is diffusers.load_transformer and save_transformer is diffusers.save_transformer
