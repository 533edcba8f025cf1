"""The Huey task queue, in its own module so the web can enqueue without importing the tasks' code.

The queue is a SQLite file, ``settings.queue_db_path()``, chosen and created when the queue is
first used (the first enqueue, or the consumer starting), not at import: importing this module or
``worker.tasks`` writes nothing, and the data folder may be chosen after the import. Run the
worker with

    huey_consumer worker.tasks.huey -w 3 -k thread -m 0.1

(``worker.tasks`` re-exports ``huey`` with the tasks registered on it). Three threads: one
trains, one prepares models and datasets, and one is free for the interactive probes (high
priority: taken before anything queued). ``-m 0.1``: an idle thread looks at the queue at least
every 0.1 s (Huey's default backs off to 10 s), so a warm probe answers within a second.

Results are on: the probe tasks return their answer, which the job layer waits for and reads
once (``Result.get(preserve=False)`` deletes it); every other task returns ``None``, for which
Huey stores nothing. Tests set ``huey.immediate = True``: tasks then run inline in the caller's
thread, on an in-memory queue, and no file is ever made.
"""

from __future__ import annotations

import sqlite3

from huey import Huey
from huey.storage import SqliteStorage

from .settings import queue_db_path


class LazySqliteStorage(SqliteStorage):
    """Huey's SQLite storage whose file is ``settings.queue_db_path()``, resolved at the first
    connection; the tables are created on that connection (huey would create them at init)."""

    def __init__(self, name: str = "huey", **kwargs: object) -> None:
        super().__init__(name, filename="", create_tables=False, **kwargs)

    def _create_connection(self) -> sqlite3.Connection:
        path = queue_db_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.filename = str(path)
        conn = super()._create_connection()
        for statement in self.ddl:  # "if not exists": a no-op on an existing queue file
            conn.execute(statement)
        return conn


huey = Huey("sae-studio", storage_class=LazySqliteStorage, results=True, utc=True)
