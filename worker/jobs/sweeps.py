"""Sweeps: many SAEs from one activation source, each a training row with its ``sweep``.

``create_sweep(form)`` takes the training form's fields where the list fields
(``engine.sweep.SWEEP_FIELDS``: layer, hook_point, encoder_type, k, l1_alpha, l0_coef,
target_l0, expansion_factor, latent_dim, learning_rate, seed) may hold several values —
comma-separated in a form, lists in JSON — and queues the cartesian product
(``engine.sweep.expand``: an option that does not apply to an encoder type is ignored for it, no
run twice). The runs are split into sub-groups that fit the memory budget
(``estimates.group_estimate``); each sub-group is one ``run_group`` task (one forward pass per
step for all its SAEs) and takes one training slot.

Its status comes from its trainings': ``queued`` (none started), ``running`` (any initializing,
training, stopping or evaluating), ``paused`` (running ones all paused), else the finished
state: ``completed`` (all), ``failed`` / ``interrupted`` (any, in that order), ``stopped``.
Controls apply to every training they fit; the SAEs of a sub-group step together, so pausing,
resuming or stopping one of them (``trainings.request``) acts on its whole sub-group.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .. import settings
from ..db import FINISHED, RETRYABLE, RUNNING, Dataset, LanguageModel, Sweep, Training, db
from ..engine.config import ALIASES, TrainConfig
from ..engine.errors import ConfigError
from ..engine.sweep import SWEEP_FIELDS, check_group, expand
from . import common
from .configs import build_config, check_form, form_options
from .errors import Conflict, Invalid
from .estimates import GROUP_ESTIMATE_KEYS, estimate, group_estimate

MAX_RUNS = 64
"""The most SAEs one sweep may train."""
SWEEP_STATUSES = ("queued", "running", "paused", "completed", "stopped", "failed", "interrupted")
SWEEP_ACTIONS = ("pause", "resume", "stop", "retry")
NAME_LIMIT = 200


# ---------------------------------------------------------------------------- the form
def _values(raw: Any) -> list[Any]:
    """A list field's values: a JSON list as it is, a string split at commas (blanks
    dropped), anything else one value; duplicates dropped, order kept."""
    if isinstance(raw, (list, tuple)):
        items = list(raw)
    elif isinstance(raw, str):
        items = [part.strip() for part in raw.split(",") if part.strip()]
    elif raw is None:
        items = []
    else:
        items = [raw]
    out: list[Any] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def split_form(form: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The form's fields with each list field at its first value, and the list fields that
    hold more than one value (raw values, by their TrainConfig names)."""
    single: dict[str, Any] = {k: form[k] for k in form if isinstance(k, str)}
    if hasattr(form, "getlist"):  # a checkbox's hidden "false" beside its "true"
        single = {k: (form.getlist(k) if len(form.getlist(k)) > 1 and k not in SWEEP_FIELDS
                      else form[k]) for k in single}
    lists: dict[str, list[Any]] = {}
    for name in SWEEP_FIELDS:
        keys = [name] + [old for old, new in ALIASES.items() if new == name]
        key = next((k for k in keys if k in single), None)
        if key is None:
            continue
        values = _values(single.pop(key))
        single[name] = values[0] if values else ""
        if len(values) > 1:
            lists[name] = values
    return single, lists


class _Form(dict):
    """A dict that answers ``getlist`` like a form (the option parser reads checkboxes so)."""

    def getlist(self, key: str) -> list[Any]:
        value = self.get(key)
        return list(value) if isinstance(value, list) else [value]


