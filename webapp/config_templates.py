"""The Templates area: saved training and sweep configurations and the built-in presets
(``worker.jobs.templates``), and the training form started from one of them.

    POST   /templates            name + the form's fields (kind=sweep: lists), or from_training
    GET    /templates            the page (presets first) | {"items": [...]} as JSON
    GET    /templates/<id>       the page | JSON | ?format=toml (sae-studio train|sweep --config)
    DELETE /templates/<id>       {"deleted": id}; 409 for a preset (read-only)

``start_ctx`` is the training form's context from ``?template=<id>`` or ``?from_training=<id>``
(``/trainings/form``, the Training page): one function turns a template's or a training's
configuration into the form's values (``jobs.form_strings``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from worker import jobs

from .forms import form_ctx
from .render import is_fragment_request, json_response, page_or_fragment, posted, wants_json

bp = Blueprint("config_templates", __name__)


def template_view(tpl: Any) -> dict[str, Any]:
    """A template as the page shows it: its dict, the fields as the form's strings, links."""
    d = jobs.template_as_dict(tpl)
    d["shown"] = jobs.form_strings(tpl.fields)
    d["dom_id"] = "template-" + re.sub(r"[^a-z0-9-]", "-", str(tpl.id).lower())
    d["use_url"] = use_url(template=tpl.id)
    d["toml_url"] = url_for("config_templates.detail", template_id=tpl.id, format="toml")
    d["url"] = url_for("config_templates.detail", template_id=tpl.id)
    return d


def use_url(**args: Any) -> str:
    """``/trainings?template=<id>`` or ``?from_training=<id>``: the Training page with its form
    started from that configuration (``start_ctx``)."""
    return f"{request.script_root}/trainings?{urlencode(args)}#training-config"


def _page_ctx(values: Mapping[str, Any] | None = None,
              errors: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"templates": [template_view(t) for t in jobs.list_templates()],
            "trainings": jobs.list_trainings(), "values": dict(values or {}),
            "errors": dict(errors or {})}


bp.add_app_template_global(use_url, "use_config_url")


@bp.app_template_global("template_choices")
def template_choices() -> list[dict[str, Any]]:
    """The "Start from template" select's options (the training form): presets first."""
    return [{"id": str(t.id), "name": t.name, "kind": t.kind,
             "builtin": isinstance(t, jobs.Preset)} for t in jobs.list_templates()]


# ---------------------------------------------------------------------------- routes
@bp.get("/templates")
def index() -> ResponseReturnValue:
    if wants_json():
        return json_response({"items": [jobs.template_as_dict(t)
                                        for t in jobs.list_templates()]})
    return page_or_fragment("config_templates/index.html", "config_templates/_list.html",
                            **_page_ctx())


@bp.post("/templates")
def create() -> ResponseReturnValue:
    fields = posted()
    try:
        tpl = jobs.create_template(fields)
    except jobs.Invalid as exc:
        if wants_json():
            return json_response({"error": str(exc), "errors": exc.errors}, 422)
        values = {k: str(fields.get(k) or "") for k in ("name", "from_training")}
        ctx = _page_ctx(values, exc.errors)
        if is_fragment_request():
            return (render_template("config_templates/_form.html", **ctx), 422,
                    {"HX-Retarget": "#template-form", "HX-Reswap": "outerHTML"})
        return render_template("config_templates/index.html", **ctx), 422
    if wants_json():
        return json_response(jobs.template_as_dict(tpl), 201)
    if is_fragment_request():
        ctx = _page_ctx()
        return (render_template("config_templates/_list.html", **ctx)
                + render_template("config_templates/_form.html", oob=True, **ctx)), 201
    return redirect(url_for("config_templates.index") + f"#template-{tpl.id}")


@bp.get("/templates/<template_id>")
def detail(template_id: str) -> ResponseReturnValue:
    tpl = jobs.get_template(template_id)
    if request.args.get("format") == "toml":
        slug = re.sub(r"[^A-Za-z0-9]+", "-", tpl.name).strip("-").lower() or "template"
        return Response(jobs.template_toml(tpl), mimetype="application/toml", headers={
            "Content-Disposition": f"attachment; filename={slug}.toml"})
    if wants_json():
        return json_response(jobs.template_as_dict(tpl))
    view = template_view(tpl)
    return page_or_fragment("config_templates/detail.html", "config_templates/_row.html",
                            t=view, toml=jobs.template_toml(tpl))


@bp.delete("/templates/<template_id>")
def delete(template_id: str) -> ResponseReturnValue:
    tpl = jobs.delete_template(template_id)
    if wants_json():
        return json_response({"deleted": tpl.id})
    if is_fragment_request():
        return ""
    return redirect(url_for("config_templates.index"))


# ---------------------------------------------------------------------------- the form
def start_ctx(args: Mapping[str, Any], values: Mapping[str, str] | None = None
              ) -> dict[str, Any]:
    """The training form's context, started from ``args["template"]`` (a template or preset
    id) or ``args["from_training"]`` (a training's config) when given: their values replace
    the form's, except a model or dataset that is not a ready row (presets have none), where
    ``values``' current choice stays. A sweep template gives the form in sweep mode
    (``sweeps.sweep_form_ctx``). Adds ``start_template`` (the chosen id) and ``start_mode``
    ("sweep" for a sweep template). NotFound for an unknown id."""
    values = dict(values or {})
    chosen, kind = None, None
    if args.get("template"):
        tpl = jobs.get_template(args["template"])
        fields, chosen, kind = tpl.fields, str(tpl.id), tpl.kind
    elif args.get("from_training"):
        fields, kind = jobs.training_fields(jobs.get_training(args["from_training"])), "training"
    else:
        return dict(form_ctx(values), start_template=None, start_mode=None)
    start = jobs.form_strings(fields)
    ready = {"model_id": {str(m.id) for m in jobs.ready_models()},
             "dataset_id": {str(d.id) for d in jobs.ready_datasets()}}
    for key, ids in ready.items():
        if start.get(key) not in ids:
            start.pop(key, None)
    current = {k: v for k, v in values.items() if k in ready}
    if kind == "sweep":  # the form in sweep mode: lists kept, the sweep's estimate
        from .sweeps import sweep_form_ctx  # sweeps imports trainings, which imports this

        ctx = sweep_form_ctx({**current, **start})
    else:
        ctx = form_ctx({**current, **start})
    return dict(ctx, start_template=chosen, start_mode="sweep" if kind == "sweep" else None)
