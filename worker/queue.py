"""The Huey task queue, in its own module so the web can enqueue without importing the tasks' code.

The queue is a SQLite file (``settings.queue_db_path()``) created at import, so the data folder
must be chosen first (``run.py`` sets ``SAE_STUDIO_DATA`` before importing). Run the worker with

    huey_consumer worker.tasks.huey -w 2 -k thread

(``worker.tasks`` re-exports ``huey`` with the tasks registered on it). Two threads: one trains
while the other prepares models and datasets. Tests set ``huey.immediate = True``: tasks then run
inline in the caller's thread, on an in-memory queue.
"""

from __future__ import annotations

from huey import SqliteHuey

from .settings import queue_db_path

_path = queue_db_path()
_path.parent.mkdir(parents=True, exist_ok=True)

huey = SqliteHuey("sae-studio", filename=str(_path), results=False, utc=True)
