"""The Huey consumer as a child process of run.py, kept alive and stopped in order.

``Supervisor(workers, env)`` starts ``huey_consumer worker.tasks.huey`` in its own session (a
terminal's Ctrl-C reaches run.py only, which then stops it in order) and watches it once a
second: a consumer that exits is started again, and the new one marks the trainings the dead one
left running ``interrupted`` (Retry continues them). A consumer that is alive but has not
heartbeat for ``HEARTBEAT_ALIVE_S`` (5 s; it beats every second) is hung: it is killed, its
trainings are marked ``interrupted`` at once, and a new one is started. ``stop()`` asks the
trainings this consumer runs to checkpoint, then stops it. Only this consumer's trainings
(``Training.worker``, its ``host:pid``): other workers sharing the database go on. The
consumer knows run.py's pid (``SAE_STUDIO_PARENT_PID``) and stops by itself when run.py is
gone, however run.py died (``worker.tasks``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


POLL_MAX_S = 0.1
"""The longest an idle worker thread waits between looks at the queue (huey's ``-m``; its
default backs off to 10 s): an interactive probe is picked up within this."""


def consumer_command(workers: int) -> list[str]:
    """The consumer's command line: ``workers`` threads on the app's queue, each looking at it
    at least every ``POLL_MAX_S`` seconds when idle."""
    return [sys.executable, "-m", "huey.bin.huey_consumer", "worker.tasks.huey",
            "-w", str(workers), "-k", "thread", "-m", str(POLL_MAX_S), "-q"]


def start_worker(workers: int, env: dict[str, str]) -> subprocess.Popen:
    """A consumer in its own session (run.py forwards Ctrl-C in order, see ``stop_worker``)."""
    from .engine.memory import HOST_ALLOCATOR_TUNABLES  # torch-free

    tunables = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HOST_ALLOCATOR_TUNABLES]))
    return subprocess.Popen(consumer_command(workers), cwd=ROOT,
                            env=dict(env, GLIBC_TUNABLES=tunables), start_new_session=True)


def _db() -> None:
    from .db import is_bound, open_app_database

    if not is_bound():  # not bound yet in this process
        open_app_database()


def worker_name(worker: subprocess.Popen) -> str:
    """The consumer's name in the heartbeats and on the trainings it claims (``host:pid``)."""
    return f"{socket.gethostname()}:{worker.pid}"


def stop_worker(worker: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Ask the trainings this consumer runs to checkpoint and stop as ``interrupted`` (other
    workers' trainings go on), then stop it (SIGINT: huey finishes its current task, then
    exits); SIGKILL after ``timeout_s``."""
    if worker.poll() is not None:
        return
    from .db import db
    from .jobs.workers import interrupt_worker

    _db()
    with db.connection_context():
        n = interrupt_worker(worker_name(worker))
    if n:
        print(f"Checkpointing {n} running training(s); Retry continues them.", flush=True)
    worker.send_signal(signal.SIGINT)
    try:
        worker.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


class Supervisor:
    """One consumer on the data folder, started again when it exits or hangs."""

    def __init__(self, workers: int, env: dict[str, str]) -> None:
        self.workers = workers
        self.env = dict(env, SAE_STUDIO_PARENT_PID=str(os.getpid()))
        self.stopping = threading.Event()
        self._start()
        threading.Thread(target=self._watch, name="worker-supervisor", daemon=True).start()

    def _start(self) -> None:
        self.started_at = time.time()
        self.proc = start_worker(self.workers, self.env)

    def silent_for(self) -> float | None:
        """Seconds since the current consumer's last heartbeat; None before its first (start-up
        waits for the data folder's worker lock and imports the engine: not judged)."""
        from .db import db
        from .jobs import heartbeat_age

        _db()
        with db.connection_context():
            return heartbeat_age(worker_name(self.proc), self.started_at)

    def _watch(self) -> None:
        from .jobs import HEARTBEAT_ALIVE_S

        while not self.stopping.wait(1.0):
            code = self.proc.poll()
            if self.stopping.is_set():
                break
            if code is not None:
                # 0 also when another process reaped it first (gunicorn's master reaps every
                # child; Popen then cannot learn the status): say no more than we know
                why = (f"was killed by signal {-code}" if code < 0
                       else f"exited with status {code}" if code > 0 else "exited")
            else:
                try:
                    silent = self.silent_for()
                except Exception as exc:  # a busy database: judge it next second
                    print(f"Reading the worker's heartbeat failed: {exc}", flush=True)
                    continue
                if silent is None or silent < HEARTBEAT_ALIVE_S:
                    continue
                why = self._kill_hung(silent)
            old = self.proc.pid
            self._start()
            print(f"The worker (pid {old}) {why}; started a new one (pid {self.proc.pid}). "
                  "Trainings it was running are interrupted: Retry continues them.", flush=True)

    def _kill_hung(self, silent: float) -> str:
        """Kill the hung consumer (its whole session) and mark its trainings interrupted now."""
        from .db import db
        from .jobs.workers import mark_worker_interrupted

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        why = f"stopped responding (no heartbeat for {silent:.0f} s) and was killed"
        with db.connection_context():
            mark_worker_interrupted(worker_name(self.proc),
                                    f"The worker {why}; Retry continues from the newest "
                                    "checkpoint.")
        return why

    def stop(self) -> None:
        self.stopping.set()
        stop_worker(self.proc)
