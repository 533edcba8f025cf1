"""Several SAEs trained in lock-step from shared activation sources (a sweep's group).

    group = GroupTrainer([Member(cfg_a, out_a), Member(cfg_b, out_b)], sources, callbacks=cb)
    results = group.fit(resume=resume_points([out_a, out_b]))

Each member is a ``Trainer`` with its own config, run folder and callbacks; it writes exactly
what a single training writes (checkpoints with retention, the SAELens export). Members that
read the same hook (layer, hook point) share one activation source: each step fetches one batch
per hook and every member on that hook learns from it, so the model's forward pass is paid once
for the whole group (``activations.SharedExtraction`` shares it across hooks too). The group
hears the caller once per step (``trainer.hear``: pause saves every member, stop finishes them
all); every member's training time is the group's step time, so its tokens/s is the group's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .activations import ActivationSource
from .checkpoints import list_checkpoints, load_checkpoint
from .config import TrainConfig
from .errors import CheckpointError, ConfigError
from .trainer import Callbacks, Trainer, TrainResult, hear

SHARED = ("batch_size", "total_steps", "auto_save_interval", "log_every", "device",
          "precision")
"""Options every member of a group must share: they step together on the same batches."""

Hook = tuple[int, str]


@dataclass
class Member:
    """One SAE of a group: its config, run folder and callbacks (metrics, log, checkpoints)."""

    cfg: TrainConfig
    out_dir: Path
    callbacks: Callbacks | None = None
    export_meta: dict[str, Any] | None = None

    @property
    def hook(self) -> Hook:
        """(layer, hook point); layer -1 for an activation file's own."""
        return (-1 if self.cfg.layer is None else int(self.cfg.layer), self.cfg.hook_point)


def check_shared(cfgs: list[TrainConfig]) -> None:
    """ConfigError naming the first ``SHARED`` option the configs disagree on."""
    for name in SHARED:
        values = {getattr(cfg, name) for cfg in cfgs}
        if len(values) > 1:
            raise ConfigError(f"The SAEs of a group train together, so they must share "
                              f"{name}; got {sorted(map(str, values))}.")


def resume_points(out_dirs: list[Path], on_skip: Callable[[Path, Exception], None] | None = None
                  ) -> list[Path] | None:
    """The newest step at which every member has a checkpoint that loads, as one path per
    member; None when there is none (a fresh start). A newer file that does not load is
    skipped (``on_skip``), so a save cut short in one member falls back for all."""
    found: list[dict[int, Path]] = [dict(list_checkpoints(Path(d) / "checkpoints"))
                                    for d in out_dirs]
    common = set(found[0]).intersection(*found[1:]) if found else set()
    for step in sorted(common, reverse=True):
        paths = [steps[step] for steps in found]
        bad: tuple[Path, Exception] | None = None
        for path in paths:
            try:
                load_checkpoint(path)
            except CheckpointError as exc:
                bad = (path, exc)
                break
        if bad is None:
            return paths
        if on_skip is not None:
            on_skip(*bad)
    return None


class GroupTrainer:
    def __init__(self, members: list[Member], sources: dict[Hook, ActivationSource], *,
                 callbacks: Callbacks | None = None) -> None:
        if not members:
            raise ConfigError("A group needs at least one SAE.")
        check_shared([m.cfg for m in members])
        self.cb = callbacks or Callbacks()
        self.members = members
        self.sources = sources
        self.trainers = [Trainer(m.cfg, sources[m.hook], m.out_dir, callbacks=m.callbacks,
                                 export_meta=m.export_meta) for m in members]
        self.by_hook: dict[Hook, list[Trainer]] = {}
        for m, t in zip(members, self.trainers, strict=True):
            self.by_hook.setdefault(m.hook, []).append(t)

    @property
    def step(self) -> int:
        return self.trainers[0].step

    def fit(self, resume: list[Path] | None = None) -> list[TrainResult]:
        """Train every member to ``total_steps`` (continuing from ``resume``, one checkpoint
        per member at the same step: ``resume_points``), then finish each (held-out vectors,
        final checkpoint, export)."""
        for i, trainer in enumerate(self.trainers):
            trainer.begin(resume[i] if resume else None)
        if len({t.step for t in self.trainers}) > 1:
            raise CheckpointError("The group's checkpoints are not all at the same step.")
        cfg = self.trainers[0].cfg
        self.cb.on_log(f"Group of {len(self.trainers)} SAEs on {len(self.by_hook)} hook(s): "
                       f"{cfg.total_steps - self.step} steps of {cfg.batch_size} tokens.")
        stopped = False
        while self.step < cfg.total_steps:
            if hear(self.cb, self.step, self.trainers):
                stopped = True
                break
            t0 = time.perf_counter()
            for hook, trainers in self.by_hook.items():
                batch = self.sources[hook].next_batch(cfg.batch_size)
                for trainer in trainers:
                    trainer.learn(batch)
            rows = [trainer.read_if_logging() for trainer in self.trainers]
            spent = time.perf_counter() - t0
            for trainer, window in zip(self.trainers, rows, strict=True):
                trainer.end_step(spent, window)
        return [trainer.finish(stopped) for trainer in self.trainers]
