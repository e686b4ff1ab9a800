"""Exceptions shared by every layer (no imports of the rest of the package)."""
from __future__ import annotations


class RunError(ValueError):
    """A configuration or checkpoint problem that stops a run (or a command) before it starts.

    The CLIs print it as one ``error: ...`` line and exit with status 2.
    """


__all__ = ["RunError"]
