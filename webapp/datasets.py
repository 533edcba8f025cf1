"""The Datasets area: add a corpus (Hub id, path, bundled kjv or an upload), list, detail,
delete. Preparation is a background job; rows poll themselves while it runs."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from worker import jobs

from .render import is_fragment_request, json_response, page_or_fragment, wants_json

bp = Blueprint("datasets", __name__, url_prefix="/datasets")

FIELDS = ("source", "name", "context_size", "max_tokens", "text_field")


def _ctx(**extra: Any) -> dict[str, Any]:
    return {"datasets": jobs.list_datasets(), "values": {"context_size": "128",
                                                         "text_field": "text"},
            "errors": {}, **extra}


@bp.get("")
def index() -> ResponseReturnValue:
    if wants_json():
        return json_response({"items": [jobs.dataset_as_dict(d)
                                        for d in jobs.list_datasets()]})
    return page_or_fragment("datasets/index.html", "datasets/_list.html", **_ctx())


@bp.post("")
def create() -> ResponseReturnValue:
    values = {f: request.form.get(f, "") for f in FIELDS}
    upload = request.files.get("file")
    try:
        dataset = jobs.add_dataset(
            values["source"], name=values["name"] or None,
            context_size=values["context_size"] or 128,
            max_tokens=values["max_tokens"] or None,
            text_field=values["text_field"] or "text",
            upload=(upload.filename, upload.stream) if upload and upload.filename else None)
    except jobs.Invalid as exc:
        errors = dict(exc.errors)
        if "upload" in errors:
            errors.setdefault("file", errors["upload"])
        if wants_json():
            return json_response({"error": str(exc), "errors": errors}, 422)
        ctx = _ctx(values=values, errors=errors)
        if is_fragment_request():
            return render_template("datasets/_form.html", **ctx), 422
        return render_template("datasets/index.html", **ctx), 422
    if wants_json():
        return json_response(jobs.dataset_as_dict(dataset), 201)
    if is_fragment_request():
        return render_template("datasets/_created.html", dataset=dataset, **_ctx()), 201
    return redirect(url_for("datasets.index"))


@bp.get("/<int:dataset_id>")
def detail(dataset_id: int) -> ResponseReturnValue:
    dataset = jobs.get_dataset(dataset_id)
    if wants_json():
        return json_response(jobs.dataset_as_dict(dataset))
    return page_or_fragment("datasets/detail.html", "datasets/_row.html", dataset=dataset)


@bp.delete("/<int:dataset_id>")
def delete(dataset_id: int) -> ResponseReturnValue:
    jobs.delete_dataset(dataset_id)
    if wants_json():
        return json_response({"deleted": dataset_id})
    if is_fragment_request():
        return ""
    return redirect(url_for("datasets.index"))
