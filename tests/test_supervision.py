"""run.py supervises its worker: a SIGKILLed run.py leaves no orphan worker behind (the orphan
would go on training beside the next run.py's worker), and a worker that dies alone is started
again. Real processes: run.py, its Huey consumer, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class RunPy:
    """run.py on a fresh data folder and a free port; its output collected line by line."""

    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "run.py", "--data-dir", str(data_dir), "--port", "0"], cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        _wait(lambda: self.find(r"worker pid (\d+)") is not None, 60, "run.py's URL line")
        self.worker = int(self.find(r"worker pid (\d+)"))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def find(self, pattern: str) -> str | None:
        for line in list(self.lines):
            m = re.search(pattern, line)
            if m:
                return m.group(1)
        return None

    def worker_started(self) -> bool:
        """The worker has run its start-up hook (the parent watch starts there): its heartbeat
        shows on /healthz."""
        url = self.find(r"(http://127\.0\.0\.1:\d+)/")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                return bool(json.load(r)["worker_alive"])
        except OSError:
            return False


def test_sigkill_of_run_py_leaves_no_worker(tmp_path: Path) -> None:
    run = RunPy(tmp_path)
    try:
        _wait(run.worker_started, 90, "the worker's start-up")
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(10)
        _wait(lambda: not _alive(run.worker), 20, f"the orphaned worker {run.worker} to stop")
    finally:
        for pid in (run.proc.pid, run.worker):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_that_dies_is_started_again(tmp_path: Path) -> None:
    run = RunPy(tmp_path)
    new = None
    try:
        os.kill(run.worker, signal.SIGKILL)
        _wait(lambda: run.find(r"started a new one \(pid (\d+)\)") is not None, 20,
              "a new worker")
        new = int(run.find(r"started a new one \(pid (\d+)\)"))
        assert new != run.worker and _alive(new)
        run.proc.send_signal(signal.SIGINT)  # Ctrl-C still stops both cleanly
        assert run.proc.wait(90) == 0
        _wait(lambda: not _alive(new), 20, "the new worker to stop with run.py")
    finally:
        for pid in (run.proc.pid, run.worker, new):
            if pid and _alive(pid):
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
