"""The app's data: peewee models on SQLite (WAL) or PostgreSQL, shared by the web process and
the workers.

Imports peewee and the torch-free ``engine.files`` only (no Flask, no torch). The database is
known at run time: ``init_db(url)`` binds the deferred ``db`` (a ``DatabaseProxy`` every module
imports) to a ``sqlite:///path`` file (or a plain path) or a PostgreSQL server
(``postgresql://user:password@host:port/name``), and creates or migrates the schema.
Connections are per thread on both; the web opens one per request, the worker one per task
(``db.connection_context()``) and writes in short ``db.atomic()`` blocks.

Writers take turns on both back-ends, so a block that reads and then writes sees no commit in
between: on SQLite ``db.atomic()`` begins ``BEGIN IMMEDIATE``; on PostgreSQL each transaction
takes one transaction-scoped advisory lock (``WRITE_LOCK``) right after ``BEGIN`` (see
``AppPostgresqlDatabase``). Reads outside a transaction never wait.

Schema versions: SQLite keeps them in ``PRAGMA user_version``; PostgreSQL in the one-row table
``schema_version``, migrated in one transaction under ``pg_advisory_xact_lock(MIGRATION_LOCK)`` so
that processes starting together migrate once. ``MIGRATIONS[i]`` upgrades version i to i+1; a new
PostgreSQL database starts at 0 (v0 -> v1 creates today's tables, later steps check first).

SQL that differs between the two lives here: ``json_value`` (a number or text at a key of a JSON
text column), ``spread_metrics`` (a run's metric rows downsampled in the database), ``upsert``
(insert or replace on a unique key) and ``data_version`` (the live pages' change poll).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from peewee import (
    SQL,
    BooleanField,
    Case,
    Cast,
    ColumnBase,
    Database,
    DatabaseProxy,
    Expression,
    Field,
    FloatField,
    ForeignKeyField,
    Insert,
    IntegerField,
    Model,
    NodeList,
    PostgresqlDatabase,
    Select,
    SqliteDatabase,
    TextField,
    fn,
)
from peewee import CharField as _CharField

from .engine.files import json_safe

log = logging.getLogger(__name__)

WRITE_LOCK = 0x5AE5_0001
"""The PostgreSQL advisory lock key every ``db.atomic()`` transaction takes (writers in turn)."""
MIGRATION_LOCK = 0x5AE5_0002
"""The PostgreSQL advisory lock key the schema migration holds."""
_WRITE = re.compile(r"\s*(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)


class AppSqliteDatabase(SqliteDatabase):
    """Transactions take the write lock when they begin (BEGIN IMMEDIATE).

    With WAL, a deferred transaction that reads and then writes fails at once with "database is
    locked" when another connection committed in between; an immediate one waits its turn
    (busy_timeout). Web requests and worker threads all write in short read-then-write blocks.
    """

    def begin(self, lock_type: str | None = None) -> None:
        super().begin(lock_type or "IMMEDIATE")


class AppPostgresqlDatabase(PostgresqlDatabase):
    """PostgreSQL with SQLite's write discipline and column sizes.

    Every transaction takes the advisory lock ``WRITE_LOCK`` right after ``BEGIN`` (held to its
    commit or rollback), and a write outside a transaction runs in one: like SQLite's single
    writer and BEGIN IMMEDIATE, the app's read-then-write blocks (a claim of a queued training,
    a control request, a progress flush) run one at a time across every process and machine,
    so none reads a row another is about to change. ``lock_type`` (SQLite's) is accepted and
    ignored. Reads outside a transaction never wait.

    Column types: floats are DOUBLE PRECISION (REAL's 24-bit mantissa would round epoch
    timestamps to ~2 minutes), integers and ids BIGINT (byte counts and token counts pass 2**31,
    as on SQLite).
    """

    field_types = {**PostgresqlDatabase.field_types, "FLOAT": "DOUBLE PRECISION",
                   "INT": "BIGINT", "AUTO": "BIGSERIAL"}

    def begin(self, isolation_level: Any = None, lock_type: str | None = None) -> None:
        super().begin(isolation_level)
        try:
            self.execute_sql("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        except Exception:
            self.rollback()
            raise

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        """A write outside a transaction runs in one of its own (so it too waits for the write
        lock, as a SQLite write waits for an IMMEDIATE transaction); anything else as is.
        PostgreSQL text cannot hold a NUL character: one in a value becomes U+FFFD (in what is
        stored and in what is looked for alike), where SQLite kept it."""
        if params and any(isinstance(p, str) and "\x00" in p for p in params):
            params = [p.replace("\x00", "\ufffd") if isinstance(p, str) else p for p in params]
        if self.in_transaction() or not _WRITE.match(sql):
            return super().execute_sql(sql, params)
        with self.atomic():
            return super().execute_sql(sql, params)


db = DatabaseProxy()
"""The app database every module imports; ``init_db`` binds it (SQLite or PostgreSQL)."""
_SQLITE = AppSqliteDatabase(None)
_POSTGRES: AppPostgresqlDatabase | None = None


class CharField(_CharField):
    """A short text column without a length limit: SQLite never enforced VARCHAR(255), so on
    PostgreSQL it is plain VARCHAR too (a long name or label must not fail there only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", None)
        super().__init__(*args, **kwargs)


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


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = "\\ud"
"""How ``json.dumps`` writes a surrogate (lower case): the cheap test before a walk."""


def without_surrogates(value: Any) -> Any:
    """``value`` with each lone UTF-16 surrogate ("\\ud800") in its text, dict keys included,
    replaced by U+FFFD. Such a string can be neither encoded as UTF-8 (a page showing it fails)
    nor stored in a text column (the drivers refuse it); inside JSON it was stored escaped."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {without_surrogates(k): without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_surrogates(v) for v in value]
    return value


class JSONField(TextField):
    """JSON stored as text on both back-ends; non-finite floats are stored as null (standard JSON
    has no NaN, and the database's JSON functions read the text: ``json_value``). A lone
    surrogate in a string is stored as U+FFFD (``json.dumps`` would write it as an escape the
    pages cannot show and PostgreSQL's JSON functions refuse); a pair (an emoji) stays."""

    def db_value(self, value: Any) -> str | None:
        if value is None:
            return None
        text = json.dumps(json_safe(value))
        if _SURROGATE_ESCAPE in text:  # a pair or a lone one: json.loads tells them apart
            text = json.dumps(without_surrogates(json.loads(text)))
        return text

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
    worker = CharField(null=True)
    """The worker preparing it (``host:pid``) while ``preparing``: if that worker dies, another
    one queues the row again (``jobs.workers.requeue_preparations``)."""


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
    max_positions = IntegerField(null=True)
    """The longest context it reads (its config's ``max_position_embeddings``); null when its
    config does not say, or for rows prepared before schema 12."""

    class Meta:
        table_name = "language_model"


class Dataset(PreparedRow):
    """A corpus the user added (UI area "Datasets")."""

    context_size = IntegerField(default=128)
    max_tokens = IntegerField(null=True)
    text_field = CharField(default="text")
    n_documents = IntegerField(null=True)
    """Documents in the whole corpus (read to the end, whatever ``max_tokens``)."""
    n_documents_tokenised = IntegerField(null=True)
    """Documents with at least one token in the token store (its meta's ``n_documents``): fewer
    than ``n_documents`` when ``max_tokens`` stops the store early; null until tokenised."""
    n_tokens = IntegerField(null=True)
    """Tokens in the token store (whole contexts); null until tokenised."""
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
    worker = CharField(null=True)
    """The worker that runs (or last ran) it: its heartbeat name, ``host:pid``; set by the claim."""
    queue_seen_at = FloatField(null=True)
    """When a worker last held its queued task (a claim attempt, epoch seconds). A queued
    training whose task no worker has held for a while was lost with a killed worker
    (``jobs.workers.lost_tasks``) and is queued again."""

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
    """Written by each running worker every second; the top bar shows the newest one's age, the
    Workers page lists them all. ``created_at`` is when the worker started."""

    name = CharField(unique=True)
    """``host:pid``: a restarted worker is a new row."""
    pid = IntegerField()
    host = CharField(null=True)
    data_dir = TextField(null=True)
    """The worker's data folder on its host (one worker per data folder: ``worker.lock``)."""
    running = JSONField(default=list)
    """Ids of the trainings it is running now."""
    slots = IntegerField(default=1)
    """Trainings (or sweep sub-groups) it runs at once (``$SAE_STUDIO_MAX_TRAININGS``)."""
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


def _v0_to_v1(database: DatabaseProxy) -> None:
    database.create_tables(TABLES)


def _v1_to_v2(database: DatabaseProxy) -> None:
    """Models and datasets that fail end ``failed``, like trainings (they ended ``error``)."""
    for table in (LanguageModel, Dataset):
        table.update(status="failed").where(table.status == "error").execute()


def _v2_to_v3(database: DatabaseProxy) -> None:
    """Trainings get ``eval_progress`` (the ``evaluating`` status's progress)."""
    if "eval_progress" not in {c.name for c in database.get_columns("training")}:
        database.execute_sql("ALTER TABLE training ADD COLUMN eval_progress REAL")


def _v3_to_v4(database: DatabaseProxy) -> None:
    """Trainings keep their first start across Retry: ``attempt_started_at`` (the current
    attempt's start) and ``elapsed_before_s`` (earlier attempts' seconds)."""
    columns = {c.name for c in database.get_columns("training")}
    if "attempt_started_at" not in columns:
        database.execute_sql("ALTER TABLE training ADD COLUMN attempt_started_at REAL")
        database.execute_sql("UPDATE training SET attempt_started_at = started_at")
    if "elapsed_before_s" not in columns:
        database.execute_sql("ALTER TABLE training ADD COLUMN elapsed_before_s REAL "
                             "NOT NULL DEFAULT 0")


def _v4_to_v5(database: DatabaseProxy) -> None:
    """The time estimate's measurements: table ``calibration``."""
    database.create_tables([Calibration])


def _v5_to_v6(database: DatabaseProxy) -> None:
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


def _v6_to_v7(database: DatabaseProxy) -> None:
    """Users' latent labels and notes: table ``latent_label``."""
    database.create_tables([LatentLabel])


def _v7_to_v8(database: DatabaseProxy) -> None:
    """The ``mlp_in`` hook point (transcoders' input) for models registered before it: every
    model the engine finds an MLP output in has its input too (the same MLP module, OPT's fc1,
    BERT's intermediate), so it joins the hook points of each model that lists mlp_out."""
    for model in LanguageModel.select(LanguageModel.id, LanguageModel.hook_points):
        points = list(model.hook_points or [])
        if "mlp_out" in points and "mlp_in" not in points:
            LanguageModel.update(hook_points=[*points, "mlp_in"]).where(
                LanguageModel.id == model.id).execute()


def _v8_to_v9(database: DatabaseProxy) -> None:
    """Many workers: trainings say which worker runs them (``worker``) and when a worker last
    held their queued task (``queue_seen_at``); heartbeats say the host, what the worker runs
    and how many slots it has."""
    added = {"training": {"worker": "VARCHAR(255)", "queue_seen_at": "DOUBLE PRECISION"},
             "worker_heartbeat": {"host": "VARCHAR(255)", "data_dir": "TEXT",
                                  "running": "TEXT NOT NULL DEFAULT '[]'",
                                  "slots": "INTEGER NOT NULL DEFAULT 1"}}
    for table, columns in added.items():
        have = {c.name for c in database.get_columns(table)}
        for column, kind in columns.items():
            if column not in have:
                database.execute_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _v9_to_v10(database: DatabaseProxy) -> None:
    """Models and datasets say which worker prepares them (``worker``), so that a row left
    ``preparing`` by a dead worker is queued again while other workers live."""
    for table in ("language_model", "dataset"):
        if "worker" not in {c.name for c in database.get_columns(table)}:
            database.execute_sql(f"ALTER TABLE {table} ADD COLUMN worker VARCHAR")


def _v10_to_v11(database: DatabaseProxy) -> None:
    """Datasets say how many documents their token store holds (``n_documents_tokenised``)
    beside the corpus's count (``n_documents``); null for rows prepared before (the pages then
    show the corpus's count alone, as they did)."""
    if "n_documents_tokenised" not in {c.name for c in database.get_columns("dataset")}:
        database.execute_sql("ALTER TABLE dataset ADD COLUMN n_documents_tokenised BIGINT")


def _v11_to_v12(database: DatabaseProxy) -> None:
    """Models say the longest context they read (``max_positions``), so a training's form can
    refuse a dataset whose contexts are longer; null for rows prepared before (checked when the
    training loads the model, as it was)."""
    if "max_positions" not in {c.name for c in database.get_columns("language_model")}:
        database.execute_sql("ALTER TABLE language_model ADD COLUMN max_positions INTEGER")


def _v12_to_v13(database: DatabaseProxy) -> None:
    """Lone UTF-16 surrogates ("\\ud800") in stored text become U+FFFD: a JSON body could
    store one (escaped, in a JSON column: tags, a template's or a sweep's fields, a config)
    before such bodies were refused, and every page showing it failed (UTF-8 cannot encode
    it). Emoji (escaped surrogate pairs) stay. On SQLite a text column of any kind may also hold
    a surrogate as raw bytes (written by another program: Python cannot read that row); it
    is decoded and rewritten the same way. The drivers refuse surrogates in parameters, so the
    rows are found in SQL and rewritten one by one."""
    sqlite = not is_postgres()
    mark = database.param
    for model in TABLES:
        table = model._meta.table_name
        # the columns the table has now: a later schema's new column is not there yet
        present = {c.name for c in database.get_columns(table)}
        for field in model._meta.sorted_fields:
            if not isinstance(field, TextField | _CharField) or field.column_name not in present:
                continue
            column = field.column_name
            update = f'UPDATE "{table}" SET "{column}" = {mark} WHERE id = {mark}'
            if sqlite:  # UTF-8 of U+D800-U+DFFF starts ED A0-BF: candidates hold an ED byte
                rows = database.execute_sql(
                    f'SELECT id, CAST("{column}" AS BLOB) FROM "{table}" '
                    f"WHERE instr(CAST(\"{column}\" AS BLOB), X'ED') > 0").fetchall()
                for row_id, raw in rows:
                    try:
                        bytes(raw).decode("utf-8")
                        continue
                    except UnicodeDecodeError:
                        pass
                    try:
                        text = without_surrogates(bytes(raw).decode("utf-8", "surrogatepass"))
                    except UnicodeDecodeError:
                        text = bytes(raw).decode("utf-8", "replace")
                    database.execute_sql(update, (text, row_id))
            if not isinstance(field, JSONField):
                continue
            rows = database.execute_sql(
                f'SELECT id, "{column}" FROM "{table}" '
                f"WHERE lower(\"{column}\") LIKE {mark} ESCAPE '!'", ("%\\ud%",)).fetchall()
            for row_id, text in rows:
                try:
                    value = json.loads(text)
                except ValueError:
                    continue
                clean = without_surrogates(value)
                if clean != value:
                    database.execute_sql(update, (json.dumps(json_safe(clean)), row_id))


MIGRATIONS = [_v0_to_v1, _v1_to_v2, _v2_to_v3, _v3_to_v4, _v4_to_v5, _v5_to_v6, _v6_to_v7,
              _v7_to_v8, _v8_to_v9, _v9_to_v10, _v10_to_v11, _v11_to_v12, _v12_to_v13]
SCHEMA_VERSION = len(MIGRATIONS)


def sqlite_path(url: str | Path) -> Path | None:
    """The file a ``sqlite:///path`` URL (or a plain path) names; None for another scheme.
    ``sqlite:///data/app.db`` is relative, ``sqlite:////srv/app.db`` absolute."""
    text = str(url)
    if text.startswith("sqlite:///"):
        return Path(text.removeprefix("sqlite:///"))
    return None if "://" in text else Path(text)


def url_scheme(url: str | Path) -> str:
    """The scheme of a URL (``postgresql``), for messages that must not echo a password."""
    return str(url).split("://", 1)[0] if "://" in str(url) else ""


POSTGRES_SCHEMES = ("postgresql", "postgres")


def url_problem(url: str | Path) -> str | None:
    """Why ``init_db`` refuses ``url`` (one sentence that never repeats a password; for a
    command line's error), or None when it is a SQLite path or a PostgreSQL URL."""
    if sqlite_path(url) is not None:
        return None
    scheme = url_scheme(url)
    if scheme not in POSTGRES_SCHEMES:
        return (f"Unsupported database URL '{scheme}://...'; use sqlite:///path or "
                "postgresql://user:password@host:port/name.")
    try:
        parsed = urlsplit(str(url))
        parsed.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        return f"The database URL '{scheme}://...' has a port that is not a number from 0 to 65535."
    if not parsed.path.strip("/"):
        return (f"The database URL '{scheme}://...' names no database; use "
                "postgresql://user:password@host:port/name.")
    return None


def init_db(url: Path | str) -> Database:
    """Bind ``db`` to the database at ``url`` and bring its schema up to date: a ``sqlite:///``
    URL or a plain path is a SQLite file (WAL); ``postgresql://user:password@host:port/name``
    (or ``postgres://``, query options such as ``?sslmode=require`` passed to libpq) a
    PostgreSQL database, which must exist. Raises ValueError (``url_problem``'s sentence) for
    another URL, peewee's OperationalError when the server cannot be reached."""
    problem = url_problem(url)
    if problem:
        raise ValueError(problem)
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _bind(_SQLITE)
        _SQLITE.init(str(path), pragmas={"journal_mode": "wal", "foreign_keys": 1,
                                         "synchronous": "normal", "busy_timeout": 10_000},
                     timeout=10, check_same_thread=False)
        _migrate_sqlite()
    else:
        from playhouse.db_url import parse

        params = parse(str(url), unquote_password=True, unquote_user=True)
        name = params.pop("database")
        params.setdefault("connect_timeout", 10)
        global _POSTGRES
        if _POSTGRES is None:
            _POSTGRES = AppPostgresqlDatabase(None)
        _bind(_POSTGRES)
        _POSTGRES.init(name, **params)
        _migrate_postgres()
    return db.obj


def _bind(database: Database) -> None:
    """Point ``db`` at ``database`` (closing this thread's connection to the one before)."""
    if db.obj is not None and db.obj is not database and not db.obj.is_closed():
        db.obj.close()
    if db.obj is not database:
        db.initialize(database)


def _migrate_sqlite() -> None:
    """Run the missing migrations, each in its own transaction with its ``user_version``."""
    with db.connection_context():
        version = db.execute_sql("PRAGMA user_version").fetchone()[0]
        for i in range(version, SCHEMA_VERSION):
            with db.atomic():
                MIGRATIONS[i](db)
                db.execute_sql(f"PRAGMA user_version = {i + 1}")
        if version < SCHEMA_VERSION:
            log.info("Migrated the database from schema %d to %d", version, SCHEMA_VERSION)


def _migrate_postgres() -> None:
    """Run the missing migrations in one transaction under ``MIGRATION_LOCK``: a second process
    starting meanwhile waits, then finds the schema current. DDL is transactional on
    PostgreSQL, so a failed migration leaves the database as it was."""
    with db.connection_context():
        with db.atomic():
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            db.execute_sql("CREATE TABLE IF NOT EXISTS schema_version "
                           "(version INTEGER NOT NULL)")
            row = db.execute_sql("SELECT version FROM schema_version").fetchone()
            if row is None:
                db.execute_sql("INSERT INTO schema_version (version) VALUES (0)")
            version = row[0] if row else 0
            for i in range(version, SCHEMA_VERSION):
                MIGRATIONS[i](db)
            if version < SCHEMA_VERSION:
                db.execute_sql("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
    if version < SCHEMA_VERSION:
        log.info("Migrated the database from schema %d to %d", version, SCHEMA_VERSION)


def schema_version() -> int:
    """The bound database's schema version (``SCHEMA_VERSION`` once ``init_db`` ran)."""
    if is_postgres():
        return db.execute_sql("SELECT version FROM schema_version").fetchone()[0]
    return db.execute_sql("PRAGMA user_version").fetchone()[0]


def is_bound() -> bool:
    """Whether ``db`` is bound to a database in this process (``init_db`` ran)."""
    return db.obj is not None and db.obj.database is not None


def is_postgres() -> bool:
    """Whether ``db`` is bound to PostgreSQL (else SQLite)."""
    return isinstance(db.obj, PostgresqlDatabase)


def open_app_database() -> None:
    """Bind ``db`` to the configured app database (``settings.database_url()``), migrating it."""
    from .settings import database_url

    init_db(database_url())


def data_version() -> int:
    """A number that changes when a write is committed (a cheap poll for live pages).

    SQLite: ``PRAGMA data_version`` (changes when another connection commits). PostgreSQL: a
    hash of ``pg_current_snapshot()`` (PostgreSQL 13+), the set of transactions a new query would
    see as committed: it changes whenever a transaction that wrote anything ends (committed or
    rolled back, by anyone, in any database of the server) and never for reads. It is read from
    the same state that decides visibility, so a commit the caller's next query does not see yet
    changes a later value (a write-ahead-log position can already include a commit that queries
    do not see yet)."""
    if is_postgres():
        text = db.execute_sql("SELECT pg_current_snapshot()::text").fetchone()[0]
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")
    return db.execute_sql("PRAGMA data_version").fetchone()[0]


# ---------------------------------------------------------------------------- portable SQL
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def json_value(column: Any, key: str, *, text: bool = False) -> ColumnBase:
    """The number (``text``: the text) at top-level ``key`` of a JSON text column, as SQL for
    the bound database; NULL when the key is missing.

    SQLite: ``json_extract(column, '$.key')``. PostgreSQL: ``CAST(column AS json) ->> 'key'``,
    cast to double precision when the value is a JSON number (NULL otherwise: a string or a
    boolean is not a number). ``key`` is a plain name (letters, digits, underscores)."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"Not a plain JSON key: {key!r}")
    if not is_postgres():
        return fn.json_extract(column, f"$.{key}")
    as_json = Cast(column, "json")
    value = NodeList((as_json, SQL(f"->> '{key}'")), parens=True)
    if text:
        return value
    kind = fn.json_typeof(NodeList((as_json, SQL(f"-> '{key}'"))))
    return Case(None, [(kind == "number", Cast(value, "double precision"))])


def spread_metrics(training_id: int, limit: int, *keys: str | tuple[str, ...]
                   ) -> list[tuple[Any, ...]]:
    """``(step, value, ...)`` of at most ~``limit`` of a training's Metric rows spread over the
    run, oldest first: every stride-th row by step, the first and last kept. A key names a
    number in the row's ``data`` (``json_value``); a tuple of keys is the first present.

    Downsampled and unpacked in the database (row_number + the JSON functions), so a chart
    costs the same whether its run has 100 or 100,000 metric rows.
    """
    n = Metric.select().where(Metric.training == training_id).count()
    if n == 0:
        return []
    stride = max(1, -(-n // limit))
    rn = fn.row_number().over(order_by=[Metric.step]) - 1
    rows = (Metric.select(Metric.step, Metric.data, rn.alias("rn"))
            .where(Metric.training == training_id).alias("m"))

    def value(key: str | tuple[str, ...]) -> ColumnBase:
        if isinstance(key, str):
            return json_value(rows.c.data, key)
        return fn.coalesce(*(json_value(rows.c.data, k) for k in key))

    mod = fn.mod(rows.c.rn, stride) if is_postgres() else Expression(rows.c.rn, "%", stride)
    query = (Select([rows], [rows.c.step, *(value(k) for k in keys)])
             .where((mod == 0) | (rows.c.rn == n - 1)).order_by(rows.c.step))
    return list(db.execute(query).fetchall())


def upsert(query: Insert, *keys: Field) -> Insert:
    """The insert ``query`` replacing the row that has the same ``keys`` (a unique index) when
    there is one: every other column takes the new values, as SQLite's INSERT OR REPLACE did,
    the row keeping its id (``ON CONFLICT (keys) DO UPDATE``, on SQLite and PostgreSQL)."""
    names = {k.name for k in keys}
    kept = [f for f in keys[0].model._meta.sorted_fields
            if f.name not in names and not f.primary_key]
    return query.on_conflict(conflict_target=list(keys), preserve=kept)
