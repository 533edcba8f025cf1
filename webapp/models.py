"""The Models area: add a transformers model (a background job), list, detail, delete."""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from flask.typing import ResponseReturnValue

from worker import jobs

from . import answers
from .render import posted_text

bp = Blueprint("models", __name__, url_prefix="/models")

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "bfloat16": 2, "fp16": 2, "bf16": 2,
               "float64": 8}


def model_memory(model: Any) -> int | None:
    """Estimated memory of the model's weights (parameters x bytes of its dtype)."""
    if not model.n_params:
        return None
    return int(model.n_params) * DTYPE_BYTES.get(str(model.dtype or "float32"), 4)


def _ctx(**extra: Any) -> dict[str, Any]:
    return {"models": jobs.list_models(), "values": {}, "errors": {},
            "model_memory": model_memory, **extra}


@bp.get("")
def index() -> ResponseReturnValue:
    return answers.listing("models", jobs.model_as_dict, _ctx())


@bp.post("")
def create() -> ResponseReturnValue:
    values = posted_text(("source", "name"))  # form fields or a JSON object
    try:
        model = jobs.add_model(values["source"], name=values["name"] or None)
    except jobs.Invalid as exc:
        return answers.invalid("models", exc, _ctx(values=values, errors=exc.errors))
    return answers.created("models", model, jobs.model_as_dict, _ctx(model=model))


@bp.get("/<int:model_id>")
def detail(model_id: int) -> ResponseReturnValue:
    model = jobs.get_model(model_id)
    return answers.detail("models", model, jobs.model_as_dict,
                          {"model": model, "model_memory": model_memory})


@bp.delete("/<int:model_id>")
def delete(model_id: int) -> ResponseReturnValue:
    jobs.delete_model(model_id)
    return answers.deleted("models", model_id)
