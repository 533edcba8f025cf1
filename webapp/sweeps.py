"""Sweeps: many SAEs from one activation source, each a training row of the sweep.

``POST /sweeps`` takes the training form's fields, where the list fields (``LIST_FIELDS``)
take comma-separated values (JSON: lists); ``GET /sweeps`` and ``GET /sweeps/<id>`` show them
(HTML, or JSON); ``POST /sweeps/<id>/pause|resume|stop|retry`` and ``DELETE /sweeps/<id>``
steer them; ``/ws/sweeps/<id>`` (``webapp/ws.py``) streams the card's parts as they change.

A sweep card is built from one view dict (``sweep_view``) and rendered by the macros of
``templates/sweeps/_card.html``: the page, the HTTP fragments and the WebSocket (``SweepPoller``,
the training stream's ``live.Poller`` reading the sweep instead) render the same macros.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, get_template_attribute, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from markupsafe import Markup

from worker import jobs
from worker.jobs import FINISHED
from worker.jobs import sweeps as sweep_jobs

from . import answers, live
from .forms import MODEL_FIELDS, form_ctx, form_values
from .render import is_fragment_request, json_response, posted, wants_json
from .trainings import card_html, training_json

bp = Blueprint("sweeps", __name__)

LIST_FIELDS: tuple[str, ...] = tuple(sweep_jobs.SWEEP_FIELDS)
"""The form's fields that take several comma-separated values in sweep mode."""
PARTS = ("status", "buttons")
"""Card parts besides the run lines, each a macro with one root ``sweep-N-<part>``."""
WINDOWS = {"heldout_text": "held-out text", "heldout_vectors": "held-out activations",
           "training": "training window"}
"""How a run line names the window of its FVU and L0 (``jobs.final_figures``)."""


# ---------------------------------------------------------------------------- views
def run_view(t: Any, name: str | None = None) -> dict[str, Any]:
    """One run's progress line: name, status, step / total, FVU and L0 with their window."""
    step, total = int(t.current_step or 0), int(t.total_steps or 0)
    figures = jobs.final_figures(t)
    cfg = t.config or {}
    return {
        "id": t.id, "t": t, "name": name or jobs.display_name(t), "status": t.status,
        "requested": t.requested, "error": t.error, "finished": t.status in FINISHED,
        "step": step, "total": total,
        "fraction": 1.0 if t.status == "completed" else (min(1.0, step / total) if total
                                                          else 0.0),
        "fvu": figures.get("fvu"), "l0": figures.get("l0"), "window": figures.get("window"),
        "window_label": WINDOWS.get(figures.get("window") or "", "no metrics yet"),
        "eval_progress": t.eval_progress, "task_group": t.task_group,
        "layer": cfg.get("layer"), "encoder": cfg.get("encoder_type"),
    }


def sweep_view(sweep: Any, trainings: list[Any] | None = None) -> dict[str, Any]:
    """Everything a sweep card and page show, computed once for all their parts."""
    trainings = jobs.sweep_trainings(sweep) if trainings is None else trainings
    d = jobs.sweep_as_dict(sweep, trainings)
    config = sweep.config or {}
    lists = config.get("lists") or {}
    # The shared settings: the first run's whole config (what the form left out: defaults)
    # without the swept options.
    base = (trainings[0].config if trainings else None) or config.get("form") or {}
    shared = {k: v for k, v in base.items()
              if k not in lists and k not in ("model_id", "dataset_id", "mode") and v is not None}
    names = {t.id: jobs.display_name(t) for t in trainings}
    runs = [run_view(t, names[t.id]) for t in trainings]
    by_id = {r["id"]: r for r in runs}
    groups = [[by_id[i] for i in g if i in by_id] for g in d["groups"]]
    est = d.get("estimate") or {}
    sizes = est.get("group_memory_bytes") or []
    return {
        "id": sweep.id, "sweep": sweep, "d": d, "name": sweep.name, "status": d["status"],
        "finished": all(t.status in FINISHED for t in trainings),
        "title": f"{sweep.model.name} + {sweep.dataset.name}", "model": sweep.model,
        "dataset": sweep.dataset, "runs": runs, "counts": d["counts"], "groups": groups,
        "group_memory": [sizes[i] if i < len(sizes) else None for i in range(len(groups))],
        "estimate": est, "lists": lists, "shared": shared,
        "compare_url": "/compare?ids=" + ",".join(map(str, d["trainings"])),
        "created_at": sweep.created_at,
    }


