"""What every service of the job layer shares: the database's lifecycle, the one way to enqueue
a task, row look-ups by id, rows as JSON-ready dicts, and the rule that a model or dataset in use
by a queued or running training stays.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from .. import settings
from ..db import RUNNING, data_version, db, open_app_database
from ..engine.files import json_safe
from .errors import Conflict, Invalid, NotFound

MAX_ID = 2**63 - 1
"""The largest row id (a signed 64-bit integer: SQLite's, BIGINT on PostgreSQL); larger ids do
not exist."""
MAX_NAME = 200
"""The longest name a model or dataset may have (characters)."""
MAX_SOURCE = 1000
"""The longest source (a path or Hub id) a model or dataset may have (characters)."""
OUTSIDE_ROOTS = ("Local files must be under an allowed folder (uploads, or one named with "
                 "--allow-path); see the README.")
"""The one answer for a local path the user may not add, whether it exists or not."""


# ---------------------------------------------------------------------------- the database
def open_database() -> None:
    """Bind the app database (``settings.database_url()``), migrating it."""
    open_app_database()


def connect() -> None:
    """Open this thread's connection (the web: once per request)."""
    db.connect(reuse_if_open=True)


def disconnect() -> None:
    """Close this thread's connection if it is open."""
    if not db.is_closed():
        db.close()


def changes_since(version: int | None) -> int | None:
    """The database's change counter when a write was committed since ``version`` was read,
    else None; ``changes_since(None)`` reads the counter (a cheap poll for live pages). It may
    also change without a change the caller sees (another database on the same PostgreSQL
    server, a rolled-back write): callers compare what they show (``db.data_version``)."""
    now = data_version()
    return now if now != version else None


# ---------------------------------------------------------------------------- tasks
def enqueue(task_name: str, *args: Any) -> None:
    """Enqueue ``worker.tasks.<task_name>(*args)``, after the caller's writes are committed.

    The one way the job layer queues work (tests replace it to record tasks instead). The tasks
    module is imported here, not at the top: it pulls in the engine lazily, the web never.
    """
    from .. import tasks

    getattr(tasks, task_name)(*args)


def queue_preparation(table: type, task_name: str, **values: Any) -> Any:
    """Insert a model or dataset row (status ``queued``), enqueue its preparation task
    ``task_name(row id)`` once the row is committed, and return the row as it is then (in
    immediate mode the task already ran). A name already taken in the table is named apart:
    ``kjv`` added twice becomes ``kjv (2)``."""
    with db.atomic():
        values["name"] = unique_name(table, values["name"])
        row = table.create(status="queued", message="Waiting for the worker.", **values)
    enqueue(task_name, row.id)
    return table.get_by_id(row.id)


def unique_name(table: type, name: str) -> str:
    """``name``, or ``name (2)``, ``name (3)``... the first one no row of ``table`` has."""
    taken = {r.name for r in table.select(table.name)
             .where((table.name == name) | table.name.startswith(f"{name} ("))}
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name} ({n})"
    return candidate


# ---------------------------------------------------------------------------- rows
def get_row(table: type, kind: str, row_id: int | str) -> Any:
    """The row of ``table`` with id ``row_id``, or NotFound("Model 7 does not exist.") (also for
    an id that is not a whole number from 0 to 2**63 - 1)."""
    text = str(row_id).strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_ID:
        raise NotFound(f"{kind} {text[:30]} does not exist.")
    key = int(text)
    row = table.get_or_none(table.id == key)
    if row is None:
        raise NotFound(f"{kind} {key} does not exist.")
    return row


def check_length(value: str, limit: int, field: str, label: str, errors: dict[str, str]) -> None:
    """Put "<label> is too long (N characters; at most LIMIT)." into ``errors[field]``."""
    if len(value) > limit:
        errors[field] = f"{label} is too long ({len(value):,} characters; at most {limit:,})."


def local_path(source: str, *, pathlike: bool) -> Path | None:
    """The resolved path (symlinks and ``..`` followed) a source names, or None when it is not
    ``pathlike`` (a bundled name or a Hub id: never looked up on disk, so the answer does not
    depend on what exists; the worker reads such names in its own empty folder,
    ``settings.work_dir()``).

    Raises Invalid({"source": OUTSIDE_ROOTS}) when it is a path but not under one of
    ``settings.allowed_roots()``, with the same words whether it exists or not.
    """
    if not pathlike:
        return None
    try:
        resolved = Path(source).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):  # too long, a NUL byte, ~nobody
        raise Invalid(OUTSIDE_ROOTS, {"source": OUTSIDE_ROOTS}) from None
    if not any(resolved.is_relative_to(root) for root in settings.allowed_roots()):
        raise Invalid(OUTSIDE_ROOTS, {"source": OUTSIDE_ROOTS})
    return resolved


def row_dict(row: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """The named fields of a row as a JSON-ready dict (NaN and infinities as None)."""
    return json_safe({name: getattr(row, name) for name in fields})


def remove_tree(path: str | Path | None) -> None:
    """Delete a run folder (nothing when there is none)."""
    if path:
        shutil.rmtree(path, ignore_errors=True)


def blank(raw: Any) -> bool:
    """A form value that was left empty."""
    return raw is None or (isinstance(raw, str) and not raw.strip())


def delete_with_trainings(table: type, kind: str, row_id: int | str) -> Any:
    """Delete a model or dataset row (NotFound as ``get_row``) with its trainings' rows and run
    folders; returns the deleted row. Conflict while one of them is queued or running: "Model 3
    is used by training 5, which is training; stop it first."."""
    row = get_row(table, kind, row_id)
    what = f"{kind} {row.id}"
    trainings = list(row.trainings)
    active = [t for t in trainings if t.status == "queued" or t.status in RUNNING]
    if active:
        ids = ", ".join(str(t.id) for t in active)
        raise Conflict(f"{what} is used by training {ids}, which is {active[0].status}; "
                       "stop it first.")
    with db.atomic():
        row.delete_instance(recursive=True)
    for t in trainings:
        remove_tree(t.out_dir)
    return row


def finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, not a number, NaN, Inf)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def with_model_and_dataset() -> Any:
    """Trainings joined with their model and dataset rows (one query for a list)."""
    from ..db import Dataset, LanguageModel, Training

    return (Training.select(Training, LanguageModel, Dataset)
            .join(LanguageModel, on=(Training.model == LanguageModel.id))
            .switch(Training).join(Dataset, on=(Training.dataset == Dataset.id)))
