"""The Huey tasks: prepare models and datasets, run trainings, answer the interactive probes
(a trained SAE on the user's text, steering; high priority, results returned). Run the worker with

    huey_consumer worker.tasks.huey -w 3 -k thread -m 0.1

Each task owns its database connection and writes in short ``db.atomic()`` blocks; the engine
(and so torch) is imported only inside task bodies, so the web process may import this module
to enqueue. A task never raises: a failure is stored on its row (status ``failed``) with a
sentence in ``error`` and the traceback in the log; a probe returns its error as its result.
Only the probes return a value (Huey stores no result for ``None``), so nothing accumulates in
the queue's result store.

Many workers (one per data folder, on any number of machines) may share the database, the queue
and the artifacts folder. A worker claims a training (``_claim``: conditional, so two never take
the same one) when one of its own slots is free and the training's device is one it has, else
puts the task back on the queue for another; the row then names it (``Training.worker``, the
``host:pid`` of its heartbeat). Each worker beats every second and, every few seconds, marks
the trainings of dead workers interrupted (``jobs.workers``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from huey.signals import SIGNAL_INTERRUPTED
from peewee import fn

from . import settings
from .db import (
    RUNNING,
    Checkpoint,
    Dataset,
    LanguageModel,
    Metric,
    Training,
    WorkerHeartbeat,
    db,
    is_bound,
    open_app_database,
)
from .jobs import common
from .jobs import workers as pool
from .progress import Throttled
from .queue import huey

__all__ = ["huey", "prepare_model", "prepare_dataset", "probe_activations", "probe_steer",
           "run_group", "run_training"]

log = logging.getLogger("worker.tasks")

HEARTBEAT_S = 1.0
"""Seconds between heartbeats (``jobs.health``: alive when younger than 5 s, dead after 15)."""
REAP_S = 5.0
"""Seconds between a worker's looks for dead workers whose trainings it marks interrupted."""
REMEASURE_S = 300.0
"""How often an idle worker measures its device's speed again (seconds; ``_heartbeat_loop``)."""
PROGRESS_S = 0.5
"""Seconds between writes of a model's or dataset's progress."""
RETRY_CLAIM_S = 2
"""A training this worker cannot take now (no free slot, or its device is not here) goes back
to the queue for this many seconds; another worker (or this one, later) takes it then."""
INTERRUPTED_MESSAGE = pool.INTERRUPTED_MESSAGE
_init_lock = threading.Lock()
_claim_lock = threading.Lock()


# ---------------------------------------------------------------------------- helpers
@contextmanager
def connection() -> Iterator[None]:
    """This thread's connection for the task: opened (and closed) here unless already open
    (an immediate-mode task runs inside its caller's connection)."""
    with _init_lock:
        if not is_bound():
            open_app_database()
    opened = db.is_closed()
    if opened:
        db.connect()
    try:
        yield
    finally:
        if opened and not db.is_closed():
            db.close()


def worker_name() -> str:
    """This worker's name, ``host:pid``: its heartbeat row and the ``worker`` of the trainings
    it claims."""
    return f"{socket.gethostname()}:{os.getpid()}"