def sweep_json(sweep: Any, trainings: list[Any] | None = None) -> dict[str, Any]:
    trainings = jobs.sweep_trainings(sweep) if trainings is None else trainings
    out = jobs.sweep_as_dict(sweep, trainings)
    out["model_name"] = sweep.model.name
    out["dataset_name"] = sweep.dataset.name
    out["url"] = url_for("sweeps.detail", sweep_id=sweep.id)
    return out


def render_part(name: str, *args: Any, oob: bool = False) -> Markup:
    html = get_template_attribute("sweeps/_card.html", name)(*args, oob)
    return Markup(str(html).strip())


def render_card(view: dict[str, Any], oob: bool = False) -> str:
    return str(render_part("card", view, oob=oob))


def render_parts(view: dict[str, Any], names: list[str] | tuple[str, ...] = PARTS,
                 oob: bool = False) -> str:
    """Card parts as top-level elements (htmx swaps each by id): ``status``, ``buttons``,
    ``runs`` (every line) or ``run-<training id>`` (one line)."""
    out = []
    runs = {f"run-{r['id']}": r for r in view["runs"]}
    for name in names:
        if name in runs:
            out.append(str(render_part("run", view, runs[name], oob=oob)))
        else:
            out.append(str(render_part(name, view, oob=oob)))
    return "\n".join(out)


def sweep_cards(only_recent: bool = False) -> list[Markup]:
    """Every sweep's card, newest first (``only_recent``: those still running or finished in
    the last day)."""
    import time

    out = []
    for sweep in jobs.list_sweeps():
        trainings = jobs.sweep_trainings(sweep)
        if only_recent and trainings and all(t.status in FINISHED for t in trainings):
            last = max((t.finished_at or 0) for t in trainings)
            if last < time.time() - 86400:
                continue
        out.append(render_part("card", sweep_view(sweep, trainings)))
    return out


# ---------------------------------------------------------------------------- the form
def sweep_form_ctx(values: dict[str, str], errors: dict[str, str] | None = None
                   ) -> dict[str, Any]:
    """The training form's context in sweep mode: the list fields keep their comma-separated
    values (the single-run form would reset a layer it does not offer) and the estimate is the
    sweep's (run count, group memory per sub-group, time)."""
    ctx = form_ctx(values, errors)
    for name in LIST_FIELDS:
        if values.get(name):
            ctx["values"][name] = values[name]
    as_lists = {name: list_field(f, ctx["choices"].get(name))
                for name, f in ctx["fields"].items() if name in LIST_FIELDS}
    ctx["fields"] = {**ctx["fields"], **as_lists}
    for group in ("first_row", "model_fields", "main_fields", "advanced_fields"):
        ctx[group] = [as_lists.get(f.name, f) for f in ctx[group]]
    ctx["mode"] = "sweep"
    ctx["estimate"] = sweep_estimate(ctx["values"])
    return ctx


def list_field(f: Any, choices: list[tuple[str, str]] | None) -> Any:
    """A list field as the sweep form shows it: a text input whose help says it takes
    comma-separated values (and, for a select, which)."""
    if choices:
        offered = [v for v, _ in choices]
        if f.name == "layer" and len(offered) > 2:
            offered = [f"{offered[0]}–{offered[-1]}"]
        example = f"one or more of {', '.join(offered)}, comma-separated"
    else:
        example = "one or more values, comma-separated, e.g. 1, 2"
    return replace(f, kind="text", help=f"Sweep: {example}. {f.help}")


def sweep_estimate(values: Mapping[str, Any]) -> dict[str, Any]:
    """``jobs.sweep_estimate`` of the shown values (blanks left out, as for one run)."""
    return jobs.sweep_estimate({k: v for k, v in values.items() if v not in ("", None)})


def _list_values(src: Mapping[str, Any]) -> dict[str, str]:
    """``form_values`` with JSON lists shown comma-joined (the form shows them so)."""
    flat = {k: (", ".join(str(x) for x in v) if isinstance(v, list) and k in LIST_FIELDS
                else v) for k, v in dict(src).items()} if not hasattr(src, "getlist") else src
    return form_values(flat)


# ---------------------------------------------------------------------------- routes
@bp.get("/sweeps")
def index() -> ResponseReturnValue:
    sweeps = jobs.list_sweeps()
    if wants_json():
        return json_response({"items": [sweep_json(s) for s in sweeps]})
    cards = [render_part("card", sweep_view(s)) for s in sweeps]
    if is_fragment_request():
        return render_template("sweeps/_list.html", sweep_cards=cards)
    return render_template("sweeps/index.html", sweep_cards=cards)


