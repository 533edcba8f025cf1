"""The SAE report of a finished training, its latent browser and the latents' labels.

- ``GET /trainings/<id>/report``: the evaluation numbers (ours and SAEBench's core metrics), the
  latent density histogram and a paginated, sortable table of the latents with a search.
  Query arguments ``page``, ``per_page`` (1-500, default 50), ``sort`` (frequency, max_act,
  mean_act, id; ``match`` with a token search), ``order`` (desc, asc), ``by`` (id, label,
  token) and ``q`` (by id: a latent id, the table jumps to the page holding it; by label: a
  label substring; by token: a token's text). An htmx request returns the table fragment only
  (``#latents-table``); JSON clients get the report with the requested page of latents under
  ``latents``; ``?format=saebench`` answers the report in SAEBench's core-eval output schema.
- ``GET /trainings/<id>/latents/<n>``: one latent, its numbers, activation histogram, top and
  quantile contexts, logits, neighbours, label, the "try it" box (and steering for a causal
  LM). The table's ``sort``, ``order``, ``by``, ``q`` and ``per_page`` ride along in the URL so
  prev/next (and the ``j``/``k`` keys, static/latents.js) follow the table's order and filter.
- ``PUT`` / ``POST /trainings/<id>/latents/<n>/label``: set ``label`` and ``notes`` (form fields
  or JSON; one left out stays). Answers the label state as JSON, the label fragment for htmx
  (with the page heading and title swapped out of band), or (a plain form) back to the page.

The files are read by ``worker.jobs.reports`` (the worker's eval folder); no torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from worker import jobs
from worker.jobs import latent_labels, reports

from . import error_response
from .render import (
    activation_histogram_svg,
    fmt_sci,
    histogram_svg,
    is_fragment_request,
    json_response,
    wants_json,
)
from .render import posted as posted_fields

bp = Blueprint("reports", __name__)

TABLE_ARGS = ("page", "per_page", "sort", "order", "q", "by")
VIEW_ARGS = ("sort", "order", "by", "q", "per_page")
"""What a latent page's URL carries of the table it was opened from."""
TOKEN_MARKS = {"\n": "↵", "\r": "␍", "\t": "⇥"}
SORT_LABELS = {"id": "Latent", "frequency": "Frequency", "max_act": "Max act",
               "mean_act": "Mean act", "match": "Match"}
SEARCH_LABELS = {"id": "Latent id", "label": "Label", "token": "Token"}
SEARCH_HINTS = {"id": "id, 0–{last}", "label": "text in a label", "token": "a token, e.g. ␣the"}


def _missing(exc: reports.NoReport) -> ResponseReturnValue:
    if wants_json() or is_fragment_request():
        return error_response(exc)
    return render_template("reports/missing.html", t=exc.training, message=str(exc)), 404


def _table_args() -> dict[str, Any]:
    """The table's arguments. The search form sends the current sort as ``keep_sort`` /
    ``keep_order``: kept for a search by id or label, dropped for a token search (which starts
    in its own order, by match)."""
    args = {k: request.args[k] for k in TABLE_ARGS if request.args.get(k, "") != ""}
    if "sort" not in args and args.get("by") != "token":
        for key in ("sort", "order"):
            if request.args.get(f"keep_{key}"):
                args[key] = request.args[f"keep_{key}"]
    return args


SEARCH_FIELDS = ("by", "q")
"""The search form's own fields: their errors show beside it; the others (``page``,
``per_page``, ``sort``, ``order``: from a link or a typed URL) show above the table."""


def _page_with_fallback(t: Any, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The requested page, or (for the HTML views) the closest valid one plus the errors: one
    per bad argument, each left out in turn. A bad table argument gets the sentence that names
    it ("page must be a whole number, not “abc”."), as JSON clients do."""
    errors: dict[str, str] = {}
    for _ in TABLE_ARGS:
        kept = {k: v for k, v in args.items() if k not in errors and not (errors and k == "q")}
        try:
            return reports.latents_page(t, **kept), errors
        except jobs.Invalid as exc:
            found = {k: v if k in SEARCH_FIELDS else str(exc) for k, v in exc.errors.items()}
            errors.update(found or {"q": str(exc)})
    return reports.latents_page(t), errors


def view_params(page: Mapping[str, Any]) -> dict[str, Any]:
    """The table's view (sort, order, search by label or token, page size) as URL arguments
    for a latent page; defaults left out. A search by id is a jump, not a filter: not kept."""
    out: dict[str, Any] = {"sort": page["sort"], "order": page["order"]}
    if page.get("by") in ("label", "token") and page.get("q") is not None:
        out.update(by=page["by"], q=page["q"])
    elif page.get("by") == "label":
        out["by"] = "label"
    if page.get("per_page", 50) != 50:
        out["per_page"] = page["per_page"]
    return out


def _table_ctx(t: Any, page: dict[str, Any], errors: dict[str, str], q: str = ""
               ) -> dict[str, Any]:
    base = {"sort": page["sort"], "order": page["order"]}
    if page["per_page"] != 50:
        base["per_page"] = page["per_page"]
    if page["by"] != "id":
        base["by"] = page["by"]
        if page["q"] is not None:
            base["q"] = page["q"]
    view = view_params(page)

    def table_url(**kw: Any) -> str:
        params = {**base, **kw}
        return url_for("reports.report", training_id=t.id,
                       **{k: v for k, v in params.items() if v not in (None, "")})

    def sort_url(key: str) -> str:
        if key == page["sort"]:
            order = "asc" if page["order"] == "desc" else "desc"
        else:
            order = "asc" if key == "id" else "desc"
        q = page["q"] if page["by"] == "id" else base.get("q")
        return table_url(sort=key, order=order, q=q)

    def latent_url(n: int) -> str:
        return url_for("reports.latent_page", training_id=t.id, n=n, **view)

    last = max(0, page["total"] - 1)
    return {"t": t, "latents": page, "errors": errors, "q": q or (page["q"] or ""),
            "table_url": table_url, "sort_url": sort_url, "latent_url": latent_url,
            "search_fields": SEARCH_FIELDS,
            "sort_labels": SORT_LABELS, "search_labels": SEARCH_LABELS,
            "search_hint": SEARCH_HINTS[page["by"]].format(last=last)}


@bp.get("/trainings/<int:training_id>/report")
def report(training_id: int) -> ResponseReturnValue:
    t = jobs.get_training(training_id)
    try:
        data = reports.require_report(t)
    except reports.NoReport as exc:
        return _missing(exc)
    if request.args.get("format") == "saebench":
        return json_response(reports.saebench(t))
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


@bp.app_template_filter("token")
def display_token(text: str) -> str:
    """Whitespace made visible: newlines as ↵, tabs as ⇥ (spaces stay, shown with pre-wrap)."""
    return "".join(TOKEN_MARKS.get(ch, ch) for ch in text) or "∅"


def shade(contexts: list[dict[str, Any]], top: float) -> list[dict[str, Any]]:
    """Contexts for display: each token with ``shown`` text, ``alpha`` (its activation over
    ``top``, 0-1, three decimals) and ``center`` (the activating token)."""
    out = []
    for c in contexts:
        tokens = []
        for i, tok in enumerate(c["tokens"]):
            act = tok.get("act") or 0.0
            alpha = min(1.0, max(0.0, act / top)) if top > 0 else 0.0
            tokens.append({**tok, "shown": display_token(tok["text"]),
                           "alpha": round(alpha, 3), "center": i == c["center"]})
        out.append({**c, "tokens": tokens})
    return out


def shading_top(data: dict[str, Any]) -> float:
    """The latent's shading scale: its max activation (else its best context's)."""
    top = data.get("max_act") or 0.0
    if top <= 0:
        top = max((c.get("activation") or 0.0 for c in data["contexts"]), default=0.0)
    return top


def shaded_contexts(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The latent's top contexts for display (``shade`` on its max activation)."""
    return shade(data["contexts"], shading_top(data))


def _view_args() -> dict[str, str]:
    return {k: request.args[k] for k in VIEW_ARGS if request.args.get(k, "") != ""}


def _label_ctx(t: Any, data: dict[str, Any], errors: dict[str, str] | None = None,
               saved: bool = False, posted: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"t": t, "latent": data, "label_errors": errors or {}, "label_saved": saved,
            "label_posted": posted,
            "label_url": url_for("reports.label", training_id=t.id, n=data["id"]),
            "label_max": latent_labels.LABEL_MAX, "notes_max": latent_labels.NOTES_MAX}


@bp.get("/trainings/<int:training_id>/latents/<int:n>")
def latent_page(training_id: int, n: int) -> ResponseReturnValue:
    t = jobs.get_training(training_id)
    try:
        data = reports.latent(t, n)
    except reports.NoReport as exc:
        return _missing(exc)
    if wants_json():
        return json_response(data)
    args = _view_args()
    nav = reports.latent_nav(t, n, sort=args.get("sort"), order=args.get("order"),
                             by=args.get("by"), q=args.get("q"))
    carry = {k: v for k, v in args.items() if k in VIEW_ARGS}
    if not nav["filtered"]:
        carry.pop("by", None)
        carry.pop("q", None)
    r = reports.report(t) or {}
    back = {**carry}
    if "q" not in back:
        back["q"] = n
    top = shading_top(data)
    quantiles = [{**g, "contexts": shade(g["contexts"], top)} for g in data["quantiles"]] \
        if data["quantiles"] is not None else None
    hist = data["histogram"]
    hist_svg = activation_histogram_svg(
        hist["edges"], hist["counts"], chart_id=f"latent-{n}-histogram",
        label=f"Latent {n}: its non-zero activations on the held-out tokens") \
        if hist is not None else None

    def latent_url(m: int) -> str:
        return url_for("reports.latent_page", training_id=t.id, n=m, **carry)

    return render_template(
        "reports/latent.html", r=r, contexts=shaded_contexts(data), quantiles=quantiles,
        activation_histogram=hist_svg, nav=nav, latent_url=latent_url,
        report_url=url_for("reports.report", training_id=t.id, **back),
        prev_url=latent_url(nav["prev"]) if nav["prev"] is not None else None,
        next_url=latent_url(nav["next"]) if nav["next"] is not None else None,
        **_label_ctx(t, data))


@bp.put("/trainings/<int:training_id>/latents/<int:n>/label")
@bp.post("/trainings/<int:training_id>/latents/<int:n>/label")
def label(training_id: int, n: int) -> ResponseReturnValue:
    """Set a latent's ``label`` (at most 200 characters, one line) and ``notes`` (at most
    5,000): form fields or a JSON object, either may be left out (blank clears; both blank
    removes the label). JSON answer ``{"training_id", "latent", "label", "notes",
    "auto_label"}``; htmx: the label editor fragment (on 422 with the errors beside the
    fields); a plain form goes back to the latent page. 422 ``{"error", "errors": {"label",
    "notes"}}`` for bad values, 404 for an unknown training or latent."""
    t = jobs.get_training(training_id)
    fragment = is_fragment_request()
    as_json = not fragment and (wants_json() or request.is_json)
    try:
        posted = posted_fields()
        changes = {k: posted.get(k) for k in ("label", "notes") if k in posted}
        state = reports.set_latent_label(t, n, **changes)
    except reports.NoReport as exc:
        return _missing(exc)
    except jobs.JobError as exc:
        if as_json:
            body: dict[str, Any] = {"error": str(exc)}
            if exc.errors:
                body["errors"] = exc.errors
            return json_response(body, exc.status)
        if not fragment or not isinstance(exc, jobs.Invalid):
            raise
        ctx = _label_ctx(t, reports.latent(t, n), exc.errors, posted=posted)
        return render_template("reports/_label.html", oob=False, **ctx), 422
    if as_json:
        return json_response(state)
    if fragment:
        ctx = _label_ctx(t, reports.latent(t, n), saved=True)
        return render_template("reports/_label.html", oob=True, **ctx)
    return redirect(url_for("reports.latent_page", training_id=t.id, n=n) + "#latent-label",
                    303)
