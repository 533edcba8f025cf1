"""run.py supervises its worker: a SIGKILLed run.py leaves no orphan worker behind (the orphan
would go on training beside the next run.py's worker), and a worker that dies alone is started
again, and one that hangs (no heartbeat) is killed and replaced; two workers on one database share
the trainings, and one whose worker dies moves to the other. Real processes: run.py, its Huey
consumer, signals."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

from . import cluster
from .processes import RunPy, alive, wait_for


def test_sigkill_of_run_py_leaves_no_worker(tmp_path: Path) -> None:
    run = RunPy(tmp_path)
    worker = run.worker()
    try:
        wait_for(run.worker_started, 90, "the worker's start-up")
        assert os.readlink(f"/proc/{worker}/cwd") == str(tmp_path / "worker")  # empty, its own
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(10)
        wait_for(lambda: not alive(worker), 20, f"the orphaned worker {worker} to stop")
    finally:
        for pid in (run.proc.pid, worker):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_that_dies_is_started_again(tmp_path: Path) -> None:
    run = RunPy(tmp_path)
    first, new = run.worker(), None
    try:
        os.kill(first, signal.SIGKILL)
        wait_for(run.restarts, 20, "a new worker")
        new = run.worker()
        assert new != first and alive(new)
        run.proc.send_signal(signal.SIGINT)  # Ctrl-C still stops both cleanly
        assert run.proc.wait(90) == 0
        wait_for(lambda: not alive(new), 20, "the new worker to stop with run.py")
    finally:
        for pid in (run.proc.pid, first, new):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_one_worker_per_data_folder(data_dir: Path) -> None:
    """A second worker on the same data folder (a new run.py's, while a killed one's orphan still
    checkpoints) waits before it recovers rows or takes tasks, until the first has exited."""
    from worker import tasks
    from worker.engine.files import take_lock

    first = take_lock(data_dir / "worker.lock")  # the other worker
    second = threading.Thread(target=tasks._hold_worker_lock, daemon=True)
    second.start()
    time.sleep(1.5)
    assert second.is_alive() and tasks._worker_lock is None  # still waiting
    os.close(first)  # the other worker exits
    second.join(5)
    assert not second.is_alive() and tasks._worker_lock is not None
    held_by = (data_dir / "worker.lock").read_text()
    os.close(tasks._worker_lock)
    tasks._worker_lock = None
    assert held_by == str(os.getpid())


def test_a_hung_worker_is_killed_and_its_training_interrupted(tmp_path: Path) -> None:
    """A worker that is alive but silent (SIGSTOP: no heartbeat) is found within a few seconds:
    /healthz says so, its training becomes ``interrupted``, run.py kills it and starts a new
    one, and Retry then finishes the training on the new worker."""
    run = RunPy(tmp_path)
    hung, new = run.worker(), None
    try:
        m = run.call("/models", {"source": "minilm-l6"})
        d = run.call("/datasets", {"source": "kjv", "max_tokens": "20000", "context_size": "64"})
        wait_for(lambda: run.call(f"/models/{m['id']}")["status"] == "ready", 120, "the model")
        wait_for(lambda: run.call(f"/datasets/{d['id']}")["status"] == "ready", 120, "the data")
        t = run.call("/trainings", {"model_id": m["id"], "dataset_id": d["id"], "layer": 3,
                                    "expansion_factor": 2, "batch_size": 128,
                                    "total_steps": 100_000, "log_every": 5,
                                    "buffer_tokens": 4096, "eval_tokens": 0})
        tid = t["id"]
        wait_for(lambda: run.call(f"/trainings/{tid}")["status"] == "training", 120, "training")
        assert run.call("/healthz")["worker_alive"]
        os.kill(hung, signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_for(lambda: not run.call("/healthz")["worker_alive"], 10, "healthz to see it")
        row = wait_for(lambda: (r := run.call(f"/trainings/{tid}"))["status"] == "interrupted"
                       and r, 15, "the training to be interrupted")
        assert time.monotonic() - stopped_at < 12
        assert "no heartbeat" in row["error"]
        wait_for(lambda: not alive(hung), 10, "the hung worker to be killed")
        wait_for(run.restarts, 10, "the new worker")  # printed after the hung one is reaped
        assert run.restarts() == 1
        new = run.worker()
        assert new != hung and alive(new)
        wait_for(run.worker_started, 90, "the new worker's start-up")
        retried = run.call(f"/trainings/{tid}/retry", {}, "POST")
        assert retried["status"] == "queued"
        wait_for(lambda: run.call(f"/trainings/{tid}")["status"] == "training", 120, "again")
        run.call(f"/trainings/{tid}/stop", {}, "POST")
        final = wait_for(lambda: (r := run.call(f"/trainings/{tid}"))["status"] in
                         ("stopped", "completed", "failed") and r, 120, "the stop")
        assert final["status"] == "stopped", final
        run.proc.send_signal(signal.SIGINT)
        assert run.proc.wait(90) == 0
    except AssertionError:
        print("run.py's output:", *run.lines[-80:], sep="\n")  # shown with the failure
        raise
    finally:
        for pid in (run.proc.pid, hung, new):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_two_workers_share_the_work_and_a_dead_ones_training_moves(tmp_path: Path) -> None:
    """Two ``run.py --worker-only`` (their own data folders; one database, queue and artifacts
    folder) take one training each; one worker is SIGKILLed with its run.py: the other marks its
    training interrupted within the dead threshold, and after Retry finishes it from the newest
    checkpoint in the shared artifacts folder."""

    shared = cluster.sqlite_shared(tmp_path / "shared")
    web = RunPy(tmp_path / "web", "--no-worker", *shared.args())
    with cluster.Watch(web) as watch:
        a = watch.add("a", cluster.WorkerProcess(tmp_path / "a", shared))
        b = watch.add("b", cluster.WorkerProcess(tmp_path / "b", shared))
        seen = cluster.wait_workers(web, [a.name, b.name])
        assert {w["data_dir"] for w in seen} == {str((tmp_path / n).resolve()) for n in "ab"}
        assert all(w["slots"] == 1 and w["running"] == [] for w in seen)

        m = web.call("/models", {"source": "minilm-l6"})
        d = web.call("/datasets", {"source": "kjv", "max_tokens": "20000", "context_size": "64"})
        wait_for(lambda: web.call(f"/models/{m['id']}")["status"] == "ready", 120, "the model")
        wait_for(lambda: web.call(f"/datasets/{d['id']}")["status"] == "ready", 120, "the data")
        form = {"model_id": m["id"], "dataset_id": d["id"], "layer": 2, "expansion_factor": 2,
                "k": 8, "batch_size": 128, "total_steps": 100_000, "log_every": 5,
                "auto_save_interval": 10, "buffer_tokens": 4096, "eval_tokens": 0,
                "device": "cpu"}
        ids = [web.call("/trainings", form)["id"] for _ in range(2)]
        rows = [cluster.wait_status(web, i, "training") for i in ids]
        by_worker = {r["worker"]: r["id"] for r in rows}
        assert set(by_worker) == {a.name, b.name}  # one slot each: one training each
        running = {w["name"]: w["running"] for w in cluster.workers(web)}
        assert running[a.name] == [by_worker[a.name]] and running[b.name] == [by_worker[b.name]]
        moved, other = by_worker[a.name], by_worker[b.name]

        web.call(f"/trainings/{other}/stop", {}, "POST")  # b's slot is free for the Retry
        cluster.wait_status(web, other, "stopped")
        cluster.kill_mid_run(web, a, moved, slack_s=5)
        states = {w["name"]: w["state"] for w in cluster.workers(web)}
        assert states[a.name] == "dead" and states[b.name] == "alive"

        newest = max(c["step"] for c in web.call(f"/trainings/{moved}/checkpoints")["items"])
        assert newest > 0
        cluster.set_total_steps(shared.database_url, moved, newest + 20)
        assert web.call(f"/trainings/{moved}/retry", {}, "POST")["status"] == "queued"
        final = cluster.wait_status(web, moved, "completed")
        assert final["worker"] == b.name and final["current_step"] == newest + 20
        assert final["result"]["steps"] == newest + 20
        log = cluster.log_lines(shared.database_url, moved)
        # from the newest checkpoint on disk: the one listed, or one saved as a was killed
        resumed = [int(m.group(1)) for line in log
                   if (m := re.fullmatch(r"Resumed from .* at step (\d+)\.", line))]
        assert resumed and newest <= resumed[-1] < newest + 20, log


def test_a_dataset_whose_worker_dies_while_preparing_it_is_prepared_by_another(
        tmp_path: Path) -> None:
    """Two workers; the one preparing a dataset (its row names it) is SIGKILLed mid-way: the
    other puts the row back to queued once the dead threshold has passed, queues its preparation
    and prepares it to ready."""
    shared = cluster.sqlite_shared(tmp_path / "shared")
    web = RunPy(tmp_path / "web", "--no-worker", *shared.args())
    with cluster.Watch(web) as watch:
        workers = {w.name: w for w in (watch.add("a", cluster.WorkerProcess(tmp_path / "a",
                                                                            shared)),
                                       watch.add("b", cluster.WorkerProcess(tmp_path / "b",
                                                                            shared)))}
        cluster.wait_workers(web, list(workers))
        m = web.call("/models", {"source": "minilm-l6"})
        wait_for(lambda: web.call(f"/models/{m['id']}")["status"] == "ready", 120, "the model")
        d = web.call("/datasets", {"source": "kjv", "context_size": "64"})  # the whole corpus

        def preparing_worker() -> str | None:
            status, worker, _ = cluster.dataset_row(shared.database_url, d["id"])
            assert status != "ready", "prepared before its worker could be killed"
            return worker if status == "preparing" else None

        name = wait_for(preparing_worker, 60, "a worker to prepare the dataset")
        workers[name].kill()
        (survivor,) = set(workers) - {name}
        wait_for(lambda: "its worker stopped while preparing it" in "\n".join(
            workers[survivor].lines), 90, "the live worker to queue the dataset again")
        wait_for(lambda: web.call(f"/datasets/{d['id']}")["status"] == "ready", 180,
                 "the dataset to be prepared again")
        status, worker, _ = cluster.dataset_row(shared.database_url, d["id"])
        assert (status, worker) == ("ready", None)
        done = web.call(f"/datasets/{d['id']}")
        assert done["n_tokens"] > 500_000 and done["error"] is None
