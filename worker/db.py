"""The app's data: peewee models on SQLite (WAL), shared by the web process and the worker.

Imports peewee and the torch-free ``engine.files`` only (no Flask, no torch). The database
path is known at run time: ``init_db(path)`` binds the deferred ``db`` and creates or migrates
the schema. Connections are per thread; the web opens one per request, the worker one per
task (``db.connection_context()``) and writes in short ``db.atomic()`` blocks.

Schema versions live in ``PRAGMA user_version``; ``MIGRATIONS[i]`` upgrades version i to i+1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from peewee import (
    BooleanField,
    CharField,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    SqliteDatabase,
    TextField,
)

from .engine.files import json_safe


class AppDatabase(SqliteDatabase):
    """Transactions take the write lock when they begin (BEGIN IMMEDIATE).

    With WAL, a deferred transaction that reads and then writes fails at once with "database is
    locked" when another connection committed in between; an immediate one waits its turn
    (busy_timeout). Web requests and worker threads all write in short read-then-write blocks.
    """

    def atomic(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("lock_type", "IMMEDIATE")
        return super().atomic(*args, **kwargs)


db = AppDatabase(None)

MODEL_STATUSES = ("queued", "preparing", "ready", "failed")
DATASET_STATUSES = MODEL_STATUSES
TRAINING_STATUSES = ("queued", "initializing", "training", "paused", "stopping", "evaluating",
                     "completed", "stopped", "failed", "interrupted")
RUNNING = ("initializing", "training", "paused", "stopping", "evaluating")
"""A worker holds the job: it must mark it finished (or the next start marks it interrupted).
``evaluating``: the last step is done and its weights saved; the worker evaluates them on
held-out text before the run becomes ``completed`` or ``stopped``."""
FINISHED = ("completed", "stopped", "failed", "interrupted")
RETRYABLE = ("stopped", "failed", "interrupted")
REQUESTS = ("pause", "resume", "stop", "save")


def now() -> float:
    return time.time()


class JSONField(TextField):
    """JSON stored as text; non-finite floats are stored as null (standard JSON has no NaN, and
    SQLite's json_extract reads the text)."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(json_safe(value))

    def python_value(self, value: str | None) -> Any:
        return None if value is None else json.loads(value)


class BaseModel(Model):
    created_at = FloatField(default=now)
    updated_at = FloatField(default=now)

    class Meta:
        database = db

    def save(self, *args: Any, **kwargs: Any) -> int:
        self.updated_at = now()
        return super().save(*args, **kwargs)


class PreparedRow(BaseModel):
    """The columns of a source the worker prepares (models and datasets): statuses ``queued,
    preparing, ready, failed``, progress 0-1 with a message while preparing, the error's
    sentence when it failed. Not a table of its own."""

    name = CharField()
    source = TextField()
    status = CharField(default="queued", index=True)
    error = TextField(null=True)
    progress = FloatField(default=0.0)
    message = TextField(null=True)


class LanguageModel(PreparedRow):
    """A transformers model the user added (UI area "Models")."""

    path = TextField(null=True)
    architecture = CharField(null=True)
    model_type = CharField(null=True)
    n_layers = IntegerField(null=True)
    hidden_dim = IntegerField(null=True)
    vocab_size = IntegerField(null=True)
    n_params = IntegerField(null=True)
    dtype = CharField(null=True)
    is_causal = BooleanField(null=True)
    hook_points = JSONField(null=True)

    class Meta:
        table_name = "language_model"


class Dataset(PreparedRow):
    """A corpus the user added (UI area "Datasets")."""

    context_size = IntegerField(default=128)
    max_tokens = IntegerField(null=True)
    text_field = CharField(default="text")
    n_documents = IntegerField(null=True)
    n_tokens = IntegerField(null=True)
    samples = JSONField(null=True)

    class Meta:
        table_name = "dataset"


class Sweep(BaseModel):
    """Many SAEs trained from one activation source (UI area "Sweeps"). Each SAE is a Training
    row with ``sweep`` set; the sweep's status is derived from theirs (``jobs.sweeps``)."""

    name = CharField()
    model = ForeignKeyField(LanguageModel, backref="sweeps", on_delete="CASCADE")
    dataset = ForeignKeyField(Dataset, backref="sweeps", on_delete="CASCADE")
    config = JSONField()
    """``{"form": the shared form values, "lists": {option: [values]}}`` as submitted."""
    groups = JSONField(default=list)
    """The sub-groups: lists of training ids, each trained by one task (one forward pass)."""
    memory = JSONField(null=True)
    """The group memory estimate (bytes per sub-group, the budget) it was split by."""

    class Meta:
        table_name = "sweep"


class Template(BaseModel):
    """A saved configuration the form starts from: a training's or a sweep's fields."""

    name = CharField()
    kind = CharField(default="training")
    """``training`` or ``sweep`` (a sweep's list fields hold lists)."""
    fields = JSONField()

    class Meta:
        table_name = "template"


class Training(BaseModel):
    """One SAE training job. ``config`` is the engine's TrainConfig as a dict."""

    model = ForeignKeyField(LanguageModel, backref="trainings", on_delete="CASCADE")
    dataset = ForeignKeyField(Dataset, backref="trainings", on_delete="CASCADE")
    status = CharField(default="queued", index=True)
    error = TextField(null=True)
    config = JSONField()
    current_step = IntegerField(default=0)
    total_steps = IntegerField()
    requested = CharField(null=True)
    """A control request from the web (pause, resume, stop, save) the worker picks up."""
    out_dir = TextField(null=True)
    latest = JSONField(null=True)
    """The newest metrics row (as the engine reports it)."""
    result = JSONField(null=True)
    """The engine's final result (held-out evaluation) once finished."""
    estimate = JSONField(null=True)
    started_at = FloatField(null=True)
    """When the first attempt started (a Retry keeps it)."""
    finished_at = FloatField(null=True)
    attempt_started_at = FloatField(null=True)
    """When the current (or last) attempt started: the first start, or the newest Retry's."""
    elapsed_before_s = FloatField(default=0.0)
    """Seconds the earlier attempts ran (start to finish each), summed when a Retry starts."""
    device = CharField(null=True)
    eval_progress = FloatField(null=True)
    """Fraction (0-1) of the held-out evaluation done while the status is ``evaluating``."""
    sweep = ForeignKeyField(Sweep, null=True, backref="trainings", on_delete="CASCADE")
    task_group = CharField(null=True)
    """The sub-group it trains in (``"<sweep id>.<index>"``): its members train in one task and
    take one training slot; None for a training on its own."""
    name = CharField(null=True)
    """The user's name for it (None: the default name, ``jobs.trainings.default_name``)."""
    tags = JSONField(default=list)

    class Meta:
        table_name = "training"


class Metric(BaseModel):
    """One metrics row per training and step (append-only)."""

    training = ForeignKeyField(Training, backref="metrics", on_delete="CASCADE")
    step = IntegerField()
    data = JSONField()

    class Meta:
        table_name = "metric"
        indexes = ((("training", "step"), True),)


class Checkpoint(BaseModel):
    training = ForeignKeyField(Training, backref="checkpoints", on_delete="CASCADE")
    step = IntegerField()
    path = TextField()
    loss = FloatField(null=True)
    size_bytes = IntegerField(default=0)
    is_best = BooleanField(default=False)
    reason = CharField(default="auto")

    class Meta:
        table_name = "checkpoint"
        indexes = ((("training", "step"), True),)


class LogLine(BaseModel):
    training = ForeignKeyField(Training, backref="log_lines", on_delete="CASCADE")
    level = CharField(default="info")
    message = TextField()

    class Meta:
        table_name = "log_line"


class LatentLabel(BaseModel):
    """A user's label and notes for one latent of a training's SAE (the latent page edits it;
    the latent table shows and searches it). One row per (training, latent)."""

    training = ForeignKeyField(Training, backref="latent_labels", on_delete="CASCADE")
    latent = IntegerField()
    label = CharField(default="")
    notes = TextField(default="")

    class Meta:
        table_name = "latent_label"
        indexes = ((("training", "latent"), True),)


class WorkerHeartbeat(BaseModel):
    """Written by each running worker every few seconds; the top bar shows its age."""

    name = CharField(unique=True)
    pid = IntegerField()
    device = CharField()
    device_name = CharField(null=True)
    device_memory = IntegerField(null=True)
    gflops = FloatField(null=True)
    """Measured fp32 matmul throughput of the device (for the web's time estimate)."""

    class Meta:
        table_name = "worker_heartbeat"


class Calibration(BaseModel):
    """How long the newest clean attempt of a model's training took on a device, phase by phase
    (the time estimate's basis). One row per (model, device); a later attempt replaces it.

    Clean: a fresh start (not a Retry from a checkpoint) that ended ``completed``; its paused
    seconds are left out. Seconds are wall-clock.
    """

    model = ForeignKeyField(LanguageModel, backref="calibrations", on_delete="CASCADE")
    device = CharField()
    """The training row's ``device`` ("cpu", "cuda:0", ...)."""
    training_id = IntegerField()
    """The training measured (a plain number: the row may be deleted, its timings stay)."""
    setup_s = FloatField()
    """Claim to the first training step (model load, activation buffer fill), without
    ``token_build_s``."""
    token_build_s = FloatField(default=0.0)
    """Building the token store in that attempt (0 when it existed): it does not recur."""
    train_s = FloatField()
    """First step to the last step's metrics, pauses left out (live extraction and saves
    included)."""
    train_tokens = IntegerField()
    flops_per_token = FloatField()
    """The config's FLOPs per trained token (``estimates.flops_per_token``)."""
    eval_s = FloatField(default=0.0)
    """The held-out evaluation (status ``evaluating``); 0 when it did not run."""
    eval_tokens = IntegerField(default=0)
    """The config's ``eval_tokens`` (0 when the evaluation did not run)."""
    finish_s = FloatField()
    """The rest: the final save and export, the result."""
    total_s = FloatField()
    """Start to ``completed``, paused seconds left out."""

    class Meta:
        table_name = "calibration"
        indexes = ((("model", "device"), True),)


TABLES = [LanguageModel, Dataset, Sweep, Template, Training, Metric, Checkpoint, LogLine,
          LatentLabel, WorkerHeartbeat, Calibration]


def _v0_to_v1(database: SqliteDatabase) -> None:
    database.create_tables(TABLES)


def _v1_to_v2(database: SqliteDatabase) -> None:
    """Models and datasets that fail end ``failed``, like trainings (they ended ``error``)."""
    for table in (LanguageModel, Dataset):
        table.update(status="failed").where(table.status == "error").execute()


def _v2_to_v3(database: SqliteDatabase) -> None:
    """Trainings get ``eval_progress`` (the ``evaluating`` status's progress)."""
    if "eval_progress" not in {c.name for c in database.get_columns("training")}:
        database.execute_sql("ALTER TABLE training ADD COLUMN eval_progress REAL")


def _v3_to_v4(database: SqliteDatabase) -> None:
    """Trainings keep their first start across Retry: ``attempt_started_at`` (the current
    attempt's start) and ``elapsed_before_s`` (earlier attempts' seconds)."""
    columns = {c.name for c in database.get_columns("training")}
    if "attempt_started_at" not in columns:
        database.execute_sql("ALTER TABLE training ADD COLUMN attempt_started_at REAL")
        database.execute_sql("UPDATE training SET attempt_started_at = started_at")
    if "elapsed_before_s" not in columns:
        database.execute_sql("ALTER TABLE training ADD COLUMN elapsed_before_s REAL "
                             "NOT NULL DEFAULT 0")


def _v4_to_v5(database: SqliteDatabase) -> None:
    """The time estimate's measurements: table ``calibration``."""
    database.create_tables([Calibration])


def _v5_to_v6(database: SqliteDatabase) -> None:
    """Sweeps and templates (tables ``sweep``, ``template``); trainings get ``sweep_id``,
    ``task_group``, ``name`` and ``tags``."""
    database.create_tables([Sweep, Template])
    columns = {c.name for c in database.get_columns("training")}
    added = {"sweep_id": "INTEGER REFERENCES sweep (id) ON DELETE CASCADE",
             "task_group": "VARCHAR(255)", "name": "VARCHAR(255)",
             "tags": "TEXT NOT NULL DEFAULT '[]'"}
    for column, kind in added.items():
        if column not in columns:
            database.execute_sql(f"ALTER TABLE training ADD COLUMN {column} {kind}")
    database.execute_sql("CREATE INDEX IF NOT EXISTS training_sweep_id ON training (sweep_id)")


def _v6_to_v7(database: SqliteDatabase) -> None:
    """Users' latent labels and notes: table ``latent_label``."""
    database.create_tables([LatentLabel])


def _v7_to_v8(database: SqliteDatabase) -> None:
    """The ``mlp_in`` hook point (transcoders' input) for models registered before it: every
    model the engine finds an MLP output in has its input too (the same MLP module, OPT's fc1,
    BERT's intermediate), so it joins the hook points of each model that lists mlp_out."""
    for model in LanguageModel.select(LanguageModel.id, LanguageModel.hook_points):
        points = list(model.hook_points or [])
        if "mlp_out" in points and "mlp_in" not in points:
            LanguageModel.update(hook_points=[*points, "mlp_in"]).where(
                LanguageModel.id == model.id).execute()


MIGRATIONS = [_v0_to_v1, _v1_to_v2, _v2_to_v3, _v3_to_v4, _v4_to_v5, _v5_to_v6, _v6_to_v7,
              _v7_to_v8]
SCHEMA_VERSION = len(MIGRATIONS)


def init_db(path: Path | str) -> SqliteDatabase:
    """Bind ``db`` to the SQLite file at ``path`` (WAL) and bring its schema up to date."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db.init(str(path), pragmas={"journal_mode": "wal", "foreign_keys": 1,
                                "synchronous": "normal", "busy_timeout": 10_000},
            timeout=10, check_same_thread=False)
    with db.connection_context():
        version = db.execute_sql("PRAGMA user_version").fetchone()[0]
        for i in range(version, SCHEMA_VERSION):
            with db.atomic():
                MIGRATIONS[i](db)
                db.execute_sql(f"PRAGMA user_version = {i + 1}")
    return db


def data_version() -> int:
    """SQLite's PRAGMA data_version: changes when another connection commits (a cheap poll)."""
    return db.execute_sql("PRAGMA data_version").fetchone()[0]
