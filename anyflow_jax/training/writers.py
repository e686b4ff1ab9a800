"""Metrics for the training loop: writers, progress (steps/s, ETA), parameter overview.

CLU's ``metric_writers`` and ``periodic_actions`` import TensorFlow at import time, so this
module never imports them at module level (importing ``anyflow_jax.training.writers`` pulls in
neither TensorFlow, nor those CLU modules, nor tensorboardX). :func:`create_writer` writes
TensorBoard event files through ``clu.metric_writers`` (imported lazily) when TensorFlow is
installed, and otherwise through :class:`TensorBoardWriter` (tensorboardX, pure Python, imported
lazily); only if neither is available does it fall back to console + JSON lines and say so once.
``metrics.jsonl`` is written in every case.
:class:`Progress` replaces ``clu.periodic_actions.ReportProgress`` for the same reason.
``clu.parameter_overview`` does not need TensorFlow and is used directly, with a fallback.
"""
from __future__ import annotations

import importlib
import importlib.util
import itertools
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

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """``images``: name -> uint8 ``(N, H, W, C)`` array, C 1 or 3 (CLU's convention)."""

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
    writes hparams to ``<workdir>/hparams.json``. On resume the trainer first drops the records
    after the restored step (:func:`drop_records_after`), so every step appears once."""

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


def _read_records(workdir) -> tuple[str, list[tuple[str, int | None, dict]]]:
    """``<workdir>/metrics.jsonl`` and its lines as ``(line ending in a newline, step, record)``;
    ``step`` is None for a line that is not a record (a torn last line of a killed run)."""
    path = os.path.join(os.fspath(workdir), METRICS_FILE)
    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                    at = int(record["step"])
                except (ValueError, KeyError, TypeError):
                    record, at = {}, None
                rows.append((line if line.endswith("\n") else line + "\n", at, record))
    return path, rows


def _rewrite(path: str, lines) -> None:
    from anyflow_jax import fileio
    fileio.atomic_write_bytes(path, "".join(lines).encode("utf-8"))


def _merged(rows, step: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _, at, record in rows:
        if at == step:
            out.update({k: v for k, v in record.items() if k != "step"})
    return out


def drop_records_after(workdir, step: int) -> int:
    """Remove the records of steps after ``step`` from ``<workdir>/metrics.jsonl`` (a resumed run
    logs them again); returns how many were dropped. The file is rewritten atomically; a torn
    last line (a killed run) is dropped too."""
    path, rows = _read_records(workdir)
    keep = [line for line, at, _ in rows if at is not None and at <= int(step)]
    dropped = len(rows) - len(keep)
    if dropped:
        _rewrite(path, keep)
        logger.info("dropped %d metric records after step %d from %s (they are logged again)", dropped, step, path)
    return dropped


def records_at(workdir, step: int) -> dict[str, Any]:
    """The scalars of every record of ``step`` in ``<workdir>/metrics.jsonl``, merged (later
    records win; ``{}`` when there is none)."""
    return _merged(_read_records(workdir)[1], int(step))


def pop_records_at(workdir, step: int) -> dict[str, Any]:
    """Remove the records of ``step`` from ``<workdir>/metrics.jsonl`` and return their scalars
    merged (later records win; ``{}`` when there is none). The file is rewritten atomically."""
    path, rows = _read_records(workdir)
    merged = _merged(rows, int(step))
    if merged:
        _rewrite(path, [line for line, at, _ in rows if at != int(step)])
    return merged


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

    def write_images(self, step, images):
        for w in self.writers:
            if hasattr(w, "write_images"):
                w.write_images(step, images)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


_TB_FILE_IDS = itertools.count()  # makes event file names unique within a process


class TensorBoardWriter(NullWriter):
    """TensorBoard event files in ``workdir`` through ``tensorboardX.SummaryWriter`` (pure
    Python, no TensorFlow; imported here, lazily, so an ImportError surfaces at construction).

    Scalars are written with ``add_scalar`` (``simple_value``), texts with ``add_text`` and
    hparams as hparams-plugin summaries in the same event file (as CLU does; values other than
    str/bool/int/float are written as their ``str``). tensorboardX queues events to its own
    background thread, which writes them to disk every ``flush_secs`` (so ``asynchronous`` of
    :func:`create_writer` does not apply). Its own ``flush`` does not wait for that queue, so
    :meth:`flush` closes the ``SummaryWriter`` (which drains the queue to disk) and the next
    write opens a new event file. Event file names end in ``.<pid>.<n>``, unique per writer, as
    tensorboardX names files by the second and would truncate a file of the same name.
    """

    def __init__(self, workdir, *, flush_secs: int = 120):
        self._tbx = importlib.import_module("tensorboardX")
        self.logdir = os.fspath(workdir)
        self.flush_secs = int(flush_secs)
        self._writer = None
        self._get()  # the event file exists from the start; errors surface here

    def _get(self):
        if self._writer is None:
            suffix = f".{os.getpid()}.{next(_TB_FILE_IDS)}"
            self._writer = self._tbx.SummaryWriter(logdir=self.logdir, flush_secs=self.flush_secs,
                                                   filename_suffix=suffix)
        return self._writer

    def write_scalars(self, step, scalars):
        values = {str(k): float(_to_scalar(k, v)) for k, v in scalars.items()}
        writer = self._get()
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=int(step))

    def write_hparams(self, hparams):
        from tensorboardX.summary import hparams as hparams_summaries

        def plain(v):
            if isinstance(v, np.generic):
                v = v.item()
            return v if isinstance(v, (str, bool, int, float)) else str(v)

        summaries = hparams_summaries({str(k): plain(v) for k, v in hparams.items()}, {})
        file_writer = self._get()._get_file_writer()
        for summary in summaries:  # experiment, session start, session end
            file_writer.add_summary(summary)

    def write_texts(self, step, texts):
        writer = self._get()
        for k, v in texts.items():
            writer.add_text(str(k), str(v), global_step=int(step))

    def write_images(self, step, images):
        writer = self._get()
        for k, v in images.items():
            writer.add_images(str(k), np.asarray(v, np.uint8), global_step=int(step), dataformats="NHWC")

    def flush(self):
        self.close()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _tensorflow_installed() -> bool:
    """Whether TensorFlow can be imported, without importing it."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # e.g. a stub in sys.modules without __spec__
        return False


