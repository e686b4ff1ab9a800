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
"""
from __future__ import annotations

import logging
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import jax
    if _COORD.value or _NPROC.value:
        jax.distributed.initialize(coordinator_address=_COORD.value, num_processes=_NPROC.value,
                                   process_id=_PID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()

    from anyflow_jax.errors import RunError
    from anyflow_jax.training.loop import NonFiniteLoss, train
    try:
        last = train(_CONFIG.value, _WORKDIR.value)
        if last:
            loss = last.get("loss", last.get("critic/loss"))
            print(f"process {jax.process_index()}/{jax.process_count()}: finished at step {last.get('step')} "
                  f"with loss {loss!r}", flush=True)
    except (RunError, NonFiniteLoss, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
