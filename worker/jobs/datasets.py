"""Datasets: the corpora a user added (``kjv``, a .txt/.jsonl/.csv path, an upload or a Hugging
Face dataset id).

Adding one validates its values, inserts a row (status ``queued``) and enqueues
``prepare_dataset``, which counts documents and tokens and keeps a few samples; it ends
``ready`` or ``failed``.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from .. import settings
from ..db import Dataset, LanguageModel
from ..engine.config import check_value, option, parse_value, range_text
from ..engine.documents import looks_like_path
from . import common
from .errors import Invalid

DATASET_FIELDS = ("id", "name", "source", "status", "error", "progress", "message",
                  "context_size", "max_tokens", "text_field", "n_documents",
                  "n_documents_tokenised", "n_tokens", "tokenised_with", "samples", "worker",
                  "created_at", "updated_at")
"""The keys of ``dataset_as_dict`` (the JSON API); ``worker`` names the worker preparing it while
``preparing`` (null otherwise). ``n_documents`` counts the whole corpus's documents;
``n_documents_tokenised`` and ``n_tokens`` what its token store holds (null until tokenised;
``max_tokens`` may stop the store before the corpus ends): the store its preparation built, with
the newest ready model then. ``tokenised_with`` lists every token store of it in this data
folder, one per model's tokenizer (``tokenisations``)."""
UPLOAD_SUFFIXES = (".txt", ".jsonl", ".csv")
FORM_OPTIONS = ("context_size", "max_tokens", "text_field")
"""The engine options a dataset row holds: the add form's fields, labelled and checked as the
options registry says (``form_fields``, ``_count``)."""
MAX_TOKENS_RULE = "at least the context size"
"""The dataset's own bound on ``max_tokens`` (the token store keeps whole contexts), stricter
than the option's minimum (1)."""


def list_datasets() -> list[Dataset]:
    """All datasets, newest first."""
    return list(Dataset.select().order_by(Dataset.id.desc()))


def ready_datasets() -> list[Dataset]:
    """The datasets a training can use (status ``ready``), newest first."""
    return list(Dataset.select().where(Dataset.status == "ready").order_by(Dataset.id.desc()))


def _safe_filename(filename: str) -> str:
    """The upload's name as saved: ASCII letters, digits, ``._-`` (others become ``_``), at
    most 80 characters, its suffix (checked before: .txt, .jsonl or .csv) kept whatever the
    rest becomes, so the preparation reads it as what it is."""
    base = Path(filename.replace("\\", "/")).name
    suffix = Path(base).suffix.lower()
    stem = base[:-len(suffix)] if suffix else base
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80 - len(suffix)]
    return (stem or "upload") + suffix


def form_fields() -> dict[str, dict[str, str]]:
    """The add form's ``{"label", "help"}`` per option of ``FORM_OPTIONS``: the option's label
    (the name its errors use) and help, with the bounds ``add_dataset`` checks: the option's
    min and max for ``context_size`` ("Between 2 and 131,072 tokens."), ``MAX_TOKENS_RULE``
    for ``max_tokens``."""
    out = {}
    for name in FORM_OPTIONS:
        info = option(name)
        bounds = MAX_TOKENS_RULE if name == "max_tokens" else range_text(info)
        if bounds and info.unit and name != "max_tokens":
            bounds += f" {info.unit}"
        help_text = f"{info.help} {bounds[:1].upper()}{bounds[1:]}." if bounds else info.help
        out[name] = {"label": info.label, "help": help_text}
    return out


def _count(name: str, raw: Any, default: int | None, errors: dict[str, str]) -> int | None:
    """The engine option ``name`` (context_size, max_tokens) from a form value, parsed and
    checked against its bounds (blank: ``default``); its message into ``errors`` when bad."""
    if common.blank(raw):
        return default
    info = option(name)
    try:
        value = parse_value(info, raw)
    except ValueError as exc:
        errors[name] = str(exc)
        return None
    problem = check_value(info, value)
    if problem:
        errors[name] = problem
        return None
    return value


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
    else:
        try:
            path = common.local_path(source, pathlike=looks_like_path(source))
        except Invalid as exc:
            errors.update(exc.errors)
            return source
        if path is None:
            return source
        if not path.is_file():
            errors["source"] = f"The file '{source}' does not exist in an allowed folder."
        elif path.suffix.lower() not in UPLOAD_SUFFIXES:
            errors["source"] = f"'{source}' is not a .txt, .jsonl or .csv file."
        else:
            return str(path)
    return source


