"""The job layer the web app (and any other front end) calls: models, datasets, trainings,
their checkpoints, estimates, reports and the worker's health. No torch, no Flask.

Every service reads or writes the app database (``worker.db``, bound by ``open_database``) and
queues Huey tasks through ``common.enqueue`` after its own writes are committed. Problems a user
can fix raise a ``JobError`` (``errors.py``) whose ``str()`` is a sentence and whose ``status``
is the HTTP status to answer with. One module per noun:

- ``models``, ``datasets``: add (validated, then prepared by the worker), list, get, delete;
  statuses ``queued, preparing, ready, failed``;
- ``configs``: a training's configuration from the form's values, every bad field at once;
- ``estimates``: the memory and time estimate of the form's values;
- ``trainings``: create, read (metrics, log, a card's data), steer (pause, resume, stop, retry);
- ``checkpoints``: list, save now, delete, and the SAELens export zip;
- ``sweeps``: many SAEs from one activation source (create, read, steer, delete), each a
  training row trained in sub-groups that fit the memory budget;
- ``health``: the newest worker heartbeat; ``reports``: the evaluation files of a training;
- ``workers``: every worker's heartbeat (the Workers page), and the trainings dead workers left;
- ``templates``: saved training and sweep configurations and the built-in presets.

The names below are the public services; ``from worker import jobs; jobs.add_model(...)``.
"""

from __future__ import annotations

from ..db import FINISHED, RUNNING, TRAINING_STATUSES
from . import common, reports
from .checkpoints import (
    checkpoint_as_dict,
    checkpoints,
    delete_checkpoint,
    export_zip,
    get_checkpoint,
    has_export,
    save_checkpoint_now,
)
from .common import changes_since, connect, disconnect, open_database
from .compare import compare_trainings, final_figures, pareto_front
from .configs import ALIASES, HOOK_POINTS, OptionInfo, form_options, training_defaults
from .datasets import (
    UPLOAD_SUFFIXES,
    add_dataset,
    dataset_as_dict,
    delete_dataset,
    get_dataset,
    list_datasets,
    ready_datasets,
)
from .errors import Conflict, Invalid, JobError, NotFound
from .estimates import after_training_s, estimate
from .health import HEARTBEAT_ALIVE_S, HEARTBEAT_DEAD_S, health, heartbeat_age
from .labels import (
    all_tags,
    default_name,
    display_name,
    filter_choices,
    label,
    rename,
    set_tags,
)
from .models import add_model, delete_model, get_model, list_models, model_as_dict, ready_models
from .sweeps import (
    MAX_RUNS,
    SWEEP_ACTIONS,
    SWEEP_STATUSES,
    create_sweep,
    delete_sweep,
    get_sweep,
    list_sweeps,
    request_sweep,
    sweep_as_dict,
    sweep_estimate,
    sweep_status,
    sweep_trainings,
)
from .templates import (
    PRESETS,
    Preset,
    create_template,
    delete_template,
    form_strings,
    get_template,
    list_templates,
    template_as_dict,
    template_toml,
    training_fields,
)
from .trainings import (
    ACTIONS,
    LATEST_KEYS,
    LIST_SORTS,
    METRIC_ALIASES,
    card_data,
    create_training,
    delete_training,
    elapsed_seconds,
    get_training,
    interrupt_running,
    list_trainings,
    log_lines,
    mark_interrupted,
    metrics_rows,
    request,
    signatures,
    training_as_dict,
    with_aliases,
)
from .workers import (
    WORKER_FIELDS,
    interrupt_worker,
    list_workers,
    mark_worker_interrupted,
    reap_dead_workers,
    worker_as_dict,
    workers_overview,
)

__all__ = [
    "ACTIONS", "ALIASES", "Conflict", "FINISHED", "HEARTBEAT_ALIVE_S", "HOOK_POINTS", "Invalid",
    "JobError", "LATEST_KEYS", "METRIC_ALIASES", "NotFound", "OptionInfo", "RUNNING",
    "UPLOAD_SUFFIXES", "add_dataset", "add_model", "after_training_s", "card_data",
    "changes_since", "checkpoint_as_dict", "checkpoints", "common", "connect", "create_training",
    "dataset_as_dict",
    "delete_checkpoint", "delete_dataset", "delete_model", "delete_training", "disconnect",
    "elapsed_seconds", "estimate", "export_zip", "form_options", "get_checkpoint", "get_dataset",
    "get_model", "get_training", "has_export", "health", "heartbeat_age", "interrupt_running",
    "list_datasets", "list_models", "list_trainings", "log_lines", "mark_interrupted",
    "metrics_rows", "model_as_dict", "open_database", "ready_datasets", "ready_models", "reports",
    "request", "save_checkpoint_now", "signatures", "training_as_dict", "training_defaults",
    "with_aliases", "MAX_RUNS", "SWEEP_ACTIONS", "SWEEP_STATUSES", "create_sweep",
    "delete_sweep", "get_sweep", "list_sweeps", "request_sweep", "sweep_as_dict",
    "sweep_estimate", "sweep_status", "sweep_trainings",
    # names, tags and the comparison page
    "all_tags", "compare_trainings", "default_name", "display_name", "final_figures", "label",
    "pareto_front", "rename", "set_tags", "LIST_SORTS", "TRAINING_STATUSES", "filter_choices",
    # templates and presets
    "PRESETS", "Preset", "create_template", "delete_template", "form_strings", "get_template",
    "list_templates", "template_as_dict", "template_toml", "training_fields",
    # the pool of workers
    "HEARTBEAT_DEAD_S", "WORKER_FIELDS", "interrupt_worker", "list_workers",
    "mark_worker_interrupted", "reap_dead_workers", "worker_as_dict", "workers_overview",
]
