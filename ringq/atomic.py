"""Atomic file writing: a reader, or a crash at any moment, sees the old file or the new one.

Its own module so that the checkpoint loader and the packer both use it without
importing each other.
"""
import os
import tempfile
from pathlib import Path

import torch

from .errors import RingqError


def write_atomic(path, write):
    """Call ``write(f)`` on a temp file beside ``path``, fsync, then rename it over ``path``.

    A reader, or a crash at any moment, sees either the old file or the new one; a
    crash may leave a ``.<name>.*.tmp`` file behind (see :func:`remove_stale_temps`).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise RingqError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; run files are as public as a plain write
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise RingqError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_atomic(obj, path):
    """torch.save ``obj`` to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(text, path):
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text.encode()))


def remove_stale_temps(folder, names):
    """Delete the temp files that a crash inside :func:`write_atomic` left for ``names``."""
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
