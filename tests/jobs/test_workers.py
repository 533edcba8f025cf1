"""Many workers on one database: a worker claims trainings up to its own slots and only for a
device it has; its heartbeat says where it runs and what; the live workers interrupt what dead
ones left running; start-up recovery leaves a live worker's trainings alone; a worker whose data
folder lacks the model folder the preparing worker resolved loads the model itself. Real rows,
real trainings of the bundled model (the two-process test is in tests/test_supervision.py)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from worker import jobs, tasks
from worker.db import LanguageModel, Training, WorkerHeartbeat, db
from worker.jobs.health import HEARTBEAT_DEAD_S
from worker.jobs.workers import INTERRUPTED_MESSAGE, KEPT_S, stopped_message

from ..web.conftest import make_dataset, make_model, make_training
from .conftest import form, status_of


def beat(name: str, *, age: float = 0.0, host: str = "elsewhere", data_dir: str = "/srv/sae",
         running: tuple[int, ...] = ()) -> None:
    """A heartbeat row as another worker writes it, its newest beat ``age`` seconds ago."""
    now = time.time()
    with db.atomic():
        WorkerHeartbeat.insert(name=name, pid=int(name.rsplit(":", 1)[1]), host=host,
                               data_dir=data_dir, running=list(running), slots=1, device="cpu",
                               created_at=now - age - 60, updated_at=now - age).execute()


def row(training_id: int) -> Training:
    return Training.get_by_id(training_id)


def set_row(training_id: int, **values: Any) -> None:
    with db.atomic():
        Training.update(**values).where(Training.id == training_id).execute()


@pytest.fixture
def scheduled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[Any, ...], int]]:
    """Tasks a worker put back on the queue for later (``schedule``), recorded, not run."""
    calls: list[tuple[tuple[Any, ...], int]] = []
    for task in (tasks.run_training, tasks.run_group):
        monkeypatch.setattr(task, "schedule",
                            lambda args, delay: calls.append((tuple(args), delay)))
    return calls


# ---------------------------------------------------------------------------- claims
def test_a_worker_claims_up_to_its_own_slots(model: LanguageModel, dataset: Any,
                                             enqueued: list, scheduled: list,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    me = tasks.worker_name()
    a, b = (jobs.create_training(form(model, dataset)) for _ in range(2))
    set_row(a.id, status="training", worker=me)
    tasks.run_training.call_local(b.id)  # its one slot is busy: back to the queue
    assert status_of(b.id) == "queued" and row(b.id).worker is None
    assert scheduled == [((b.id, False), tasks.RETRY_CLAIM_S)]

    set_row(a.id, worker="elsewhere:7")  # another worker's training takes none of its slots
    tasks.run_training.call_local(b.id)
    done = jobs.get_training(b.id)
    assert done.status == "completed", done.error
    assert done.worker == me and jobs.training_as_dict(done)["worker"] == me
    assert len(scheduled) == 1

    # two slots: one more of its own; a sweep's sub-group takes one slot for all its rows
    monkeypatch.setenv("SAE_STUDIO_MAX_TRAININGS", "2")
    set_row(a.id, worker=me)
    c, d, e, f = (jobs.create_training(form(model, dataset)) for _ in range(4))
    assert tasks._claim([c.id]) == [c.id]
    assert row(c.id).status == "initializing" and row(c.id).worker == me
    assert tasks._claim([d.id]) == [] and row(d.id).status == "queued"
    monkeypatch.setenv("SAE_STUDIO_MAX_TRAININGS", "3")
    set_row(e.id, task_group="g")
    set_row(f.id, task_group="g")
    assert tasks._claim([f.id, e.id]) == [f.id, e.id]
    assert tasks._claim([d.id]) == []  # a, c and the group: three slots
    assert {row(i).worker for i in (e.id, f.id)} == {me}
    # a row no longer queued (claimed by another worker, stopped) is not claimed again
    set_row(d.id, status="initializing", worker="elsewhere:7")
    set_row(c.id, status="completed")
    assert tasks._claim([d.id]) == [] and row(d.id).worker == "elsewhere:7"


def test_a_training_for_a_device_this_worker_lacks_stays_queued(
        model: LanguageModel, dataset: Any, enqueued: list, scheduled: list) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last CUDA device here
    t = jobs.create_training(form(model, dataset, device=missing))
    assert t.config["device"] == missing
    for _ in range(2):  # every time it comes back, this worker leaves it to another
        tasks.run_training.call_local(t.id)
    t = jobs.get_training(t.id)
    assert (t.status, t.worker, t.started_at, t.device) == ("queued", None, None, None)
    assert scheduled == [((t.id, False), tasks.RETRY_CLAIM_S)] * 2
    assert tasks._claim([t.id]) == []

    assert tasks.device_fits("auto") and tasks.device_fits("cpu") and tasks.device_fits(None)
    assert tasks.device_fits("cuda") == torch.cuda.is_available()
    assert tasks.device_fits("cuda:0") == torch.cuda.is_available()
    assert not tasks.device_fits(missing)
    assert tasks.device_fits("mps") == torch.backends.mps.is_available()
    assert not tasks.device_fits("tpu:0") and not tasks.device_fits("nonsense")

    set_row(t.id, config=dict(t.config, device="cpu"))  # one it has: claimed here
    assert tasks._claim([t.id]) == [t.id] and row(t.id).worker == tasks.worker_name()


def test_a_sweep_group_for_a_missing_device_stays_queued(model: LanguageModel, dataset: Any,
                                                          enqueued: list,
                                                          scheduled: list) -> None:
    a, b = (jobs.create_training(form(model, dataset)) for _ in range(2))
    set_row(a.id, task_group="g")
    set_row(b.id, task_group="g", config=dict(b.config, device=f"cuda:{torch.cuda.device_count()}"))
    tasks.run_group.call_local([a.id, b.id])  # one member cannot run here: none is claimed
    assert [status_of(i) for i in (a.id, b.id)] == ["queued", "queued"]
    assert scheduled == [(([a.id, b.id],), tasks.RETRY_CLAIM_S)]


# ---------------------------------------------------------------------------- heartbeats
def test_the_heartbeat_says_where_the_worker_runs_and_what(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_STUDIO_MAX_TRAININGS", "3")
    me = tasks.worker_name()
    m, d = make_model(), make_dataset()
    t1 = make_training(m, d, "training", worker=me)
    make_training(m, d, "completed", worker=me)
    t3 = make_training(m, d, "paused", worker=me)
    make_training(m, d, "training", worker="elsewhere:1")
    device = {"device": "cpu", "device_name": "x86_64 CPU", "device_memory": 2**34,
              "gflops": 12.5}
    started = time.time() - 30
    tasks.write_heartbeat(me, device, started)
    (w,) = jobs.list_workers()
    assert set(w) == set(jobs.WORKER_FIELDS)
    assert (w["name"], w["host"], w["pid"], w["data_dir"]) == (
        me, socket.gethostname(), os.getpid(), str(data_dir.resolve()))
    assert (w["running"], w["slots"], w["alive"], w["state"]) == ([t1.id, t3.id], 3, True,
                                                                  "alive")
    assert {k: w[k] for k in device} == device
    assert w["started_at"] == pytest.approx(started) and 0 <= w["age_s"] < 5

    set_row(t1.id, status="completed")  # the next beat says what it runs now
    tasks.write_heartbeat(me, device, started)
    (w,) = jobs.list_workers()
    assert w["running"] == [t3.id] and w["started_at"] == pytest.approx(started)
    h = jobs.health()  # the top bar: the newest heartbeat
    assert h["alive"] and h["name"] == me and h["device_name"] == "x86_64 CPU"


def test_an_idle_worker_measures_its_device_again_and_keeps_the_fastest(data_dir: Path
                                                                         ) -> None:
    """The speed measured at the start may read low (the machine was busy): an idle worker
    measures again (every REMEASURE_S) and keeps the faster figure; one that trains does not
    measure (its own training would slow the measurement)."""
    me = tasks.worker_name()
    device = {"device": "cpu", "device_name": "x86_64 CPU", "device_memory": 2**34,
              "gflops": 0.001}  # as if measured under a heavy load
    tasks.remeasure(me, device)
    assert device["gflops"] > 0.001
    fast = dict(device, gflops=1e9)  # faster than any measurement: kept
    tasks.remeasure(me, fast)
    assert fast["gflops"] == 1e9
    make_training(make_model(), make_dataset(), "training", worker=me)
    busy = dict(device, gflops=0.001)
    tasks.remeasure(me, busy)
    assert busy["gflops"] == 0.001


# ---------------------------------------------------------------------------- dead workers
def test_live_workers_interrupt_the_trainings_of_dead_ones(data_dir: Path,
                                                           enqueued: list) -> None:
    beat("live:1")
    beat("late:2", age=HEARTBEAT_DEAD_S - 8)  # silent, not dead yet
    beat("dead:3", age=HEARTBEAT_DEAD_S + 5)
    states = {w["name"]: w["state"] for w in jobs.list_workers()}
    assert states == {"live:1": "alive", "late:2": "silent", "dead:3": "dead"}
    m, d = make_model(), make_dataset()
    live = make_training(m, d, "training", worker="live:1")
    late = make_training(m, d, "paused", worker="late:2")
    dead = make_training(m, d, "training", worker="dead:3")
    dead_eval = make_training(m, d, "evaluating", worker="dead:3")
    ghost = make_training(m, d, "initializing", worker="ghost:4")  # no heartbeat row at all
    done = make_training(m, d, "completed", worker="dead:3")
    queued = make_training(m, d, "queued")

    assert tasks.reap() == 3
    for t in (dead, dead_eval):
        r = row(t.id)
        assert (r.status, r.requested) == ("interrupted", None)
        silent = re.fullmatch(r"The worker dead:3 stopped \(no heartbeat for (\d+) s\); Retry "
                              r"continues from the newest checkpoint\.", r.error)
        assert silent and HEARTBEAT_DEAD_S + 5 <= int(silent.group(1)) < HEARTBEAT_DEAD_S + 60
        assert r.finished_at == pytest.approx(time.time(), abs=30)
    assert (row(ghost.id).status, row(ghost.id).error) == ("interrupted", INTERRUPTED_MESSAGE)
    assert [status_of(t.id) for t in (live, late, done, queued)] == [
        "training", "paused", "completed", "queued"]
    assert row(live.id).error is None and row(done.id).finished_at == done.finished_at
    assert tasks.reap() == 0

    # Retry queues it again with resume, for any worker
    assert jobs.request(dead.id, "retry").status == "queued"
    assert enqueued == [("run_training", (dead.id, True))]

    # a worker stopping (its supervisor) touches its own trainings only
    assert jobs.interrupt_worker("late:2") == 1
    assert row(late.id).requested == "interrupt" and row(live.id).requested is None
    assert jobs.mark_worker_interrupted("live:1", "killed as hung") == 1
    assert (row(live.id).status, row(live.id).error) == ("interrupted", "killed as hung")
    assert status_of(late.id) == "paused"


def test_start_up_recovery_leaves_a_live_workers_training_alone(data_dir: Path) -> None:
    host, here = socket.gethostname(), str(data_dir.resolve())
    m, d = make_model(), make_dataset()
    beat("gpu-box:5", host="gpu-box", data_dir="/srv/sae", age=1)  # live, another machine
    beat(f"{host}:6", host=host, data_dir=str(data_dir / "other"), age=1)  # here, other folder
    beat(f"{host}:7", host=host, data_dir=here, age=1)  # the previous worker on this folder
    beat("gone:8", host="gone", data_dir="/srv/sae", age=HEARTBEAT_DEAD_S + 60)
    elsewhere = make_training(m, d, "training", worker="gpu-box:5")
    beside = make_training(m, d, "paused", worker=f"{host}:6")
    previous = make_training(m, d, "training", worker=f"{host}:7")
    gone = make_training(m, d, "evaluating", worker="gone:8")
    preparing = make_model("preparing", name="m2", worker="gpu-box:5")  # live: left alone
    left = make_model("preparing", name="m3", worker=f"{host}:7")  # the previous worker's

    assert tasks.recover() == 3
    assert [status_of(t.id) for t in (elsewhere, beside)] == ["training", "paused"]
    assert (row(previous.id).status, row(previous.id).error) == ("interrupted",
                                                                 INTERRUPTED_MESSAGE)
    assert row(gone.id).status == "interrupted"
    assert row(gone.id).error.startswith("The worker gone:8 stopped (no heartbeat for ")
    assert jobs.get_model(preparing.id).status == "preparing"
    # prepared again at once (immediate mode: the task ran), by this worker
    assert (jobs.get_model(left.id).status, jobs.get_model(left.id).worker) == ("ready", None)

    # alone on the database (the other rows gone): their trainings and model name unknown
    # workers, and the model is prepared again
    with db.atomic():
        WorkerHeartbeat.delete().where(WorkerHeartbeat.host != "gone").execute()
    assert tasks.recover() == 3
    assert [status_of(t.id) for t in (elsewhere, beside)] == ["interrupted"] * 2
    assert jobs.get_model(preparing.id).status == "ready"


def test_live_workers_queue_again_what_dead_ones_left_preparing(
        data_dir: Path, enqueued: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model or dataset names the worker preparing it: when that worker dies (or has no
    heartbeat row), a live worker's reap queues the row again; a live or silent worker's rows
    stay. The task claims a row only from ``queued``, so a second copy of it does nothing."""
    beat("live:1")
    beat("late:2", age=HEARTBEAT_DEAD_S - 8)
    beat("dead:3", age=HEARTBEAT_DEAD_S + 5)
    rows = {name: make_model("preparing", name=name, worker=name, progress=0.4)
            for name in ("live:1", "late:2", "dead:3", "ghost:4")}
    old = make_model("preparing", name="old")  # from before rows named their worker
    ds = make_dataset("preparing", worker="dead:3", progress=0.7)
    ready = make_model("ready", name="ready", worker=None)

    assert tasks.reap() == 0  # counts trainings only
    again = {("prepare_model", (rows[n].id,)) for n in ("dead:3", "ghost:4")}
    again |= {("prepare_model", (old.id,)), ("prepare_dataset", (ds.id,))}
    assert set(enqueued) == again and len(enqueued) == 4
    for m in (rows["dead:3"], rows["ghost:4"], old):
        m = jobs.get_model(m.id)
        assert (m.status, m.worker, m.progress) == ("queued", None, 0.0)
        assert m.message == "Waiting for the worker (the worker preparing it stopped)."
    assert jobs.get_dataset(ds.id).status == "queued"
    for name in ("live:1", "late:2"):
        assert (jobs.get_model(rows[name].id).status,
                jobs.get_model(rows[name].id).worker) == ("preparing", name)
    assert jobs.get_model(ready.id).status == "ready"
    enqueued.clear()
    assert tasks.reap() == 0 and enqueued == []  # nothing left to queue

    # the queued task runs on this worker: it claims the row, names itself while preparing
    seen: list[tuple[str, str | None]] = []
    real = tasks._prepare_model

    def spy(model: Any, report: Any) -> dict[str, Any]:
        m = jobs.get_model(model.id)
        seen.append((m.status, m.worker))
        return real(model, report)

    monkeypatch.setattr(tasks, "_prepare_model", spy)
    tasks.prepare_model.call_local(old.id)
    tasks.prepare_model.call_local(old.id)  # a duplicate: the row is no longer queued
    tasks.prepare_model.call_local(rows["live:1"].id)  # another worker's: left alone
    assert seen == [("preparing", tasks.worker_name())]
    assert (jobs.get_model(old.id).status, jobs.get_model(old.id).worker) == ("ready", None)
    assert jobs.get_model(rows["live:1"].id).status == "preparing"


