"""Engine fixtures shared by the test modules: tiny real models of every family
(tests/engine/tiny_models.py) and a synthetic sparse activation file (tests/engine/synthetic.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.engine.models import LoadedModel, load_model

from .synthetic import write_sparse_file
from .tiny_models import TINY_FAMILIES, make_tiny_model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> the folder of its saved tiny model (built once per session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: make_tiny_model(family, root / family) for family in TINY_FAMILIES}


@pytest.fixture(scope="module")
def tiny(tiny_dirs: dict[str, Path]) -> dict[str, LoadedModel]:
    """family -> its tiny model, loaded afresh for each test module."""
    return {family: load_model(str(path)) for family, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def acts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An activation file of 20,000 synthetic sparse vectors (d_in 32, k 4 of 128 atoms)."""
    return write_sparse_file(tmp_path_factory.mktemp("acts") / "acts.safetensors")
