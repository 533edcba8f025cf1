"""The Models area: add a transformers model (a background job), list, detail, delete."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from worker import jobs

from .render import is_fragment_request, json_response, page_or_fragment, wants_json

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
    if wants_json():
        return json_response({"items": [jobs.model_as_dict(m) for m in jobs.list_models()]})
    return page_or_fragment("models/index.html", "models/_list.html", **_ctx())


@bp.post("")
def create() -> ResponseReturnValue:
    values = {"source": request.form.get("source", ""), "name": request.form.get("name", "")}
    try:
        model = jobs.add_model(values["source"], name=values["name"] or None)
    except jobs.Invalid as exc:
        if wants_json():
            return json_response({"error": str(exc), "errors": exc.errors}, 422)
        ctx = _ctx(values=values, errors=exc.errors)
        if is_fragment_request():
            return render_template("models/_form.html", **ctx), 422
        return render_template("models/index.html", **ctx), 422
    if wants_json():
        return json_response(jobs.model_as_dict(model), 201)
    if is_fragment_request():
        # The fresh form, plus the new row at the top of the list (out of band).
        return render_template("models/_created.html", model=model, **_ctx()), 201
    return redirect(url_for("models.index"))


@bp.get("/<int:model_id>")
def detail(model_id: int) -> ResponseReturnValue:
    model = jobs.get_model(model_id)
    if wants_json():
        return json_response(jobs.model_as_dict(model))
    return page_or_fragment("models/detail.html", "models/_row.html", model=model,
                            model_memory=model_memory)


@bp.delete("/<int:model_id>")
def delete(model_id: int) -> ResponseReturnValue:
    jobs.delete_model(model_id)
    if wants_json():
        return json_response({"deleted": model_id})
    if is_fragment_request():
        return ""
    return redirect(url_for("models.index"))