def test_a_preparation_taken_from_its_worker_keeps_the_new_claim(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker taken for dead (its row queued again and claimed by another) finishing late
    does not overwrite the row: its progress, ``ready`` or ``failed`` apply only to its own
    claim."""
    m = make_model("queued", name="late", source="minilm-l6", n_layers=None)
    real = tasks._prepare_model

    def taken(model: Any, report: Any) -> dict[str, Any]:
        with db.atomic():
            LanguageModel.update(worker="other:9").where(LanguageModel.id == model.id).execute()
        report(0.5, "halfway")  # not written either: the row is no longer this worker's
        return real(model, report)

    monkeypatch.setattr(tasks, "_prepare_model", taken)
    tasks.prepare_model.call_local(m.id)
    after = jobs.get_model(m.id)
    assert (after.status, after.worker, after.n_layers) == ("preparing", "other:9", None)
    assert (after.progress, after.message) == (0.0, "Loading the model...")


def test_heartbeat_rows_of_long_dead_workers_are_deleted(data_dir: Path) -> None:
    """Every worker start adds a row (``host:pid``): rows silent for a week go at the live
    workers' check; the Workers page counts the rows older than a day it does not list."""
    beat("live:1")
    beat("yesterday:2", age=2 * 24 * 3600)
    beat("old:3", age=KEPT_S + 60)
    m, d = make_model(), make_dataset()
    done = make_training(m, d, "completed", worker="old:3")
    overview = jobs.workers_overview()
    assert [w["name"] for w in overview["items"]] == ["live:1"] and overview["hidden"] == 2
    assert tasks.reap() == 0
    assert sorted(hb.name for hb in WorkerHeartbeat.select()) == ["live:1", "yesterday:2"]
    assert jobs.workers_overview()["hidden"] == 1
    assert row(done.id).worker == "old:3"  # a training keeps its worker's name


def test_stopped_message_names_the_worker() -> None:
    assert stopped_message("box:12", 16.4) == (
        "The worker box:12 stopped (no heartbeat for 16 s); Retry continues from the newest "
        "checkpoint.")


# ---------------------------------------------------------------------------- per machine
def test_a_worker_without_the_preparing_workers_model_folder_loads_the_model(
        model: LanguageModel, dataset: Any, enqueued: list, data_dir: Path) -> None:
    """The config names the folder the preparing worker resolved (its data folder); another
    machine lacks it: the worker resolves the model's source itself, and builds its own token
    store."""
    t = jobs.create_training(form(model, dataset))
    assert Path(t.config["model"]).is_dir()
    assert tasks.local_config(t) == t.config  # here: used as it is
    elsewhere = "/srv/another-machine/sae-data/models/minilm-l6"
    set_row(t.id, config=dict(t.config, model=elsewhere))
    assert tasks.local_config(row(t.id)) == dict(t.config, model="minilm-l6")
    shutil.rmtree(data_dir / "tokens")  # nor its token store
    tasks.run_training.call_local(t.id)
    done = jobs.get_training(t.id)
    assert done.status == "completed", done.error
    assert done.current_step == 20 and done.config["model"] == elsewhere
    assert any((data_dir / "tokens").glob("*/meta.json"))


def test_a_lost_preparation_task_is_queued_again(data_dir: Path, enqueued: list,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A model or dataset ``queued`` for QUEUE_LOST_S whose task is not in the queue (a worker
    killed between the pop and its claim took it along, or the enqueue after the row's commit
    failed) is queued again by the live workers' check, once; one whose task waits in the queue
    (behind busy threads) is left to it. Read on a real SQLite queue with no consumer."""
    from worker.db import Dataset
    from worker.jobs.workers import QUEUE_LOST_S
    from worker.queue import huey

    old = time.time() - QUEUE_LOST_S - 5
    waiting = make_model("queued", name="waiting")
    lost = make_model("queued", name="lost")
    fresh = make_model("queued", name="fresh")  # its task is on its way
    ds = make_dataset("queued")
    reads: list[int] = []
    with monkeypatch.context() as counted:  # nothing queued for long: the queue is not read
        counted.setattr(huey, "pending", lambda *a: reads.append(1) or [])
        assert tasks.reap() == 0 and enqueued == [] and reads == []
    with db.atomic():
        LanguageModel.update(updated_at=old).where(
            LanguageModel.id.in_([waiting.id, lost.id])).execute()
        Dataset.update(updated_at=old).where(Dataset.id == ds.id).execute()
    huey.immediate = False  # a fresh storage at its first use: queue.db in the data folder
    try:
        tasks.prepare_model(waiting.id)
        tasks.prepare_model(ds.id)  # the dataset's id, but a model's task: not its task
        assert huey.pending_count() == 2 and (data_dir / "queue.db").is_file()
        assert tasks.reap() == 0
        assert enqueued == [("prepare_model", (lost.id,)), ("prepare_dataset", (ds.id,))]
        assert [jobs.get_model(m.id).status for m in (waiting, lost, fresh)] == ["queued"] * 3
        enqueued.clear()
        assert tasks.reap() == 0 and enqueued == []  # marked: not again for QUEUE_LOST_S

        with db.atomic():
            LanguageModel.update(updated_at=old).where(LanguageModel.id == lost.id).execute()

        def unreadable(*args: Any) -> list:
            raise OSError("the queue is down")

        with monkeypatch.context() as patched:
            patched.setattr(huey, "pending", unreadable)
            assert tasks.reap() == 0 and enqueued == []  # unreadable: none taken for lost
        assert tasks.reap() == 0 and enqueued == [("prepare_model", (lost.id,))]
    finally:
        huey.immediate = True


def test_a_lost_queued_task_is_queued_again(data_dir: Path, enqueued: list,
                                            scheduled: list) -> None:
    """A worker SIGKILLed while it holds a queued training's task (popped, not yet claimed or
    put back) takes the task along; the live workers' check queues it again once no worker has
    held it for QUEUE_LOST_S, once."""
    from worker.jobs.workers import QUEUE_LOST_S

    m, d = make_model(), make_dataset()
    old = time.time() - QUEUE_LOST_S - 5
    fresh = make_training(m, d, "queued")  # created just now: its task is on its way
    lost = make_training(m, d, "queued")
    held = make_training(m, d, "queued")  # a worker tried to claim it 3 s ago
    running = make_training(m, d, "training", worker="live:1")
    group = [make_training(m, d, s, task_group="9.0") for s in ("queued", "queued", "completed")]
    beat("live:1")
    for t in (lost, held, running, *group):
        set_row(t.id, updated_at=old)
    set_row(held.id, queue_seen_at=time.time() - 3)

    tasks.reap()
    assert enqueued == [("run_training", (lost.id, True)),
                        ("run_group", ([group[0].id, group[1].id],))]
    assert [status_of(t.id) for t in (fresh, lost, held, running)] == [
        "queued", "queued", "queued", "training"]
    enqueued.clear()
    tasks.reap()  # marked seen: not queued twice
    assert enqueued == []

    # every claim attempt marks its task alive, also one that cannot claim (no such GPU here)
    set_row(lost.id, queue_seen_at=old, config=dict(row(lost.id).config, device="cuda:7"))
    tasks.run_training.call_local(lost.id, True)
    assert scheduled == [((lost.id, True), 2)] and status_of(lost.id) == "queued"
    assert row(lost.id).queue_seen_at == pytest.approx(time.time(), abs=30)
    tasks.reap()
    assert enqueued == []
