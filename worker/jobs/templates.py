"""Configuration templates: a training's (or a sweep's) form fields saved under a name, and the
read-only built-in presets.

A template's ``fields`` are the training form's option names (``encoder_type``, ``layer``,
``k``, ...; ``worker.engine.config.options()`` with ``in_form``) with typed values, plus
optionally ``model_id`` and ``dataset_id`` (ints; a template outlives those rows, so they are
not required to exist). A ``sweep`` template's ``LIST_FIELDS`` hold lists of values (the sweep
is their cartesian product); every value is parsed by the option's own parser and the
combinations are checked as the form checks one training (``configs.check_form``).

Presets (``PRESETS``) live here, never in the database; their ids are strings
(``preset:cpu-quick-look``) and they have no model or dataset (the form keeps the current
choice). ``template_toml`` writes the file ``sae-studio train|sweep --config FILE`` reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..db import Dataset, LanguageModel, Template, Training, db
from ..engine.config import OptionInfo, parse_value
from ..engine.memory import estimate_memory
from . import common
from .configs import _raw, check_form, form_options
from .errors import Conflict, Invalid, NotFound

__all__ = ["KINDS", "LIST_FIELDS", "PRESETS", "Preset", "create_template", "delete_template",
           "form_strings", "get_template", "jetson_estimate", "list_templates",
           "template_as_dict", "template_form_values", "template_toml", "training_fields"]

KINDS = ("training", "sweep")
NAME_MAX = 200
LIST_FIELDS = ("layer", "hook_point", "encoder_type", "k", "l1_alpha", "l0_coef", "target_l0",
               "expansion_factor", "latent_dim", "learning_rate", "seed")
"""The options a sweep template may list several values of: ``engine.sweep.SWEEP_FIELDS``
(repeated here since that module imports torch; tests/jobs/test_templates.py checks they
match)."""
ROW_FIELDS = ("model_id", "dataset_id")


# ---------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """A built-in, read-only template (defined in code; never a database row)."""

    id: str
    name: str
    kind: str
    fields: dict[str, Any]
    description: str


QUICK_LOOK = {"encoder_type": "topk", "k": 32, "expansion_factor": 4, "batch_size": 1024,
              "total_steps": 150, "buffer_tokens": 16_384, "eval_tokens": 2048,
              "log_every": 10, "auto_save_interval": 50}
"""The CPU quick look: 153,600 training tokens, a 4x TopK SAE, a small held-out evaluation."""
QUICK_LOOK_MEASURED = ("measured with sae-studio train (SmolLM2-135M layer 15 on the KJV, model "
                       "and tokens cached) on this project's 2-core CPU while other jobs "
                       "shared it (load average 3.9): 18m 21s to the end of the evaluation, at "
                       "160 tokens/s; alone on that CPU the same extraction trains at about "
                       "420 tokens/s (README, Sweep figures), about 6 minutes for these "
                       "tokens plus the evaluation (not timed end to end)")
"""Two runs on 2026-12-01, both with other jobs on the machine: 18m 21s (load average 3.9) and
21m 19s (5.8); the same result both times (FVU 0.205 on training batches, CE loss recovered
0.986)."""

JETSON = {"encoder_type": "topk", "k": 64, "expansion_factor": 32, "batch_size": 4096,
          "total_steps": 5000, "precision": "bf16", "device": "cuda",
          "auto_save_interval": 500}
JETSON_BUDGET = 6 * 10**9
"""The Jetson Orin Nano's usable memory (bytes), as the estimate's reference budget
(``estimates.REFERENCE_BUDGET``)."""
JETSON_SHARE = 0.5
"""The preset's estimate stays under this share of the budget: the Jetson's CPU and GPU share
the 6 GB, so the rest is left to the OS, the CUDA context and the process on the CPU side."""
REFERENCE_MODEL = {"name": "SmolLM2-135M", "d_in": 576, "n_layers": 30,
                   "n_params": 134_515_008, "dtype": "bfloat16"}
"""The bundled SmolLM2-135M's sizes (hidden 576, 30 layers, 134.5M parameters), the model the
Jetson preset is sized for (its layer: the middle one, 15)."""

L0_SWEEP = dict(QUICK_LOOK, k=[20, 40, 80, 120, 200], encoder_type=["topk"], seed=[0])


def jetson_estimate() -> int:
    """The memory estimate (bytes) of the Jetson preset: ``engine.memory.estimate_memory`` on
    CUDA in bf16, live extraction from SmolLM2-135M's middle layer, every other option at its
    preset or default value."""
    defaults = {info.name: info.default for info in form_options()}
    v = dict(defaults, **JETSON)
    m = REFERENCE_MODEL
    return estimate_memory(
        m["d_in"], v["expansion_factor"] * m["d_in"], encoder_type=v["encoder_type"], k=v["k"],
        batch_size=v["batch_size"], micro_batch_size=v["micro_batch_size"],
        precision=v["precision"], model_params=m["n_params"], model_dtype=m["dtype"],
        buffer_tokens=v["buffer_tokens"], device="cuda", source="live",
        layer=m["n_layers"] // 2, n_layers=m["n_layers"], tie_weights=v["tie_weights"],
        eval_tokens=v["eval_tokens"], total_steps=v["total_steps"]).total


def _presets() -> tuple[Preset, ...]:
    jetson_gib = jetson_estimate() / 2**30
    return (
        Preset("preset:cpu-quick-look", "CPU quick look", "training", QUICK_LOOK,
               "A quick first SAE on a CPU with the bundled smollm2-135m or "
               "minilm-l6: TopK k=32, 4x latents, batch 1,024 x 150 steps (153,600 tokens), "
               f"2,048 held-out tokens; {QUICK_LOOK_MEASURED}."),
        Preset("preset:jetson-orin-nano-6gb", "Jetson Orin Nano (6 GB)", "training", JETSON,
               "A 6 GB Jetson Orin Nano profile: TopK k=64, 32x latents, batch 4,096 x 5,000 "
               f"steps on CUDA in bf16. Memory estimate {jetson_gib:.2f} GiB (SmolLM2-135M "
               "layer 15 live, model weights included), under half of the 6 GB the Jetson's "
               "CPU and GPU share."),
        Preset("preset:l0-sweep-20-200", "L0 sweep 20–200", "sweep", L0_SWEEP,
               "Five TopK SAEs with k = 20, 40, 80, 120, 200 (SAEBench's L0 range), one seed, "
               "trained together from one forward pass at the CPU quick look's sizes; compare "
               "them on the L0-FVU frontier."),
    )


PRESETS = _presets()
_PRESET_BY_ID = {p.id: p for p in PRESETS}


# ---------------------------------------------------------------------------- fields
def _infos() -> dict[str, OptionInfo]:
    return {info.name: info for info in form_options()}


def _row_id(raw: Any, field: str, kind: str, errors: dict[str, str]) -> int | None:
    """A model or dataset id: optional, a whole number when given (the row need not exist)."""
    if common.blank(raw):
        return None
    text = str(raw).strip()
    if isinstance(raw, bool) or not (text.isascii() and text.isdigit()) \
            or len(text) > 19 or int(text) > common.MAX_ID:
        errors[field] = f"The {kind} id must be a whole number (got '{str(raw)[:30]}')."
        return None
    return int(text)


def _list_values(info: OptionInfo, raw: Any) -> Any:
    """A sweep field's values: a JSON list, or comma-separated text (as ``sae-studio sweep``:
    split on commas first, so "1,000" is two values), each through the option's parser; one
    value given as text or a number stays one value (not a list)."""
    if not isinstance(raw, list | tuple | str):
        return parse_value(info, raw)
    parts = list(raw) if isinstance(raw, list | tuple) else [
        p for p in raw.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{info.label} needs at least one value.")
    if isinstance(raw, str) and len(parts) == 1:
        return parse_value(info, parts[0])
    return [parse_value(info, p) for p in parts]


def _combinations(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Single-valued field sets that together use every listed value: the first of each list,
    then each list's other values in turn (checked like one training each)."""
    lists = {k: v for k, v in fields.items() if isinstance(v, list)}
    base = {k: (v[0] if isinstance(v, list) else v) for k, v in fields.items()}
    out = [base]
    for name, values in lists.items():
        out.extend(dict(base, **{name: v}) for v in values[1:])
    return out


