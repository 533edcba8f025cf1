"""Several SAEs trained in lock-step from shared activation sources (a sweep's group).

    group = GroupTrainer([Member(cfg_a, out_a), Member(cfg_b, out_b)], sources, callbacks=cb)
    results = group.fit(resume=resume_points([out_a, out_b]))

Each member is a ``Trainer`` with its own config, run folder and callbacks; it writes exactly
what a single training writes (checkpoints with retention, the SAELens export). Members that
read the same hook (layer, hook point, and a transcoder's target hook point) share one
activation source: each step fetches one batch
per hook and every member on that hook learns from it, so the model's forward pass is paid once
for the whole group (``activations.SharedExtraction`` shares it across hooks too). The group
hears the caller once per step (``trainer.hear``: pause saves every member, stop finishes them
all), and again while a buffer round is extracted (``trainer.listening``: every hook's batch
is fetched before any member learns, so such a pause saves the whole group as of the step's
start), and while a resume rebuilds each source's buffer (``trainer.replaying``: a stop there
keeps every member's checkpoint as its final one); every member's training time is the group's
step time, so its tokens/s is the group's.

``train_group(cfgs, out_dirs, ...)`` is the whole job: load the model and corpus once, train
every run together, evaluate them in one held-out pass (``engine.sweep`` plans the runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .activations import ActivationSource, CachedActivations, LiveActivations, SharedExtraction
from .checkpoints import list_checkpoints, load_checkpoint
from .config import TrainConfig
from .errors import CheckpointError, ConfigError
from .models import default_layer
from .pipeline import (
    Progress,
    check_file_target,
    check_hook_points,
    held_out_evaluation,
    load_for_extraction,
    result_values,
    source_meta,
)
from .sweep import check_group, check_shared
from .trainer import Callbacks, Stopped, Trainer, TrainResult, hear, listening, replaying

Hook = tuple[int, str, str | None]
"""A source's key: (layer, hook point, target hook point or None)."""


@dataclass
class Member:
    """One SAE of a group: its config, run folder and callbacks (metrics, log, checkpoints)."""

    cfg: TrainConfig
    out_dir: Path
    callbacks: Callbacks | None = None
    export_meta: dict[str, Any] | None = None

    @property
    def hook(self) -> Hook:
        """(layer, hook point, target hook point); layer -1 for an activation file's own."""
        return (-1 if self.cfg.layer is None else int(self.cfg.layer), self.cfg.hook_point,
                self.cfg.target_hook_point)


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
        positions = [trainer.begin(resume[i] if resume else None, replay=False)
                     for i, trainer in enumerate(self.trainers)]
        if len({t.step for t in self.trainers}) > 1:
            raise CheckpointError("The group's checkpoints are not all at the same step.")
        if resume:
            try:
                self.replay(positions)
            except Stopped:  # stopped while resuming: nothing learnt, the checkpoints stand
                return [trainer.finish(stopped=True, resumed=resume[i])
                        for i, trainer in enumerate(self.trainers)]
        cfg = self.trainers[0].cfg
        self.cb.on_log(f"Group of {len(self.trainers)} SAEs on {len(self.by_hook)} hook(s): "
                       f"{cfg.total_steps - self.step} steps of {cfg.batch_size} tokens.")
        stopped = False
        while self.step < cfg.total_steps:
            if hear(self.cb, self.step, self.trainers):
                stopped = True
                break
            t0 = time.perf_counter()
            try:  # every hook's batch first: a pause heard while one is extracted saves all
                with listening(self.cb, self.step, self.trainers) as heard:  # before learning
                    batches = {hook: self.sources[hook].next_batch(cfg.batch_size)
                               for hook in self.by_hook}
            except Stopped:
                stopped = True
                break
            for hook, trainers in self.by_hook.items():
                for trainer in trainers:
                    trainer.learn(batches[hook])
            del batches
            rows = [trainer.read_if_logging() for trainer in self.trainers]
            spent = time.perf_counter() - t0 - heard.heard_s
            for trainer, window in zip(self.trainers, rows, strict=True):
                trainer.end_step(spent, window)
        return [trainer.finish(stopped) for trainer in self.trainers]

    def replay(self, positions: list[dict[str, Any]]) -> None:
        """Rebuild each shared source's buffer at the members' checkpoint position, once per
        source, not once per member, hearing the caller meanwhile (``trainer.replaying``:
        Stopped on a stop)."""
        with replaying(self.cb, self.step, self.trainers):
            for hook, trainers in self.by_hook.items():
                held = [positions[self.trainers.index(t)] for t in trainers]
                if any(p != held[0] for p in held[1:]):
                    raise CheckpointError(
                        f"The group's checkpoints at step {self.step} hold different data "
                        f"positions for the SAEs on layer {hook[0]} {hook[1]}"
                        + (f" -> {hook[2]}" if hook[2] else "")
                        + "; they cannot resume together.")
                self.sources[hook].load_state_dict(held[0])


def place(cfgs: list[TrainConfig], device: torch.device) -> list[TrainConfig]:
    """A group's SAEs on the GPUs its ``gpus`` asks for, the way sparsify distributes modules:
    with ``gpus`` N > 1, SAE i trains on ``cuda:(i mod N)`` (its config says so: device
    ``cuda:j``, gpus 1) while the model's forward stays on ``device`` (the first GPU), and each
    step's batch is copied to every SAE's GPU. One process: the GPUs work in parallel because
    nothing waits for a GPU between logging steps. ConfigError off CUDA or with fewer GPUs."""
    n = cfgs[0].gpus if cfgs else 1
    if n <= 1:
        return cfgs
    if device.type != "cuda":
        raise ConfigError(f"GPUs ({n}) spreads a sweep's SAEs over that many GPUs; this group "
                          f"runs on {device.type}.")
    have = torch.cuda.device_count()
    if have < n:
        raise ConfigError(f"GPUs ({n}) spreads a sweep's SAEs over {n} GPUs, but CUDA sees "
                          f"{have} here.")
    return [cfg.replace(device=f"cuda:{i % n}", gpus=1) for i, cfg in enumerate(cfgs)]


