"""Trainings: create one from the form's values, read its rows (metrics, log, the card's data),
and steer it.

Trainings are steered through the database, never by killing a task: ``request(id, "pause")``
sets ``Training.requested`` and the worker picks it up between steps (see ``worker.progress``).
Statuses: ``queued, initializing, training, paused, stopping, evaluating, completed, stopped,
failed, interrupted``. ``evaluating`` comes after the last step (its weights are saved) while the
worker evaluates the SAE on held-out text (``eval_progress`` 0-1); a run without an evaluation
goes straight to ``completed`` or ``stopped``. It counts as running (no delete, no retry) and
accepts no control: a stop is refused with 409 (nothing is left to stop; the evaluation
takes seconds to minutes).

Metrics rows are the engine's dicts. The engine names the learning rate ``learning_rate`` and
the dead latent count ``dead``; the API also answers the older names ``lr`` and
``dead_neurons`` (``METRIC_ALIASES``, added by ``with_aliases`` on every row it returns).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from .. import settings
from ..db import (
    FINISHED,
    RETRYABLE,
    RUNNING,
    Checkpoint,
    LanguageModel,
    LogLine,
    Metric,
    Training,
    db,
    json_value,
    spread_metrics,
)
from ..engine.files import json_safe
from ..engine.sweep import applies
from . import common
from .configs import build_config
from .errors import Conflict, Invalid
from .estimates import estimate
from .sweeps import act_on_rows, queue_groups

TRAINING_FIELDS = ("id", "status", "current_step", "total_steps", "error", "requested",
                   "config", "estimate", "out_dir", "device", "created_at", "updated_at",
                   "started_at", "finished_at", "result", "eval_progress", "worker")
LATEST_KEYS = ("step", "loss", "mse", "l0", "dead", "dead_neurons", "fvu", "learning_rate",
               "tokens_per_s")
"""The API's ``latest`` contract (``training_as_dict``)."""
METRIC_ALIASES = {"lr": "learning_rate", "dead_neurons": "dead"}
"""Older metric names the API keeps answering: alias -> the engine's name."""
ACTIONS = ("stop", "pause", "resume", "retry")


# ---------------------------------------------------------------------------- create, read
def create_training(form: Mapping[str, Any]) -> Training:
    """Validate the form's values (TrainConfig names, strings or numbers; ``layer_idx`` is
    accepted for ``layer``) and queue a training.

    Blank values take their defaults; ``latent_dim`` wins over ``expansion_factor``. Raises
    Invalid with one message per bad field; nothing is inserted or queued then.
    """
    cfg, model, dataset = build_config(form)
    est = estimate(model, {k: v for k, v in form.items() if isinstance(k, str)})
    with db.atomic():
        training = Training.create(model=model, dataset=dataset, status="queued",
                                   config=cfg.to_dict(), total_steps=cfg.total_steps,
                                   estimate=est)
        training.out_dir = str(settings.trainings_dir() / str(training.id))
        training.save()
    common.enqueue("run_training", training.id, False)
    return Training.get_by_id(training.id)


LIST_SORTS = {"created": "desc", "name": "asc", "status": "asc", "fvu": "asc", "l0": "asc",
              "step": "desc"}
"""``list_trainings``'s sort keys and their default order."""