def parse_fields(posted: Mapping[str, Any], kind: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The template's fields from form values or a JSON object (blank ones left out), and why
    the bad ones are bad, ``{field: sentence}``: each value by the option's own parser, then
    every combination through the form's checks (bounds, encoder options) without a model."""
    fields: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, what in (("model_id", "model"), ("dataset_id", "dataset")):
        value = _row_id(posted.get(name), name, what, errors)
        if value is not None:
            fields[name] = value
    for name, info in _infos().items():
        raw = _raw(posted, info)
        if raw is None or common.blank(raw) or raw == []:
            continue
        try:
            if kind == "sweep" and name in LIST_FIELDS:
                fields[name] = _list_values(info, raw)
            elif isinstance(raw, list | tuple):
                errors[name] = (f"{info.label} takes one value here" + (
                    "; a sweep template (kind=sweep) may list several."
                    if name in LIST_FIELDS else "; only these take lists in a sweep: "
                    f"{', '.join(LIST_FIELDS)}."))
            elif kind == "sweep" and isinstance(raw, str) and "," in raw \
                    and info.kind in ("int", "float"):
                errors[name] = (f"{info.label} cannot take several values in a sweep; these "
                                f"can: {', '.join(LIST_FIELDS)}.")
            else:
                fields[name] = parse_value(info, raw)
        except ValueError as exc:
            errors[name] = str(exc)
    for combo in _combinations({k: v for k, v in fields.items() if k not in ROW_FIELDS}):
        _, problems = check_form(combo, None)  # the fields that parsed: bounds, cross-checks
        for name, message in problems.items():
            errors.setdefault(name, message)
    return fields, errors


def training_fields(t: Training) -> dict[str, Any]:
    """A training's configuration as template fields: its model and dataset ids and every form
    option its config holds (None left out)."""
    cfg = t.config or {}
    fields: dict[str, Any] = {"model_id": t.model_id, "dataset_id": t.dataset_id}
    fields.update((name, cfg[name]) for name in _infos() if cfg.get(name) is not None)
    return fields


def _string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_string(v) for v in value)
    return str(value)


