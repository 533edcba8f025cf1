"""The Training area (the home page): the configuration form, the job cards, their controls,
metrics, checkpoints and export.

A card is built from one view dict (``card_view``) and rendered by the macros of
``templates/trainings/_card.html``; the page, the HTTP fragments and the WebSocket all render
the same macros (``render_parts``).
"""

from __future__ import annotations

import csv
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    get_template_attribute,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from flask.typing import ResponseReturnValue
from markupsafe import Markup

from worker import jobs
from worker.jobs import FINISHED, reports

from . import answers
from .config_templates import start_ctx
from .forms import MODEL_FIELDS, form_ctx, form_values
from .render import (
    MAX_POINTS,
    is_fragment_request,
    json_response,
    page_or_fragment,
    wants_json,
)
from .render import posted as posted_fields

bp = Blueprint("trainings", __name__)

PARTS = ("status", "progress", "tiles", "charts", "buttons", "log", "checkpoints_count",
         "checkpoints")
"""Card parts, each a macro of ``trainings/_card.html`` with one root ``training-N-<part>``."""
LOG_LINES = 8


# ---------------------------------------------------------------------------- card view
def checkpoint_dict(ckpt: Any) -> dict[str, Any]:
    out = jobs.checkpoint_as_dict(ckpt)
    out["download_url"] = url_for("trainings.download_checkpoint", checkpoint_id=ckpt.id)
    return out


def card_view(t: Any, *, with_metrics: bool = True) -> dict[str, Any]:
    """Everything a card shows, computed once for all its parts."""
    d = jobs.training_as_dict(t)
    cfg = t.config or {}
    latest = d.get("metrics") or {}
    started = t.started_at
    elapsed = jobs.elapsed_seconds(t)
    step, total = int(t.current_step or 0), int(t.total_steps or 0)
    fraction = min(1.0, step / total) if total else 0.0
    if t.status == "completed":
        fraction = 1.0
    eta, eta_to, after = None, "last step", None
    if t.status in ("training", "evaluating"):  # the evaluation and finishing, as measured
        after = jobs.after_training_s(t.model_id, t.device, int(cfg.get("eval_tokens") or 0))
    if t.status == "training" and total > step:
        tps, batch = latest.get("tokens_per_s"), cfg.get("batch_size")
        if tps and batch:
            eta = (total - step) * float(batch) / float(tps)
        elif elapsed and step:
            eta = elapsed / step * (total - step)
        if eta is not None and after is not None:
            eta, eta_to = eta + after, "completed"
    elif t.status == "evaluating" and after is not None:
        eta, eta_to = after * (1.0 - float(t.eval_progress or 0.0)), "completed"
    estimate = t.estimate or {}
    d_sae = estimate.get("d_sae") or cfg.get("latent_dim")
    if d_sae is None and t.model.hidden_dim:
        d_sae = int(cfg.get("expansion_factor") or 8) * int(t.model.hidden_dim)
    l0_frac = latest.get("l0_frac")
    if l0_frac is None and latest.get("l0") is not None and d_sae:
        l0_frac = float(latest["l0"]) / d_sae
    dead_frac = latest.get("dead_frac")
    if dead_frac is None and latest.get("dead") is not None and d_sae:
        dead_frac = float(latest["dead"]) / d_sae
    data = jobs.card_data(t, log_limit=LOG_LINES, chart_limit=MAX_POINTS if with_metrics else None)
    return {
        "id": t.id, "t": t, "d": d, "status": t.status, "error": t.error,
        "requested": t.requested, "finished": t.status in FINISHED,
        "title": d["name"], "subtitle": f"{t.model.name} + {t.dataset.name}",
        "user_name": t.name or "", "default_name": jobs.default_name(t) if t.name else d["name"],
        "tags": d["tags"], "sweep_id": d["sweep_id"],
        "encoder": cfg.get("encoder_type", "topk"),
        "layer": cfg.get("layer"), "hook": cfg.get("hook_point", "residual"),
        "target_hook": cfg.get("target_hook_point"), "skip": bool(cfg.get("skip_connection")),
        "created_at": t.created_at, "started_at": started, "finished_at": t.finished_at,
        "worker": t.worker,
        "step": step, "total": total, "fraction": fraction, "elapsed": elapsed, "eta": eta,
        "eta_to": eta_to,
        "latest": latest, "d_sae": d_sae, "l0_frac": l0_frac, "dead_frac": dead_frac,
        "log": data["log"], "checkpoints": [checkpoint_dict(c) for c in data["checkpoints"]],
        "can_export": jobs.has_export(t),
        "has_report": t.status in ("completed", "stopped") and reports.has_report(t),
        "loss_points": [(x, loss) for x, loss, _, _ in data["chart"] if loss is not None],
        "l0_points": [(x, l0) for x, _, l0, _ in data["chart"] if l0 is not None],
        "target_l0": data["target_l0"],
        "coef_points": [(x, c) for x, _, _, c in data["chart"] if c is not None],
    }