def error_message(exc: BaseException) -> str:
    """The sentence to store: EngineError messages as they are, others prefixed by their class."""
    from .engine.errors import EngineError

    if isinstance(exc, EngineError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def log_failure(what: str, exc: BaseException) -> None:
    """Log a task's failure: an EngineError (bad input the engine explained: a missing file, a
    context too long, a link swapped in) as its sentence, anything else with its traceback."""
    from .engine.errors import EngineError

    if isinstance(exc, EngineError):
        log.warning("%s failed: %s", what, exc)
    else:
        log.error("%s failed", what, exc_info=exc)


def _update(model: type, row_id: int, **values: Any) -> None:
    with db.atomic():
        model.update(updated_at=time.time(), **values).where(model.id == row_id).execute()


def _row_progress(model: type, row_id: int, worker: str) -> Throttled:
    """A progress callback (fraction, message) writing the row at most every PROGRESS_S, while
    ``worker`` is preparing it."""
    def write(fraction: float, message: str) -> None:
        with db.atomic():
            model.update(progress=fraction, message=message, updated_at=time.time()).where(
                (model.id == row_id) & (model.worker == worker)).execute()

    return Throttled(write, PROGRESS_S)


# ---------------------------------------------------------------------------- models, datasets
def _prepare(table: type, row_id: int, work: Callable[[Any, Throttled], dict[str, Any]],
             first_message: str) -> None:
    """Run ``work(row, report)`` for a model or dataset row: claimed from ``queued`` as
    ``preparing`` with this worker's name (a row already taken or ready is left alone: a task
    queued twice does nothing the second time), then ``ready`` with the values ``work`` returns,
    or ``failed`` with the sentence of its error — unless the row was queued again meanwhile
    (this worker was taken for dead: ``jobs.workers.requeue_preparations``)."""
    me = worker_name()
    with connection():
        mine = (table.id == row_id) & (table.worker == me) & (table.status == "preparing")
        try:
            with db.atomic():
                claimed = table.update(status="preparing", worker=me, error=None, progress=0.0,
                                       message=first_message, updated_at=time.time()) \
                    .where((table.id == row_id) & (table.status == "queued")).execute()
            if not claimed:
                log.info("%s %s is not queued: left alone", table.__name__, row_id)
                return
            values = work(table.get_by_id(row_id), _row_progress(table, row_id, me))
            with db.atomic():
                table.update(status="ready", progress=1.0, error=None, worker=None,
                             updated_at=time.time(), **values).where(mine).execute()
        except Exception as exc:  # stored on the row, logged (``log_failure``)
            log_failure(f"Preparing {table.__name__} {row_id}", exc)
            with db.atomic():
                table.update(status="failed", error=error_message(exc), message=None,
                             worker=None, updated_at=time.time()).where(mine).execute()


@huey.task()
def prepare_model(model_id: int) -> None:
    """Load the model once (downloading or converting it if needed) and store what it is."""
    _prepare(LanguageModel, model_id, _prepare_model, "Loading the model...")


def _prepare_model(model: LanguageModel, report: Throttled) -> dict[str, Any]:
    from .engine.models import load_model

    unchanged_path(model.source)
    loaded = load_model(model.source, data_dir=settings.data_dir(),
                        progress=lambda message, fraction: report(fraction, message))
    info = loaded.info
    return dict(message=None, architecture=info.architecture, model_type=info.model_type,
                n_layers=info.n_layers, hidden_dim=info.hidden_size,
                vocab_size=info.vocab_size, n_params=info.n_params, dtype=info.dtype,
                is_causal=info.is_causal, hook_points=list(info.hook_points),
                max_positions=info.max_positions,
                path=str(Path(info.path).resolve()))


@huey.task()
def prepare_dataset(dataset_id: int) -> None:
    """Count the corpus's documents (``n_documents``: all of them); tokenise with the newest
    ready model's tokenizer (if any): the token store's tokens (``n_tokens``) and documents
    (``n_documents_tokenised``, fewer when ``max_tokens`` stops it early)."""
    _prepare(Dataset, dataset_id, _prepare_dataset, "Reading documents...")


def _prepare_dataset(ds: Dataset, report: Throttled) -> dict[str, Any]:
    from .engine.corpora import iter_documents

    unchanged_path(ds.source)
    n_docs, first = 0, []
    for text in iter_documents(ds.source, text_field=ds.text_field):
        n_docs += 1
        if len(first) < 3:
            first.append(text[:2000])
        if n_docs % 1000 == 0:
            report(0.0, f"Counted {n_docs:,} documents...")
    if n_docs == 0:
        from .engine.errors import DataError

        raise DataError(f"The corpus '{ds.name}' has no documents (no non-empty text).")

    model = (LanguageModel.select().where(LanguageModel.status == "ready")
             .order_by(LanguageModel.id.desc()).first())
    if model is None:
        return dict(n_documents=n_docs, n_documents_tokenised=None, n_tokens=None,
                    samples=first, message="tokenised when a training starts")

    from transformers import AutoTokenizer

    from .engine.corpora import TokenStore, build_token_store
    from .engine.pipeline import token_store_dir

    report(0.0, f"Tokenising with {model.name}...")
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    out = token_store_dir(settings.data_dir(), ds.source, model.path, ds.context_size,
                          ds.max_tokens, ds.text_field)
    if (out / "meta.json").is_file():
        store = TokenStore.open(out)
    else:
        store = build_token_store(ds.source, tokenizer, out, context_size=ds.context_size,
                                  max_tokens=ds.max_tokens, text_field=ds.text_field,
                                  progress=report)
    return dict(n_documents=n_docs, n_documents_tokenised=store.n_documents,
                n_tokens=store.n_tokens, samples=store.decode_samples(tokenizer, 3),
                message=f"Tokenised with {model.name} ({store.n_contexts:,} contexts).")


# ---------------------------------------------------------------------------- trainings
@huey.task()
def run_training(training_id: int, resume: bool = False) -> None:
    """Run (or continue, ``resume=True``) a training, reporting through ``TrainingReporter``."""
    with connection():
        try:
            _run_training(training_id, resume)
        except Exception as exc:  # stored on the row, logged (``log_failure``)
            log_failure(f"Training {training_id}", exc)
            _fail(training_id, exc)


def _fail(training_id: int, exc: BaseException) -> None:
    """Store that an attempt failed, with its one-line message."""
    with db.atomic():
        Training.update(status="failed", error=error_message(exc), requested=None,
                        finished_at=time.time(), updated_at=time.time()) \
            .where(Training.id == training_id).execute()


def device_fits(requested: str | None, gpus: int = 1) -> bool:
    """Whether a training asking for the device ``requested`` (its config's ``device``) on
    ``gpus`` processes can run on this worker: ``auto`` and ``cpu`` anywhere, ``cuda`` /
    ``cuda:N`` where CUDA has more than N devices, ``mps`` where MPS is available; with
    ``gpus`` > 1, ``cpu`` anywhere (gloo processes) and ``cuda`` / ``auto`` where CUDA has at
    least ``gpus`` devices. A name torch does not know fits nowhere (``jobs.configs`` refuses
    such names before a training is queued)."""
    import torch

    name = str(requested or "auto").strip().lower()
    if gpus > 1 and name in ("auto", "cuda"):
        return torch.cuda.is_available() and torch.cuda.device_count() >= gpus
    if name in ("auto", "cpu"):
        return True
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return bool(torch.backends.mps.is_available())
    return device.type == "cpu"


def _claim(training_ids: list[int]) -> list[int]:
    """Claim the queued trainings among ``training_ids`` (one, or a sweep's sub-group: one
    slot, all its queued rows or none) for this worker: status initializing, ``worker`` this
    worker's name. Returns the ids claimed, in order; [] when none is queued (deleted, stopped,
    or claimed by another worker meanwhile), when their device is not here, or when this
    worker's slots (``settings.max_concurrent_trainings()``) are all busy with its own trainings.

    Safe beside other workers on any database: the update is conditional (``status = 'queued'``)
    and its affected-row count decides; when another worker took some of the rows first, this
    claim is rolled back. The lock keeps this worker's own threads from sharing out one slot."""
    me = worker_name()
    with db.atomic():  # this task is alive (``jobs.workers.lost_tasks``)
        Training.update(queue_seen_at=time.time()) \
            .where(Training.id.in_(training_ids) & (Training.status == "queued")).execute()
    with _claim_lock, db.atomic() as txn:
        rows = list(Training.select(Training.id, Training.config)
                    .where(Training.id.in_(training_ids) & (Training.status == "queued")))
        if not rows:
            return []
        if not all(device_fits((r.config or {}).get("device"), _gpus(r.config)) for r in rows):
            return []
        busy = {t.task_group or f"#{t.id}" for t in Training.select(Training.id,
                                                                     Training.task_group)
                .where(Training.status.in_(RUNNING) & (Training.worker == me)
                       & Training.id.not_in(training_ids))}
        if len(busy) >= settings.max_concurrent_trainings():
            return []
        queued = {r.id for r in rows}
        now = time.time()
        n = Training.update(status="initializing", worker=me,
                            started_at=fn.COALESCE(Training.started_at, now),
                            attempt_started_at=now, requested=None, error=None,
                            finished_at=None, eval_progress=None, updated_at=now) \
            .where(Training.id.in_(sorted(queued)) & (Training.status == "queued")).execute()
        if n != len(queued):  # another worker took some of them first: all or none
            txn.rollback()
            return []
        return [i for i in training_ids if i in queued]


def _gpus(config: dict[str, Any] | None) -> int:
    """The processes a training's config asks for (``gpus``; 1 when unset or bad)."""
    try:
        return max(1, int((config or {}).get("gpus") or 1))
    except (TypeError, ValueError):
        return 1


def _run_training(training_id: int, resume: bool) -> None:
    t = Training.get_or_none(Training.id == training_id)
    if t is None or t.status != "queued":
        return
    if not _claim([training_id]):
        t = Training.get_or_none(Training.id == training_id)
        if t is not None and t.status == "queued":
            run_training.schedule((training_id, resume), delay=RETRY_CLAIM_S)
        return

    from .engine.devices import release_host_memory
    from .engine.errors import FolderInUse
    from .engine.files import folder_lock

    out_dir = Path(t.out_dir or settings.trainings_dir() / str(training_id))
    try:
        with folder_lock(out_dir):  # never beside another trainer of this run (an orphan)
            if (gpus := _gpus(t.config)) > 1:
                from . import ddp

                ddp.run(training_id, gpus, out_dir)
            else:
                _train(t, out_dir)
    except FolderInUse as exc:
        _folder_in_use([training_id], exc)
    finally:
        release_host_memory()  # the heap keeps a CPU training's freed blocks until now


def _folder_in_use(training_ids: list[int], exc: Exception) -> None:
    with db.atomic():
        Training.update(status="interrupted", error=f"{exc} Retry continues from the "
                        "newest checkpoint then.", requested=None, finished_at=time.time(),
                        updated_at=time.time()).where(Training.id.in_(training_ids)).execute()


def _keep_rows_until(training_id: int, step: int | None, out_dir: Path) -> None:
    """Before an attempt: a fresh start (``step`` None) forgets the rows of an earlier one; a
    continued run keeps the metrics up to ``step`` and the checkpoints still on disk."""
    from .engine.checkpoints import list_checkpoints

    with db.atomic():
        if step is None:
            Metric.delete().where(Metric.training == training_id).execute()
            Checkpoint.delete().where(Checkpoint.training == training_id).execute()
        else:
            Metric.delete().where((Metric.training == training_id) & (Metric.step > step)) \
                .execute()
            on_disk = {str(p) for _, p in list_checkpoints(out_dir / "checkpoints")}
            Checkpoint.delete().where((Checkpoint.training == training_id)
                                      & Checkpoint.path.not_in(on_disk)).execute()
            Training.update(current_step=step).where(Training.id == training_id).execute()


def unchanged_path(source: str | None) -> None:
    """A local file or folder is stored by its resolved path when it is added (``jobs.common.
    local_path``: checked then to be in an allowed folder); before the worker reads one, the
    part of its path below the allowed folder it is in (``settings.root_forms``; else its own
    folder) must hold no link. A link put there since would have the worker read a file nobody
    allowed: DataError naming it. Names and Hub ids (relative) are left alone."""
    from .engine.errors import DataError

    if not source or not os.path.isabs(source):
        return
    path = Path(source)
    # links above the folder it was added from (a shared mount reached through one) are fine
    roots = [r for r in settings.root_forms() if path.is_relative_to(r) and r != path]
    base = max(roots, key=lambda r: len(r.parts)) if roots else path.parent
    try:
        moved = path.resolve() != base.resolve() / path.relative_to(base)
    except (OSError, RuntimeError):  # a loop of links
        moved = True
    if moved:
        raise DataError(f"'{source}' has been replaced by a link (or moved behind one) since it "
                        "was added, so it is not read; add the file or folder again.")


def local_config(t: Training) -> dict[str, Any]:
    """The training's config for this machine. Its ``model`` is the folder the worker that
    prepared the model resolved, in that worker's data folder (a per-machine cache); where that
    folder is not here, the model's source is used instead and resolved as the engine does
    (a bundled name converted into this worker's data folder, a Hub id downloaded). The token
    store is per machine too: the pipeline builds a missing one in this data folder."""
    config = dict(t.config or {})
    path = config.get("model")
    if path and not Path(str(path)).expanduser().exists() and t.model.source:
        config["model"] = t.model.source
    for key in ("model", "dataset"):
        unchanged_path(config.get(key))
    return config


def _names(t: Training) -> dict[str, Any]:
    """The names the user gave, for the export and the report."""
    return {"model": t.model.source, "model_name": t.model.source,
            "dataset": t.dataset.source, "dataset_path": t.dataset.source}


def _finish(training_id: int, values: dict[str, Any], interrupted: bool) -> str:
    """Store how an attempt ended (its values as ``train_and_evaluate`` returns them); returns
    the status: ``interrupted`` (the worker stopped), ``stopped`` or ``completed``."""
    if interrupted:
        status, error = "interrupted", INTERRUPTED_MESSAGE
    elif values["stopped"]:
        status, error = "stopped", None
    else:
        status, error = "completed", None
    if "report" in values["eval"]:
        values["eval"]["report"] = bool(values["eval"]["report"])  # the API's flag
    with db.atomic():
        Training.update(status=status, error=error, result=values,
                        current_step=values["steps"], requested=None, finished_at=time.time(),
                        updated_at=time.time()).where(Training.id == training_id).execute()
    return status


def _train(t: Training, out_dir: Path, dist: Any = None, device: Any = None) -> None:
    """Run a claimed training in ``out_dir`` (its folder lock held) and store how it ended.

    Under ``dist`` (one rank of ``worker.ddp``, its process group joined, on ``device``) rank
    0 does all of this and the other ranks train their shards silently."""
    from .engine.checkpoints import newest_loadable
    from .engine.config import TrainConfig
    from .engine.devices import pick_device
    from .engine.distributed import SINGLE
    from .engine.pipeline import train_and_evaluate
    from .engine.trainer import Callbacks
    from .progress import TrainingReporter

    dist = dist or SINGLE
    training_id = t.id
    cfg = TrainConfig.from_dict(local_config(t))
    device = device or pick_device(cfg.device)
    if not dist.is_main:  # rank 0 picked the checkpoint; one answer for all the ranks
        resume = dist.broadcast_object(None)
        train_and_evaluate(cfg, out_dir, data_dir=settings.data_dir(), device=device,
                           callbacks=Callbacks(), resume=Path(resume) if resume else None,
                           names=_names(t), evaluate=False, dist=dist)
        return
    reporter = TrainingReporter(training_id)
    # Always continue from the newest checkpoint that loads when there is one (a fresh
    # training's folder is empty): a stale queue entry of a retried training must not restart
    # it from step 0.
    found = newest_loadable(out_dir / "checkpoints", lambda path, exc: reporter.log(
        f"Skipping {path.name}: {exc} Continuing from an older checkpoint.", "warning"))
    checkpoint = found[0] if found else None
    dist.broadcast_object(str(checkpoint) if checkpoint else None)
    shutil.rmtree(out_dir / "eval", ignore_errors=True)  # a report is for the weights it read
    _keep_rows_until(training_id, found[1].step if found else None, out_dir)

    _update(Training, training_id, device=str(device) if not dist.enabled
            else f"{device.type} x{dist.world_size}")
    reporter.log(f"Preparing the model and activations on {device}"
                 + (f" ({dist.world_size} processes)..." if dist.enabled else "..."))

    values = train_and_evaluate(
        cfg, out_dir, data_dir=settings.data_dir(), device=device,
        callbacks=reporter.callbacks(), resume=checkpoint, names=_names(t),
        prepare_progress=reporter.preparing, after_fit=reporter.close,
        evaluate=lambda: not reporter.interrupted,
        on_eval_start=reporter.start_evaluation, eval_progress=reporter.evaluation_progress,
        log=reporter.log, on_eval_error=_eval_failed(reporter), dist=dist)
    eval_ended = time.time()
    status = _finish(training_id, values, reporter.interrupted)
    if status == "completed" and checkpoint is None and not dist.enabled:  # a clean sample
        from .jobs.estimates import record_calibration

        try:
            record_calibration(training_id, cfg, reporter.timings, values, eval_ended)
        except Exception:  # the training stands; only the time estimate misses it
            log.exception("Recording the timings of training %s failed", training_id)


def _eval_failed(reporter: Any) -> Callable[[Exception], None]:
    def failed(exc: Exception) -> None:  # the trained SAEs are saved; only the report is lost
        log.error("Evaluation of training(s) %s failed", reporter.ids, exc_info=exc)
        reporter.log(f"Evaluation failed: {error_message(exc)}", "error")
    return failed


# ---------------------------------------------------------------------------- sweeps
@huey.task()
def run_group(training_ids: list[int]) -> None:
    """Train a sweep's sub-group together (one forward pass per step for all of them) and
    evaluate them in one held-out pass; each SAE's row reports as a training's does."""
    ids = [int(i) for i in training_ids]
    with connection():
        try:
            _run_group(ids)
        except Exception as exc:  # stored on the rows, logged (``log_failure``)
            log_failure(f"Sweep group {ids}", exc)
            with db.atomic():
                Training.update(status="failed", error=error_message(exc), requested=None,
                                finished_at=time.time(), updated_at=time.time()) \
                    .where(Training.id.in_(ids) & Training.status.in_(RUNNING)).execute()


def _run_group(training_ids: list[int]) -> None:
    claimed = _claim(training_ids)
    if not claimed:
        if Training.select().where(Training.id.in_(training_ids)
                                   & (Training.status == "queued")).exists():
            run_group.schedule((training_ids,), delay=RETRY_CLAIM_S)
        return

    from contextlib import ExitStack

    from .engine.errors import FolderInUse
    from .engine.files import folder_lock

    trainings = [Training.get_by_id(i) for i in claimed]
    out_dirs = [Path(t.out_dir or settings.trainings_dir() / str(t.id)) for t in trainings]
    try:
        with ExitStack() as locks:
            for out_dir in out_dirs:
                locks.enter_context(folder_lock(out_dir))
            _train_group(trainings, out_dirs)
    except FolderInUse as exc:
        _folder_in_use(claimed, exc)
    finally:
        from .engine.devices import release_host_memory

        release_host_memory()


def _train_group(trainings: list[Training], out_dirs: list[Path]) -> None:
    """Run a claimed sub-group (every run folder locked) and store how each SAE ended."""
    from .engine.checkpoints import list_checkpoints
    from .engine.config import TrainConfig
    from .engine.devices import pick_device
    from .engine.group import resume_points, train_group
    from .progress import GroupReporter

    reporter = GroupReporter([t.id for t in trainings])
    # the newest step at which every member has a checkpoint that loads (none: a fresh start)
    resume = resume_points(out_dirs, lambda path, exc: reporter.log(
        f"Skipping {path.parent.parent.name}/{path.name}: {exc} Continuing the group from an "
        "older checkpoint.", "warning"))
    step = None
    if resume is not None:
        step = {str(p): s for s, p in list_checkpoints(out_dirs[0] / "checkpoints")}[
            str(resume[0])]
    for t, out_dir in zip(trainings, out_dirs, strict=True):
        shutil.rmtree(out_dir / "eval", ignore_errors=True)
        _keep_rows_until(t.id, step, out_dir)

    cfgs = [TrainConfig.from_dict(local_config(t)) for t in trainings]
    device = pick_device(cfgs[0].device)
    with db.atomic():
        Training.update(device=str(device), updated_at=time.time()) \
            .where(Training.id.in_(reporter.ids)).execute()
    reporter.log(f"Preparing the model and activations on {device} for {len(trainings)} SAEs "
                 "trained together...")
    out = train_group(
        cfgs, out_dirs, data_dir=settings.data_dir(), device=device,
        callbacks=reporter.callbacks(), member_callbacks=reporter.member_callbacks(),
        resume=resume, names=_names(trainings[0]), prepare_progress=reporter.preparing,
        after_fit=reporter.close, evaluate=lambda: not reporter.interrupted,
        on_eval_start=reporter.start_evaluation, eval_progress=reporter.evaluation_progress,
        log=reporter.log, on_eval_error=_eval_failed(reporter))
    for t, values in zip(trainings, out["runs"], strict=True):
        _finish(t.id, values, reporter.interrupted)


# ---------------------------------------------------------------------------- probes
PROBE_PRIORITY = 100
"""Huey priority of the interactive probes: taken before queued trainings and preparations
(which have the default, 0) by the next free worker thread."""


@huey.task(priority=PROBE_PRIORITY)
def probe_activations(training_id: int, checkpoint: str, text: str,
                      latent: int | None) -> dict[str, Any]:
    """The SAE's latents on ``text`` (``engine.probe.Probe.activations``); see ``_probe``."""
    return _probe(training_id, checkpoint, lambda probe: probe.activations(text, latent))


@huey.task(priority=PROBE_PRIORITY)
def probe_steer(training_id: int, checkpoint: str, prompt: str, latent: int, coefficient: float,
                max_new_tokens: int, seed: int | None) -> dict[str, Any]:
    """Baseline and steered continuations of ``prompt`` (``engine.probe.Probe.steer``)."""
    return _probe(training_id, checkpoint, lambda probe: probe.steer(
        prompt, latent, coefficient, max_new_tokens, seed))


def _probe(training_id: int, checkpoint: str, work: Callable[[Any], Any]) -> dict[str, Any]:
    """Run ``work(probe)`` on the training's SAE in ``checkpoint`` with its model, kept warm
    by ``worker.interactive`` (keyed by training, checkpoint and the file's mtime).

    Never raises: ``{"result", "warm", "seconds"}`` (``warm``: the probe was loaded already;
    ``seconds``: the whole task), or ``{"error": sentence, "errors": {field: message},
    "status": HTTP status}`` (404 no such training, 409 checkpoint gone or unreadable, 422 bad
    input the engine found, 500 a bug, logged)."""
    from .engine.errors import CheckpointError, EngineError, ModelLoadError
    from .interactive import CACHE

    t0 = time.perf_counter()
    try:
        with connection():
            t = Training.get_or_none(Training.id == training_id)
            if t is None:
                return {"error": f"Training {training_id} does not exist.", "status": 404}
            source, device_name = t.model.source, (t.config or {}).get("device", "auto")
        path = Path(checkpoint)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return {"error": f"The checkpoint {path.name} of training {training_id} is gone; "
                    "try again (a newer one is used then).", "status": 409}
        entry, warm = CACHE.get((training_id, str(path), mtime),
                                lambda: _load_probe(source, path, device_name))
        try:
            with entry.lock:
                if entry.value is None:  # released between get and lock: load it again
                    entry.value = _load_probe(source, path, device_name)
                result = work(entry.value)
        finally:
            CACHE.done(entry)
        return {"result": result, "warm": warm,
                "seconds": round(time.perf_counter() - t0, 4)}
    except (CheckpointError, ModelLoadError) as exc:
        return {"error": str(exc), "status": 409}
    except EngineError as exc:
        return {"error": str(exc), "errors": dict(getattr(exc, "errors", {}) or {}),
                "status": 422}
    except Exception as exc:  # a bug: the web answers 500 with the sentence, logged here
        log.exception("Probe of training %s failed", training_id)
        return {"error": error_message(exc), "status": 500}


def _load_probe(source: str, checkpoint: Path, device_name: str) -> Any:
    """The model of ``source`` and the SAE in ``checkpoint``, as an ``engine.probe.Probe``."""
    from .engine.devices import pick_device
    from .engine.models import load_model
    from .engine.probe import Probe, load_probe_sae

    device = pick_device(device_name)
    sae = load_probe_sae(checkpoint, device)
    unchanged_path(source)
    loaded = load_model(source, data_dir=settings.data_dir(), device=str(device))
    return Probe(loaded, sae)


# ---------------------------------------------------------------------------- worker start-up
def recover() -> int:
    """Mark trainings left running by the previous worker on this data folder, or by dead
    workers, interrupted (``jobs.workers.recover_trainings``: never a live worker's); queue again
    the models and datasets they left preparing (``jobs.workers.requeue_preparations``).

    Returns how many rows were changed. Called when the consumer starts (no task runs yet).
    """
    host, data_dir = socket.gethostname(), str(settings.data_dir())
    with connection():
        n = pool.recover_trainings(host, data_dir)
        again = pool.requeue_preparations(host, data_dir)
    for task_name, args in again:  # after the commit: the task finds its row queued
        common.enqueue(task_name, *args)
    return n + len(again)


def measure_device() -> dict[str, Any]:
    """The worker's device, its memory (bytes) and fp32 matmul speed (GFLOP/s): the best of
    three 0.1 s windows (~0.3 s in all), since other work on the machine only slows it."""
    import torch

    from .engine.devices import pick_device

    device = pick_device("auto")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, int(props.total_memory)
    else:
        name = device.type.upper() if device.type != "cpu" else (os.uname().machine + " CPU")
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    n = 1024 if device.type != "cpu" else 512
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    (a @ b).sum().item()  # warm-up
    gflops = 0.0
    for _ in range(3):
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            (a @ b).sum().item()
            runs += 1
        gflops = max(gflops, 2 * n**3 * runs / (time.perf_counter() - t0) / 1e9)
    return {"device": str(device), "device_name": name, "device_memory": memory,
            "gflops": round(gflops, 2)}


def write_heartbeat(name: str, device: dict[str, Any], started_at: float | None = None) -> None:
    """Insert or refresh this worker's heartbeat row: its device (``measure_device``), host,
    data folder, slots and the trainings it runs now; ``started_at`` (default: now, on the
    first beat) is when the worker started."""
    now = time.time()
    values = dict(pid=os.getpid(), host=socket.gethostname(), data_dir=str(settings.data_dir()),
                  slots=settings.max_concurrent_trainings(), updated_at=now)
    with connection():
        with db.atomic():
            values["running"] = pool.running_ids(name)
            update = {getattr(WorkerHeartbeat, key): value
                      for key, value in {**values, **device}.items()}
            if started_at is not None:
                update[WorkerHeartbeat.created_at] = started_at
            WorkerHeartbeat.insert(name=name, created_at=started_at or now, **values,
                                   **device).on_conflict(
                conflict_target=[WorkerHeartbeat.name], update=update).execute()


def reap() -> int:
    """Mark the trainings of dead workers interrupted (``jobs.workers.reap_dead_workers``), queue
    again the models and datasets they left preparing (``jobs.workers.requeue_preparations``)
    and the tasks a dead worker took along (``jobs.workers.lost_tasks``); delete the heartbeat
    rows of workers silent for a week (``jobs.workers.forget_old_workers``); queue again the
    preparations whose task is neither in the queue nor claimed (``lost_preparations``).
    Returns how many trainings it marked."""
    with connection():
        n = pool.reap_dead_workers()
        again = pool.requeue_preparations()
        lost = pool.lost_tasks() + pool.lost_preparations(_queued_preparations)
        pool.forget_old_workers()
    if n:
        log.warning("Marked %d training(s) of dead workers interrupted", n)
    for task_name, args in again:
        log.warning("Queueing %s%s again: its worker stopped while preparing it", task_name, args)
        common.enqueue(task_name, *args)
    for task_name, args in lost:  # after the commit: a task finds its rows as marked
        log.warning("Queueing %s%s again: its task was lost (a worker died holding it, or it "
                    "never reached the queue)",
                    task_name, args)
        common.enqueue(task_name, *args)
    return n


def _queued_preparations() -> set[tuple[str, int]] | None:
    """``(task name, row id)`` of the model and dataset preparations waiting in the queue; None
    when the queue cannot be read whole (then none is taken for lost this time)."""
    names = set(pool.PREPARE_TASKS.values())
    try:
        return {(t.name, t.args[0]) for t in huey.pending() if t.name in names and t.args}
    except Exception:  # unreachable queue, or a task this version does not know
        log.exception("Reading the queue's waiting tasks failed")
        return None


def _heartbeat_loop(name: str, device: dict[str, Any], started_at: float) -> None:
    """Beat every ``HEARTBEAT_S``; every ``REAP_S`` also interrupt what dead workers left;
    every ``REMEASURE_S`` while it trains nothing, measure the device's speed again and keep
    the fastest measurement (one taken while the machine was busy reads low, and the time
    estimate's guess before a calibration comes from it)."""
    reaped = measured = time.monotonic()
    while True:
        time.sleep(HEARTBEAT_S)
        if time.monotonic() - measured >= REMEASURE_S:
            measured = time.monotonic()
            remeasure(name, device)
        try:
            write_heartbeat(name, device, started_at)
        except Exception:  # keep beating
            log.exception("Writing the heartbeat failed")
        if time.monotonic() - reaped >= REAP_S:
            reaped = time.monotonic()
            try:
                reap()
            except Exception:  # a busy database: next time
                log.exception("Looking for dead workers failed")


def remeasure(name: str, device: dict[str, Any]) -> None:
    """While the worker ``name`` trains nothing, measure its device's speed again into
    ``device["gflops"]``, keeping the faster of the two."""
    try:
        with connection():
            idle = not pool.running_ids(name)
        if idle:
            device["gflops"] = max(device.get("gflops") or 0.0, measure_device()["gflops"])
    except Exception:  # keep the last measurement
        log.exception("Measuring the device again failed")


def _measured_device() -> dict[str, Any]:
    try:
        return measure_device()
    except Exception:  # a heartbeat without a speed is still useful
        log.exception("Measuring the device failed")
        return {"device": "cpu", "device_name": None, "device_memory": None, "gflops": None}


def sweep_temporary_files(root: Path) -> int:
    """Delete the temporary files and folders an interrupted save left under ``root``: hidden
    names with ``files.TMP_MARK`` (replace_folder) or ending ``.tmp`` / ``.raw`` (checkpoint
    and activation files). Only at start-up, before any task could be writing one. Returns how
    many were removed."""
    from .engine.files import TMP_MARK

    removed = 0
    for folder, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            if name.startswith(".") and (TMP_MARK in name or name.endswith((".tmp", ".raw"))):
                path = Path(folder) / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                    dirs.remove(name)
                else:
                    path.unlink(missing_ok=True)
                removed += 1
    return removed


_startup_lock = threading.Lock()
_started = False


_worker_lock: int | None = None


def _hold_worker_lock() -> None:
    """One worker per data folder: hold ``<data>/worker.lock`` for the life of this process.
    A second worker (e.g. a new run.py's, while the orphan of a killed one still checkpoints its
    training) waits here, before recovering rows or taking tasks, until the first has exited."""
    global _worker_lock
    from .engine.errors import FolderInUse
    from .engine.files import take_lock

    path = settings.data_dir() / "worker.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    waited = 0
    while _worker_lock is None:
        try:
            _worker_lock = take_lock(path)
        except FolderInUse as exc:
            if waited % 10 == 0:
                log.warning("Another worker (pid %s) works on %s; waiting for it to stop",
                            exc.holder, settings.data_dir())
            time.sleep(1.0)
            waited += 1


def _import_engine() -> None:
    """Import the engine and transformers once, before any task runs: two worker threads
    importing transformers at the same time can see it half-initialised ("cannot import name
    'AutoConfig' from 'transformers'")."""
    import transformers

    from .engine import evaluate, models, pipeline  # noqa: F401 - imported for their side effects

    for name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer"):
        getattr(transformers, name)  # resolves transformers' lazy attributes now


@huey.on_startup()
def on_worker_start() -> None:
    """Once per consumer process: recover stale rows and start the heartbeat thread.

    Every worker thread calls this before its first task; the lock makes the others wait until
    recovery is done, so none claims a training that recovery would then mark interrupted.
    """
    global _started
    with _startup_lock:
        if _started:
            return
        _started = True
        _hold_worker_lock()
        settings.work_dir().mkdir(parents=True, exist_ok=True)
        os.chdir(settings.work_dir())  # names that are not paths are never read from elsewhere
        _import_engine()
        try:
            recover()
        except Exception:  # the worker still runs
            log.exception("Recovering stale jobs failed")
        removed = sweep_temporary_files(settings.data_dir())
        if removed:
            log.info("Removed %d temporary files left by an interrupted save", removed)
        # The first beat before any task runs: a training this worker claims always has a
        # heartbeat row, so no other worker takes it for a dead one's.
        name, device, started_at = worker_name(), _measured_device(), time.time()
        try:
            write_heartbeat(name, device, started_at)
        except Exception:  # the loop tries again
            log.exception("Writing the heartbeat failed")
        threading.Thread(target=_heartbeat_loop, args=(name, device, started_at),
                         name="sae-heartbeat", daemon=True).start()
        parent = os.environ.get("SAE_STUDIO_PARENT_PID", "")
        if parent.isdigit():
            threading.Thread(target=_watch_parent, args=(int(parent),), name="sae-parent",
                             daemon=True).start()


def _watch_parent(parent: int, poll_s: float = 1.0, grace_s: float = 120.0) -> None:
    """Under run.py: stop when run.py is gone, however it died (a SIGKILL included), as run.py
    would have stopped this worker — running trainings checkpoint and end ``interrupted``, then
    the consumer shuts down (SIGINT); if a task does not end within ``grace_s``, exit anyway.
    Without this an orphaned worker would go on training beside the next run.py's worker."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    log.warning("run.py (pid %s) is gone: interrupting running trainings and stopping", parent)
    try:
        with connection():
            pool.interrupt_worker(worker_name())
    except Exception:  # still stop
        log.exception("Asking running trainings to stop failed")
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(grace_s)
    os._exit(1)


@huey.signal(SIGNAL_INTERRUPTED)
def on_interrupted(signal: str, task: Any, *args: Any, **kwargs: Any) -> None:
    """The consumer interrupted a task (shutdown): the trainings it ran are interrupted."""
    if task is None or not task.args:
        return
    if task.name == run_training.name:
        ids = [int(task.args[0])]
    elif task.name == run_group.name:
        ids = [int(i) for i in task.args[0]]
    else:
        return
    with connection():
        with db.atomic():
            Training.update(status="interrupted", error=INTERRUPTED_MESSAGE, requested=None,
                            finished_at=time.time(), updated_at=time.time()) \
                .where(Training.id.in_(ids) & Training.status.in_(RUNNING)).execute()
