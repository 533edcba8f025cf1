"""The Huey consumer as a child process of run.py, kept alive and stopped in order.

``Supervisor(workers, env)`` starts ``huey_consumer worker.tasks.huey`` in its own session (a
terminal's Ctrl-C reaches run.py only, which then stops it in order) and watches it once a
second: a consumer that exits is started again, and the new one marks the trainings the dead one
left running ``interrupted`` (Retry continues them). ``stop()`` asks running trainings to
checkpoint, then stops the consumer. The consumer knows run.py's pid (``SAE_STUDIO_PARENT_PID``)
and stops by itself when run.py is gone, however run.py died (``worker.tasks``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def consumer_command(workers: int) -> list[str]:
    """The consumer's command line: ``workers`` threads on the app's queue."""
    return [sys.executable, "-m", "huey.bin.huey_consumer", "worker.tasks.huey",
            "-w", str(workers), "-k", "thread", "-q"]


def start_worker(workers: int, env: dict[str, str]) -> subprocess.Popen:
    """A consumer in its own session (run.py forwards Ctrl-C in order, see ``stop_worker``)."""
    return subprocess.Popen(consumer_command(workers), cwd=ROOT, env=env,
                            start_new_session=True)


def stop_worker(worker: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Ask running trainings to checkpoint and stop as ``interrupted``, then stop the consumer
    (SIGINT: huey finishes its current task, then exits); SIGKILL after ``timeout_s``."""
    if worker.poll() is not None:
        return
    from .db import init_db
    from .jobs import interrupt_running
    from .settings import app_db_path

    init_db(app_db_path())
    n = interrupt_running()
    if n:
        print(f"Checkpointing {n} running training(s); Retry continues them.", flush=True)
    worker.send_signal(signal.SIGINT)
    try:
        worker.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


class Supervisor:
    """One consumer on the data folder, started again when it exits."""

    def __init__(self, workers: int, env: dict[str, str]) -> None:
        self.workers = workers
        self.env = dict(env, SAE_STUDIO_PARENT_PID=str(os.getpid()))
        self.proc = start_worker(workers, self.env)
        self.stopping = threading.Event()
        threading.Thread(target=self._watch, name="worker-supervisor", daemon=True).start()

    def _watch(self) -> None:
        while not self.stopping.wait(1.0):
            code = self.proc.poll()
            if code is None or self.stopping.is_set():
                continue
            old = self.proc.pid
            self.proc = start_worker(self.workers, self.env)
            print(f"The worker (pid {old}) exited with status {code}; started a new one (pid "
                  f"{self.proc.pid}). Trainings it was running are interrupted: Retry continues "
                  "them.", flush=True)

    def stop(self) -> None:
        self.stopping.set()
        stop_worker(self.proc)
