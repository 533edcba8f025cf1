"""Fixtures for the job-layer tests: a fresh data folder and SQLite file per test, Huey in
immediate mode (tasks run inline, in the caller's thread), and helpers to add the bundled
``minilm-l6`` model and a small ``kjv`` dataset."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# worker.queue creates the queue file at import: keep it out of the repository's ./data.
_saved = os.environ.get("SAE_STUDIO_DATA")
os.environ["SAE_STUDIO_DATA"] = tempfile.mkdtemp(prefix="sae-jobs-queue-")
from worker import jobs, tasks  # noqa: E402
from worker.db import db, init_db  # noqa: E402
from worker.queue import huey  # noqa: E402

if _saved is None:
    os.environ.pop("SAE_STUDIO_DATA", None)
else:
    os.environ["SAE_STUDIO_DATA"] = _saved

# Small, fast training settings (minilm-l6: 6 layers, hidden 384).
FAST = {"layer_idx": "2", "expansion_factor": "2", "k": "8", "batch_size": "128",
        "total_steps": "20", "log_every": "5", "auto_save_interval": "10",
        "buffer_tokens": "2048", "eval_tokens": "256", "device": "cpu"}


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SAE_STUDIO_DATA", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    init_db(tmp_path / "app.db")
    huey.immediate = True
    yield tmp_path
    if not db.is_closed():
        db.close()


@pytest.fixture
def model(data_dir: Path) -> Any:
    m = jobs.add_model("minilm-l6")
    assert m.status == "ready", m.error
    return m


@pytest.fixture
def dataset(model: Any) -> Any:
    d = jobs.add_dataset("kjv", context_size="64", max_tokens="16384")
    assert d.status == "ready", d.error
    return d


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple]]:
    """Record enqueued tasks instead of running them (tests then run them themselves)."""
    calls: list[tuple[str, tuple]] = []
    monkeypatch.setattr(jobs, "_enqueue", lambda name, *args: calls.append((name, args)))
    return calls


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def status_of(training_id: int) -> str:
    return jobs.get_training(training_id).status


def start_in_thread(training_id: int, resume: bool = False) -> threading.Thread:
    """Run the training task in a thread (as a worker would), with its own DB connection."""
    thread = threading.Thread(target=tasks.run_training.call_local,
                              args=(training_id, resume), daemon=True)
    thread.start()
    return thread
