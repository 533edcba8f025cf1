"""The pool of workers: every worker's heartbeat (the Workers page), and the trainings a worker
left behind when it stopped.

Any number of workers may share one database and queue (``run.py --worker-only`` on each
machine). Each beats once a second (``worker.tasks``): its row in ``WorkerHeartbeat`` names it
``host:pid`` and says where it runs (host, data folder), its device, its slots and the trainings
it runs now. A claimed training names its worker (``Training.worker``). Judged by the age of the
newest beat, a worker is

- ``alive`` while younger than ``HEARTBEAT_ALIVE_S`` (5 s),
- ``silent`` up to ``HEARTBEAT_DEAD_S`` (15 s): hung or busy (under run.py its supervisor kills
  a silent worker and interrupts its trainings itself),
- ``dead`` after that: every live worker marks the trainings it was running ``interrupted``
  (``reap_dead_workers``), and Retry continues them on any worker from the newest checkpoint
  in the shared artifacts folder.

A worker starting on a data folder also interrupts what the previous worker on that folder left
running (``recover_trainings``): the folder's ``worker.lock`` proves that one is gone. Models
and datasets name the worker preparing them (``worker``) likewise: those a gone worker left
``preparing`` are queued again (``requeue_preparations``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..db import RUNNING, Dataset, LanguageModel, Training, WorkerHeartbeat, db
from .health import HEARTBEAT_ALIVE_S, HEARTBEAT_DEAD_S

SHOWN_S = 24 * 3600.0
"""The Workers page lists the live workers and those heard from in the last 24 hours; older rows
are counted, not listed."""

KEPT_S = 7 * 24 * 3600.0
"""A worker's heartbeat row is deleted a week after its last beat (``forget_old_workers``): each
start of a worker adds a row (its name is ``host:pid``), so rows would pile up forever."""

INTERRUPTED_MESSAGE = ("The worker stopped while this training was running; Retry continues "
                       "from the newest checkpoint.")
"""The error of a training whose worker is gone and unknown (no heartbeat row), or was the
previous worker on this data folder."""

WORKER_FIELDS = ("name", "host", "pid", "data_dir", "device", "device_name", "device_memory",
                 "gflops", "slots", "running", "alive", "state", "age_s", "started_at",
                 "updated_at")
"""The keys of a worker in the API (``worker_as_dict``)."""


def worker_state(age_s: float) -> str:
    """``alive``, ``silent`` or ``dead`` for a worker whose newest beat is ``age_s`` old."""
    if age_s < HEARTBEAT_ALIVE_S:
        return "alive"
    return "silent" if age_s < HEARTBEAT_DEAD_S else "dead"


def worker_as_dict(hb: WorkerHeartbeat, now: float | None = None) -> dict[str, Any]:
    """One heartbeat row as the API gives it (``WORKER_FIELDS``): ``device_memory`` in bytes,
    ``gflops`` the fp32 matmul speed measured at start, ``running`` the ids of the trainings it
    ran at its newest beat, ``alive`` whether it beat in the last 5 s, ``state`` alive / silent
    / dead, ``age_s`` the seconds since its newest beat, ``started_at`` when it started (epoch
    seconds)."""
    age = max(0.0, (time.time() if now is None else now) - hb.updated_at)
    state = worker_state(age)
    running = [int(i) for i in (hb.running or [])]
    return {"name": hb.name, "host": hb.host, "pid": hb.pid, "data_dir": hb.data_dir,
            "device": hb.device, "device_name": hb.device_name,
            "device_memory": hb.device_memory, "gflops": hb.gflops, "slots": hb.slots,
            "running": running, "alive": state == "alive", "state": state,
            "age_s": round(age, 1), "started_at": hb.created_at, "updated_at": hb.updated_at}


def list_workers(within_s: float | None = None) -> list[dict[str, Any]]:
    """Every worker's heartbeat, newest first (``worker_as_dict``); with ``within_s``, only
    those heard from in the last ``within_s`` seconds."""
    now = time.time()
    query = WorkerHeartbeat.select().order_by(WorkerHeartbeat.updated_at.desc(),
                                              WorkerHeartbeat.name)
    if within_s is not None:
        query = query.where(WorkerHeartbeat.updated_at >= now - within_s)
    return [worker_as_dict(hb, now) for hb in query]


def workers_overview(within_s: float = SHOWN_S) -> dict[str, Any]:
    """The Workers page: ``{"items": workers heard from in the last ``within_s`` seconds, newest
    first, "hidden": how many older rows are left out, "alive": how many items are alive,
    "dead_after_s": HEARTBEAT_DEAD_S}``."""
    items = list_workers(within_s)
    hidden = WorkerHeartbeat.select().count() - len(items)
    return {"items": items, "hidden": max(0, hidden),
            "alive": sum(w["alive"] for w in items), "dead_after_s": HEARTBEAT_DEAD_S}


def running_ids(name: str) -> list[int]:
    """The trainings the worker ``name`` runs now (claimed by it, status in RUNNING)."""
    return [t.id for t in Training.select(Training.id)
            .where((Training.worker == name) & Training.status.in_(RUNNING))
            .order_by(Training.id)]


# ---------------------------------------------------------------------------- left behind
def stopped_message(name: str, silent_s: float) -> str:
    """The error of a training whose worker ``name`` has been silent ``silent_s`` seconds."""
    return (f"The worker {name} stopped (no heartbeat for {silent_s:.0f} s); Retry continues "
            "from the newest checkpoint.")


def _gone(host: str | None, data_dir: str | None, now: float) -> dict[str | None, str]:
    """The workers (names, None for a training no worker claimed) that left trainings running
    and are gone (``_gone_workers``), with the sentence to store."""
    names = {t.worker for t in Training.select(Training.worker).distinct()
             .where(Training.status.in_(RUNNING))}
    return {name: INTERRUPTED_MESSAGE if silent is None else stopped_message(name, silent)
            for name, silent in _gone_workers(names, host, data_dir, now).items()}


def _gone_workers(names: set[str | None], host: str | None, data_dir: str | None,
                  now: float) -> dict[str | None, float | None]:
    """Those of ``names`` that are gone: dead (silent ``HEARTBEAT_DEAD_S``: the seconds it has
    been silent), unknown (None or no heartbeat row: None), or with ``host`` and ``data_dir``
    the previous worker on that data folder (None: its folder's lock proves it is gone)."""
    if not names:
        return {}
    beats = {hb.name: hb for hb in WorkerHeartbeat.select().where(
        WorkerHeartbeat.name.in_([n for n in names if n is not None]))}
    gone: dict[str | None, float | None] = {}
    for name in names:
        hb = beats.get(name) if name is not None else None
        if hb is None or (host is not None and (hb.host, hb.data_dir) == (host, data_dir)):
            gone[name] = None
        elif now - hb.updated_at >= HEARTBEAT_DEAD_S:
            gone[name] = now - hb.updated_at
    return gone


def _interrupt(gone: dict[str | None, str], now: float) -> int:
    """Mark the running trainings of each gone worker ``interrupted`` with its sentence; a row
    another worker claimed meanwhile (a Retry) is left alone."""
    n = 0
    for name, message in gone.items():
        mine = Training.worker.is_null() if name is None else Training.worker == name
        n += Training.update(status="interrupted", error=message, requested=None,
                             finished_at=now, updated_at=now) \
            .where(mine & Training.status.in_(RUNNING)).execute()
    return n


def reap_dead_workers(now: float | None = None) -> int:
    """Mark the trainings of dead workers (no heartbeat for ``HEARTBEAT_DEAD_S``, or no
    heartbeat row at all) ``interrupted``, naming the worker. Every live worker calls this every
    few seconds; returns how many trainings it marked."""
    now = time.time() if now is None else now
    with db.atomic():
        return _interrupt(_gone(None, None, now), now)


def forget_old_workers(now: float | None = None) -> int:
    """Delete the heartbeat rows of workers silent for ``KEPT_S`` (long dead: their trainings
    were marked interrupted within seconds of their death; a training keeps its worker's name).
    Returns how many rows were deleted."""
    now = time.time() if now is None else now
    with db.atomic():
        return WorkerHeartbeat.delete().where(WorkerHeartbeat.updated_at < now - KEPT_S).execute()


QUEUE_LOST_S = 30.0
"""A queued training whose task no worker has held for this long (seconds; counted from its
last claim attempt, creation or Retry, whichever is newest) has lost its task: a worker killed
while holding it between the queue and its claim took it along (a queue's pop is final). Every
worker tries to claim each queued task every ``worker.tasks.RETRY_CLAIM_S`` (2 s) while it
cannot run it, so a live queue holds none this stale."""


def lost_tasks(now: float | None = None) -> list[tuple[str, tuple[Any, ...]]]:
    """The tasks to queue again for queued trainings whose task was lost (``QUEUE_LOST_S``):
    ``("run_training", (id, True))`` for a training alone, ``("run_group", ([ids],))`` with the
    queued members of a sweep's sub-group. Marks them seen now, so the next look (``REAP_S``
    later, on any worker) does not queue them again. A duplicate task would be harmless: the
    claim is conditional, and the second finds the training taken."""
    now = time.time() if now is None else now
    stale = now - QUEUE_LOST_S
    with db.atomic():
        rows = list(Training.select(Training.id, Training.task_group)
                    .where((Training.status == "queued") & (Training.updated_at < stale)
                           & ((Training.queue_seen_at.is_null())
                              | (Training.queue_seen_at < stale)))
                    .order_by(Training.id))
        if not rows:
            return []
        groups = {r.task_group for r in rows if r.task_group}
        members: dict[str, list[int]] = {g: [] for g in groups}
        for t in (Training.select(Training.id, Training.task_group)
                  .where(Training.task_group.in_(sorted(groups))
                         & (Training.status == "queued")).order_by(Training.id)
                  if groups else []):
            members[t.task_group].append(t.id)
        ids = [r.id for r in rows] + [i for g in members.values() for i in g]
        Training.update(queue_seen_at=now).where(Training.id.in_(ids)).execute()
    return ([("run_training", (r.id, True)) for r in rows if not r.task_group]
            + [("run_group", (members[g],)) for g in sorted(groups)])


def recover_trainings(host: str, data_dir: str, now: float | None = None) -> int:
    """At a worker's start on ``host`` and ``data_dir``: mark ``interrupted`` the trainings the
    previous worker on this data folder left running (it is gone: this one holds the folder's
    ``worker.lock``), and those of dead or unknown workers. A live worker elsewhere keeps its
    trainings. Returns how many were marked."""
    now = time.time() if now is None else now
    with db.atomic():
        return _interrupt(_gone(host, data_dir, now), now)


PREPARE_TASKS = {"language_model": "prepare_model", "dataset": "prepare_dataset"}
"""The task that prepares a row of each table (``worker.tasks``)."""

REQUEUED_MESSAGE = "Waiting for the worker (the worker preparing it stopped)."
"""The message of a model or dataset queued again because its worker is gone."""


def requeue_preparations(host: str | None = None, data_dir: str | None = None,
                         now: float | None = None) -> list[tuple[str, tuple[Any, ...]]]:
    """Queue again the models and datasets left ``preparing`` by a gone worker (the rule of
    trainings: dead, unknown, or with ``host`` and ``data_dir`` the previous worker on that
    data folder); a live worker's are left alone. Returns the tasks to queue once this commits,
    ``("prepare_model", (id,))`` or ``("prepare_dataset", (id,))``: the preparation starts over
    (a row is claimed only from ``queued``, so a duplicate task does nothing)."""
    now = time.time() if now is None else now
    found: list[tuple[str, tuple[Any, ...]]] = []
    with db.atomic():
        for table in (LanguageModel, Dataset):
            names = {r.worker for r in table.select(table.worker).distinct()
                     .where(table.status == "preparing")}
            for name in _gone_workers(names, host, data_dir, now):
                theirs = table.worker.is_null() if name is None else table.worker == name
                ids = [r.id for r in table.select(table.id).where(
                    theirs & (table.status == "preparing")).order_by(table.id)]
                table.update(status="queued", worker=None, progress=0.0,
                             message=REQUEUED_MESSAGE, updated_at=now) \
                    .where(table.id.in_(ids) & (table.status == "preparing")).execute()
                found += [(PREPARE_TASKS[table._meta.table_name], (i,)) for i in ids]
    return found


def lost_preparations(waiting: Callable[[], set[tuple[str, int]] | None],
                      now: float | None = None) -> list[tuple[str, tuple[Any, ...]]]:
    """The preparation tasks to queue again for models and datasets ``queued`` for
    ``QUEUE_LOST_S`` whose task is not in the queue (``waiting()``: the ``(task name, row id)``
    of the preparation tasks there, or None when it cannot be read; called only when such rows
    exist, so a quiet queue is not read every few seconds): a worker killed between the
    queue's pop and its claim took the task along, or the enqueue after the row's commit
    failed (the queue was down). A preparation is claimed as soon as a worker takes its task,
    so one that is neither in the queue nor claimed for that long is gone. Marks the rows
    (``updated_at``) so the next look waits as long again; a duplicate task (its row claimed
    between the two reads) does nothing: the claim is from ``queued`` only."""
    now = time.time() if now is None else now
    stale = {table: [r.id for r in table.select(table.id).where(
        (table.status == "queued") & (table.updated_at < now - QUEUE_LOST_S))
        .order_by(table.id)] for table in (LanguageModel, Dataset)}
    if not any(stale.values()):
        return []
    in_queue = waiting()
    if in_queue is None:
        return []
    found: list[tuple[str, tuple[Any, ...]]] = []
    with db.atomic():
        for table, candidates in stale.items():
            task = PREPARE_TASKS[table._meta.table_name]
            ids = [i for i in candidates if (task, i) not in in_queue]
            if ids:
                table.update(updated_at=now).where(
                    table.id.in_(ids) & (table.status == "queued")).execute()
                found += [(task, (i,)) for i in ids]
    return found


def interrupt_worker(name: str) -> int:
    """Ask the trainings the worker ``name`` runs to checkpoint and stop as ``interrupted``
    (that worker shuts down; Retry continues them). Returns how many were asked."""
    with db.atomic():
        return Training.update(requested="interrupt") \
            .where((Training.worker == name) & Training.status.in_(RUNNING)).execute()


def mark_worker_interrupted(name: str, reason: str) -> int:
    """Mark the trainings the worker ``name`` runs ``interrupted`` now, with ``reason`` as their
    error (it was killed: nobody else will). Returns how many were marked."""
    now = time.time()
    with db.atomic():
        return _interrupt({name: reason}, now)