def list_trainings(status: str | None = None, model: Any = None, encoder_type: str | None = None,
                   tag: str | None = None, sweep: Any = None, sort: str | None = None,
                   order: str | None = None) -> list[Training]:
    """Trainings with their model and dataset, newest first; filtered by ``status``, ``model``
    (id), ``encoder_type``, ``tag`` (ignoring case) and ``sweep`` (id) when given, sorted by
    ``sort`` (``LIST_SORTS``: created, name (the display name), status (in lifecycle order),
    fvu, l0 (the final figures, ``compare.final_figures``; none last), step) in ``order`` (asc
    or desc; each key has its default). Invalid with every bad parameter at once (an unknown
    status, encoder type, model or sweep id, sort or order)."""
    from peewee import fn

    from ..db import TRAINING_STATUSES, Sweep
    from ..engine import architectures
    from .compare import check_sort, final_figures, sort_rows
    from .errors import NotFound
    from .labels import TAG_MAX, display_names

    blank = (None, "")
    errors: dict[str, str] = {}
    if status not in blank and status not in TRAINING_STATUSES:
        errors["status"] = (f"Unknown status '{str(status)[:30]}'; use one of "
                            f"{', '.join(TRAINING_STATUSES)}.")
    if encoder_type not in blank and encoder_type not in architectures.names():
        errors["encoder_type"] = (f"Unknown encoder type '{str(encoder_type)[:30]}'; use one of "
                                  f"{', '.join(architectures.names())}.")
    ids: dict[str, int] = {}
    for field, value, table, kind in (("model", model, LanguageModel, "Model"),
                                      ("sweep", sweep, Sweep, "Sweep")):
        if value in blank:
            continue
        try:
            ids[field] = common.get_row(table, kind, value).id
        except NotFound as exc:
            errors[field] = str(exc)
    tag = " ".join(str(tag).split()) if tag not in blank else None
    if tag is not None and len(tag) > TAG_MAX:
        errors["tag"] = f"A tag has at most {TAG_MAX} characters."
    order = check_sort(sort, order, LIST_SORTS, errors)
    if errors:
        raise Invalid(" ".join(errors.values()), errors)
    query = common.with_model_and_dataset()
    if status not in blank:
        query = query.where(Training.status == status)
    if "model" in ids:
        query = query.where(Training.model == ids["model"])
    if "sweep" in ids:
        query = query.where(Training.sweep == ids["sweep"])
    if encoder_type not in blank:
        query = query.where(fn.coalesce(json_value(Training.config, "encoder_type", text=True),
                                        "topk") == encoder_type)
    rows = list(query.order_by(Training.id.desc()))
    if tag is not None:
        rows = [t for t in rows if tag.casefold() in {str(x).casefold() for x in t.tags or []}]
    sort = sort or "created"
    desc = (order or LIST_SORTS[sort]) == "desc"
    if sort == "created":
        return rows if desc else rows[::-1]
    if sort == "name":
        names = display_names(rows)
        return sort_rows(rows, lambda t: names[t.id].casefold(), desc)
    if sort == "status":
        return sort_rows(rows, lambda t: TRAINING_STATUSES.index(t.status)
                         if t.status in TRAINING_STATUSES else len(TRAINING_STATUSES), desc)
    if sort == "step":
        return sort_rows(rows, lambda t: int(t.current_step or 0), desc)
    figures = {t.id: final_figures(t)[sort] for t in rows}
    return sort_rows(rows, lambda t: figures[t.id], desc)


def get_training(training_id: int | str) -> Training:
    """The training, or NotFound("Training 7 does not exist.")."""
    return common.get_row(Training, "Training", training_id)


