"""The comparison page: ``GET /compare?ids=1,2,3`` puts trainings (live or finished) side by
side: their curves over tokens, a sortable table of final figures and the L0 Pareto charts.

The data is ``jobs.compare_trainings`` (JSON answers it as is, plus each run's ``url`` and
``report_url``); this module only picks the charts' series and the table's sort links. A page
with a live run re-fetches its body every 5 s (``compare/_body.html``, the htmx fragment).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template, request, url_for
from flask.typing import ResponseReturnValue

from worker import jobs
from worker.jobs.compare import DESC_FIRST

from .render import (
    json_response,
    multi_line_chart,
    page_or_fragment,
    pareto_chart,
    series_color,
    series_dash,
    wants_json,
)

bp = Blueprint("compare", __name__)

CURVE_CHARTS = (
    # (key, title, y axis label, log y, digits)
    ("loss", "Loss (training batches)", "loss", True, 4),
    ("fvu", "FVU (fraction of variance unexplained)", "FVU", True, 4),
    ("l0", "L0 (active latents per token)", "latents / token", False, 1),
    ("dead_frac", "Dead latents (fraction of latents)", "fraction of latents", False, 4),
)
"""The overlaid curves: the metrics row's key, the chart's title and y label, log y, digits."""

COLUMNS = (
    # (sort key, header, unit or None)
    ("name", "Name", None),
    ("status", "Status", None),
    ("encoder_type", "Encoder", None),
    ("layer", "Layer", None),
    ("sparsity", "k / L1 / L0 coef.", None),
    ("width", "Width", "latents"),
    ("steps", "Steps", "done / total"),
    ("fvu", "FVU", "fraction"),
    ("l0", "L0", "latents / token"),
    ("dead_frac", "Dead", "% of latents"),
    ("ce_loss_recovered", "CE loss recovered", "%"),
    ("kl_div", "KL", "nats / token"),
)
"""The table's columns in order (each sorts by its key); the window column follows."""

WINDOWS = {
    "heldout_text": "held-out text",
    "heldout_vectors": "held-out vectors",
    "training": "training window",
}


def _links(entry: dict[str, Any]) -> None:
    entry["url"] = url_for("trainings.detail", training_id=entry["id"])
    entry["report_url"] = url_for("reports.report", training_id=entry["id"])


