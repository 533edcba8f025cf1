"""Synthetic activations with a known sparse structure (a real tensor file, no mocks)."""

from __future__ import annotations

from pathlib import Path

import torch

from worker.engine.activations import write_activation_file


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
