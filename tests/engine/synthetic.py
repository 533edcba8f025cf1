"""Synthetic activations with a known sparse structure (a real tensor file, no mocks), and a
short training on such a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from worker.engine.activations import CachedActivations, write_activation_file
from worker.engine.config import TrainConfig
from worker.engine.trainer import Callbacks, Trainer, TrainResult


def sparse_activations(n: int, d_in: int = 32, n_atoms: int = 128, k: int = 4, offset: float = 3.0,
                       seed: int = 0) -> torch.Tensor:
    """x = offset + sum of k random unit atoms with positive weights (a k-sparse dictionary)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d_in, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.randint(0, n_atoms, (n, k), generator=g)
    vals = torch.rand(n, k, generator=g) * 2 + 0.5
    return (vals[..., None] * atoms[idx]).sum(1) + offset


def write_sparse_file(path: Path, n: int = 20_000, **kw) -> Path:
    x = sparse_activations(n, **kw)
    write_activation_file(x.split(4096), path, meta={"model": "synthetic", "layer": 0,
                                                     "hook_point": "residual",
                                                     "context_size": 16})
    return path


def train(cfg: TrainConfig, out: Path, resume: Path | str | None = None,
                  **callbacks: Any) -> tuple[Trainer, TrainResult, list[dict[str, Any]]]:
    """Train ``cfg`` on its activation file (``cfg.eval_tokens`` held out) into ``out``.

    Returns the trainer, its result and the metrics rows it reported; ``callbacks`` are the other
    ``Callbacks`` fields (on_log, on_checkpoint, control)."""
    rows: list[dict[str, Any]] = []
    source = CachedActivations(cfg.activations, seed=cfg.seed, holdout=cfg.eval_tokens)
    trainer = Trainer(cfg, source, out, callbacks=Callbacks(on_metrics=rows.append, **callbacks))
    return trainer, trainer.fit(resume=resume), rows