def with_aliases(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics row with both the engine's names and the older API names
    (``METRIC_ALIASES``), JSON-safe. Rows stored before the rename carry ``lr`` only."""
    row = dict(metrics)
    for old, new in METRIC_ALIASES.items():
        if new not in row and old in row:
            row[new] = row[old]
        if new in row:
            row[old] = row[new]
    return json_safe(row)


def elapsed_seconds(training: Training, now: float | None = None) -> float | None:
    """Seconds the training has run, summed over its attempts (a Retry adds to it): the
    earlier attempts' start-to-finish times plus the current attempt's, up to its finish (or
    now while it runs). None before it first started."""
    start = training.attempt_started_at or training.started_at
    if start is None:
        return None
    end = training.finished_at if training.status in FINISHED and training.finished_at \
        else (now or time.time())
    return (training.elapsed_before_s or 0.0) + max(0.0, end - start)


def training_as_dict(training: Training) -> dict[str, Any]:
    """The API view: ``id, status, current_step, total_steps, error, latest`` (``LATEST_KEYS``
    or None), plus ``model_id, dataset_id, requested, config, estimate, created_at,
    started_at, finished_at, result, eval_progress`` (0-1 while ``evaluating``, else as the
    evaluation left it or None), ``elapsed_s`` (``elapsed_seconds``), ``metrics``: the
    newest metrics row in full (or None), ``name`` (``labels.display_name``: the user's name or
    the default), ``tags`` and ``sweep_id`` (None for a training on its own)."""
    from .labels import display_name

    out = common.row_dict(training, TRAINING_FIELDS)
    out["elapsed_s"] = elapsed_seconds(training)
    full = with_aliases(training.latest) if training.latest else None
    out["latest"] = {k: full.get(k) for k in LATEST_KEYS} if full else None
    out["metrics"] = full
    out["model_id"] = training.model_id
    out["dataset_id"] = training.dataset_id
    out["name"] = display_name(training)
    out["tags"] = list(training.tags or [])
    out["sweep_id"] = training.sweep_id
    return out


def metrics_rows(training_id: int | str, after_step: int = -1) -> list[dict[str, Any]]:
    """The training's metrics rows (``with_aliases``), oldest first; only steps after
    ``after_step`` (for incremental updates)."""
    training = get_training(training_id)
    rows = (Metric.select().where((Metric.training == training.id) & (Metric.step > after_step))
            .order_by(Metric.step))
    return [with_aliases(r.data) for r in rows]


def _log_dicts(query: Any) -> list[dict[str, Any]]:
    return [{"id": r.id, "created_at": r.created_at, "level": r.level, "message": r.message}
            for r in query]


def log_lines(training_id: int | str, after_id: int = 0) -> list[dict[str, Any]]:
    """Log lines ``{id, created_at, level, message}``, oldest first, with id > ``after_id``."""
    training = get_training(training_id)
    return _log_dicts(LogLine.select().where((LogLine.training == training.id)
                                             & (LogLine.id > after_id)).order_by(LogLine.id))


# ---------------------------------------------------------------------------- the card's data
def chart_rows(training_id: int, limit: int) -> list[tuple[int, Any, Any, Any]]:
    """(step, loss, l0, sparsity_coef) of at most ~``limit`` rows spread over the run, first
    and last kept (``db.spread_metrics``: downsampled in the database, so a card costs the same
    whether its run has 100 or 100,000 metric rows)."""
    return spread_metrics(training_id, limit, "loss", "l0", "sparsity_coef")


def card_data(training: Training, *, log_limit: int, chart_limit: int | None
              ) -> dict[str, Any]:
    """What a job card shows besides the row: ``log`` (the newest ``log_limit`` lines, oldest
    first, as ``log_lines`` gives them), ``checkpoints`` (rows, newest step first) and
    ``chart`` (``chart_rows``; empty when ``chart_limit`` is None) and ``target_l0`` (the
    run's target when its type steers its sparsity coefficient toward one, else None)."""
    log = _log_dicts(LogLine.select().where(LogLine.training == training.id)
                     .order_by(LogLine.id.desc()).limit(log_limit))[::-1]
    ckpts = list(Checkpoint.select().where(Checkpoint.training == training.id)
                 .order_by(Checkpoint.step.desc()))
    chart = chart_rows(training.id, chart_limit) if chart_limit is not None else []
    cfg = training.config or {}
    target = cfg.get("target_l0")
    steered = target is not None and applies("target_l0", cfg.get("encoder_type", "topk"))
    return {"log": log, "checkpoints": ckpts, "chart": chart,
            "target_l0": target if steered else None}


def signatures(training_id: int) -> dict[str, Any] | None:
    """Cheap fingerprints of a card's parts (``status, progress, tiles, charts, buttons, log,
    checkpoints_count, checkpoints``) plus ``row``, the training; None when it is gone. A live
    page compares them with the last ones it sent and re-renders the parts that differ."""
    if not 0 <= training_id <= common.MAX_ID:  # no such row; the database's integers end there
        return None
    t = Training.get_or_none(Training.id == training_id)
    if t is None:
        return None
    newest = (Metric.select(Metric.step).where(Metric.training == training_id)
              .order_by(Metric.step.desc()).first())
    n_metrics = Metric.select().where(Metric.training == training_id).count()
    last_log = (LogLine.select(LogLine.id).where(LogLine.training == training_id)
                .order_by(LogLine.id.desc()).first())
    ckpts = tuple((c.id, c.is_best) for c in
                  Checkpoint.select(Checkpoint.id, Checkpoint.is_best)
                  .where(Checkpoint.training == training_id).order_by(Checkpoint.id))
    status = (t.status, t.error, t.requested, t.eval_progress)
    return {
        "row": t,
        "status": status,
        "progress": (status, t.current_step, t.total_steps, t.started_at, t.finished_at),
        "tiles": json.dumps(t.latest, sort_keys=True, default=str),
        "charts": (newest.step if newest else None, n_metrics),
        "buttons": status,
        "log": last_log.id if last_log else 0,
        "checkpoints_count": len(ckpts),
        "checkpoints": ckpts,
    }


# ---------------------------------------------------------------------------- controls
def request(training_id: int | str, action: str) -> Training:
    """``stop``, ``pause``, ``resume`` or ``retry`` a training; returns the updated row.

    pause: training/initializing; resume: paused; stop: queued (stopped at once) or
    initializing/training/paused (the worker finalises the current weights: ``stopping``, then
    ``evaluating`` and ``stopped``); retry: stopped/failed/interrupted (queued again; continues
    from the newest checkpoint). A sweep's training acts with its sub-group (they step
    together): the action also applies to each sibling it fits, and a retry queues them as one
    task. Anything else raises Conflict, e.g. "Training 4 is completed;
    only a paused training can be resumed." An ``evaluating`` training has finished its steps
    and saved its weights: a stop is refused with a sentence saying so.
    """
    if action not in ACTIONS:
        msg = f"Unknown action '{action}'; use one of {', '.join(ACTIONS)}."
        raise Invalid(msg, {"action": msg})
    retry = False
    with db.atomic():
        t = get_training(training_id)
        where = f"Training {t.id} is {t.status}"
        if action == "pause":
            if t.status not in ("training", "initializing"):
                raise Conflict(f"{where}; only a running training can be paused.")
            t.requested = "pause"
        elif action == "resume":
            if t.status != "paused":
                raise Conflict(f"{where}; only a paused training can be resumed.")
            t.requested = "resume"
        elif action == "stop":
            if t.status == "queued":
                t.status, t.requested, t.finished_at = "stopped", None, time.time()
            elif t.status in ("initializing", "training", "paused"):
                t.status, t.requested = "stopping", "stop"
            elif t.status == "stopping":
                raise Conflict(f"{where} already; it finishes after the current step.")
            elif t.status == "evaluating":
                raise Conflict(f"{where}: its training has ended and its weights are saved; "
                               "wait for its held-out evaluation to finish (seconds to minutes).")
            else:
                raise Conflict(f"{where}; only a queued or running training can be stopped.")
        else:
            if t.status not in RETRYABLE:
                raise Conflict(f"{where}; only a stopped, failed or interrupted training can be "
                               "retried.")
            if t.finished_at and t.attempt_started_at:  # Elapsed sums the attempts
                t.elapsed_before_s = (t.elapsed_before_s or 0.0) + max(
                    0.0, t.finished_at - t.attempt_started_at)
            t.status, t.error, t.requested, t.finished_at = "queued", None, None, None
            retry = True
        t.save()
        siblings: list[list[int]] = []
        if t.task_group:  # a sweep's sub-group steps together: the request is the group's
            siblings = act_on_rows(list(Training.select().where(
                (Training.task_group == t.task_group) & (Training.id != t.id))), action)
    if retry and t.task_group:
        queue_groups([sorted([t.id, *(i for ids in siblings for i in ids)])])
    elif retry:
        common.enqueue("run_training", t.id, True)
    return get_training(t.id)


def delete_training(training_id: int | str) -> None:
    """Delete a finished training, its rows and its run folder.

    Conflict while it is queued or running: stop it first.
    """
    t = get_training(training_id)
    if t.status not in FINISHED:
        raise Conflict(f"Training {t.id} is {t.status}; stop it before deleting it.")
    with db.atomic():
        t.delete_instance(recursive=True)
    common.remove_tree(t.out_dir)


def interrupt_running() -> int:
    """Ask every running training to checkpoint and stop as ``interrupted`` (worker shutdown;
    Retry continues it). Returns how many were asked."""
    with db.atomic():
        return Training.update(requested="interrupt").where(Training.status.in_(RUNNING)) \
            .execute()


def mark_interrupted(reason: str) -> int:
    """Mark every running training ``interrupted`` now, with ``reason`` as its error: its worker
    is gone (killed as hung), so nobody else will. Retry continues from the newest checkpoint.
    Returns how many were marked."""
    now = time.time()
    with db.atomic():
        return Training.update(status="interrupted", error=reason, requested=None,
                               finished_at=now, updated_at=now) \
            .where(Training.status.in_(RUNNING)).execute()