def _warn_fallback(reasons: list[str], workdir) -> None:
    global _FALLBACK_WARNED
    if _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED = True
    logger.warning("TensorBoard metrics disabled (%s); writing metrics to the console and %s",
                   "; ".join(reasons), os.path.join(os.fspath(workdir), METRICS_FILE))


def _reason(what: str, e: BaseException) -> str:
    return f"{what} unavailable: {type(e).__name__}: {e}"


def create_writer(workdir, *, process_index: int = 0, tensorboard: bool = True,
                  asynchronous: bool = True):
    """The metric writer for a run in ``workdir``.

    Process 0: console + ``<workdir>/metrics.jsonl`` always; with ``tensorboard=True`` also
    TensorBoard event files in ``workdir``: through ``clu.metric_writers.create_default_writer``
    if TensorFlow is installed (checked with ``importlib.util.find_spec`` before CLU's writers
    are imported, as they import TensorFlow), else through :class:`TensorBoardWriter`
    (tensorboardX; ``asynchronous`` applies to CLU's writer only). If neither works, one warning
    line per process names the reasons and the run continues with console + JSON lines.
    ``tensorboard=False`` gives console + JSON lines without a warning. Other processes get a
    writer that writes nothing (no files, no console lines). The
    result supports ``write_scalars(step, dict)``, ``write_hparams(dict)``,
    ``write_texts(step, dict)``, ``flush()`` and ``close()``.
    """
    if int(process_index) != 0:
        return NullWriter()
    writers: list[Any] = []
    if tensorboard:
        reasons: list[str] = []
        if _tensorflow_installed():
            try:
                metric_writers = importlib.import_module("clu.metric_writers")
                writers.append(metric_writers.create_default_writer(
                    os.fspath(workdir), just_logging=False, asynchronous=asynchronous))
            except Exception as e:  # noqa: BLE001 - e.g. a broken TensorFlow install
                reasons.append(_reason("clu.metric_writers", e))
                logger.info("clu.metric_writers failed (%s: %s); trying tensorboardX", type(e).__name__, e)
        else:
            reasons.append("clu.metric_writers unavailable: TensorFlow is not installed")
        if not writers:
            try:
                writers += [TensorBoardWriter(workdir), ConsoleWriter()]
            except Exception as e:  # noqa: BLE001 - ImportError when tensorboardX is missing
                reasons.append(_reason("tensorboardX", e))
                _warn_fallback(reasons, workdir)
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
    "TensorBoardWriter",
    "JsonlWriter",
    "MultiWriter",
    "Progress",
    "format_duration",
    "drop_records_after",
    "parameter_overview",
    "count_params",
    "METRICS_FILE",
    "HPARAMS_FILE",
]
