"""Small helpers for atomic writes (temporary file, fsync, rename)."""

from __future__ import annotations

import os
from pathlib import Path


def file_mode() -> int:
    """The mode a plain ``open()`` gives a new file; ``mkstemp`` files are 0600 until chmod."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
