"""The Datasets area: add a corpus (Hub id, path, bundled kjv or an upload), list, detail,
delete. Preparation is a background job; rows poll themselves while it runs."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request
from flask.typing import ResponseReturnValue

from worker import jobs
from worker.jobs import datasets as dataset_jobs

from . import answers
from .render import posted_text

bp = Blueprint("datasets", __name__, url_prefix="/datasets")

FIELDS = ("source", "name", "context_size", "max_tokens", "text_field")


def _ctx(**extra: Any) -> dict[str, Any]:
    """The page's context: the list, the form's values and errors, and ``fields`` (the engine
    options' labels and help with the bounds the job layer checks: one source for both)."""
    return {"datasets": jobs.list_datasets(), "values": {"context_size": "128",
                                                         "text_field": "text"},
            "errors": {}, "fields": dataset_jobs.form_fields(), **extra}


@bp.get("")
def index() -> ResponseReturnValue:
    return answers.listing("datasets", jobs.dataset_as_dict, _ctx())


@bp.post("")
def create() -> ResponseReturnValue:
    values = posted_text(FIELDS)  # form fields or a JSON object (an upload: multipart only)
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
        if "upload" in errors:  # the form's field for an upload is "file"
            errors.setdefault("file", errors["upload"])
        return answers.invalid("datasets", exc, _ctx(values=values, errors=errors))
    return answers.created("datasets", dataset, jobs.dataset_as_dict, _ctx(dataset=dataset))


@bp.get("/<int:dataset_id>")
def detail(dataset_id: int) -> ResponseReturnValue:
    dataset = jobs.get_dataset(dataset_id)
    return answers.detail("datasets", dataset, jobs.dataset_as_dict,
                          {"dataset": dataset, "fields": dataset_jobs.form_fields(),
                           "tokenised_with": dataset_jobs.tokenisations(dataset)})


@bp.delete("/<int:dataset_id>")
def delete(dataset_id: int) -> ResponseReturnValue:
    jobs.delete_dataset(dataset_id)
    return answers.deleted("datasets", dataset_id)
