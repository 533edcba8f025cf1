"""The SAE report of a finished training and its latent browser.

- ``GET /trainings/<id>/report``: the evaluation numbers, the latent density histogram and a
  paginated, sortable table of the latents with a search by latent id. Query arguments
  ``page``, ``per_page`` (1-500, default 50), ``sort`` (frequency, max_act, mean_act, id),
  ``order`` (desc, asc) and ``q`` (a latent id: the table jumps to the page holding it). An
  htmx request returns the table fragment only (``#latents-table``); JSON clients get the
  report with the requested page of latents under ``latents``.
- ``GET /trainings/<id>/latents/<n>``: one latent, its numbers and top activating contexts.

The files are read by ``worker.jobs.reports`` (the worker's eval folder); no torch here.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template, request, url_for
from flask.typing import ResponseReturnValue

from worker import jobs
from worker.jobs import reports

from . import error_response
from .render import fmt_sci, histogram_svg, is_fragment_request, json_response, wants_json

bp = Blueprint("reports", __name__)

TABLE_ARGS = ("page", "per_page", "sort", "order", "q")
TOKEN_MARKS = {"\n": "↵", "\r": "␍", "\t": "⇥"}
SORT_LABELS = {"id": "Latent", "frequency": "Frequency", "max_act": "Max act",
               "mean_act": "Mean act"}


def _missing(exc: reports.NoReport) -> ResponseReturnValue:
    if wants_json() or is_fragment_request():
        return error_response(exc)
    return render_template("reports/missing.html", t=exc.training, message=str(exc)), 404


def _table_args() -> dict[str, Any]:
    args = {k: request.args[k] for k in TABLE_ARGS if request.args.get(k, "") != ""}
    return args


def _page_with_fallback(t: Any, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The requested page, or (for the HTML views) the closest valid one plus the errors."""
    try:
        return reports.latents_page(t, **args), {}
    except jobs.Invalid as exc:
        errors = dict(exc.errors) or {"q": str(exc)}
    kept = {k: v for k, v in args.items() if k not in errors and k != "q"}
    try:
        return reports.latents_page(t, **kept), errors
    except jobs.Invalid:
        return reports.latents_page(t), errors


def _table_ctx(t: Any, page: dict[str, Any], errors: dict[str, str], q: str = ""
               ) -> dict[str, Any]:
    base = {"sort": page["sort"], "order": page["order"]}
    if page["per_page"] != 50:
        base["per_page"] = page["per_page"]

    def table_url(**kw: Any) -> str:
        params = {**base, **kw}
        return url_for("reports.report", training_id=t.id,
                       **{k: v for k, v in params.items() if v not in (None, "")})

    def sort_url(key: str) -> str:
        if key == page["sort"]:
            order = "asc" if page["order"] == "desc" else "desc"
        else:
            order = "asc" if key == "id" else "desc"
        return table_url(sort=key, order=order, q=page["q"])

    def latent_url(n: int) -> str:
        return url_for("reports.latent_page", training_id=t.id, n=n, **base)

    return {"t": t, "latents": page, "errors": errors, "q": q or (page["q"] or ""),
            "table_url": table_url, "sort_url": sort_url, "latent_url": latent_url,
            "sort_labels": SORT_LABELS}


@bp.get("/trainings/<int:training_id>/report")
def report(training_id: int) -> ResponseReturnValue:
    t = jobs.get_training(training_id)
    try:
        data = reports.require_report(t)
    except reports.NoReport as exc:
        return _missing(exc)
    args = _table_args()
    if wants_json():
        return json_response({**data, "latents": reports.latents_page(t, **args)})
    page, errors = _page_with_fallback(t, args)
    status = 422 if errors else 200
    ctx = _table_ctx(t, page, errors, args.get("q", ""))
    if is_fragment_request():
        return render_template("reports/_latents.html", **ctx), status
    hist = data.get("histogram") or {}
    svg = histogram_svg(hist.get("edges") or [], hist.get("counts") or [],
                        chart_id=f"training-{t.id}-density",
                        label="Latent density: log10 firing frequency of the alive latents")
    return render_template("reports/report.html", r=data, histogram=svg,
                           finished=t.status in ("completed", "stopped"), **ctx), status


@bp.app_template_filter("freq")
def fmt_frequency(value: Any) -> str:
    """Firing fractions: 0.939, 0.0123, 4.56e-5 (3 significant digits), 0 for dead."""
    if value is None:
        return "—"
    v = float(value)
    if v == 0:
        return "0"
    return f"{v:.3g}" if v >= 1e-3 else fmt_sci(v)


def display_token(text: str) -> str:
    """Whitespace made visible: newlines as ↵, tabs as ⇥ (spaces stay, shown with pre-wrap)."""
    return "".join(TOKEN_MARKS.get(ch, ch) for ch in text) or "∅"


def shaded_contexts(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The latent's contexts for display: each token with ``shown`` text and ``alpha`` (its
    activation over the latent's max act, 0-1, three decimals)."""
    top = data.get("max_act") or 0.0
    if top <= 0:
        top = max((c.get("activation") or 0.0 for c in data["contexts"]), default=0.0)
    out = []
    for c in data["contexts"]:
        tokens = []
        for i, tok in enumerate(c["tokens"]):
            act = tok.get("act") or 0.0
            alpha = min(1.0, max(0.0, act / top)) if top > 0 else 0.0
            tokens.append({**tok, "shown": display_token(tok["text"]),
                           "alpha": round(alpha, 3), "center": i == c["center"]})
        out.append({**c, "tokens": tokens})
    return out


@bp.get("/trainings/<int:training_id>/latents/<int:n>")
def latent_page(training_id: int, n: int) -> ResponseReturnValue:
    t = jobs.get_training(training_id)
    try:
        data = reports.latent(t, n)
    except reports.NoReport as exc:
        return _missing(exc)
    if wants_json():
        return json_response(data)
    back = {k: request.args[k] for k in ("sort", "order", "per_page")
            if request.args.get(k)}
    if back.get("sort") not in reports.SORTS or back.get("order") not in reports.ORDERS:
        back = {}
    r = reports.report(t) or {}
    return render_template(
        "reports/latent.html", t=t, r=r, latent=data, contexts=shaded_contexts(data),
        report_url=url_for("reports.report", training_id=t.id, q=n, **back),
        prev_url=url_for("reports.latent_page", training_id=t.id, n=n - 1, **back)
        if n > 0 else None,
        next_url=url_for("reports.latent_page", training_id=t.id, n=n + 1, **back)
        if n + 1 < data["d_sae"] else None)
