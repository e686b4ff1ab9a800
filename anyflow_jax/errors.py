"""Exceptions shared by every layer (no imports of the rest of the package)."""
from __future__ import annotations


class RunError(ValueError):
    """A configuration or checkpoint problem that stops a run (or a command) before it starts.

    The CLIs print it as one ``error: ...`` line and exit with status 2.
    """


#: Exit status of ``train`` and ``pipeline`` when a run was stopped by SIGTERM or SIGINT after
#: saving a checkpoint (EX_TEMPFAIL of sysexits.h: "try again later"). Rerunning the same command
#: resumes the run. 0 means finished, 2 bad input, 1 any other failure.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """A run stopped by a signal (preemption, Ctrl-C) after saving a checkpoint at ``step``."""

    def __init__(self, step: int, signal_name: str, workdir: str = ""):
        self.step, self.signal_name, self.workdir = step, signal_name, workdir
        where = f" in {workdir}" if workdir else ""
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint saved{where}; "
                         f"run the same command again to resume")


__all__ = ["RunError", "Preempted", "EXIT_PREEMPTED"]
