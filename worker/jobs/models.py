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
                "dtype", "is_causal", "hook_points", "created_at", "updated_at")
"""The keys of ``model_as_dict`` (the JSON API)."""


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
    Raises Invalid({"source": ...}) when source is blank.
    """
    source = (source or "").strip()
    if not source:
        msg = "Give a model: a bundled name (minilm-l6, smollm2-135m), a folder or a Hub id."
        raise Invalid(msg, {"source": msg})
    return common.queue_preparation(LanguageModel, "prepare_model", source=source,
                                    name=(name or "").strip() or source)


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