def form_strings(fields: Mapping[str, Any]) -> dict[str, str]:
    """Template fields as the form's values (strings): lists comma-joined, booleans
    "true"/"false", None left out. The one way a config becomes form values ("Start from
    template" and "Use this config" alike)."""
    return {k: _string(v) for k, v in fields.items() if v is not None}


# ---------------------------------------------------------------------------- rows
def _training_name(t: Training) -> str:
    """The training's name as its card shows it (``labels.display_name``)."""
    try:
        from .labels import display_name
    except ImportError:  # before trainings had names
        return str(t.name or f"{t.model.name} + {t.dataset.name} (training {t.id})")
    return str(display_name(t))


def _taken(name: str) -> bool:
    folded = name.casefold()
    if any(p.name.casefold() == folded for p in PRESETS):
        return True
    return any(n.casefold() == folded for (n,) in Template.select(Template.name).tuples())


def _unique(name: str) -> str:
    """``name``, or ``name (2)``, ``name (3)``, ... when taken."""
    out, n = name, 1
    while _taken(out):
        n += 1
        out = f"{name} ({n})"
    return out


def create_template(posted: Mapping[str, Any]) -> Template:
    """Save a template from ``name``, ``kind`` (``training`` default, or ``sweep``) and the
    form's fields, or from ``from_training=<id>`` (that training's config; the name defaults to
    the training's). Raises NotFound for an unknown training, Invalid (422) with every bad field
    (``name``: required, at most 200 characters, not already used by a template or preset)."""
    errors: dict[str, str] = {}
    name = str(posted.get("name") or "").strip()
    kind = str(posted.get("kind") or "training").strip() or "training"
    source = posted.get("from_training")
    if not common.blank(source):
        t = common.get_row(Training, "Training", source)
        fields, kind = training_fields(t), "training"
        if not name:
            name = _unique(_training_name(t)[:NAME_MAX])
    else:
        if kind not in KINDS:
            errors["kind"] = f"Kind '{kind[:30]}' is not available; choose training or sweep."
            kind = "training"
        fields, field_errors = parse_fields(posted, kind)
        errors.update(field_errors)
    if not name:
        errors["name"] = "Give the template a name."
    elif len(name) > NAME_MAX:
        common.check_length(name, NAME_MAX, "name", "The name", errors)
    elif _taken(name):
        errors["name"] = f"A template named '{name}' already exists; choose another name."
    if errors:
        first = next(iter(errors.values()))
        raise Invalid(f"The template needs fixing: {first}", errors)
    with db.atomic():
        row = Template.create(name=name, kind=kind, fields=fields)
    return row


