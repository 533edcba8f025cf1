"""Models: the transformers models a user added (a bundled name, a local folder or a Hub id).

Adding one inserts a row (status ``queued``) and enqueues ``prepare_model``, which loads it once
and records its shape (layers, hidden size, hook points); it ends ``ready`` or ``failed``.
"""

from __future__ import annotations

from typing import Any

from ..db import LanguageModel
from . import common
from .errors import Invalid

MODEL_FIELDS = ("id", "name", "source", "status", "error", "progress", "message", "path",
                "architecture", "model_type", "n_layers", "hidden_dim", "vocab_size", "n_params",
                "dtype", "is_causal", "hook_points", "max_positions", "worker", "created_at",
                "updated_at")
"""The keys of ``model_as_dict`` (the JSON API); ``worker`` names the worker preparing it while
``preparing`` (null otherwise)."""
BUNDLED = ("minilm-l6", "smollm2-135m")
"""The engine's bundled model names (``worker.engine.models.BUNDLED_MODELS``, which imports
torch)."""


def list_models() -> list[LanguageModel]:
    """All models, newest first."""
    return list(LanguageModel.select().order_by(LanguageModel.id.desc()))


def ready_models() -> list[LanguageModel]:
    """The models a training can use (status ``ready``), newest first."""
    return list(LanguageModel.select().where(LanguageModel.status == "ready")
                .order_by(LanguageModel.id.desc()))


def add_model(source: str, name: str | None = None) -> LanguageModel:
    """Add a model (bundled name, local folder or Hub id) and enqueue its preparation.

    Returns the row (status ``queued``; in immediate mode already ``ready`` or ``failed``).
    A local folder must be under ``settings.allowed_roots()`` (stored resolved). Raises Invalid
    ({"source": ...}) when source is blank, too long or a folder outside those roots, and
    ({"name": ...}) when the name is too long.
    """
    source = (source or "").strip()
    name = (name or "").strip()
    errors: dict[str, str] = {}
    if not source:
        errors["source"] = ("Give a model: a bundled name (minilm-l6, smollm2-135m), a folder or "
                            "a Hub id.")
    common.check_length(source, common.MAX_SOURCE, "source", "The source", errors)
    common.check_length(name, common.MAX_NAME, "name", "The name", errors)
    if errors:
        raise Invalid(next(iter(errors.values())), errors)
    if source not in BUNDLED:
        pathlike = (source.startswith(("/", ".", "~")) or source.count("/") > 1
                    or "\\" in source)  # as the engine's models._looks_like_path
        path = common.local_path(source, pathlike=pathlike)
        name = name or source
        source = str(path) if path is not None else source
    return common.queue_preparation(LanguageModel, "prepare_model", source=source,
                                    name=name or source)


def get_model(model_id: int | str) -> LanguageModel:
    """The model, or NotFound("Model 7 does not exist.")."""
    return common.get_row(LanguageModel, "Model", model_id)


def delete_model(model_id: int | str) -> None:
    """Delete a model and its finished trainings (with their run folders).

    Conflict while one of its trainings is queued or running.
    """
    common.delete_with_trainings(LanguageModel, "Model", model_id)


def model_as_dict(model: LanguageModel) -> dict[str, Any]:
    """JSON-ready copy of a model row (``MODEL_FIELDS``)."""
    return common.row_dict(model, MODEL_FIELDS)
