"""Helpers shared by the command-line entry points: one error type, one step-list parser, output
folder checks that leave nothing behind, progress-bar and logging defaults.

Every CLI prints a :class:`UsageError` as one ``error: ...`` line and exits with status 2.
Nothing here imports JAX, so flags are checked before any heavy import.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Sequence

import numpy as np


class UsageError(ValueError):
    """Bad command-line input."""


def int_list(spec: str | Sequence, flag: str) -> list[int]:
    """``'1,2,2'`` (or a sequence of ints) -> ``[1, 2]``: integers, duplicates dropped, order kept."""
    if isinstance(spec, str):
        items = [t.strip() for t in spec.split(",")]
        if not spec.strip() or any(not t for t in items):
            raise UsageError(f"{flag} must be a comma-separated list of integers, got {spec!r}")
    else:
        items = list(spec)
        if not items:
            raise UsageError(f"{flag} is empty")
    out: list[int] = []
    for item in items:
        if isinstance(item, (bool, np.bool_)):
            raise UsageError(f"{flag} must be integers, got {item!r}")
        if isinstance(item, (int, np.integer)):
            v = int(item)
        elif isinstance(item, str) and re.fullmatch(r"[+-]?\d+", item):
            v = int(item)
        else:
            raise UsageError(f"{flag} must be integers, got {item!r}" +
                             (f" in {spec!r}" if isinstance(spec, str) else ""))
        if v not in out:
            out.append(v)
    return out


def parse_steps(spec: str | Sequence, flag: str = "--steps") -> list[int]:
    """Step counts: positive integers, duplicates dropped, in the order given."""
    steps = int_list(spec, flag)
    bad = [s for s in steps if s < 1]
    if bad:
        raise UsageError(f"{flag} must be positive (>= 1), got {bad[0]}" +
                         (f" in {spec!r}" if isinstance(spec, str) else ""))
    return steps


def plural(n: int, word: str) -> str:
    """``plural(1, 'step') == '1 step'``, ``plural(4, 'step') == '4 steps'``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def missing_dirs(path: str) -> list[str]:
    """``path`` and those of its ancestors that do not exist yet, deepest first: the folders
    ``os.makedirs(path)`` would create."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    out = []
    while not os.path.lexists(path) and path != os.path.dirname(path):
        out.append(path)
        path = os.path.dirname(path)
    return out


def remove_empty_dirs(dirs: Sequence[str]) -> None:
    """Remove the folders ``dirs`` (deepest first, as :func:`missing_dirs` lists them) while they
    are empty; stops at the first one that is missing, not empty or not removable."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            return


def progress_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a progress flag: ``None`` (the default) shows the bar only when
    stderr is a terminal (so log files get no carriage-return-joined bar lines), ``True`` always
    shows it, ``False`` never."""
    return None if progress is None else not progress


def quiet_logs() -> None:
    """No absl/Orbax WARNING lines (e.g. "Metadata file does not exist" when reading a checkpoint
    written without Orbax metadata) from a command that only reads checkpoints."""
    import logging
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


_CPU_FLAG = "--xla_cpu_multi_thread_eigen=false"


def cpu_flags() -> None:
    """Single-threaded Eigen kernels on the CPU backend (XLA still runs independent ops in
    parallel). Measured on 2 CPU cores: toy-model sampling ~3x and classifier training ~1.5x
    faster, because the Eigen thread pool otherwise spends most of its time spinning in the
    kernel (sys time). Only set when the user has not chosen a value in ``XLA_FLAGS`` and no
    backend is initialised yet; it has no effect on GPU or TPU."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" in flags:
        return
    jax = sys.modules.get("jax")
    if jax is not None:
        try:
            from jax._src import xla_bridge
            if xla_bridge.backends_are_initialized():
                return
        except Exception:
            return
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_FLAG}".strip()


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
HUGEPAGE_OPT_OUT = "ANYFLOW_JAX_HUGEPAGE_MALLOC"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_has_hugetlb_tunable() -> bool:
    """Linux with glibc >= 2.35, the first with the ``glibc.malloc.hugetlb`` tunable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(v) for v in version.split(".")[:2])
    except (AttributeError, ValueError, OSError):
        return False
    return name == "glibc" and (major, minor) >= (2, 35)


def hugepage_malloc_env(environ=None, thp_path: str | None = None):
    """The environment to re-execute this process with so that glibc's malloc backs its large
    blocks with transparent huge pages, or ``None`` when that cannot help or was declined.

    Why: XLA's CPU runtime allocates each program's temporary buffers afresh on every execution;
    glibc serves blocks of this size with ``mmap`` and returns them with ``munmap``, so every
    training step faults in its whole working set again, 4 KiB at a time (the toy teacher step:
    ~140 MiB, 15 million page faults in 400 steps, a third of the process's CPU time in the
    kernel). Where the kernel's transparent huge pages are in ``madvise`` mode (common on cloud
    machines), glibc >= 2.35's ``glibc.malloc.hugetlb=1`` tunable asks for 2 MiB pages instead:
    measured on 2 CPU cores, the toy teacher trains at 7.5-7.8 steps/s instead of 5.4-5.8
    (``docs/results.md``). Tunables are read when the process starts, hence the re-execution.

    ``None`` when: ``ANYFLOW_JAX_HUGEPAGE_MALLOC=0``; not Linux/glibc or glibc < 2.35; the kernel's
    THP mode is not ``madvise`` (``always`` needs nothing, ``never`` cannot help); the tunable is
    already set (by the user or by an earlier re-execution); ``sys.orig_argv`` is unknown."""
    env = os.environ if environ is None else environ
    if env.get(HUGEPAGE_OPT_OUT, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    if not glibc_has_hugetlb_tunable():
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    try:
        with open(thp_path or _THP_ENABLED) as f:
            if "[madvise]" not in f.read():
                return None
    except OSError:
        return None
    if not getattr(sys, "orig_argv", None):
        return None
    new = dict(env)
    new["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE
    return new  # the re-executed process sees the tunable and does not re-execute again


def hugepage_malloc() -> None:
    """Re-execute the running command (same interpreter, same arguments) with huge-page malloc
    when :func:`hugepage_malloc_env` says it helps; otherwise return. Entry points call it first
    thing under ``if __name__ == "__main__"``, before JAX starts; set
    ``ANYFLOW_JAX_HUGEPAGE_MALLOC=0`` to turn it off."""
    env = hugepage_malloc_env()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:  # e.g. a sandbox without exec: run on as we are
        return


__all__ = ["UsageError", "int_list", "parse_steps", "plural", "missing_dirs", "remove_empty_dirs", "progress_disable",
           "quiet_logs", "cpu_flags", "hugepage_malloc", "hugepage_malloc_env", "glibc_has_hugetlb_tunable",
           "HUGEPAGE_TUNABLE"]
