"""Small helpers for atomic writes and JSON: one place for each mechanism.

- ``replace_folder(folder)``: build a folder's new content in a sibling temporary folder, then
  swap it into place with renames (the old one is put back if the swap fails);
- ``file_mode()`` / ``fsync_dir()``: the modes a plain ``open()`` gives, durable renames;
- ``json_safe(value)``: NaN and infinities become None, recursively (standard JSON has no NaN);
- ``folder_lock(folder)``: one trainer per run folder (an exclusive lock on ``folder/.lock``).

No torch: the web and the job layer import this module too.
"""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import FolderInUse

LOCK_FILE = ".lock"
"""Held (``flock``) by the process training in a run folder; it holds that process's pid."""
TMP_MARK = ".tmp-"
"""Temporary files and folders carry this in their name (``.<name>.tmp-XXXX``), so a start-up
sweep can find the ones an interrupted write left behind."""


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replace_folder(folder: Path | str) -> Iterator[Path]:
    """Write a folder atomically: ``with replace_folder(out) as tmp: <write files into tmp>``.

    ``tmp`` is a sibling of ``folder`` (same filesystem). When the block ends without an error,
    the files get the umask's modes, an existing ``folder`` is renamed aside, ``tmp`` renamed into
    place (the old folder put back if that fails) and the old one removed. On an error ``tmp`` is
    removed and ``folder`` is left as it was. Readers see the old folder or the new one, never a
    half-written one.
    """
    folder = Path(folder)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}{TMP_MARK}", dir=parent))
    old: Path | None = None
    try:
        yield tmp
        mode = file_mode()
        for p in tmp.rglob("*"):
            if p.is_file() and not p.is_symlink():
                os.chmod(p, mode)
            elif p.is_dir():
                os.chmod(p, mode | ((mode & 0o444) >> 2))
        os.chmod(tmp, mode | ((mode & 0o444) >> 2))  # mkdtemp makes 0700: give x where r
        fsync_dir(tmp)
        if folder.exists() or folder.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}{TMP_MARK}old-", dir=parent))
            os.rmdir(old)
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if old is not None:
                os.replace(old, folder)
                old = None
            raise
        fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            _remove(old)


def json_safe(value: Any) -> Any:
    """A copy for ``json.dumps(..., allow_nan=False)``: NaN and infinities become None, tuples
    lists, dict keys strings, numpy / torch scalars plain numbers (``.item()``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return json_safe(item())
    return value


@contextmanager
def folder_lock(folder: Path | str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder/.lock`` for the block: one trainer per run folder,
    whether the other one is a thread, another process (an orphaned worker, the CLI) or another
    machine on the same filesystem. Raises FolderInUse, naming the holder's pid, when it is
    taken. The lock goes with the process: a killed trainer leaves no stale lock. A folder this
    call created (with its parents) is removed again when nothing but the lock file was written
    in it: a run that failed before its first save leaves no empty folder behind."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = take_lock(folder / LOCK_FILE)
    except FolderInUse as exc:
        raise FolderInUse(f"The run folder {folder} is in use by another trainer (pid "
                          f"{exc.holder}); wait until it has stopped.", exc.holder) from None
    try:
        yield folder
    finally:
        if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            (folder / LOCK_FILE).unlink()  # still held: nobody else locks the unlinked file
            for path in created:  # the folders this call made, as long as they are empty
                try:
                    path.rmdir()
                except OSError:
                    break
        os.close(fd)  # closing the descriptor releases the lock


def take_lock(path: Path) -> int:
    """Open ``path`` (created if missing) and take an exclusive ``flock`` on it without waiting,
    writing this process's pid into it. Returns the descriptor: closing it (or the process
    ending, however it ends) releases the lock. FolderInUse (``holder``: the pid written by the
    process that has it) when it is taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FolderInUse(f"{path} is held by process {holder}.", holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
