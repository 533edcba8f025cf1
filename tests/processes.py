"""Real processes for the tests and bench scripts that kill things: run.py on a data folder, the
Huey consumers working on it, and a bounded wait. Loopback only; every wait has a timeout."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "",
             poll_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = proc.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(proc.parent.name))
    return found


def _processes() -> Iterator[tuple[int, bytes, bytes]]:
    """(pid, command line, environment) of every live process we may read."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not alive(int(proc.name)):
            continue
        try:
            yield int(proc.name), (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
        except OSError:
            continue


def consumers(data_dir: Path) -> list[int]:
    """Huey consumers working on this data folder."""
    mark = f"SAE_STUDIO_DATA={data_dir}".encode()
    return [pid for pid, cmd, env in _processes() if b"huey_consumer" in cmd and mark in env]


def stop_all(data_dir: Path) -> None:
    """SIGKILL whatever still runs on this data folder (run.py, workers)."""
    mark = f"SAE_STUDIO_DATA={data_dir}".encode()
    for pid, cmd, env in _processes():
        if pid != os.getpid() and (str(data_dir).encode() in cmd or mark in env):
            os.kill(pid, signal.SIGKILL)


class RunPy:
    """run.py on ``data_dir`` and a free port (more options in ``args``); its output collected
    line by line."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "run.py", "--data-dir", str(data_dir), "--port", "0", *args],
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        self.url = wait_for(lambda: self.find(r"(http://127\.0\.0\.1:\d+)/"), 60, "run.py")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 90) -> int:
        """Send ``sig`` (Ctrl-C by default) and wait: run.py's exit status."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def find(self, pattern: str) -> str | None:
        """The first group of the newest output line matching ``pattern``."""
        hits = [m.group(1) for line in list(self.lines) if (m := re.search(pattern, line))]
        return hits[-1] if hits else None

    def worker(self) -> int:
        """The current worker: the one the URL line names, or the supervisor's newest."""
        return int(self.find(r"(?:worker pid|started a new one \(pid) (\d+)"))

    def restarts(self) -> int:
        return sum("started a new one" in line for line in list(self.lines))

    def call(self, path: str, data: dict[str, Any] | None = None,
             method: str | None = None) -> Any:
        """A JSON request (a form post when ``data`` is given), as curl on the loopback."""
        body = None if data is None else urllib.parse.urlencode(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def worker_started(self) -> bool:
        """The worker ran its start-up hook: its heartbeat shows on /healthz."""
        try:
            return bool(self.call("/healthz")["worker_alive"])
        except OSError:
            return False