def _save_upload(filename: str, stream: BinaryIO) -> Path:
    """Copy an upload to ``uploads_dir()/<uuid>-<safe name>``; Invalid when it is empty."""
    folder = settings.uploads_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # made here: its owner's alone
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
    messages for ``source``, ``upload``, ``context_size`` (the option's bounds: 2-131,072
    tokens), ``max_tokens`` (blank, or at least context_size), ``text_field``, each naming the
    option by its label (the form's, ``form_fields``); nothing is saved then.
    """
    errors: dict[str, str] = {}
    if upload is not None and not upload[0]:
        upload = None

    ctx = _count("context_size", context_size, 128, errors)
    max_tok = _count("max_tokens", max_tokens, None, errors)
    if max_tok is not None and ctx is not None and max_tok < ctx:
        errors["max_tokens"] = (f"{option('max_tokens').label} must be {MAX_TOKENS_RULE} "
                                f"({ctx:,}; got {max_tok:,}), or blank for the whole corpus.")
    text_field = (text_field or "").strip() or "text"
    if not re.fullmatch(r"[\w .-]{1,100}", text_field):
        errors["text_field"] = "The text field must be a column name (letters, digits, _ . -)."
    source = (source or "").strip()
    name = (name or "").strip()
    common.check_length(name, common.MAX_NAME, "name", "The name", errors)
    common.check_length(source, common.MAX_SOURCE, "source", "The source", errors)
    if "source" not in errors:
        source = _check_source(source, upload, errors)
    if errors:
        raise Invalid("Some dataset values need fixing.", errors)

    if upload is not None:
        filename, stream = upload
        source = str(_save_upload(filename, stream))
        name = name or Path(filename).name[:common.MAX_NAME]
    return common.queue_preparation(Dataset, "prepare_dataset", source=source,
                                    name=name or source, context_size=ctx,
                                    max_tokens=max_tok, text_field=text_field)


def get_dataset(dataset_id: int | str) -> Dataset:
    """The dataset, or NotFound("Dataset 7 does not exist.")."""
    return common.get_row(Dataset, "Dataset", dataset_id)


def delete_dataset(dataset_id: int | str) -> None:
    """Delete a dataset, its finished trainings, its uploaded file and its token stores (unless
    another dataset has the same source).

    Conflict while one of its trainings is queued or running.
    """
    dataset = common.delete_with_trainings(Dataset, "Dataset", dataset_id)
    if Dataset.select().where(Dataset.source == dataset.source).exists():
        return
    for store in token_stores(dataset.source):
        common.remove_tree(store)
    upload = Path(dataset.source)
    if upload.parent == settings.uploads_dir():
        upload.unlink(missing_ok=True)


def token_stores(source: str) -> list[Path]:
    """The token stores under ``settings.tokens_dir()`` built from ``source`` (their
    ``meta.json`` names it), whatever tokenizer and context size."""
    found = []
    for meta in settings.tokens_dir().glob("*/meta.json"):
        try:
            built_from = json.loads(meta.read_text(encoding="utf-8")).get("source")
        except (OSError, ValueError, AttributeError):
            continue
        if built_from == source:
            found.append(meta.parent)
    return found


def tokenisations(dataset: Dataset) -> list[dict[str, Any]]:
    """Every model ``dataset`` was tokenised with, as the token stores in this data folder
    record it (a store's ``meta.json`` names its source, tokenizer and counts; the database keeps
    one count per dataset, the store its preparation built): ``{"model_id", "model",
    "n_tokens", "n_documents"}`` per store with the dataset's source, context size, corpus
    tokens and text field, oldest first. ``model`` is the name of the model whose folder the
    tokenizer was loaded from (``model_id`` its id), else that folder's name (``model_id``
    null). A worker with its own data folder keeps its stores there, so they are not listed."""
    metas = []
    for store in token_stores(dataset.source):
        try:
            meta = json.loads((store / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or (
                meta.get("context_size"), meta.get("max_tokens"), meta.get("text_field")) != (
                dataset.context_size, dataset.max_tokens, dataset.text_field):
            continue
        metas.append(meta)
    if not metas:
        return []
    models: dict[str, LanguageModel] = {}
    for model in LanguageModel.select().where(LanguageModel.path.is_null(False)) \
            .order_by(LanguageModel.id.desc()):
        models[model.path] = model  # the oldest row of a folder added twice names it
    out = []
    for meta in sorted(metas, key=lambda m: str(m.get("created_at") or "")):
        tokenizer = str(meta.get("tokenizer") or "")
        model = models.get(tokenizer)
        out.append({"model_id": model.id if model else None,
                    "model": model.name if model else (Path(tokenizer).name or tokenizer),
                    "n_tokens": meta.get("n_tokens"), "n_documents": meta.get("n_documents")})
    return out


def dataset_as_dict(dataset: Dataset) -> dict[str, Any]:
    """JSON-ready copy of a dataset row (``DATASET_FIELDS``; ``tokenised_with`` from
    ``tokenisations``)."""
    row = common.row_dict(dataset, tuple(f for f in DATASET_FIELDS if f != "tokenised_with"))
    return {f: tokenisations(dataset) if f == "tokenised_with" else row[f]
            for f in DATASET_FIELDS}
