"""The Huey task queue, in its own module so the web can enqueue without importing the tasks' code.

The queue is chosen by ``settings.queue_url()`` when it is first used (the first enqueue, or the
consumer starting), not at import: importing this module or ``worker.tasks`` writes nothing and
connects to nothing, and the data folder and URLs may be set after the import (tests, run.py).

- ``sqlite:///path`` (the default: ``settings.queue_db_path()`` in the data folder) or a plain
  path: Huey's SQLite storage on that file, made then;
- ``redis://host:port/db`` (``rediss://`` for TLS): Huey's Redis storage with priorities
  (``RedisQueue``, Redis >= 5), the queue every worker of a lab shares.

Run the worker with

    huey_consumer worker.tasks.huey -w 3 -k thread -m 0.1

(``worker.tasks`` re-exports ``huey`` with the tasks registered on it). Three threads: one
trains, one prepares models and datasets, and one is free for the interactive probes (high
priority: taken before anything queued, on both storages). ``-m 0.1``: an idle thread looks at
the SQLite queue at least every 0.1 s (Huey's default backs off to 10 s), so a warm probe answers
within a second; on Redis a thread waits on the queue itself (a blocking pop).

Results are on: the probe tasks return their answer, which the job layer waits for and reads
once (``Result.get(preserve=False)`` deletes it); every other task returns ``None``, for which
Huey stores nothing. Tests set ``huey.immediate = True``: tasks then run inline in the caller's
thread, on an in-memory queue, and no file is ever made (setting it back to False makes a new
``LazyStorage``, which reads the URL again at its first use).
"""

from __future__ import annotations

import calendar
import datetime
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from huey import Huey
from huey.storage import BaseStorage, PriorityRedisStorage, SqliteStorage

from . import settings

REDIS_SCHEMES = ("redis", "rediss")


class RedisQueue(PriorityRedisStorage):
    """Huey's Redis storage with priorities, its schedule keyed by UTC epoch seconds: Huey
    (``utc=True``) hands it naive UTC times, which the stock storage reads as local time, so a
    task scheduled on a machine in another time zone would run hours early or late."""

    def convert_ts(self, ts: datetime.datetime) -> float:
        return calendar.timegm(ts.timetuple()) + ts.microsecond * 1e-6


def url_problem(url: str) -> str | None:
    """Why ``open_storage`` refuses ``url`` (one sentence that never repeats a password; for a
    command line's error), or None."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in REDIS_SCHEMES:
        try:
            urlsplit(url).port  # noqa: B018 (raises for a port that is not a number)
        except ValueError:
            return (f"The queue URL '{scheme}://...' has a port that is not a number from 0 "
                    "to 65535.")
        return None
    if not scheme or url.startswith("sqlite:///"):
        return None
    return f"Unsupported queue URL '{scheme}://...'; use sqlite:///path or redis://host:port/db."


def open_storage(name: str, url: str) -> BaseStorage:
    """Huey's storage for the queue ``name`` at ``url`` (see the module docstring); ValueError
    (``url_problem``'s sentence) for another URL. A SQLite file (and its folder) is made here;
    Redis is not contacted until the first command."""
    problem = url_problem(url)
    if problem:
        raise ValueError(problem)
    if url.split("://", 1)[0] in REDIS_SCHEMES:
        return RedisQueue(name, url=url)
    path = Path(url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteStorage(name, filename=str(path))


class LazyStorage:
    """A Huey storage that opens the one ``settings.queue_url()`` names at its first use and
    passes every call on to it (the consumer's ``storage.blocking`` included)."""

    def __init__(self, name: str = "huey", **kwargs: Any) -> None:
        self.name = name
        self._backend: BaseStorage | None = None
        self._lock = threading.Lock()

    def backend(self) -> BaseStorage:
        """The storage, opened on the first call."""
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = open_storage(self.name, settings.queue_url())
        return self._backend

    def close(self) -> bool:
        """Close the storage's connection if it was opened (a forked consumer's child does)."""
        return bool(self._backend.close()) if self._backend is not None else False

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):  # not set yet (a copy being made): never open the queue for it
            raise AttributeError(attr)
        return getattr(self.backend(), attr)


huey = Huey("sae-studio", storage_class=LazyStorage, results=True, utc=True)