def build_sweep(form: Mapping[str, Any]
                ) -> tuple[list[TrainConfig], dict[str, list[Any]], LanguageModel, Dataset]:
    """The sweep's runs (TrainConfigs, in order), its typed lists, model and dataset. Raises
    Invalid with every bad field (a bad value of a list names itself) and when the product has
    no run, more than ``MAX_RUNS`` or runs that cannot share one source."""
    single, raw_lists = split_form(form)
    errors: dict[str, str] = {}
    for info in form_options():  # "4,096" would read as one number: refuse it in a sweep
        raw = single.get(info.name)  # (a text option such as Matryoshka widths keeps its commas)
        if info.name not in SWEEP_FIELDS and info.kind != "bool" and (
                isinstance(raw, list) or (isinstance(raw, str) and "," in raw
                                          and info.kind != "str")):
            errors[info.name] = (f"{info.label} takes one value in a sweep (write numbers "
                                 f"without commas); these take several: "
                                 f"{', '.join(SWEEP_FIELDS)}.")
    try:
        base, model, dataset = build_config(_Form(single))
    except Invalid as exc:
        errors = {**exc.errors, **errors}
        base = model = dataset = None
    lists: dict[str, list[Any]] = {}
    for name, values in raw_lists.items():
        typed = []
        for value in values:
            cfg, bad = check_form(_Form(single, **{name: value}), model, dataset)
            if name in bad:
                errors.setdefault(name, f"'{value}': {bad[name]}")
            else:
                typed.append(getattr(cfg, name))
        lists[name] = typed
    if errors:
        first = next(iter(errors.values()))
        raise Invalid(f"Some sweep settings need fixing: {first}", errors)
    assert base is not None and model is not None and dataset is not None
    n = 1
    for values in lists.values():
        n *= len(values)
    if n > MAX_RUNS * 4:  # expand() would only drop duplicates
        msg = f"This sweep has {n:,} runs; a sweep trains at most {MAX_RUNS}."
        raise Invalid(msg, {"form": msg})
    cfgs = expand(base, lists)
    if len(cfgs) > MAX_RUNS:
        msg = f"This sweep has {len(cfgs)} runs; a sweep trains at most {MAX_RUNS}."
        raise Invalid(msg, {"form": msg})
    d_in, n_layers = int(model.hidden_dim or 0) or None, int(model.n_layers or 0) or None
    for cfg in cfgs:  # a combination may be wrong where each value alone is not
        bad = cfg.errors(d_in=d_in, n_layers=n_layers)
        if bad:
            field, message = next(iter(bad.items()))
            raise Invalid(f"Some sweep settings need fixing: {message}", {field: message})
    try:
        check_group(cfgs)
    except ConfigError as exc:
        field = "gpus" if "GPUs" in str(exc) else "form"
        raise Invalid(str(exc), {field: str(exc)}) from None
    return cfgs, lists, model, dataset


def sweep_estimate(form: Mapping[str, Any]) -> dict[str, Any]:
    """The sweep form's estimate: ``estimates.group_estimate`` of its runs, or (a bad field,
    no model yet) its keys null with ``"invalid": {field: sentence}, "warning": sentence``."""
    try:
        cfgs, _, model, _ = build_sweep(form)
    except Invalid as exc:
        return dict(dict.fromkeys(GROUP_ESTIMATE_KEYS), invalid=exc.errors, warning=str(exc))
    return dict(group_estimate(model, cfgs), invalid={})


def _stored(form: Mapping[str, Any]) -> dict[str, Any]:
    """The submitted option fields worth keeping (strings, numbers, lists), without the
    sweep's own name and the form's guard token."""
    return {k: v for k, v in form.items() if k not in ("name", "csrf_token")
            and isinstance(v, (str, int, float, bool, list)) and len(str(v)) <= 1000}


def default_sweep_name(lists: Mapping[str, list[Any]], n_runs: int) -> str:
    if not lists:
        return "sweep of 1 run"
    parts = [f"{name}={','.join(str(v) for v in values)}" for name, values in lists.items()]
    return f"{' × '.join(parts)} ({n_runs} runs)"


# ---------------------------------------------------------------------------- create, read
def create_sweep(form: Mapping[str, Any]) -> Sweep:
    """Validate the form (``build_sweep``) and queue every sub-group; returns the sweep."""
    cfgs, lists, model, dataset = build_sweep(form)
    name = str(form.get("name") or "").strip()
    if len(name) > NAME_LIMIT:
        msg = f"The name has {len(name):,} characters; at most {NAME_LIMIT}."
        raise Invalid(msg, {"name": msg})
    group_est = group_estimate(model, cfgs)
    single, _ = split_form(form)
    with db.atomic():
        sweep = Sweep.create(name=name or default_sweep_name(lists, len(cfgs)), model=model,
                             dataset=dataset, config={"form": _stored(single),
                                                      "lists": lists},
                             groups=[], memory=group_est)
        groups: list[list[int]] = []
        for g, members in enumerate(group_est["groups"]):
            ids = []
            for i in members:
                cfg = cfgs[i]
                est = estimate(model, dict(cfg.to_dict(), model_id=model.id,
                                           dataset_id=dataset.id))
                t = Training.create(model=model, dataset=dataset, status="queued",
                                    config=cfg.to_dict(), total_steps=cfg.total_steps,
                                    estimate=est, sweep=sweep, task_group=f"{sweep.id}.{g}")
                t.out_dir = str(settings.trainings_dir() / str(t.id))
                t.save()
                ids.append(t.id)
            groups.append(ids)
        sweep.groups = groups
        sweep.save()
    for ids in groups:
        common.enqueue("run_group", ids)
    return Sweep.get_by_id(sweep.id)


def list_sweeps() -> list[Sweep]:
    """All sweeps, newest first."""
    return list(Sweep.select().order_by(Sweep.id.desc()))


def get_sweep(sweep_id: int | str) -> Sweep:
    """The sweep, or NotFound("Sweep 7 does not exist.")."""
    return common.get_row(Sweep, "Sweep", sweep_id)


def sweep_trainings(sweep: Sweep) -> list[Training]:
    """Its trainings in run order."""
    return list(Training.select().where(Training.sweep == sweep.id).order_by(Training.id))


