"""Fixtures shared by every test folder (flaskr style): a fresh data folder per test with its app
database, the Flask app on it with Huey in immediate mode, a test client, and ``enqueued`` to
record tasks instead of running them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from webapp import create_app
from worker.jobs import common
from worker.queue import huey


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``tmp_path`` as the data folder (``$SAE_STUDIO_DATA``) with its app database bound,
    Hugging Face offline, and Huey immediate (tasks run inline, on an in-memory queue)."""
    monkeypatch.setenv("SAE_STUDIO_DATA", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    common.open_database()
    huey.immediate = True
    yield tmp_path
    common.disconnect()


@pytest.fixture
def app(data_dir: Path) -> Flask:
    """The web app on ``data_dir``."""
    return create_app({"TESTING": True, "DATA_DIR": str(data_dir)})


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def enqueued(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...]]]:
    """Record enqueued tasks as ``(task_name, args)`` instead of running them (a test then runs
    them itself, or checks what was queued)."""
    calls: list[tuple[str, tuple[Any, ...]]] = []

    def record(name: str, *args: Any) -> None:
        calls.append((name, args))

    monkeypatch.setattr(common, "enqueue", record)  # the job layer's one way to enqueue
    return calls
