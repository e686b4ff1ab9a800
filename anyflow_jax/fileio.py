"""Small file helpers shared by the entry points: atomic writes and writable-folder checks."""
from __future__ import annotations

import os


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and one rename (never half-written).

    The file gets mode ``0o666`` less the umask, like any file a user creates (``tempfile.mkstemp``
    would give ``0o600``); the temporary name is unique per call, so concurrent writers of one
    path never share a temporary file.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def ensure_writable_dir(path: str) -> str:
    """Create ``path`` if needed and prove it is writable; returns the absolute path.

    Raises ``OSError`` with a one-line message naming the folder (``<path> is a file, not a
    folder``, ``<path> is not writable: <parent> is a file, not a folder``, ``<path> is not
    writable: <reason>``).
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe-{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as e:
        if os.path.exists(path) and not os.path.isdir(path):
            raise OSError(f"{path} is a file, not a folder") from None
        parent = os.path.dirname(path)
        while parent != os.path.dirname(parent) and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise OSError(f"{path} is not writable: {parent} is a file, not a folder") from None
        raise OSError(f"{path} is not writable: {e.strerror or e}") from None
    return path
