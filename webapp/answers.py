"""The answers the Models, Datasets and Trainings areas give: one outcome as JSON, as an htmx
fragment or as the whole page (or a redirect to it).

``area`` is both the blueprint's name and the template folder (``models``, ``datasets``,
``trainings``); a route's context holds the area's items under that same name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import redirect, render_template, url_for
from flask.typing import ResponseReturnValue

from worker import jobs

from .render import is_fragment_request, json_response, page_or_fragment, wants_json

AsDict = Callable[[Any], dict[str, Any]]


def listing(area: str, as_dict: AsDict, ctx: dict[str, Any]) -> ResponseReturnValue:
    """``{"items": [...]}`` as JSON, else the list (htmx) or the area's page."""
    if wants_json():
        return json_response({"items": [as_dict(item) for item in ctx[area]]})
    return page_or_fragment(f"{area}/index.html", f"{area}/_list.html", **ctx)


def invalid(area: str, exc: jobs.Invalid, ctx: dict[str, Any]) -> ResponseReturnValue:
    """422 for a form that did not validate: ``{"error", "errors"}`` as JSON, else the form
    (htmx) or the area's page, with ``ctx["errors"]`` shown beside the fields."""
    if wants_json():
        return json_response({"error": str(exc), "errors": ctx["errors"]}, 422)
    return page_or_fragment(f"{area}/index.html", f"{area}/_form.html", 422, **ctx)


def created(area: str, item: Any, as_dict: AsDict, ctx: dict[str, Any]) -> ResponseReturnValue:
    """201 with the new item as JSON; for htmx the fresh form plus the new row at the top of
    the list (out of band, ``_created.html``); else a redirect to the area's page."""
    if wants_json():
        return json_response(as_dict(item), 201)
    if is_fragment_request():
        return render_template(f"{area}/_created.html", **ctx), 201
    return redirect(url_for(f"{area}.index"))


def detail(area: str, item: Any, as_dict: AsDict, ctx: dict[str, Any]) -> ResponseReturnValue:
    """The item as JSON, else its row (htmx: a preparing row polls itself) or its page."""
    if wants_json():
        return json_response(as_dict(item))
    return page_or_fragment(f"{area}/detail.html", f"{area}/_row.html", **ctx)


def deleted(area: str, item_id: int) -> ResponseReturnValue:
    """``{"deleted": id}`` as JSON, nothing for htmx (the row swaps itself out), else a
    redirect to the area's page."""
    if wants_json():
        return json_response({"deleted": item_id})
    if is_fragment_request():
        return ""
    return redirect(url_for(f"{area}.index"))