_FINISHED_CARDS: OrderedDict[tuple[int, float, bool], Markup] = OrderedDict()
"""Rendered cards of finished jobs by (id, updated_at, has_report): they change only when the
row does or the evaluation report appears."""


def card_html(t: Any) -> Markup:
    """The whole card of a job (the ``card`` macro); a finished job's card is rendered once."""
    if t.status not in FINISHED:
        return render_part("card", card_view(t))
    # The eval folder may appear after the row's last update: its existence is in the key.
    key = (t.id, t.updated_at, t.status in ("completed", "stopped") and reports.has_report(t))
    html = _FINISHED_CARDS.get(key)
    if html is None:
        html = _FINISHED_CARDS[key] = render_part("card", card_view(t))
        while len(_FINISHED_CARDS) > 256:
            _FINISHED_CARDS.popitem(last=False)
    return html


def render_part(name: str, view: dict[str, Any], oob: bool = False) -> Markup:
    html = get_template_attribute("trainings/_card.html", name)(view, oob)
    return Markup(str(html).strip())


def render_parts(view: dict[str, Any], names: tuple[str, ...] | list[str] = PARTS,
                 oob: bool = False) -> str:
    """Several card parts as top-level elements (htmx swaps each by id)."""
    return "\n".join(str(render_part(n, view, oob)) for n in names)


def render_card(view: dict[str, Any], oob: bool = False) -> str:
    return str(render_part("card", view, oob))


def tag_filter_oob() -> str:
    """The jobs list's tag filter with the tags in use now, out of band (its choice kept, read
    from the page's URL: htmx's ``HX-Current-URL``), so a tag just given can be filtered by;
    nothing from a page without the filter bar (a training's own page)."""
    url = urlsplit(request.headers.get("HX-Current-URL", ""))
    lists = (url_for("trainings.index"), url_for("trainings.list_trainings"),
             request.script_root + "/trainings/list")  # the pages with the filter bar
    if url.path not in lists:
        return ""
    query = parse_qs(url.query)
    select = get_template_attribute("trainings/_filters.html", "filter_select")
    return str(select("tag", jobs.filter_choices()["tag"], (query.get("tag") or [""])[0], "any",
                      oob=True))


def training_json(t: Any) -> dict[str, Any]:
    out = jobs.training_as_dict(t)
    out["model_name"] = t.model.name
    out["dataset_name"] = t.dataset.name
    out["url"] = url_for("trainings.detail", training_id=t.id)
    return out


# ---------------------------------------------------------------------------- pages
def _page_ctx(**extra: Any) -> dict[str, Any]:
    """The page's cards and its form (from ``?template=`` or ``?from_training=`` when given)."""
    from .sweeps import sweep_cards  # sweeps imports this module

    trainings, filters = filtered_trainings()
    return {"cards": [card_html(t) for t in trainings], **start_ctx(request.args),
            "sweep_cards": sweep_cards(only_recent=True), **filters, **extra}


LIST_FILTERS = ("status", "model", "encoder_type", "tag", "sweep", "sort", "order")
"""The jobs list's query parameters (``jobs.list_trainings``'s arguments)."""


def filtered_trainings() -> tuple[list[Any], dict[str, Any]]:
    """The trainings the query's filters and sort select, and the filter bar's context
    (``job_filters``: the values, ``filter_errors``, ``filter_choices``). Bad values give every
    training (newest first) with their messages in ``filter_errors``."""
    values = {k: request.args.get(k, "").strip() for k in LIST_FILTERS}
    errors: dict[str, str] = {}
    try:
        trainings = jobs.list_trainings(**{k: v or None for k, v in values.items()})
    except jobs.Invalid as exc:
        errors = exc.errors
        trainings = jobs.list_trainings()
    choices = {"status": list(jobs.TRAINING_STATUSES), **jobs.filter_choices(),
               "sort": list(jobs.LIST_SORTS)}
    return trainings, {"job_filters": values, "filter_errors": errors,
                       "filter_choices": choices,
                       "filtering": any(values[k] for k in LIST_FILTERS[:5])}


@bp.get("/")
def index() -> ResponseReturnValue:
    ctx = _page_ctx()
    return render_template("trainings/index.html", **ctx), 422 if ctx["filter_errors"] else 200


