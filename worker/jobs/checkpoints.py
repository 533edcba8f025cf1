"""A training's checkpoints (list, save now, delete) and its SAELens export as a zip."""

from __future__ import annotations

import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from ..db import RUNNING, Checkpoint, Training, db
from . import common
from .errors import Conflict
from .trainings import get_training

CHECKPOINT_FIELDS = ("id", "step", "path", "loss", "size_bytes", "is_best", "reason",
                     "created_at")
"""The keys of ``checkpoint_as_dict`` besides ``training_id``."""


def checkpoints(training: Training | int | str) -> list[Checkpoint]:
    """The training's checkpoints, newest step first."""
    t = training if isinstance(training, Training) else get_training(training)
    return list(Checkpoint.select().where(Checkpoint.training == t.id)
                .order_by(Checkpoint.step.desc()))


def checkpoint_as_dict(ckpt: Checkpoint) -> dict[str, Any]:
    """JSON-ready copy of a checkpoint row."""
    out = common.row_dict(ckpt, CHECKPOINT_FIELDS)
    out["training_id"] = ckpt.training_id
    return out


def save_checkpoint_now(training_id: int | str) -> Training:
    """Ask the worker for a checkpoint at the current step (kept by retention).

    Conflict unless the training is training or paused (a paused training already saved a
    checkpoint when it paused: nothing to do).
    """
    with db.atomic():
        t = get_training(training_id)
        if t.status not in ("training", "paused"):
            raise Conflict(f"Training {t.id} is {t.status}; checkpoints can be saved only while "
                           "it is training or paused.")
        if t.status == "paused":
            return t
        t.requested = "save"
        t.save()
    return t


def get_checkpoint(checkpoint_id: int | str) -> Checkpoint:
    """The checkpoint, or NotFound("Checkpoint 7 does not exist.")."""
    return common.get_row(Checkpoint, "Checkpoint", checkpoint_id)


def delete_checkpoint(checkpoint_id: int | str) -> None:
    """Delete a checkpoint file and its row.

    Conflict for the newest or the best checkpoint of a training that is running.
    """
    ckpt = get_checkpoint(checkpoint_id)
    t = ckpt.training
    if t.status in RUNNING:
        newest = (Checkpoint.select(Checkpoint.id).where(Checkpoint.training == t.id)
                  .order_by(Checkpoint.step.desc()).first())
        if ckpt.is_best or (newest is not None and newest.id == ckpt.id):
            which = "best" if ckpt.is_best else "newest"
            raise Conflict(f"Checkpoint at step {ckpt.step} is the {which} one of running "
                           f"training {t.id}; the worker needs it until the training finishes.")
    Path(ckpt.path).unlink(missing_ok=True)
    with db.atomic():
        ckpt.delete_instance()
        Training.update(updated_at=time.time()).where(Training.id == ckpt.training_id).execute()


def _newest_mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()),
               default=folder.stat().st_mtime)


def has_export(t: Training) -> bool:
    """Whether a finished training has its SAELens folder (the card's download link)."""
    return t.status in ("completed", "stopped") and bool(t.out_dir) \
        and (Path(t.out_dir) / "saelens").is_dir()


def export_zip(training_id: int | str) -> Path:
    """A zip of the training's SAELens folder (built once, rebuilt when the folder changes).

    Conflict unless the training is completed or stopped and has an export.
    """
    t = get_training(training_id)
    folder = Path(t.out_dir or "") / "saelens"
    if t.status not in ("completed", "stopped"):
        raise Conflict(f"Training {t.id} is {t.status}; only a completed or stopped training "
                       "can be exported.")
    if not t.out_dir or not folder.is_dir():
        raise Conflict(f"Training {t.id} has no SAELens export folder ({folder}).")
    out = Path(t.out_dir) / "saelens.zip"
    if out.is_file() and out.stat().st_mtime >= _newest_mtime(folder):
        return out
    fd, tmp = tempfile.mkstemp(prefix=".saelens-", suffix=".zip", dir=t.out_dir)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    zf.write(p, Path("saelens") / p.relative_to(folder))
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out
