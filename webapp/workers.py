"""The Workers page: every worker sharing this database (its host, data folder, device, slots
and the trainings it runs), live or heard from in the last day; as JSON for scripts."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from worker import jobs

from .render import json_response, page_or_fragment, wants_json

bp = Blueprint("workers", __name__, url_prefix="/workers")

REFRESH_S = 3
"""Seconds between the page's refreshes of its list (htmx)."""


@bp.get("")
def index() -> ResponseReturnValue:
    """``{"items": [worker...], "hidden", "alive", "dead_after_s"}`` as JSON
    (``jobs.workers_overview``), else the list (htmx) or the page."""
    overview = jobs.workers_overview()
    if wants_json():
        return json_response(overview)
    return page_or_fragment("workers/index.html", "workers/_list.html", overview=overview,
                            refresh_s=REFRESH_S)
