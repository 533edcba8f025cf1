"""run.py refuses a bad --database-url / --queue-url, or servers it cannot reach, in one line
(exit 2, no traceback, never the password) before it starts anything."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_py(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "--data-dir", str(tmp_path / "data"),
                           "--no-worker", "--port", "0", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120)


@pytest.mark.parametrize(("flag", "url", "words"), [
    ("--database-url", "mysql://root:hunter2@127.0.0.1/sae", "Unsupported database URL"),
    ("--database-url", "postgresql://sae:hunter2@127.0.0.1:99999/sae", "not a number"),
    ("--database-url", "postgresql://sae:hunter2@127.0.0.1:5432", "names no database"),
    ("--database-url", "postgresql://sae:hunter2@127.0.0.1:{port}/sae",
     "Cannot open the database (postgresql://...)"),
    ("--queue-url", "amqp://guest:hunter2@127.0.0.1/", "queue"),
    ("--queue-url", "redis://:hunter2@127.0.0.1:{port}/0",
     "Cannot reach the task queue (redis://...)"),
])
def test_bad_backend_is_one_line(tmp_path: Path, flag: str, url: str, words: str) -> None:
    proc = run_py(tmp_path, flag, url.format(port=closed_port()))
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "hunter2" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("run.py: error: ")
    assert not (tmp_path / "data" / "app.db").exists() or flag == "--queue-url"
