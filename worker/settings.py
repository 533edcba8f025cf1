"""Where SAE Studio keeps its files, and the worker's limits (read from the environment).

By default everything lives under one data folder: ``$SAE_STUDIO_DATA`` or ``./data``.
``run.py`` sets the variables before it imports anything, so the web process and the Huey worker
agree. The values are read on every call (tests point them at a temporary folder).

    data/app.db                 the app's SQLite database (worker.db)
    data/queue.db               Huey's task queue
    data/uploads/               corpora uploaded through the web       } the artifacts folder
    data/trainings/<id>/        one training's run folder (checkpoints, } (default: the data
                                saelens/, eval/)                        }  folder)
    data/models/, data/tokens/  the engine's caches (converted models, token stores)

A lab points every machine at the same servers and one shared folder (README "Running it for a
lab"): ``$SAE_STUDIO_DATABASE_URL`` (``postgresql://user:password@host:5432/name``),
``$SAE_STUDIO_QUEUE_URL`` (``redis://host:6379/0``) and ``$SAE_STUDIO_ARTIFACTS`` (a folder every
machine mounts at the same path). Models and token stores stay a per-machine cache in the data
folder: a worker that lacks them builds them.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The data folder, absolute: ``$SAE_STUDIO_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("SAE_STUDIO_DATA") or "data").expanduser().resolve()


def app_db_path() -> Path:
    """The default app database: a SQLite file in the data folder."""
    return data_dir() / "app.db"


def queue_db_path() -> Path:
    """Huey's default queue file, made by ``worker.queue`` when the queue is first used."""
    return data_dir() / "queue.db"


def database_url() -> str:
    """The app database: ``$SAE_STUDIO_DATABASE_URL`` (``run.py --database-url``;
    ``postgresql://user:password@host:port/name`` or ``sqlite:///path``), else the SQLite file
    ``app_db_path()`` as a ``sqlite:///`` URL."""
    return os.environ.get("SAE_STUDIO_DATABASE_URL", "").strip() or f"sqlite:///{app_db_path()}"


def queue_url() -> str:
    """The task queue: ``$SAE_STUDIO_QUEUE_URL`` (``run.py --queue-url``; ``redis://host:port/db``
    or ``sqlite:///path``), else the SQLite file ``queue_db_path()`` as a ``sqlite:///`` URL."""
    return os.environ.get("SAE_STUDIO_QUEUE_URL", "").strip() or f"sqlite:///{queue_db_path()}"


def artifacts_dir() -> Path:
    """Where run folders and uploads live, absolute: ``$SAE_STUDIO_ARTIFACTS``
    (``run.py --artifacts``; a folder every machine of a lab mounts at the same path), else the
    data folder."""
    named = os.environ.get("SAE_STUDIO_ARTIFACTS", "").strip()
    return Path(named).expanduser().resolve() if named else data_dir()


def uploads_dir() -> Path:
    """Corpora uploaded through the web (in the artifacts folder: every worker reads them)."""
    return artifacts_dir() / "uploads"


def trainings_dir() -> Path:
    """Training N writes to ``trainings_dir() / str(N)`` (the engine's out_dir), in the
    artifacts folder: a Retry on another worker continues from the newest checkpoint there."""
    return artifacts_dir() / "trainings"


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


def root_forms() -> list[Path]:
    """``allowed_roots()`` as named (absolute, links not followed) and as resolved: a folder
    reached through a link on this machine (a shared mount) starts stored paths either way."""
    named = [Path(os.environ.get("SAE_STUDIO_DATA") or "data").expanduser().absolute()]
    raw = os.environ.get("SAE_STUDIO_ARTIFACTS", "").strip()
    artifacts = Path(raw).expanduser().absolute() if raw else named[0]
    named += [artifacts / "uploads", named[0] / "models"]
    named += [Path(p).expanduser().absolute()
              for p in os.environ.get("SAE_STUDIO_ALLOWED_PATHS", "").split(os.pathsep)
              if p.strip()]
    return list(dict.fromkeys([*allowed_roots(), *named[1:]]))


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
