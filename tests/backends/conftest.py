"""Fixtures for the back-end tests: the throw-away servers of ``tests.servers`` and ``data_dir``
with the app database on a new PostgreSQL database (Huey immediate, as in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import postgres_server, postgres_url, redis_server, redis_url
from worker.jobs import common
from worker.queue import huey

__all__ = ["postgres_server", "postgres_url", "redis_server", "redis_url"]


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str
             ) -> Iterator[Path]:
    """``tmp_path`` as the data folder with the app database on a new PostgreSQL database
    (``$SAE_STUDIO_DATABASE_URL``), Hugging Face offline, Huey immediate."""
    monkeypatch.setenv("SAE_STUDIO_DATA", str(tmp_path))
    monkeypatch.setenv("SAE_STUDIO_DATABASE_URL", postgres_url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    common.open_database()
    huey.immediate = True
    yield tmp_path
    common.disconnect()
