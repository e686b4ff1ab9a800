"""Metrics for the training loop: writers, progress (steps/s, ETA), parameter overview.

CLU's ``metric_writers`` and ``periodic_actions`` import TensorFlow at import time, so this
module never imports them at module level (importing ``anyflow_jax.metrics`` pulls in neither
TensorFlow nor those CLU modules). :func:`create_writer` imports ``clu.metric_writers`` lazily;
without TensorFlow it falls back to a console + JSON-lines writer of our own and says so once.
:class:`Progress` replaces ``clu.periodic_actions.ReportProgress`` for the same reason.
``clu.parameter_overview`` does not need TensorFlow and is used directly, with a fallback.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import numpy as np

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
HPARAMS_FILE = "hparams.json"

_FALLBACK_WARNED = False  # the "no TensorBoard" warning is printed once per process


# ----------------------------------------------------------------------------- writers
def _to_scalar(name: str, value: Any):
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {name!r} is not a scalar (shape {arr.shape})")
    return arr.reshape(()).item()


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class NullWriter:
    """Writes nothing (processes other than 0)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        pass

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ConsoleWriter(NullWriter):
    """Logs scalars as ``[step] k=v, ...`` (the format of CLU's ``LoggingWriter``)."""

    def write_scalars(self, step, scalars):
        items = ", ".join(f"{k}={_fmt(_to_scalar(k, v))}" for k, v in sorted(scalars.items()))
        logger.info("[%d] %s", int(step), items)

    def write_hparams(self, hparams):
        logger.info("[hparams] %s", ", ".join(f"{k}={v}" for k, v in sorted(hparams.items())))

    def write_texts(self, step, texts):
        for k, v in sorted(texts.items()):
            logger.info("[%d] %s: %s", int(step), k, v)


class JsonlWriter(NullWriter):
    """Appends one JSON object ``{"step": s, **scalars}`` per ``write_scalars`` call to
    ``<workdir>/metrics.jsonl`` (flushed at once, so a killed run keeps what it wrote), and
    writes hparams to ``<workdir>/hparams.json``. After a resume the file is appended to, so
    steps between the last checkpoint and a crash may appear twice: readers should keep the last
    record of each step."""

    def __init__(self, workdir):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self._fh = None

    def _file(self):
        if self._fh is None or self._fh.closed:
            try:
                os.makedirs(self.workdir, exist_ok=True)
                self._fh = open(self.path, "a", encoding="utf-8")
            except OSError as e:
                raise OSError(f"cannot write metrics to {self.path}: {e}") from e
        return self._fh

    def write_scalars(self, step, scalars):
        record = {"step": int(step)}
        for k, v in scalars.items():
            if k == "step":
                raise ValueError("a metric may not be named 'step'")
            record[str(k)] = _to_scalar(k, v)
        fh = self._file()
        fh.write(json.dumps(record) + "\n")
        fh.flush()

    def write_hparams(self, hparams):
        os.makedirs(self.workdir, exist_ok=True)
        with open(os.path.join(self.workdir, HPARAMS_FILE), "w", encoding="utf-8") as fh:
            json.dump(dict(hparams), fh, indent=2, sort_keys=True, default=str)

    def flush(self):
        if self._fh is not None and not self._fh.closed:
            self._fh.flush()

    def close(self):
        if self._fh is not None and not self._fh.closed:
            self._fh.close()


class MultiWriter(NullWriter):
    """Forwards every call to each writer (CLU writers included)."""

    def __init__(self, writers):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams):
        for w in self.writers:
            w.write_hparams(hparams)

    def write_texts(self, step, texts):
        for w in self.writers:
            if hasattr(w, "write_texts"):
                w.write_texts(step, texts)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def _warn_fallback(reason: BaseException, workdir) -> None:
    global _FALLBACK_WARNED
    if _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED = True
    logger.warning("TensorBoard metrics disabled (clu.metric_writers unavailable: %s: %s); "
                   "writing metrics to the console and %s", type(reason).__name__, reason,
                   os.path.join(os.fspath(workdir), METRICS_FILE))