@bp.get("/trainings")
@bp.get("/trainings/list")
def list_trainings() -> ResponseReturnValue:
    """The jobs list, filtered by ``status``, ``model`` (id), ``encoder_type``, ``tag``,
    ``sweep`` (id) and sorted by ``sort`` (created, name, status, fvu, l0, step) in ``order``
    (asc | desc): ``{"items": [...]}`` as JSON, the ``#jobs`` list for htmx, else the page.
    Bad values: 422 (JSON ``{"error", "errors"}``; HTML: every job, the messages above)."""
    if wants_json():
        values = {k: request.args.get(k, "").strip() or None for k in LIST_FILTERS}
        trainings = jobs.list_trainings(**values)
        return json_response({"items": [training_json(t) for t in trainings]})
    if is_fragment_request():
        trainings, filters = filtered_trainings()
        return (render_template("trainings/_jobs.html",
                                cards=[card_html(t) for t in trainings], **filters),
                422 if filters["filter_errors"] else 200)
    ctx = _page_ctx()
    return render_template("trainings/index.html", **ctx), 422 if ctx["filter_errors"] else 200


@bp.post("/trainings")
def create() -> ResponseReturnValue:
    """Queue a training from the form's fields, or from a JSON object with the same names."""
    posted = posted_fields()
    values = form_values(posted)
    try:
        t = jobs.create_training(posted)
    except jobs.Invalid as exc:
        if wants_json():
            return json_response({"error": str(exc), "errors": exc.errors}, 422)
        ctx = form_ctx(values, exc.errors)
        if is_fragment_request():
            return (render_template("trainings/_form.html", **ctx), 422,
                    {"HX-Retarget": "#training-form", "HX-Reswap": "outerHTML"})
        trainings = jobs.list_trainings()
        return render_template("trainings/index.html", cards=[card_html(x) for x in trainings],
                               **ctx), 422
    t = jobs.get_training(t.id)
    if wants_json():
        return json_response({"id": t.id, **training_json(t)}, 201)
    if is_fragment_request():
        body = render_card(card_view(t))
        form = render_template("trainings/_form.html", oob=True, **form_ctx(values))
        return body + form, 201
    return redirect(url_for("trainings.index") + f"#training-{t.id}")


@bp.get("/trainings/form")
def form() -> ResponseReturnValue:
    """The form with default values (keeps the chosen model and dataset): Reset to defaults;
    ``?template=<id>`` (Start from template) or ``?from_training=<id>``: with their values."""
    values = {k: request.args[k] for k in ("model_id", "dataset_id") if request.args.get(k)}
    ctx = start_ctx(request.args, values)
    return page_or_fragment("trainings/index.html", "trainings/_form.html",
                            **(ctx if is_fragment_request() else _page_ctx(**ctx)))


@bp.get("/trainings/model-fields")
def model_fields() -> ResponseReturnValue:
    """The layer and hook point selects for the chosen model (re-rendered on model change):
    the new model's defaults (its middle layer, its first hook point), not the previous
    model's choices, which the request still carries."""
    values = {k: v for k, v in form_values(request.args).items() if k not in MODEL_FIELDS}
    return render_template("trainings/_model_fields.html", **form_ctx(values))


@bp.get("/trainings/estimate")
def estimate() -> ResponseReturnValue:
    values = form_values(request.args)
    if request.args.get("mode") == "sweep":  # the sweep's: run count, group memory, time
        from .sweeps import sweep_form_ctx  # sweeps imports this module

        ctx = sweep_form_ctx(values)
    else:
        ctx = form_ctx(values, estimate_as_given=wants_json())
    if wants_json():
        return json_response(ctx["estimate"])
    return render_template("trainings/_estimate.html", **ctx)


@bp.get("/trainings/<int:training_id>")
def detail(training_id: int) -> ResponseReturnValue:
    t = jobs.get_training(training_id)
    if wants_json():
        return json_response(training_json(t))
    view = card_view(t)
    if is_fragment_request():
        return render_card(view)
    return render_template("trainings/detail.html", card=view)


@bp.patch("/trainings/<int:training_id>")
@bp.post("/trainings/<int:training_id>")
def update(training_id: int) -> ResponseReturnValue:
    """Name and tag a training: form fields or a JSON object with ``name`` (blank or null: back
    to the default name) and ``tags`` (a comma-separated string or a list), either may be left
    out. Answers the card (htmx) or the training as JSON; 422 ``{"error", "errors": {"name",
    "tags"}}`` for a name over 200 characters, more than 20 tags, a tag over 40 characters or
    with a comma (JSON list). POST is the no-JavaScript fallback (then back to the card)."""
    posted = posted_fields()
    changes = {k: posted.get(k) for k in ("name", "tags") if k in posted}
    t = jobs.label(training_id, **changes)
    if wants_json():
        return json_response(training_json(t))
    if is_fragment_request():
        return render_card(card_view(t)) + (tag_filter_oob() if "tags" in changes else "")
    return redirect(url_for("trainings.index") + f"#training-{t.id}")