def list_templates() -> list[Any]:
    """The presets (first, in their order), then the saved templates, newest first."""
    return [*PRESETS, *Template.select().order_by(Template.id.desc())]


def get_template(template_id: Any) -> Any:
    """A preset (``preset:<slug>``) or a saved template; NotFound("Template 7 does not exist.")
    for anything else (junk and ids past 2**63 - 1 included)."""
    text = str(template_id).strip()
    if text.startswith("preset:"):
        preset = _PRESET_BY_ID.get(text)
        if preset is None:
            raise NotFound(f"Preset '{text[7:37]}' does not exist.")
        return preset
    return common.get_row(Template, "Template", text)


def delete_template(template_id: Any) -> Any:
    """Delete a saved template; Conflict (409) for a preset (read-only)."""
    tpl = get_template(template_id)
    if isinstance(tpl, Preset):
        raise Conflict(f"'{tpl.name}' is a built-in preset; presets are read-only.")
    with db.atomic():
        tpl.delete_instance()
    return tpl


def template_as_dict(tpl: Any) -> dict[str, Any]:
    """``{"id", "name", "kind", "fields", "builtin", "created_at", "description"}``; a preset's
    id is its string, its created_at null."""
    builtin = isinstance(tpl, Preset)
    return {"id": tpl.id, "name": tpl.name, "kind": tpl.kind, "fields": dict(tpl.fields),
            "builtin": builtin, "created_at": None if builtin else tpl.created_at,
            "description": tpl.description if builtin else None}


def template_form_values(tpl: Any) -> dict[str, str]:
    """The training form's values of a template (``form_strings`` of its fields)."""
    return form_strings(tpl.fields)


# ---------------------------------------------------------------------------- TOML
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                         ("inf" if value > 0 else "-inf"))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def _ready(table: type, row_id: Any) -> Any:
    row = table.get_or_none(table.id == row_id) if row_id is not None else None
    return row if row is not None and row.status == "ready" else None


def template_toml(tpl: Any) -> str:
    """The template as the TOML file ``sae-studio train --config FILE`` (kind training) or
    ``sae-studio sweep --config FILE`` (kind sweep: list fields as arrays) reads: the options at
    the top level by name. ``model`` and ``dataset`` (with the dataset's context_size,
    max_tokens and text_field, as the web trains it) are the rows' sources when the template
    names ready rows; otherwise a commented line to fill in."""
    fields = dict(tpl.fields)
    command = "sweep" if tpl.kind == "sweep" else "train"
    lines = [f"# SAE Studio template {json.dumps(tpl.name, ensure_ascii=False)} "
             f"({'built-in preset' if isinstance(tpl, Preset) else f'template {tpl.id}'}, "
             f"kind {tpl.kind})",
             f"# sae-studio {command} --config FILE [--out DIR]"]
    model = _ready(LanguageModel, fields.pop("model_id", None))
    dataset = _ready(Dataset, fields.pop("dataset_id", None))
    if model is not None:
        lines.append(f"model = {_toml_value(model.source)}")
    else:
        lines.append('# model = "smollm2-135m"  # a bundled name, a local folder or a Hub id')
    if dataset is not None:
        lines.append(f"dataset = {_toml_value(dataset.source)}")
        lines.append(f"context_size = {_toml_value(int(dataset.context_size))}")
        if dataset.max_tokens is not None:
            lines.append(f"max_tokens = {_toml_value(int(dataset.max_tokens))}")
        lines.append(f"text_field = {_toml_value(dataset.text_field)}")
    else:
        lines.append('# dataset = "kjv"  # a bundled name, a .txt/.jsonl/.csv file or a Hub id')
    for info in form_options():
        if info.name in fields and fields[info.name] is not None:
            lines.append(f"{info.name} = {_toml_value(fields[info.name])}")
    return "\n".join(lines) + "\n"