def create_writer(workdir, *, process_index: int = 0, tensorboard: bool = True,
                  asynchronous: bool = True):
    """The metric writer for a run in ``workdir``.

    Process 0: console + ``<workdir>/metrics.jsonl`` always; with ``tensorboard=True`` also
    TensorBoard summaries through ``clu.metric_writers.create_default_writer`` (imported here,
    lazily: it needs TensorFlow). If that import fails, one warning line names the reason and
    the run continues with console + JSON lines. Other processes get a writer that writes
    nothing (no files, no console lines). The result supports ``write_scalars(step, dict)``,
    ``write_hparams(dict)``, ``write_texts(step, dict)``, ``flush()`` and ``close()``.
    """
    if int(process_index) != 0:
        return NullWriter()
    writers: list[Any] = []
    if tensorboard:
        try:
            metric_writers = importlib.import_module("clu.metric_writers")
            writers.append(metric_writers.create_default_writer(
                os.fspath(workdir), just_logging=False, asynchronous=asynchronous))
        except Exception as e:  # ImportError when TensorFlow is not installed
            _warn_fallback(e, workdir)
    if not writers:
        writers.append(ConsoleWriter())
    writers.append(JsonlWriter(workdir))
    return MultiWriter(writers)


# ----------------------------------------------------------------------------- progress
def format_duration(seconds: float) -> str:
    """``3725.2 -> '1h02m05s'``, ``340 -> '5m40s'``, ``7.4 -> '7s'``; non-finite -> '?'."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


class Progress:
    """Progress reports with steps/s, ETA and percent (in place of CLU's ``ReportProgress``).

    Call ``progress(step)`` after each update with the number of completed steps. The rate is
    measured over a window that starts at construction (at ``start_step``, so a resumed run
    counts only the steps it did itself) and restarts at each report. A report is due when
    ``step % every_steps == 0``, when ``every_secs`` have passed since the last report, or at
    ``total_steps``; it is logged and returned as a string (otherwise ``None``).
    ``summary(step)`` gives ``{"steps_per_sec", "eta_sec"}`` for the metric writer without
    restarting the window. ``clock`` (default ``time.perf_counter``) is injectable for tests.
    Build it after ahead-of-time compilation, or call :meth:`restart`, so compile time is not
    counted as training time.
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, every_steps: int | None = None,
                 every_secs: float | None = 60.0, clock: Callable[[], float] = time.perf_counter,
                 log: bool = True):
        if int(total_steps) <= 0:
            raise ValueError(f"total_steps must be positive; got {total_steps}")
        if not 0 <= int(start_step) <= int(total_steps):
            raise ValueError(f"start_step must be in [0, {total_steps}]; got {start_step}")
        if every_steps is not None and int(every_steps) <= 0:
            raise ValueError(f"every_steps must be positive or None; got {every_steps}")
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.every_steps = None if every_steps is None else int(every_steps)
        self.every_secs = None if every_secs is None else float(every_secs)
        self._clock = clock
        self._log = log
        self._last_rate: float | None = None
        self._last_reported: int | None = None
        self.restart(self.start_step)

    def restart(self, step: int) -> None:
        """Start a new measuring window at ``step`` now (e.g. after compilation or a pause)."""
        self._win_step = int(step)
        self._win_time = float(self._clock())

    def _rate(self, step: int, now: float) -> float | None:
        ds, dt = step - self._win_step, now - self._win_time
        if ds > 0 and dt > 0:
            return ds / dt
        return self._last_rate

    def _summary_at(self, step: int, now: float) -> dict[str, float]:
        rate = self._rate(step, now)
        if not rate:
            return {"steps_per_sec": 0.0, "eta_sec": float("nan")}
        return {"steps_per_sec": float(rate),
                "eta_sec": float(max(self.total_steps - step, 0) / rate)}

    def summary(self, step: int) -> dict[str, float]:
        """``steps_per_sec`` over the current window (the last report's rate if no step has
        passed since) and ``eta_sec`` to ``total_steps``; 0.0 / NaN before any measurement."""
        return self._summary_at(int(step), float(self._clock()))

    def _due(self, step: int, now: float) -> bool:
        if step <= self._win_step or step == self._last_reported:
            return False
        if step >= self.total_steps:
            return True
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_secs is not None and now - self._win_time >= self.every_secs

    def __call__(self, step: int) -> str | None:
        step = int(step)
        now = float(self._clock())
        if not self._due(step, now):
            return None
        s = self._summary_at(step, now)
        pct = 100.0 * step / self.total_steps
        line = (f"step {step}/{self.total_steps} ({pct:.1f}%), {s['steps_per_sec']:.4g} steps/s, "
                f"ETA {format_duration(s['eta_sec'])}")
        self._last_rate = s["steps_per_sec"]
        self._last_reported = step
        self._win_step, self._win_time = step, now
        if self._log:
            logger.info("%s", line)
        return line


