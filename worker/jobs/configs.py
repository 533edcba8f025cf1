"""A training's configuration from the form's values (or the JSON API's): parsed with the
option's own parser, checked against the chosen model and dataset, every bad field at once.

Names are TrainConfig's (``layer``, ``hook_point``, ...) plus ``model_id`` and ``dataset_id``;
the older names in ``ALIASES`` (``layer_idx``) are accepted on input. Which options the form has,
their labels, help, choices and bounds all come from ``worker.engine.config.options()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..db import Dataset, LanguageModel
from ..engine.config import (
    ALIASES,
    HOOK_POINTS,
    OptionInfo,
    TrainConfig,
    options,
    parse_value,
)
from ..engine.option_types import TRUE_WORDS
from ..engine.sweep import SWEEP_FIELDS
from . import common
from .errors import Invalid, NotFound

__all__ = ["ALIASES", "HOOK_POINTS", "OptionInfo", "build_config", "check_form", "form_options",
           "training_defaults"]

def form_options() -> list[OptionInfo]:
    """The options the form has (``in_form``), in the form's order; read now, so an encoder type
    registered later is among the choices."""
    return [info for info in options() if info.in_form]


def _raw(form: Mapping[str, Any], info: OptionInfo) -> Any:
    """The raw value of an option in the form, under its name or an older one (None when
    absent). A checkbox posts "true" beside its hidden "false": then any true value wins."""
    keys = [info.name] + [old for old, new in ALIASES.items() if new == info.name]
    key = next((k for k in keys if k in form), None)
    if key is None:
        return None
    if info.kind == "bool" and hasattr(form, "getlist"):
        posted = form.getlist(key)
        return next((v for v in posted if v.strip().lower() in TRUE_WORDS), posted[-1])
    return form[key]


def training_defaults(model: LanguageModel | None) -> dict[str, Any]:
    """The value every form field starts with (None = blank: resolved automatically): the
    options' defaults, the model's middle layer, the given model and the newest ready dataset."""
    out: dict[str, Any] = {info.name: info.default for info in form_options()}
    newest = Dataset.select().where(Dataset.status == "ready").order_by(Dataset.id.desc()).first()
    out["model_id"] = model.id if model is not None else None
    out["dataset_id"] = newest.id if newest is not None else None
    if model is not None and model.n_layers:
        out["layer"] = model.n_layers // 2
    return out


def _parse(form: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The form's options that are not blank, parsed; and why the others did not parse."""
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for info in form_options():
        raw = _raw(form, info)
        if common.blank(raw):
            continue
        if info.name in SWEEP_FIELDS and isinstance(raw, str) and "," in raw:
            # "8,16" would read as 816: several values are a sweep's
            errors[info.name] = (f"{info.label} takes one value in a single training; a sweep "
                                 "trains several (comma-separated), or write the number "
                                 "without commas.")
            continue
        try:
            values[info.name] = parse_value(info, raw)
        except ValueError as exc:
            errors[info.name] = str(exc)
    return values, errors


def _ready_row(table: type, kind: str, raw: Any, errors: dict[str, str], field: str) -> Any:
    if common.blank(raw):
        errors[field] = f"Choose a {kind.lower()}."
        return None
    try:
        row = common.get_row(table, kind, raw)
    except NotFound as exc:
        errors[field] = str(exc)
        return None
    if row.status != "ready":
        errors[field] = f"{kind} {row.id} is not ready (status: {row.status})."
        return None
    return row


def check_form(form: Mapping[str, Any], model: LanguageModel | None,
               dataset: Dataset | None = None) -> tuple[TrainConfig, dict[str, str]]:
    """The TrainConfig of the form's option fields (bad ones left at their defaults) and every
    bad field's message, ``{field: sentence}``: unparseable, out of bounds, or wrong for the
    model (when given). ``build_config`` checks these and the model and dataset rows; the
    estimate checks these alone."""
    values, errors = _parse(form)
    if model is not None and model.hook_points \
            and values.get("hook_point", model.hook_points[0]) not in model.hook_points:
        errors["hook_point"] = (f"Hook point '{values.pop('hook_point')}' is not available for "
                                f"{model.name}; choose one of {', '.join(model.hook_points)}.")
    if model is not None and model.hook_points and values.get("target_hook_point") \
            and values["target_hook_point"] not in model.hook_points:
        errors["target_hook_point"] = (
            f"Target hook point '{values.pop('target_hook_point')}' is not available for "
            f"{model.name}; choose one of {', '.join(model.hook_points)}.")
    limit = model.max_positions if model is not None else None
    if limit and dataset is not None and dataset.context_size > limit:
        errors["dataset_id"] = (
            f"{dataset.name}'s contexts are {dataset.context_size:,} tokens long, but "
            f"{model.name} reads at most {limit:,} positions; choose a dataset with a context "
            f"size of at most {limit:,} (add the corpus again with a shorter one).")
    n_layers = int(model.n_layers) if model is not None and model.n_layers else None
    d_in = int(model.hidden_dim) if model is not None and model.hidden_dim else None
    if values.get("layer") is None and n_layers is not None:
        values["layer"] = n_layers // 2
    cfg = TrainConfig(
        model=model.path if model is not None else "-",
        dataset=dataset.source if dataset is not None else "-",
        context_size=dataset.context_size if dataset is not None else 128,
        max_tokens=dataset.max_tokens if dataset is not None else None,
        text_field=dataset.text_field if dataset is not None else "text",
        **{k: v for k, v in values.items() if k not in errors})
    in_form = {info.name for info in form_options()}
    for name, message in cfg.errors(d_in=d_in, n_layers=n_layers).items():
        errors.setdefault(name if name in in_form else "form", message)
    return cfg, errors


def build_config(form: Mapping[str, Any]) -> tuple[TrainConfig, LanguageModel, Dataset]:
    """The TrainConfig the form describes, with its ready model and dataset.

    Values may be strings (a form) or typed (JSON); blank ones take their defaults, a blank
    layer the model's middle one. The data options come from the rows: the model's folder, the
    dataset's source, context size, token limit and text field. Raises Invalid with every bad
    field's message (``{field: sentence}``, by form name; a problem of no field under "form").
    """
    errors: dict[str, str] = {}
    model = _ready_row(LanguageModel, "Model", form.get("model_id"), errors, "model_id")
    dataset = _ready_row(Dataset, "Dataset", form.get("dataset_id"), errors, "dataset_id")
    cfg, field_errors = check_form(form, model, dataset)
    errors.update(field_errors)
    if errors:
        first = next(iter(errors.values()))
        raise Invalid(f"Some training settings need fixing: {first}", errors)
    assert model is not None and dataset is not None
    return cfg, model, dataset
