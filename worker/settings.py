"""Where SAE Studio keeps its files, and the worker's limits (read from the environment).

Everything lives under one data folder: ``$SAE_STUDIO_DATA`` or ``./data``. ``run.py`` sets the
variable before it imports anything, so the web process and the Huey worker agree. The values
are read on every call (tests point them at a temporary folder).

    data/app.db                 the app's SQLite database (worker.db)
    data/queue.db               Huey's task queue
    data/uploads/               corpora uploaded through the web
    data/trainings/<id>/        one training's run folder (checkpoints/, saelens/)
    data/models/, data/tokens/  the engine's caches (converted models, token stores)
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The data folder, absolute: ``$SAE_STUDIO_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("SAE_STUDIO_DATA") or "data").expanduser().resolve()


def app_db_path() -> Path:
    return data_dir() / "app.db"


def queue_db_path() -> Path:
    """Huey's queue file, made by ``worker.queue`` when the queue is first used."""
    return data_dir() / "queue.db"


def uploads_dir() -> Path:
    return data_dir() / "uploads"


def trainings_dir() -> Path:
    """Training N writes to ``trainings_dir() / str(N)`` (the engine's out_dir)."""
    return data_dir() / "trainings"


def max_concurrent_trainings() -> int:
    """Trainings that may run at once (``$SAE_STUDIO_MAX_TRAININGS``, default 1 per device)."""
    raw = os.environ.get("SAE_STUDIO_MAX_TRAININGS", "").strip()
    try:
        return max(1, int(raw)) if raw else 1
    except ValueError:
        return 1
