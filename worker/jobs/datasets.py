"""Datasets: the corpora a user added (``kjv``, a .txt/.jsonl/.csv path, an upload or a Hugging
Face dataset id).

Adding one validates its values, inserts a row (status ``queued``) and enqueues
``prepare_dataset``, which counts documents and tokens and keeps a few samples; it ends
``ready`` or ``failed``.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from .. import settings
from ..db import Dataset
from ..engine.documents import looks_like_path
from . import common
from .errors import Invalid

DATASET_FIELDS = ("id", "name", "source", "status", "error", "progress", "message",
                  "context_size", "max_tokens", "text_field", "n_documents", "n_tokens",
                  "samples", "created_at", "updated_at")
"""The keys of ``dataset_as_dict`` (the JSON API)."""
UPLOAD_SUFFIXES = (".txt", ".jsonl", ".csv")


def list_datasets() -> list[Dataset]:
    """All datasets, newest first."""
    return list(Dataset.select().order_by(Dataset.id.desc()))


def ready_datasets() -> list[Dataset]:
    """The datasets a training can use (status ``ready``), newest first."""
    return list(Dataset.select().where(Dataset.status == "ready").order_by(Dataset.id.desc()))


def _safe_filename(filename: str) -> str:
    base = Path(filename.replace("\\", "/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")[:80] or "upload"


def _parse_count(raw: Any, label: str) -> int:
    """A whole number from a form string ("16_384", "16,384" and "1e4" too)."""
    if isinstance(raw, bool):
        raise ValueError(f"{label} must be a whole number.")
    if isinstance(raw, int):
        return raw
    text = str(raw).strip().replace("_", "").replace(",", "")
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{label} must be a whole number (got '{raw}').") from None
        if not value.is_integer():
            raise ValueError(f"{label} must be a whole number (got '{raw}').") from None
        return int(value)


def _check_source(source: str, upload: tuple[str, BinaryIO] | None,
                  errors: dict[str, str]) -> str:
    """The source as stored (``kjv``, an absolute path or a Hub id); messages into ``errors``."""
    if upload is not None:
        if Path(upload[0]).suffix.lower() not in UPLOAD_SUFFIXES:
            errors["upload"] = (f"'{upload[0]}' is not a .txt, .jsonl or .csv file; upload plain "
                                "text, JSON lines or CSV.")
        return source
    if not source:
        errors["source"] = ("Give a dataset: kjv, a .txt/.jsonl/.csv path or a Hugging Face "
                            "dataset id, or upload a file.")
    elif source.lower() == "kjv":
        return "kjv"
    elif looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_file():
            errors["source"] = f"The file '{source}' does not exist on the worker's machine."
        elif path.suffix.lower() not in UPLOAD_SUFFIXES:
            errors["source"] = f"'{source}' is not a .txt, .jsonl or .csv file."
        else:
            return str(path.resolve())
    return source


def _save_upload(filename: str, stream: BinaryIO) -> Path:
    """Copy an upload to ``uploads_dir()/<uuid>-<safe name>``; Invalid when it is empty."""
    folder = settings.uploads_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{uuid.uuid4().hex[:12]}-{_safe_filename(filename)}"
    with open(dest, "wb") as fh:
        shutil.copyfileobj(stream, fh)
    if dest.stat().st_size == 0:
        dest.unlink()
        msg = f"The uploaded file '{filename}' is empty."
        raise Invalid(msg, {"upload": msg})
    return dest


def add_dataset(
    source: str | None,
    *,
    name: str | None = None,
    context_size: int | str = 128,
    max_tokens: int | str | None = None,
    text_field: str = "text",
    upload: tuple[str, BinaryIO] | None = None,
) -> Dataset:
    """Add a corpus and enqueue its preparation (document count, tokens, samples).

    ``source``: ``kjv``, a local .txt/.jsonl/.csv path (must exist) or a Hugging Face dataset
    id; or ``upload=(filename, file object)`` of a .txt/.jsonl/.csv file, saved to
    ``uploads_dir()/<uuid>-<safe name>``. Values may be form strings. Raises Invalid with
    messages for ``source``, ``upload``, ``context_size`` (2-4096 tokens), ``max_tokens``
    (blank, or at least context_size), ``text_field``; nothing is saved then.
    """
    errors: dict[str, str] = {}
    if upload is not None and not upload[0]:
        upload = None

    ctx: int | None = None
    try:
        ctx = 128 if common.blank(context_size) else _parse_count(context_size, "Context size")
        if not 2 <= ctx <= 4096:
            errors["context_size"] = f"Context size must be between 2 and 4096 tokens (got {ctx})."
    except ValueError as exc:
        errors["context_size"] = str(exc)
    max_tok: int | None = None
    try:
        max_tok = None if common.blank(max_tokens) else _parse_count(max_tokens, "Max tokens")
        if max_tok is not None and ctx is not None and max_tok < ctx:
            errors["max_tokens"] = (f"Max tokens must be at least the context size ({ctx}), or "
                                    "blank for the whole corpus.")
    except ValueError as exc:
        errors["max_tokens"] = str(exc)
    text_field = (text_field or "").strip() or "text"
    if not re.fullmatch(r"[\w .-]{1,100}", text_field):
        errors["text_field"] = "The text field must be a column name (letters, digits, _ . -)."
    source = _check_source((source or "").strip(), upload, errors)
    if errors:
        raise Invalid("Some dataset values need fixing.", errors)

    if upload is not None:
        filename, stream = upload
        source = str(_save_upload(filename, stream))
        name = (name or "").strip() or Path(filename).name
    return common.queue_preparation(Dataset, "prepare_dataset", source=source,
                                    name=(name or "").strip() or source, context_size=ctx,
                                    max_tokens=max_tok, text_field=text_field)


def get_dataset(dataset_id: int | str) -> Dataset:
    """The dataset, or NotFound("Dataset 7 does not exist.")."""
    return common.get_row(Dataset, "Dataset", dataset_id)


def delete_dataset(dataset_id: int | str) -> None:
    """Delete a dataset (its uploaded file too) and its finished trainings.

    Conflict while one of its trainings is queued or running.
    """
    dataset = common.delete_with_trainings(Dataset, "Dataset", dataset_id)
    src = Path(dataset.source)
    if src.is_file() and src.parent == settings.uploads_dir():
        src.unlink(missing_ok=True)


def dataset_as_dict(dataset: Dataset) -> dict[str, Any]:
    """JSON-ready copy of a dataset row (``DATASET_FIELDS``)."""
    return common.row_dict(dataset, DATASET_FIELDS)
