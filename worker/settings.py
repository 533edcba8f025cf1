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


def work_dir() -> Path:
    """The worker's working directory, an empty folder: a source that is not a path (a bundled
    name, a Hub id such as ``org/name``) is never read as a file or folder relative to wherever
    the worker was started."""
    return data_dir() / "worker"


def max_concurrent_trainings() -> int:
    """Trainings that may run at once (``$SAE_STUDIO_MAX_TRAININGS``, default 1 per device)."""
    raw = os.environ.get("SAE_STUDIO_MAX_TRAININGS", "").strip()
    try:
        return max(1, int(raw)) if raw else 1
    except ValueError:
        return 1


def tokens_dir() -> Path:
    """The engine's token stores: one folder per (corpus, tokenizer, context size)."""
    return data_dir() / "tokens"


def models_dir() -> Path:
    """The engine's model cache (bundled models converted once, e.g. smollm2-135m)."""
    return data_dir() / "models"


def allowed_roots() -> list[Path]:
    """Folders whose files a user may add as a local dataset or model, resolved: the uploads
    folder, the model cache, and every folder in ``$SAE_STUDIO_ALLOWED_PATHS``
    (``os.pathsep``-separated; ``run.py --allow-path DIR`` sets it)."""
    named = os.environ.get("SAE_STUDIO_ALLOWED_PATHS", "").split(os.pathsep)
    roots = [uploads_dir(), models_dir()]
    roots += [Path(p).expanduser().resolve() for p in named if p.strip()]
    return roots


def max_upload_bytes() -> int:
    """The largest upload accepted, in bytes: ``$SAE_STUDIO_MAX_UPLOAD_MB`` megabytes (MiB,
    ``run.py --max-upload-mb``), default 1024."""
    raw = os.environ.get("SAE_STUDIO_MAX_UPLOAD_MB", "").strip()
    try:
        mb = float(raw) if raw else 1024.0
    except ValueError:
        mb = 1024.0
    if not 0 < mb < 2**40:  # NaN, negative or absurd: the default
        mb = 1024.0
    return int(mb * 2**20)