# ----------------------------------------------------------------------------- parameters
def _unbox(params):
    try:
        from flax.core import meta
        return meta.unbox(params)
    except Exception:  # not a flax tree
        return params


def _leaves_with_names(params):
    import jax
    flat = jax.tree_util.tree_flatten_with_path(_unbox(params))[0]
    out = []
    for path, leaf in flat:
        name = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
        out.append((name, leaf))
    return out


def count_params(params, mask: Any = None) -> int:
    """Number of scalars in ``params`` (arrays or ``ShapeDtypeStruct``s); with a mask of bools
    (``training.optim.trainable_mask``), only those marked True."""
    import jax
    leaves = jax.tree_util.tree_leaves(_unbox(params))
    sizes = [int(np.prod(np.shape(x), dtype=np.int64)) for x in leaves]
    if mask is None:
        return int(sum(sizes))
    keep = [bool(m) for m in jax.tree_util.tree_leaves(mask)]
    if len(keep) != len(sizes):
        raise ValueError(f"mask has {len(keep)} leaves but params have {len(sizes)}")
    return int(sum(s for s, k in zip(sizes, keep) if k))


def _fallback_overview(params, max_lines: int | None) -> str:
    rows = [(n, str(tuple(np.shape(x))), str(getattr(x, "dtype", np.asarray(x).dtype)),
             f"{int(np.prod(np.shape(x), dtype=np.int64)):,}") for n, x in _leaves_with_names(params)]
    rows.sort()
    shown = rows if max_lines is None else rows[:max_lines]
    header = ("Name", "Shape", "Dtype", "Size")
    widths = [max(len(h), *(len(r[i]) for r in shown)) if shown else len(h) for i, h in enumerate(header)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [sep, fmt(header), sep, *(fmt(r) for r in shown)]
    if len(shown) < len(rows):
        lines.append(f"[{len(rows) - len(shown)} more]")
    lines += [sep, f"Total: {count_params(params):,}"]
    return "\n".join(lines)


def parameter_overview(params, *, mask: Any = None, include_stats: bool = False,
                       max_lines: int | None = None) -> str:
    """Table of parameter names, shapes and sizes with the total count.

    Uses ``clu.parameter_overview.get_parameter_overview`` (no TensorFlow needed); if it fails
    (e.g. abstract ``ShapeDtypeStruct`` leaves with ``include_stats``), a table of our own. With
    ``mask`` a line ``Trainable: n of N (p%)`` is appended.
    """
    tree = _unbox(params)
    try:
        from clu import parameter_overview as po
        text = po.get_parameter_overview(tree, include_stats=include_stats, max_lines=max_lines)
    except Exception as e:  # noqa: BLE001 - any failure falls back to our own table
        logger.debug("clu parameter_overview failed (%s); using the fallback table", e)
        text = _fallback_overview(tree, max_lines)
    if mask is not None:
        total, trained = count_params(tree), count_params(tree, mask)
        text += f"\nTrainable: {trained:,} of {total:,} ({100.0 * trained / max(total, 1):.2f}%)"
    return text


__all__ = [
    "create_writer",
    "NullWriter",
    "ConsoleWriter",
    "JsonlWriter",
    "MultiWriter",
    "Progress",
    "format_duration",
    "parameter_overview",
    "count_params",
    "METRICS_FILE",
    "HPARAMS_FILE",
]
