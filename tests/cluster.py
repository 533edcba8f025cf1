"""Many workers sharing one database, queue and artifacts folder, as real processes: the helpers
the cluster tests share (tests/test_supervision.py on SQLite files; a PostgreSQL + Redis test
passes its own URLs in ``Shared``).

    shared = sqlite_shared(tmp_path / "shared")
    web = RunPy(tmp_path / "web", "--no-worker", *shared.args())      # tests/processes.py
    a = WorkerProcess(tmp_path / "a", shared)                          # run.py --worker-only
    t = wait_status(web, training_id, "training")
    assert t["worker"] == a.name
    a.kill()                                                           # SIGKILL, no goodbye

Every wait is bounded; loopback only.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .processes import ROOT, RunPy, alive, stop_all, wait_for


@dataclass(frozen=True)
class Shared:
    """What every process of a cluster shares: the app database, the queue, the artifacts."""

    database_url: str
    queue_url: str
    artifacts: Path

    def args(self) -> list[str]:
        """run.py's options that point a process at them."""
        return ["--database-url", self.database_url, "--queue-url", self.queue_url,
                "--artifacts", str(self.artifacts)]


def sqlite_shared(folder: Path) -> Shared:
    """A cluster on SQLite files in ``folder`` (app.db, queue.db, artifacts/): one machine."""
    folder.mkdir(parents=True, exist_ok=True)
    return Shared(f"sqlite:///{folder / 'app.db'}", f"sqlite:///{folder / 'queue.db'}",
                  folder / "artifacts")


class WorkerProcess:
    """``run.py --worker-only`` on its own data folder with the shared options, in its own
    session; ``slots`` trainings at once (``$SAE_STUDIO_MAX_TRAININGS``). Its output is
    collected line by line."""

    def __init__(self, data_dir: Path, shared: Shared, slots: int = 1,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [sys.executable, "run.py", "--worker-only", "--data-dir", str(data_dir),
             *shared.args()],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1",
                           "SAE_STUDIO_MAX_TRAININGS": str(slots), **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        self.consumer = int(wait_for(lambda: self._find(r"worker: pid (\d+)"), 60,
                                     f"run.py --worker-only on {data_dir}"))

    def _find(self, pattern: str) -> str | None:
        hits = [m.group(1) for line in list(self.lines) if (m := re.search(pattern, line))]
        return hits[-1] if hits else None

    @property
    def name(self) -> str:
        """The consumer's name in the heartbeats and on the trainings it claims."""
        return f"{socket.gethostname()}:{self.consumer}"

    def kill(self) -> None:
        """SIGKILL run.py's process group and its consumer's (its own session) at once: the
        worker vanishes without interrupting anything, as a machine that loses power."""
        for group in (self.proc.pid, self.consumer):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        wait_for(lambda: not alive(self.consumer), 10, f"the consumer {self.consumer} to die")

    def close(self) -> None:
        """Whatever still runs of it, killed (a test's clean-up)."""
        if self.proc.poll() is None or alive(self.consumer):
            self.kill()
        stop_all(self.data_dir)


class Watch:
    """A cluster test's processes: ``with Watch(web) as watch: a = watch.add("a", WorkerProcess(
    ...))``. On an assertion error it prints each process's last output lines (shown with the
    failure); at the end it stops the web and closes every worker, however the test ended."""

    def __init__(self, web: RunPy) -> None:
        self.web = web
        self.workers: dict[str, WorkerProcess] = {}

    def add(self, label: str, worker: WorkerProcess) -> WorkerProcess:
        self.workers[label] = worker
        return worker

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is not None and issubclass(kind, AssertionError):
                outputs = {"web": self.web.lines, **{k: w.lines for k, w in self.workers.items()}}
                for label, lines in outputs.items():
                    print(f"{label}'s output:", *lines[-40:], sep="\n")
        finally:
            if self.web.proc.poll() is None:
                self.web.stop()
            for worker in self.workers.values():
                worker.close()


def workers(web: RunPy) -> list[dict[str, Any]]:
    """``GET /workers``: the workers' heartbeats, newest first."""
    return web.call("/workers")["items"]


def wait_workers(web: RunPy, names: Iterable[str], timeout: float = 120) -> list[dict[str, Any]]:
    """Wait until every worker in ``names`` is alive on ``/workers`` (its start-up is done)."""
    wanted = set(names)

    def ready() -> list[dict[str, Any]] | None:
        items = [w for w in workers(web) if w["name"] in wanted and w["alive"]]
        return items if len(items) == len(wanted) else None

    return wait_for(ready, timeout, f"the workers {sorted(wanted)} to beat", poll_s=0.5)


def wait_status(web: RunPy, training_id: int, *statuses: str,
                timeout: float = 120) -> dict[str, Any]:
    """Wait until the training's status is one of ``statuses``: its JSON then. A training that
    fails (when not waited for) fails the wait at once, with its error."""

    def reached() -> dict[str, Any] | None:
        row = web.call(f"/trainings/{training_id}")
        if row["status"] == "failed" and "failed" not in statuses:
            raise AssertionError(f"training {training_id} failed: {row['error']}")
        return row if row["status"] in statuses else None

    return wait_for(reached, timeout, f"training {training_id} to be {'/'.join(statuses)}",
                    poll_s=0.2)


def kill_mid_run(web: RunPy, worker: WorkerProcess, training_id: int,
                 slack_s: float) -> dict[str, Any]:
    """Once the training has a checkpoint, SIGKILL ``worker`` (which runs it) and wait until a
    live worker marks it interrupted, naming the dead one, within the dead threshold plus one
    look for dead workers plus ``slack_s`` seconds: its JSON then."""
    from worker.jobs import HEARTBEAT_DEAD_S
    from worker.tasks import REAP_S

    wait_for(lambda: web.call(f"/trainings/{training_id}/checkpoints")["items"], 120,
             f"a checkpoint of training {training_id}")
    worker.kill()
    killed_at = time.monotonic()
    row = wait_status(web, training_id, "interrupted",
                      timeout=HEARTBEAT_DEAD_S + REAP_S + slack_s + 10)
    assert time.monotonic() - killed_at < HEARTBEAT_DEAD_S + REAP_S + slack_s
    assert f"The worker {worker.name} stopped (no heartbeat for" in row["error"]
    return row


def set_total_steps(database_url: str, training_id: int, steps: int) -> None:
    """Give a training ``steps`` in all (its row and config), straight in the shared database:
    a Retry then trains to that step (the cluster tests' way to finish a long run early)."""
    from worker.db import Training, db, init_db

    init_db(database_url)
    with db.connection_context(), db.atomic():
        t = Training.get_by_id(training_id)
        Training.update(total_steps=steps, config=dict(t.config, total_steps=steps)) \
            .where(Training.id == training_id).execute()


def log_lines(database_url: str, training_id: int) -> list[str]:
    """The training's log messages, oldest first, read from the shared database."""
    from worker.db import LogLine, db, init_db

    init_db(database_url)
    with db.connection_context():
        return [line.message for line in LogLine.select().where(LogLine.training == training_id)
                .order_by(LogLine.id)]


def dataset_row(database_url: str, dataset_id: int) -> tuple[str, str | None, str | None]:
    """The dataset's (status, worker preparing it, message), read from the shared database
    (the API does not show the worker)."""
    from worker.db import Dataset, db, init_db

    init_db(database_url)
    with db.connection_context():
        d = Dataset.get_by_id(dataset_id)
        return d.status, d.worker, d.message