def open_group_sources(cfgs: list[TrainConfig], *, data_dir: Path, device: torch.device,
                       progress: Progress | None = None
                       ) -> tuple[list[TrainConfig], dict[tuple[int, str], Any], dict, Any]:
    """Load the model and corpus once; one source per hook, sharing one forward pass. Returns
    the runs with their layers resolved, the sources by hook, the export metadata by hook and
    the shared extraction (None from an activation file)."""
    first = cfgs[0]
    if first.activations:
        src = CachedActivations(first.activations, seed=first.seed, holdout=first.eval_tokens)
        for cfg in cfgs:
            check_file_target(cfg, src.meta)
        hooks = {Member(cfg, Path()).hook for cfg in cfgs}
        return cfgs, dict.fromkeys(hooks, src), dict.fromkeys(hooks, dict(src.meta)), None
    loaded, store, _ = load_for_extraction(first, data_dir, device, progress)
    n_layers = loaded.info.n_layers
    runs = [cfg if cfg.layer is not None else cfg.replace(layer=default_layer(n_layers))
            for cfg in cfgs]
    for cfg in runs:
        cfg.validate(d_in=loaded.info.hidden_size, n_layers=n_layers)
        check_hook_points(cfg, loaded.info)
    hooks = list(dict.fromkeys(Member(cfg, Path()).hook for cfg in runs))
    readers = [tuple((layer, p) for p in (hp, target) if p) for layer, hp, target in hooks]
    reads = list(dict.fromkeys(h for reader in readers for h in reader))
    shared = (SharedExtraction(loaded.model, reads, readers=readers) if len(readers) > 1
              else None)
    sources, metas = {}, {}
    for hook in hooks:
        cfg = next(c for c in runs if Member(c, Path()).hook == hook)
        layer, hook_point, target = hook
        metas[hook] = source_meta(cfg, loaded, store, layer)
        sources[hook] = LiveActivations(
            loaded.model, store, layer, hook_point, seed=first.seed,
            buffer_tokens=first.buffer_tokens, exclude_special=first.exclude_special,
            exclude_pos0=first.exclude_pos0, outlier_factor=first.outlier_factor,
            holdout_tokens=first.eval_tokens, device=device, meta=metas[hook],
            extract=None if shared is None else shared.for_source(layer, hook_point, target),
            target_hook_point=target)
        metas[hook]["d_target"] = sources[hook].d_target
    return runs, sources, metas, shared


def train_group(
    cfgs: list[TrainConfig], out_dirs: list[Path], *, data_dir: Path, device: torch.device,
    callbacks: Callbacks | None = None, member_callbacks: list[Callbacks] | None = None,
    resume: list[Path] | None = None, names: dict[str, Any] | None = None,
    prepare_progress: Progress | None = None, after_fit: Callable[[], None] | None = None,
    evaluate: bool | Callable[[], bool] = True, eval_progress: Progress | None = None,
    log: Callable[[str], None] = lambda message: None,
    on_eval_start: Callable[[], None] | None = None,
    on_eval_error: Callable[[Exception], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfgs`` together into ``out_dirs`` (one ``train``-like folder each) and evaluate
    each on held-out text. Returns ``{"runs": [values as train_and_evaluate's], "d_in", "tokens",
    "tokens_per_s" (the group's training steps: every run's tokens/s), "wall_s" (load to
    last report), "forwards" (model forward passes of the shared extraction, None without)}``.
    ``after_fit``, ``evaluate``, ``on_eval_start``, ``on_eval_error`` as ``train_and_evaluate``'s
    (the whole group is evaluated or not). ``log`` gets the evaluation's lines about the whole
    group; each run's own result line goes to its ``member_callbacks`` entry's ``on_log`` (to
    ``log``, naming the run, without them).
    """
    start = time.perf_counter()
    check_group(cfgs)
    runs, sources, metas, shared = open_group_sources(list(cfgs), data_dir=data_dir,
                                                      device=device, progress=prepare_progress)
    runs = place(runs, device)
    members = [Member(cfg, Path(out), (member_callbacks or [None] * len(runs))[i],
                      dict(metas[Member(cfg, Path()).hook], **(names or {})))
               for i, (cfg, out) in enumerate(zip(runs, out_dirs, strict=True))]
    group = GroupTrainer(members, sources, callbacks=callbacks)
    try:
        results = group.fit(resume=resume)
    finally:
        if after_fit is not None:
            after_fit()
    values = [result_values(result, cfg) for result, cfg in zip(results, runs, strict=True)]
    sources.clear()
    for trainer in group.trainers:
        trainer.source = None  # free a live model before the evaluations load it again
    if evaluate() if callable(evaluate) else evaluate:  # one held-out pass for every run
        held_out_evaluation(values, group.trainers, [m.out_dir for m in members],
                            data_dir=data_dir, metas=[m.export_meta or {} for m in members],
                            log=log, on_eval_start=on_eval_start, eval_progress=eval_progress,
                            on_eval_error=on_eval_error,
                            run_logs=[cb.on_log for cb in member_callbacks]
                            if member_callbacks else None)
    return {"runs": values, "d_in": group.trainers[0].d_in, "tokens": results[0].tokens,
            "tokens_per_s": results[0].tokens_per_s,
            "wall_s": round(time.perf_counter() - start, 1),
            "forwards": shared.forwards if shared is not None else None}
