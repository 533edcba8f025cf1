"""The new-training form, generated from the options (``worker.engine.config.options()``
through ``jobs.form_options()``): every option the form has, with its label, unit, help
sentence (the same as ``sae-studio train --help``), choices and the encoder types it applies to.

The job layer parses and checks what the form posts (``jobs.create_training``); this module
decides what the form looks like: which fields in which row, their choices (the ready models
and datasets, the chosen model's layers and hook points), and the values shown (defaults, or
what the user typed, beside its errors).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker import jobs

FIRST_ROW = ("model_id", "dataset_id", "encoder_type")
MODEL_FIELDS = ("layer", "hook_point", "target_hook_point")
"""Re-rendered when the model changes (``/trainings/model-fields``)."""
EXPANSION_CHOICES = (4, 8, 16, 32)
"""The expansion factors offered (a posted other value is offered too)."""


@dataclass(frozen=True)
class Field:
    """One field as ``_macros.html``'s ``field`` renders it."""

    name: str
    label: str
    kind: str
    """The input: ``select``, ``int``, ``float``, ``bool`` or ``text``."""
    help: str
    unit: str | None = None
    """Shown after the label, unless the label names it already."""
    optional: bool = False
    """May be left blank (placeholder "auto"; the help says what blank means)."""
    advanced: bool = False
    applies_to: str | None = None
    """The encoder types using the field, space-separated (``data-applies-to``; static/app.js
    hides the field for other types); None: every type."""


ROW_SELECTS = {
    "model_id": Field("model_id", "Model", "select", "A ready model from the Models page."),
    "dataset_id": Field("dataset_id", "Dataset", "select",
                        "A ready dataset from the Datasets page."),
}


def _field(info: jobs.OptionInfo) -> Field:
    """The form field of an option (``OptionInfo``)."""
    if (info.kind == "choice" or info.choices or info.name in MODEL_FIELDS + ("expansion_factor",)
            or (info.kind == "bool" and info.optional)):  # blank / on / off: a select
        kind = "select"
    else:
        kind = {"int": "int", "float": "float", "bool": "bool"}.get(info.kind, "text")
    unit = info.unit
    if unit and unit.rstrip("s").lower() in info.label.lower():
        unit = None  # "Total steps", not "Total steps (steps)"
    return Field(info.name, info.label, kind, info.help, unit=unit,
                 optional=info.optional, advanced=info.advanced,
                 applies_to=" ".join(info.applies_to) if info.applies_to else None)


def fields(infos: list[jobs.OptionInfo] | None = None) -> dict[str, Field]:
    """Every field of the form by name, in the form's order (``infos``: the form's options,
    read now when not given)."""
    out = dict(ROW_SELECTS)
    out.update((info.name, _field(info)) for info in infos or jobs.form_options())
    return out


def form_values(src: Mapping[str, Any]) -> dict[str, str]:
    """The form's fields present in ``src`` (request.form or request.args) as strings, older
    names (``layer_idx``) under the current ones. A checkbox's value: "true" when any posted
    value is (the box posts "true" beside its hidden "false")."""
    out: dict[str, str] = {}
    for name, f in fields().items():
        key = next((k for k in [name] + [o for o, n in jobs.ALIASES.items() if n == name]
                    if k in src), None)
        if key is None:
            continue
        if f.kind == "bool" and hasattr(src, "getlist"):
            out[name] = "true" if "true" in src.getlist(key) else src.get(key, "")
        else:
            out[name] = src.get(key, "")
    return out


def _choices(infos: list[jobs.OptionInfo], model: Any, models: list[Any], shown: dict[str, str]
             ) -> dict[str, list[tuple[str, str]]]:
    """(value, label) pairs of every select: ready models and datasets, the model's layers and
    hook points (every hook point without a model), the options' fixed choices."""
    out: dict[str, list[tuple[str, str]]] = {
        info.name: [("", "none")] * info.optional + [(c, c) for c in info.choices]
        for info in infos if info.choices}
    out.update({info.name: [("", "auto (the type's default)"), ("true", "on"), ("false", "off")]
                for info in infos if info.kind == "bool" and info.optional})
    out["model_id"] = [(str(m.id), f"{m.name} ({m.n_layers} layers, hidden {m.hidden_dim})")
                       for m in models]
    out["dataset_id"] = [(str(d.id), d.name) for d in jobs.ready_datasets()]
    hooks = model.hook_points if model is not None and model.hook_points else jobs.HOOK_POINTS
    out["hook_point"] = [(h, h) for h in hooks]
    out["target_hook_point"] = [("", "none (an SAE)")] + [(h, h) for h in hooks]
    n_layers = int(model.n_layers) if model is not None and model.n_layers else 0
    out["layer"] = [(str(i), f"Layer {i}") for i in range(n_layers)]
    factors = [str(x) for x in EXPANSION_CHOICES]
    if shown.get("expansion_factor") and shown["expansion_factor"] not in factors:
        factors.append(shown["expansion_factor"])
    out["expansion_factor"] = [(x, f"{x}x") for x in factors]
    return out


def _ready_model(model_id: str | None) -> Any:
    if not model_id:
        return None
    try:
        model = jobs.get_model(model_id)
    except jobs.NotFound:
        return None
    return model if model.status == "ready" else None


def form_ctx(values: dict[str, str] | None = None, errors: dict[str, str] | None = None,
             *, estimate_as_given: bool = False) -> dict[str, Any]:
    """The form's template context: fields by row, choices, shown values, errors, estimate.
    A layer or hook point the model lacks is shown as the model's default (a select cannot show
    it), and the estimate follows what is shown; ``estimate_as_given`` estimates the values as
    given instead (a program asking about that value learns it is invalid)."""
    values = dict(values or {})
    errors = dict(errors or {})
    models = jobs.ready_models()
    if "model_id" not in values and models:  # a form opened afresh; a blank choice stays blank
        values["model_id"] = str(models[0].id)
    model = _ready_model(values.get("model_id"))
    infos = jobs.form_options()
    by_name = fields(infos)
    shown = {k: "" if v is None else str(v) for k, v in jobs.training_defaults(model).items()}
    if model is None:
        shown["model_id"] = ""
    shown.update({k: v for k, v in values.items() if k in by_name})
    choices = _choices(infos, model, models, shown)
    for name in MODEL_FIELDS:  # a value the chosen model does not have: its default
        offered = [v for v, _ in choices[name]]
        if offered and shown.get(name) not in offered and name not in errors:
            shown[name] = offered[len(offered) // 2] if name == "layer" else offered[0]
    estimated = dict(shown)
    if estimate_as_given:
        estimated.update({n: values[n] for n in MODEL_FIELDS if values.get(n)})
    main = [f for f in by_name.values()
            if not f.advanced and f.name not in FIRST_ROW + MODEL_FIELDS]
    advanced = [f for f in by_name.values() if f.advanced]
    return {
        "fields": by_name, "first_row": [by_name[n] for n in FIRST_ROW],
        "model_fields": [by_name[n] for n in MODEL_FIELDS], "main_fields": main,
        "advanced_fields": advanced,
        "advanced_open": any(f.name in errors for f in main + advanced),
        "choices": choices, "values": shown, "errors": errors, "model": model,
        "estimate": jobs.estimate(model, {k: v for k, v in estimated.items() if v != ""}),
        "can_start": bool(shown.get("model_id")) and bool(shown.get("dataset_id")),
    }
