"""Sweeps: many SAEs from one forward pass.

``expand(base, lists)`` turns a base config and lists of values into the runs of their
cartesian product (an option that does not apply to a run's encoder type is left at its
default for it, and no run appears twice); ``run_name`` names a run by what it is
(``L15-topk-k32-x8-s0``); ``train_group`` loads the model and corpus once, trains every run
together (``group.GroupTrainer``: one forward pass per step for all hooks) and evaluates each on
held-out text, writing one ``train``-like folder per run.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from . import architectures
from .activations import CachedActivations, LiveActivations, SharedExtraction
from .config import TrainConfig
from .errors import ConfigError
from .group import GroupTrainer, Member, check_shared
from .models import default_layer
from .pipeline import (
    Progress,
    held_out_evaluation,
    load_for_extraction,
    result_values,
    source_meta,
)
from .trainer import Callbacks

SWEEP_FIELDS = ("layer", "hook_point", "encoder_type", "k", "l1_alpha", "l0_coef",
                "expansion_factor", "latent_dim", "learning_rate", "seed")
"""The options a sweep may list several values of (comma-separated in the CLI and the form)."""
SOURCE_SHARED = ("model", "dataset", "activations", "context_size", "max_tokens", "text_field",
                 "buffer_tokens", "eval_tokens", "exclude_special", "exclude_pos0",
                 "outlier_factor", "dense_threshold")
"""Options of the activation source and the held-out evaluation: one for the whole group (its
data seed is the first run's seed)."""


def applies(option: str, encoder_type: str) -> bool:
    users = architectures.applies_to(option)
    return users is None or encoder_type in users


def expand(base: TrainConfig, lists: Mapping[str, Sequence[Any]]) -> list[TrainConfig]:
    """The runs of the cartesian product of ``lists`` (option -> values) over ``base``, in
    order, without duplicates; an option that does not apply to a run's encoder type keeps its
    default there. ConfigError for an option that cannot be swept."""
    unknown = [name for name in lists if name not in SWEEP_FIELDS]
    if unknown:
        raise ConfigError(f"{unknown[0]} cannot take several values in a sweep; these can: "
                          f"{', '.join(SWEEP_FIELDS)}.")
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    names = list(lists)
    runs: list[TrainConfig] = []
    seen: set[str] = set()
    for combo in itertools.product(*(list(lists[n]) for n in names)):
        values = dict(zip(names, combo, strict=True))
        encoder = values.get("encoder_type", base.encoder_type)
        for name in names:
            if not applies(name, encoder):
                values[name] = defaults[name]
        if "latent_dim" in values and "expansion_factor" in values \
                and values["latent_dim"] is not None:
            values["expansion_factor"] = defaults["expansion_factor"]
        cfg = base.replace(**values)
        key = repr(sorted(cfg.to_dict().items()))
        if key not in seen:
            seen.add(key)
            runs.append(cfg)
    return runs


def _num(value: float) -> str:
    return f"{value:g}".replace("+", "")


def run_name(cfg: TrainConfig) -> str:
    """A readable, file-safe name: layer, hook point (unless the residual stream), type, its
    sparsity option, width, learning rate (when set) and seed, e.g. ``L15-topk-k32-x8-s0``."""
    if cfg.layer is not None:
        parts = [f"L{cfg.layer}"]
    else:  # the activation file's layer, or the model's middle one
        parts = ["Lfile" if cfg.activations else "Lmid"]
    if cfg.hook_point != "residual":
        parts.append(cfg.hook_point.replace("_", ""))
    parts.append(cfg.encoder_type)
    if applies("k", cfg.encoder_type):
        parts.append(f"k{cfg.k}")
    if applies("l1_alpha", cfg.encoder_type):
        parts.append(f"a{_num(cfg.l1_alpha)}")
    if applies("l0_coef", cfg.encoder_type):
        parts.append(f"c{_num(cfg.l0_coef)}")
    parts.append(f"d{cfg.latent_dim}" if cfg.latent_dim else f"x{cfg.expansion_factor}")
    if cfg.learning_rate is not None:
        parts.append(f"lr{_num(cfg.learning_rate)}")
    parts.append(f"s{cfg.seed}")
    return "-".join(parts)


def unique_names(cfgs: Sequence[TrainConfig]) -> list[str]:
    """``run_name`` of each run, with ``-2``, ``-3`` ... where two would be the same."""
    out: list[str] = []
    for cfg in cfgs:
        name, n = run_name(cfg), 2
        while name in out:
            name, n = f"{run_name(cfg)}-{n}", n + 1
        out.append(name)
    return out


def check_group(cfgs: Sequence[TrainConfig]) -> None:
    """ConfigError when the runs cannot train as one group (different sources or steps)."""
    check_shared(list(cfgs))
    for name in SOURCE_SHARED:
        values = {repr(getattr(cfg, name)) for cfg in cfgs}
        if len(values) > 1:
            raise ConfigError(f"The SAEs of a sweep read one activation source, so they must "
                              f"share {name}; got {', '.join(sorted(values))}.")


def open_group_sources(cfgs: list[TrainConfig], *, data_dir: Path, device: torch.device,
                       progress: Progress | None = None
                       ) -> tuple[list[TrainConfig], dict[tuple[int, str], Any], dict, Any]:
    """Load the model and corpus once; one source per hook, sharing one forward pass. Returns
    the runs with their layers resolved, the sources by hook, the export metadata by hook and
    the shared extraction (None from an activation file)."""
    first = cfgs[0]
    if first.activations:
        src = CachedActivations(first.activations, seed=first.seed, holdout=first.eval_tokens)
        hooks = {Member(cfg, Path()).hook for cfg in cfgs}
        return cfgs, dict.fromkeys(hooks, src), dict.fromkeys(hooks, dict(src.meta)), None
    loaded, store, _ = load_for_extraction(first, data_dir, device, progress)
    n_layers = loaded.info.n_layers
    runs = [cfg if cfg.layer is not None else cfg.replace(layer=default_layer(n_layers))
            for cfg in cfgs]
    for cfg in runs:
        cfg.validate(d_in=loaded.info.hidden_size, n_layers=n_layers)
        if cfg.hook_point not in loaded.info.hook_points:
            raise ConfigError(f"Hook point '{cfg.hook_point}' is not available for "
                              f"{loaded.info.name}; choose one of "
                              f"{', '.join(loaded.info.hook_points)}.")
    hooks = list(dict.fromkeys(Member(cfg, Path()).hook for cfg in runs))
    shared = SharedExtraction(loaded.model, hooks) if len(hooks) > 1 else None
    sources, metas = {}, {}
    for hook in hooks:
        cfg = next(c for c in runs if Member(c, Path()).hook == hook)
        metas[hook] = source_meta(cfg, loaded, store, hook[0])
        sources[hook] = LiveActivations(
            loaded.model, store, hook[0], hook[1], seed=first.seed,
            buffer_tokens=first.buffer_tokens, exclude_special=first.exclude_special,
            exclude_pos0=first.exclude_pos0, outlier_factor=first.outlier_factor,
            holdout_tokens=first.eval_tokens, device=device, meta=metas[hook],
            extract=shared.for_hook(hook) if shared is not None else None)
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
    (the whole group is evaluated or not).
    """
    start = time.perf_counter()
    check_group(cfgs)
    runs, sources, metas, shared = open_group_sources(list(cfgs), data_dir=data_dir,
                                                      device=device, progress=prepare_progress)
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
                            on_eval_error=on_eval_error)
    return {"runs": values, "d_in": group.trainers[0].d_in, "tokens": results[0].tokens,
            "tokens_per_s": results[0].tokens_per_s,
            "wall_s": round(time.perf_counter() - start, 1),
            "forwards": shared.forwards if shared is not None else None}