@bp.delete("/trainings/<int:training_id>")
def delete(training_id: int) -> ResponseReturnValue:
    """Delete a finished training. htmx: its card swaps itself out; a sweep's run also brings
    the sweep's card (out of band) without that run."""
    sweep_id = jobs.get_training(training_id).sweep_id
    jobs.delete_training(training_id)
    if sweep_id is not None and is_fragment_request() and not wants_json():
        from .sweeps import render_card, sweep_view  # sweeps imports this module

        return render_card(sweep_view(jobs.get_sweep(sweep_id)), oob=True)
    return answers.deleted("trainings", training_id)


@bp.post("/trainings/<int:training_id>/<any(stop, pause, resume, retry):action>")
def control(training_id: int, action: str) -> ResponseReturnValue:
    t = jobs.request(training_id, action)
    t = jobs.get_training(t.id)
    if wants_json():
        return json_response(training_json(t))
    if is_fragment_request():
        view = card_view(t)
        if action == "retry":
            # The card becomes live again: replace it whole so it reconnects its WebSocket.
            return render_card(view, oob=True)
        return render_parts(view, ("status", "progress", "buttons"), oob=True)
    return redirect(url_for("trainings.index") + f"#training-{t.id}")


# ---------------------------------------------------------------------------- metrics
@bp.get("/trainings/<int:training_id>/metrics")
def metrics(training_id: int) -> ResponseReturnValue:
    t = jobs.get_training(training_id)
    rows = jobs.metrics_rows(t.id)
    if request.args.get("format") == "csv":
        keys: list[str] = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys or ["step"], extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()
                             if not isinstance(v, dict | list)})
        return Response(buf.getvalue(), mimetype="text/csv", headers={
            "Content-Disposition": f"attachment; filename=training-{t.id}-metrics.csv"})
    if wants_json():
        return json_response({"training_id": t.id, "rows": rows})
    view = card_view(t)
    if is_fragment_request():
        return str(render_part("charts", view))
    return render_template("trainings/metrics.html", card=view, rows=rows)


# ---------------------------------------------------------------------------- checkpoints
@bp.get("/trainings/<int:training_id>/checkpoints")
def list_checkpoints(training_id: int) -> ResponseReturnValue:
    items = [checkpoint_dict(c) for c in jobs.checkpoints(training_id)]
    if wants_json():
        return json_response({"training_id": training_id, "items": items})
    view = card_view(jobs.get_training(training_id), with_metrics=False)
    if is_fragment_request():
        return render_parts(view, ("checkpoints_count", "checkpoints"))
    return render_template("trainings/detail.html", card=card_view(view["t"]))


def _checkpoints_changed(training_id: int) -> ResponseReturnValue:
    """After save-now or delete: the card's checkpoint parts (htmx), else back to the card."""
    if is_fragment_request():
        view = card_view(jobs.get_training(training_id), with_metrics=False)
        return render_parts(view, ("checkpoints_count", "checkpoints"), oob=True)
    return redirect(url_for("trainings.index") + f"#training-{training_id}")


@bp.post("/trainings/<int:training_id>/checkpoints")
def save_checkpoint(training_id: int) -> ResponseReturnValue:
    t = jobs.save_checkpoint_now(training_id)
    if wants_json():
        return json_response({"id": t.id, "requested": t.requested, "status": t.status}, 202)
    return _checkpoints_changed(training_id)


@bp.get("/checkpoints/<int:checkpoint_id>/download")
def download_checkpoint(checkpoint_id: int) -> ResponseReturnValue:
    ckpt = jobs.get_checkpoint(checkpoint_id)
    path = Path(ckpt.path)
    if not path.is_file():
        raise jobs.NotFound(f"The file of checkpoint {ckpt.id} is missing ({path.name}).")
    name = f"training-{ckpt.training_id}-step-{ckpt.step}{path.suffix or '.safetensors'}"
    return send_file(path, as_attachment=True, download_name=name)


@bp.delete("/checkpoints/<int:checkpoint_id>")
def delete_checkpoint(checkpoint_id: int) -> ResponseReturnValue:
    ckpt = jobs.get_checkpoint(checkpoint_id)
    training_id = ckpt.training_id
    jobs.delete_checkpoint(checkpoint_id)
    if wants_json():
        return json_response({"deleted": checkpoint_id})
    return _checkpoints_changed(training_id)


@bp.get("/trainings/<int:training_id>/export")
def export(training_id: int) -> ResponseReturnValue:
    path = jobs.export_zip(training_id)
    if not path.is_file():
        abort(404)
    return send_file(path, as_attachment=True, mimetype="application/zip",
                     download_name=f"training-{training_id}-saelens.zip")


# ---------------------------------------------------------------------------- health
@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    h = jobs.health()
    if is_fragment_request():
        return render_template("_worker_status.html", health=h)
    return json_response({"web": "ok", "worker_heartbeat_age_s": h.get("age_s"),
                          "worker_alive": bool(h.get("alive")), "device": h.get("device"),
                          "device_name": h.get("device_name")})
