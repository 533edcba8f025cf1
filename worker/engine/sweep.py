"""Sweeps: many SAEs from one forward pass.

``expand(base, lists)`` turns a base config and lists of values into the runs of their
cartesian product (an option that does not apply to a run's encoder type is left at its
default for it, and no run appears twice); ``run_name`` names a run by what it is
(``L15-topk-k32-x8-s0``); ``check_group`` says why runs cannot train as one group. Plain
arithmetic on configs, no torch (the web's job layer uses it); ``group.train_group`` trains
them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from . import architectures
from .config import TrainConfig
from .errors import ConfigError

SWEEP_FIELDS = ("layer", "hook_point", "encoder_type", "k", "l1_alpha", "l0_coef", "target_l0",
                "expansion_factor", "latent_dim", "learning_rate", "seed")
"""The options a sweep may list several values of (comma-separated in the CLI and the form)."""
SOURCE_SHARED = ("model", "dataset", "activations", "context_size", "max_tokens", "text_field",
                 "buffer_tokens", "eval_tokens", "exclude_special", "exclude_pos0",
                 "outlier_factor", "dense_threshold")
"""Options of the activation source and the held-out evaluation: one for the whole group (its
data seed is the first run's seed)."""


SHARED = ("batch_size", "total_steps", "auto_save_interval", "log_every", "device",
          "precision", "gpus")
"""Options every member of a group must share: they step together on the same batches (the
device by kind: ``engine.group.place`` spreads a group's SAEs over cuda:0, cuda:1, ...)."""

def check_shared(cfgs: list[TrainConfig]) -> None:
    """ConfigError naming the first ``SHARED`` option the configs disagree on."""
    for name in SHARED:
        values = {str(cfg.device).split(":")[0] if name == "device" else getattr(cfg, name)
                  for cfg in cfgs}
        if len(values) > 1:
            raise ConfigError(f"The SAEs of a group train together, so they must share "
                              f"{name}; got {sorted(map(str, values))}.")


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
    if cfg.hook_point != "residual" or cfg.target_hook_point:
        parts.append(cfg.hook_point.replace("_", ""))
    if cfg.target_hook_point:  # a transcoder: L15-mlpin-to-mlpout-skip-topk-...
        parts += ["to", cfg.target_hook_point.replace("_", "")]
        if cfg.skip_connection:
            parts.append("skip")
    parts.append(cfg.encoder_type)
    if applies("k", cfg.encoder_type):
        parts.append(f"k{cfg.k}")
    if applies("l1_alpha", cfg.encoder_type):
        parts.append(f"a{_num(cfg.l1_alpha)}")
    if applies("l0_coef", cfg.encoder_type):
        parts.append(f"c{_num(cfg.l0_coef)}")
    if cfg.target_l0 is not None and applies("target_l0", cfg.encoder_type):
        parts.append(f"l0t{_num(cfg.target_l0)}")
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
    """ConfigError when the runs cannot train as one group (different sources or steps, or
    GPUs to spread the SAEs over on the CPU)."""
    check_shared(list(cfgs))
    if cfgs and cfgs[0].gpus > 1 and cfgs[0].device in ("cpu", "mps"):
        raise ConfigError(f"GPUs ({cfgs[0].gpus}) in a sweep spreads its SAEs over that many "
                          f"GPUs of one worker; use device cuda or auto, not "
                          f"{cfgs[0].device} (or GPUs 1).")
    for name in SOURCE_SHARED:
        values = {repr(getattr(cfg, name)) for cfg in cfgs}
        if len(values) > 1:
            raise ConfigError(f"The SAEs of a sweep read one activation source, so they must "
                              f"share {name}; got {', '.join(sorted(values))}.")