def view(data: dict[str, Any], raw_ids: list[str], sort: str | None, order: str | None
         ) -> dict[str, Any]:
    """The template's context: the table rows (in the chosen order), the curve series and the
    Pareto points (a colour per run, by its place in ``ids``), the sort links."""
    rows = data["trainings"]
    ids = [r["id"] for r in sorted(rows, key=lambda r: r["id"])]
    order_of = {i: n for n, i in enumerate(_given_order(raw_ids, ids))}
    for r in rows:
        r["index"] = order_of.get(r["id"], 0)
        r["color"] = series_color(r["index"])
        r["dash"] = series_dash(r["index"])
        r["window_label"] = WINDOWS.get(r["final"]["window"] or "", "no metrics yet")
    legend = sorted(rows, key=lambda r: r["index"])
    charts = []
    for key, title, y_label, log_y, digits in CURVE_CHARTS:
        series = [{"key": r["id"], "name": r["name"], "index": r["index"],
                   "points": list(zip(r["curves"]["tokens"], r["curves"][key], strict=True))}
                  for r in legend]
        charts.append({"key": key, "title": title, "y_label": y_label, "log_y": log_y,
                       "digits": digits, "series": series})
    paretos = []
    for key, title, y_label, better in (
            ("fvu", "L0 against FVU", "FVU", "lower L0 and lower FVU"),
            ("ce_loss_recovered", "L0 against CE loss recovered", "CE loss recovered",
             "lower L0 and higher CE loss recovered")):
        points = [{"key": r["id"], "name": r["name"], "index": r["index"],
                   "x": r["final"]["l0"], "y": r["final"][key], "href": r["report_url"]
                   if r["status"] in ("completed", "stopped") else r["url"],
                   "live": r["live"]} for r in legend]
        paretos.append({"key": key, "title": title, "y_label": y_label, "better": better,
                        "points": points, "frontier": data["pareto"][key], "note": None,
                        "drawn": any(p["x"] is not None and p["y"] is not None
                                     for p in points)})
    not_causal = _not_causal_models(rows)
    if not_causal:  # never a CE figure for these runs: say why instead of "not yet"
        one = len(not_causal) == 1
        paretos[1]["note"] = (
            f"{' and '.join(not_causal)} {'is not a causal LM' if one else 'are not causal LMs'}"
            f" (an encoder such as BERT predicts no next token): {'its' if one else 'their'}"
            " runs have no CE loss to recover.")
    ids_text = ",".join(str(r["id"]) for r in legend)
    links = {}
    for key, _, _ in COLUMNS:
        current = sort == key
        default_desc = key in DESC_FIRST
        now_desc = (order == "desc") if order else default_desc
        next_order = ("asc" if now_desc else "desc") if current else \
            ("desc" if default_desc else "asc")
        links[key] = {"href": url_for("compare.index", ids=ids_text, sort=key, order=next_order),
                      "active": current, "desc": current and now_desc}
    refresh = url_for("compare.index", ids=ids_text,
                      **({"sort": sort} if sort else {}), **({"order": order} if order else {}))
    return {"rows": rows, "legend": legend, "charts": charts, "paretos": paretos,
            "columns": COLUMNS, "links": links, "ids_text": ids_text, "sort": sort,
            "order": order, "live": any(r["live"] for r in rows), "refresh_url": refresh,
            "json_url": url_for("compare.index", ids=ids_text, format="json"),
            "multi_line_chart": multi_line_chart, "pareto_chart": pareto_chart}


def _not_causal_models(rows: list[dict[str, Any]]) -> list[str]:
    """The names of the runs' models known not to be causal LMs (their runs never get CE
    figures), in the runs' order; a model whose kind is unknown (None) is not listed."""
    names: dict[int, str] = {}
    for r in rows:
        mid = r.get("model_id")
        if mid is not None and mid not in names and jobs.get_model(mid).is_causal is False:
            names[mid] = r["model"]
    return list(dict.fromkeys(names.values()))


def _no_ids(raw_ids: list[str]) -> bool:
    """True when ``ids`` names nothing (left out, blank, only commas): "Compare selected" with
    nothing ticked."""
    return not any(p.strip().lstrip("#") for text in raw_ids for p in str(text).split(","))


def _given_order(raw_ids: list[str], ids: list[int]) -> list[int]:
    """The ids in the order the request gave them (the colours follow it)."""
    out: list[int] = []
    for text in raw_ids:
        for part in str(text).split(","):
            part = part.strip().lstrip("#")
            if part.isdigit() and int(part) in ids and int(part) not in out:
                out.append(int(part))
    return out + [i for i in ids if i not in out]


@bp.get("/compare")
def index() -> ResponseReturnValue:
    """``?ids=1,2,3`` (or repeated ``ids=``: the training list's checkboxes), ``sort`` (a
    table column) and ``order``. JSON: ``{"trainings": [...], "pareto": {"fvu": [ids],
    "ce_loss_recovered": [ids]}}``; 422 for malformed ids, none or more than 50, a bad sort
    or order; 404 naming the ids that do not exist. A browser asking with no ids gets the
    page saying to tick trainings on the Training page (200)."""
    raw_ids = request.args.getlist("ids")
    if _no_ids(raw_ids) and not wants_json():  # a page that says what to do, not an error
        return render_template("compare/index.html", nothing=True)
    sort, order = request.args.get("sort") or None, request.args.get("order") or None
    data = jobs.compare_trainings(raw_ids, sort, order)
    for entry in data["trainings"]:
        _links(entry)
    if wants_json():
        return json_response(data)
    return page_or_fragment("compare/index.html", "compare/_body.html",
                            **view(data, raw_ids, sort, order))