@bp.post("/sweeps")
def create() -> ResponseReturnValue:
    """Queue a sweep from the form's fields (list fields comma-separated) or a JSON object
    (list fields as lists): 201 ``{"id", "status", "trainings", ...}``."""
    src = posted()  # a JSON object, or the form (a MultiDict: checkboxes read right)
    values = _list_values(src)
    try:
        sweep = jobs.create_sweep(src)
    except jobs.Invalid as exc:
        if wants_json():
            return json_response({"error": str(exc), "errors": exc.errors}, 422)
        ctx = sweep_form_ctx(values, exc.errors)
        if is_fragment_request():
            return (render_template("trainings/_form.html", **ctx), 422,
                    {"HX-Retarget": "#training-form", "HX-Reswap": "outerHTML"})
        trainings = jobs.list_trainings()
        return render_template("trainings/index.html", cards=[card_html(t) for t in trainings],
                               sweep_cards=sweep_cards(), **ctx), 422
    sweep = jobs.get_sweep(sweep.id)
    if wants_json():
        return json_response(sweep_json(sweep), 201)
    if is_fragment_request():
        body = render_card(sweep_view(sweep))
        form = render_template("trainings/_form.html", oob=True, **sweep_form_ctx(values))
        return body + form, 201
    return redirect(url_for("sweeps.detail", sweep_id=sweep.id))


@bp.get("/sweeps/form")
def form() -> ResponseReturnValue:
    """The training form in the ``mode`` asked (``single`` or ``sweep``) with the values it
    carries: the "Single run / Sweep" switch."""
    values = form_values(request.args)
    # The switch's own value is the last (a sweep template's hidden mode=sweep comes first).
    if (request.args.getlist("mode") or [""])[-1] == "sweep":
        return render_template("trainings/_form.html", **sweep_form_ctx(values))
    return render_template("trainings/_form.html", **dict(form_ctx(values), mode="single"))


@bp.get("/sweeps/model-fields")
def model_fields() -> ResponseReturnValue:
    """The sweep form's layer and hook point fields for the chosen model (its defaults)."""
    values = {k: v for k, v in form_values(request.args).items() if k not in MODEL_FIELDS}
    return render_template("trainings/_model_fields.html", **sweep_form_ctx(values))


@bp.get("/sweeps/<int:sweep_id>")
def detail(sweep_id: int) -> ResponseReturnValue:
    sweep = jobs.get_sweep(sweep_id)
    trainings = jobs.sweep_trainings(sweep)
    if wants_json():
        out = sweep_json(sweep, trainings)
        out["runs"] = [training_json(t) for t in trainings]
        return json_response(out)
    view = sweep_view(sweep, trainings)
    if is_fragment_request():
        return render_card(view)
    return render_template("sweeps/detail.html", v=view)


@bp.post("/sweeps/<int:sweep_id>/<any(pause, resume, stop, retry):action>")
def control(sweep_id: int, action: str) -> ResponseReturnValue:
    sweep = jobs.request_sweep(sweep_id, action)
    if wants_json():
        return json_response(sweep_json(sweep))
    if is_fragment_request():
        # The whole card: a sweep that was finished becomes live again (its WebSocket).
        return render_card(sweep_view(sweep), oob=True)
    return redirect(url_for("sweeps.detail", sweep_id=sweep.id))


@bp.delete("/sweeps/<int:sweep_id>")
def delete(sweep_id: int) -> ResponseReturnValue:
    jobs.delete_sweep(sweep_id)
    here = urlsplit(request.headers.get("HX-Current-URL", "")).path.rstrip("/")
    if is_fragment_request() and here == f"/sweeps/{sweep_id}":  # its own page: to the list
        return "", 200, {"HX-Redirect": url_for("sweeps.index")}
    return answers.deleted("sweeps", sweep_id)


