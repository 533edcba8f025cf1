"""Fixtures for the job-layer tests (``data_dir`` and ``enqueued`` are in tests/conftest.py): the
bundled ``minilm-l6`` model and a small ``kjv`` dataset added through the job layer, and helpers
to run and wait for a training."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from worker import jobs, tasks

# Small, fast training settings (minilm-l6: 6 layers, hidden 384).
FAST = {"layer": "2", "expansion_factor": "2", "k": "8", "batch_size": "128",
        "total_steps": "20", "log_every": "5", "auto_save_interval": "10",
        "buffer_tokens": "2048", "eval_tokens": "256", "device": "cpu"}


def form(model: Any, dataset: Any, **overrides: str) -> dict[str, str]:
    """The training form for ``model`` and ``dataset`` with the FAST settings, and overrides."""
    return {"model_id": str(model.id), "dataset_id": str(dataset.id), **FAST, **overrides}


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


def status_of(training_id: int) -> str:
    return jobs.get_training(training_id).status


def start_in_thread(training_id: int, resume: bool = False) -> threading.Thread:
    """Run the training task in a thread (as a worker would), with its own DB connection."""
    thread = threading.Thread(target=tasks.run_training.call_local,
                              args=(training_id, resume), daemon=True)
    thread.start()
    return thread
