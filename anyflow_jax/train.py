"""Train any AnyFlow stage: ``python -m anyflow_jax.train --config configs/<x>.py --workdir DIR``.

  python -m anyflow_jax.train --config configs/toy.py:teacher --workdir runs/toy/teacher
  python -m anyflow_jax.train --config configs/toy.py:flow_map --workdir runs/toy/flow_map \\
      --config.init.student=runs/toy/teacher --config.train.steps=100

The config selects the stage (a record of ``anyflow_jax.stages``: ``teacher``, ``flow_map``,
``on_policy``, ``consistency``); any
field can be overridden with ``--config.a.b=value``. A workdir with checkpoints is resumed
automatically. Multi-host: launch one process per host; pass ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (or ``--distributed`` on TPU pods / SLURM, where JAX
finds them itself).

Exit status: 0 finished (or already finished), 2 bad input (one ``error:`` line naming the
problem, before anything is compiled), 75 stopped by SIGTERM or SIGINT after saving a checkpoint
(rerun the same command to resume; a second Ctrl-C stops at once), 1 anything else (e.g. a
non-finite loss is reported as bad input, 2, naming the step and the last good checkpoint).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/<x>.py[:arg]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and run.json.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes for jax.distributed.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index for jax.distributed.")
flags.mark_flags_as_required(["config", "workdir"])


def _load_config_file(spec: str):
    import importlib.util
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_anyflow_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _unknown_override(argv) -> str | None:
    """The first ``--config.a.b=...`` override naming no field of the config file, as a message."""
    from anyflow_jax.config import unknown_field_message
    try:
        config = _load_config_file(_CONFIG_ARG)
    except Exception:  # noqa: BLE001 - reported by the caller
        return None
    for a in argv:
        if not a.startswith("--config."):
            continue
        parts = a[len("--config."):].split("=", 1)[0].split(".")
        node, section = config, []
        for i, p in enumerate(parts):
            if not hasattr(node, "keys"):
                return f"--config.{'.'.join(parts)}: config.{'.'.join(section)} is not a section"
            if p not in node:
                return unknown_field_message(".".join(section), p, list(node.keys()))
            node, section = node[p], section + [p]
    return None


def _flag_error(e: BaseException, argv) -> str:
    """One line for a flag or config mistake, naming the field."""
    from anyflow_jax.errors import RunError
    chain, x = [], e
    while x is not None:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:  # a message of ours (a config file's get_config raised it)
        if isinstance(x, RunError) and "Traceback" not in str(x):
            return str(x)
    path = (_CONFIG_ARG or "").partition(":")[0]
    if path and not os.path.isfile(path):
        return f"config file {path} does not exist"
    if any(isinstance(x, (KeyError, AttributeError)) for x in chain) or isinstance(e, flags.UnrecognizedFlagError):
        message = _unknown_override(argv)
        if message:
            return message
    first = str(e).split("\n")[0].strip().rstrip(":")
    inner = chain[-1]
    detail = " ".join(str(inner).split()) if inner is not e else ""
    return f"{first}: {detail}" if detail and detail not in first else first


_CONFIG_ARG = None


def parse_flags(argv):
    """absl flag parsing with one ``error:`` line and exit status 2 for any mistake."""
    global _CONFIG_ARG
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            _CONFIG_ARG = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            _CONFIG_ARG = argv[i + 1]
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG_ARG is not None:
            list(_CONFIG.value.keys())  # a failed load surfaces on first use: use it now, inside the try
        return rest
    except Exception as e:  # noqa: BLE001 - flags.Error, or whatever a config file raised
        print(f"error: {' '.join(_flag_error(e, argv).split())}", file=sys.stderr)
        print("(python -m anyflow_jax.train --help shows the flags)", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import jax
    if _COORD.value or _NPROC.value:
        jax.distributed.initialize(coordinator_address=_COORD.value, num_processes=_NPROC.value,
                                   process_id=_PID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()

    from anyflow_jax.errors import EXIT_PREEMPTED, Preempted, RunError
    from anyflow_jax.training.loop import NonFiniteLoss, train
    who = f"process {jax.process_index()}/{jax.process_count()}"
    try:
        last = train(_CONFIG.value, _WORKDIR.value)
    except (RunError, NonFiniteLoss, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(f"{who}: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    if last.get("already_done"):
        print(f"{who}: nothing to do, {_WORKDIR.value} is already at step {last['step']}", flush=True)
    elif last:
        loss = last.get("loss", last.get("critic/loss"))
        print(f"{who}: finished at step {last.get('step')} with loss {loss:.6g}", flush=True)


if __name__ == "__main__":
    from anyflow_jax.cli import hugepage_malloc
    hugepage_malloc()  # re-executes once with huge-page malloc where that helps (cli.py)
    app.run(main, flags_parser=parse_flags)