# ---------------------------------------------------------------------------- live
def signatures(sweep_id: int) -> dict[str, Any] | None:
    """Fingerprints of the card's parts (``status``, ``buttons``, ``runs``: the run ids, and
    ``run-<id>`` per run) plus ``row``: (sweep, trainings); None when the sweep is gone."""
    try:
        sweep = jobs.get_sweep(sweep_id)
    except jobs.NotFound:
        return None
    trainings = jobs.sweep_trainings(sweep)
    statuses = tuple(t.status for t in trainings)
    status = (jobs.sweep_status(trainings), statuses)
    sig: dict[str, Any] = {"row": (sweep, trainings), "status": status, "buttons": status,
                           "runs": tuple(t.id for t in trainings)}
    for t in trainings:
        sig[f"run-{t.id}"] = (t.status, t.requested, t.error, t.current_step, t.total_steps,
                              t.eval_progress, t.name, t.updated_at,
                              json.dumps(t.latest, sort_keys=True, default=str))
    return sig


class SweepPoller(live.Poller):
    """``live.Poller`` for a sweep: its card's parts, its JSON events (``status``, ``runs``)."""

    KIND = "sweep"
    THREAD = "ws-poller-sweep-{}"

    def _signatures(self) -> dict[str, Any] | None:
        return signatures(self.item_id)

    def _final(self, row: Any) -> bool:
        return all(t.status in FINISHED for t in row[1])

    def _gone(self) -> live.Update:
        sid = self.item_id
        message = f"Sweep {sid} was deleted."
        return live.Update(f'<article id="sweep-{sid}" class="card sweep-card gone">{message}'
                           "</article>",
                           (live.Event("error", json.dumps({"type": "error",
                                                            "error": message})),), final=True)

    def _html(self, row: Any, changed: list[str], final: bool) -> str | None:
        view = sweep_view(*row)
        if final:  # the whole card, without ws-connect (the socket is done)
            return render_card(view)
        if "runs" in changed:  # a run came or went: every line
            changed = [c for c in changed if not c.startswith("run-")]
        return render_parts(view, changed)

    def _events(self, row: Any, changed: list[str]) -> tuple[live.Event, ...]:
        if not any(v.as_json for v in self.viewers):
            return ()
        sweep, trainings = row
        events = []
        if set(changed) & {"status", "runs"}:
            events.append(live.Event("status", json.dumps(
                {"type": "status", "sweep": sweep_json(sweep, trainings)})))
        runs = [t for t in trainings if "runs" in changed or f"run-{t.id}" in changed]
        if runs:
            events.append(live.Event("runs", json.dumps(
                {"type": "runs", "runs": [training_json(t) for t in runs]})))
        return tuple(events)


def _snapshot(sweep_id: int) -> tuple[dict[str, Any] | None, str | None]:
    """(the view, the snapshot event) of the sweep now; (None, error event) when it is gone."""
    try:
        sweep = jobs.get_sweep(sweep_id)
    except jobs.NotFound as exc:
        return None, json.dumps({"type": "error", "error": str(exc)})
    trainings = jobs.sweep_trainings(sweep)
    return sweep_view(sweep, trainings), json.dumps({
        "type": "snapshot", "sweep": sweep_json(sweep, trainings),
        "runs": [training_json(t) for t in trainings]})


def html_stream(ws: Any, sweep_id: int) -> None:
    """The card's parts on connect (the whole card once finished), then those that change."""
    missing = f'<p id="sweep-{sweep_id}">Sweep {sweep_id} does not exist.</p>'
    sig = signatures(sweep_id)
    if sig is None:
        ws.send(missing)
        return
    if all(t.status in FINISHED for t in sig["row"][1]):
        ws.send(render_card(sweep_view(*sig["row"])))
        return
    with live.watch(sweep_id, sig, as_json=False, kind=SweepPoller) as viewer:
        view, _ = _snapshot(sweep_id)  # read after subscribing: no update is older
        if view is None:
            ws.send(missing)
            return
        if view["finished"]:
            ws.send(render_card(view))
            return
        ws.send(render_parts(view, [*PARTS, "runs"]))
        for update in viewer.updates(ws):
            if update.html is not None:
                ws.send(update.html)


def json_stream(ws: Any, sweep_id: int) -> None:
    """``snapshot`` first, then ``status`` and ``runs`` events; ``error`` when it is gone."""
    sig = signatures(sweep_id)
    if sig is None or all(t.status in FINISHED for t in sig["row"][1]):
        ws.send(_snapshot(sweep_id)[1])
        return
    with live.watch(sweep_id, sig, as_json=True, kind=SweepPoller) as viewer:
        view, event = _snapshot(sweep_id)
        ws.send(event)
        if view is None or view["finished"]:
            return
        cursors = live.sig_cursors(sig)
        for update in viewer.updates(ws):
            for ev in update.events:
                text = ev.text_after(cursors)
                if text is not None:
                    ws.send(text)