def sweep_status(trainings: list[Training]) -> str:
    statuses = [t.status for t in trainings]
    if not statuses:
        return "stopped"
    active = [s for s in statuses if s in RUNNING]
    if active:
        return "paused" if all(s == "paused" for s in active) else "running"
    if "queued" in statuses:
        return "running" if any(s in FINISHED for s in statuses) else "queued"
    if all(s == "completed" for s in statuses):
        return "completed"
    for status in ("failed", "interrupted"):
        if status in statuses:
            return status
    return "stopped"


def sweep_as_dict(sweep: Sweep, trainings: list[Training] | None = None) -> dict[str, Any]:
    """The API view: ``id, name, status, model_id, dataset_id, config ({"form", "lists"}),
    trainings ([ids], run order), groups ([[ids]] each trained by one task), estimate (the
    group estimate it was split by), counts ({status: n}), created_at, updated_at``."""
    trainings = sweep_trainings(sweep) if trainings is None else trainings
    counts: dict[str, int] = {}
    for t in trainings:
        counts[t.status] = counts.get(t.status, 0) + 1
    present = {t.id for t in trainings}
    return {"id": sweep.id, "name": sweep.name, "status": sweep_status(trainings),
            "model_id": sweep.model_id, "dataset_id": sweep.dataset_id,
            "config": sweep.config, "trainings": [t.id for t in trainings],
            "groups": [[i for i in g if i in present] for g in sweep.groups or []],
            "estimate": sweep.memory, "counts": counts,
            "created_at": sweep.created_at, "updated_at": sweep.updated_at}


# ---------------------------------------------------------------------------- controls
def _act(t: Training, action: str) -> bool:
    """Apply ``action`` to one row (not saved); False when its status does not take it."""
    if action == "pause" and t.status in ("training", "initializing"):
        t.requested = "pause"
    elif action == "resume" and t.status == "paused":
        t.requested = "resume"
    elif action == "stop" and t.status == "queued":
        t.status, t.requested, t.finished_at = "stopped", None, time.time()
    elif action == "stop" and t.status in ("initializing", "training", "paused"):
        t.status, t.requested = "stopping", "stop"
    elif action == "retry" and t.status in RETRYABLE:
        if t.finished_at and t.attempt_started_at:  # Elapsed sums the attempts
            t.elapsed_before_s = (t.elapsed_before_s or 0.0) + max(
                0.0, t.finished_at - t.attempt_started_at)
        t.status, t.error, t.requested, t.finished_at = "queued", None, None, None
    else:
        return False
    return True


def act_on_rows(rows: list[Training], action: str) -> list[list[int]]:
    """Apply ``action`` to every row it fits (saved in the caller's transaction). Returns the
    rows acted on by sub-group: after a retry, queue ``run_group`` for each (``queue_groups``)
    once the transaction has committed; [] when it fits none."""
    by_group: dict[str, list[int]] = {}
    for t in rows:
        if _act(t, action):
            t.save()
            by_group.setdefault(t.task_group or f"#{t.id}", []).append(t.id)
    return list(by_group.values())


def queue_groups(groups: list[list[int]]) -> None:
    for ids in groups:
        common.enqueue("run_group", ids)


def request_sweep(sweep_id: int | str, action: str) -> Sweep:
    """``pause``, ``resume``, ``stop`` or ``retry`` every training of the sweep that the action
    fits (as ``trainings.request`` describes for one); Conflict when it fits none."""
    if action not in SWEEP_ACTIONS:
        msg = f"Unknown action '{action}'; use one of {', '.join(SWEEP_ACTIONS)}."
        raise Invalid(msg, {"action": msg})
    with db.atomic():
        sweep = get_sweep(sweep_id)
        trainings = sweep_trainings(sweep)
        groups = act_on_rows(trainings, action)
        if not groups:
            status = sweep_status(trainings)
            need = {"pause": "a running", "resume": "a paused", "stop": "a queued or running",
                    "retry": "a stopped, failed or interrupted"}[action]
            raise Conflict(f"Sweep {sweep.id} is {status}; none of its trainings is {need} "
                           "one.")
    if action == "retry":
        queue_groups(groups)
    return get_sweep(sweep.id)


def delete_sweep(sweep_id: int | str) -> None:
    """Delete a finished sweep, its trainings and their run folders. Conflict while any of
    them is queued or running: stop it first."""
    sweep = get_sweep(sweep_id)
    trainings = sweep_trainings(sweep)
    busy = [t.id for t in trainings if t.status not in FINISHED]
    if busy:
        raise Conflict(f"Sweep {sweep.id} has {len(busy)} queued or running training(s); stop "
                       "it before deleting it.")
    with db.atomic():
        for t in trainings:
            t.delete_instance(recursive=True)
        sweep.delete_instance()
    for t in trainings:
        common.remove_tree(t.out_dir)
