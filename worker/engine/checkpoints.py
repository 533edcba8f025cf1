"""Checkpoints: flat safetensors files with JSON metadata, written atomically.

A checkpoint file holds only tensors — the SAE weights under ``sae.*``, the optimizer state under
``optim.<param>.<name>``, the dead-latent counters under ``stats.*`` and the torch RNG state —
and keeps every non-tensor value (step, config, schedule, data position, normaliser, best loss) as
JSON strings in the safetensors metadata. No pickle anywhere.

Files are named ``step_{step:08d}.safetensors`` inside a run's ``checkpoints/`` folder. Writes go
to a temporary file in the same folder, are fsynced, then renamed over the final name, so a crash
never leaves a half-written file under a checkpoint's name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError
from .files import file_mode, fsync_dir

CKPT_RE = re.compile(r"^step_(\d+)\.safetensors$")


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> Path:
    """Write tensors + JSON metadata to ``path`` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    str_meta = {k: json.dumps(v) for k, v in meta.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=str_meta)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def load_checkpoint(path: Path | str, device: str = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    try:
        with safe_open(str(path), framework="pt", device=device) as fh:
            raw_meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"Checkpoint '{path}' is corrupt or not a safetensors file "
                              f"({exc}).") from None
    if "step" not in meta or "config" not in meta:
        raise CheckpointError(f"'{path}' is a safetensors file but not an SAE Studio checkpoint "
                              "(no step/config metadata).")
    return Checkpoint(tensors, meta)


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.safetensors"


def list_checkpoints(ckpt_dir: Path | str) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in the folder, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path | str) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def newest_loadable(
    ckpt_dir: Path | str, on_skip: Callable[[Path, CheckpointError], None] | None = None,
) -> tuple[Path, Checkpoint] | None:
    """The newest checkpoint of the folder that loads, and its content; a newer file that does
    not load (truncated, corrupt) is skipped and passed to ``on_skip``. None when none loads."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            if on_skip is not None:
                on_skip(path, exc)
    return None


def apply_retention(
    ckpt_dir: Path | str, keep_every: int, best_step: int | None, protect: set[int] | None = None
) -> list[Path]:
    """Keep the first, the last, every ``keep_every``-th step and the best; delete the rest.

    ``protect`` holds further steps never to delete (e.g. saved on demand). Returns the deleted
    paths. The newest and the best checkpoint are never deleted.
    """
    found = list_checkpoints(ckpt_dir)
    if not found:
        return []
    keep = {found[0][0], found[-1][0]} | (protect or set())
    if best_step is not None:
        keep.add(best_step)
    if keep_every > 0:
        keep |= {s for s, _ in found if s % keep_every == 0}
    deleted = []
    for step, path in found:
        if step not in keep:
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted
