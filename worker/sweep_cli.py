"""``sae-studio sweep``: many SAEs from one forward pass (``engine.sweep``).

    sae-studio sweep --model smollm2-135m --dataset kjv --layer 15 --k 16,32,64,128 \\
                     --seed 0,1 --out sweeps/k
    sae-studio sweep --config sweep.toml --out sweeps/mixed     # [[runs]] tables

Every ``train`` flag works; ``engine.sweep.SWEEP_FIELDS`` (``--layer``, ``--hook-point``,
``--encoder-type``, ``--k``, ``--l1-alpha``, ``--l0-coef``, ``--target-l0``, ``--expansion-factor``,
``--latent-dim``, ``--learning-rate``, ``--seed``) take comma-separated lists and the sweep is
their cartesian product. ``--out DIR`` gets ``DIR/<name>/`` per SAE, laid out as a ``train
--out`` folder, and ``DIR/sweep.json``; the last stdout line is one JSON object (``RESULT_KEYS``
per run, then ``tokens``, ``tokens_per_s``, ``wall_s``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .cli import (
    _add_option,
    _data_dir,
    _help,
    _note,
    _print_json,
    _StderrProgress,
    parse_options,
    read_toml,
)
from .engine.config import ALIASES, TrainConfig, option, options, parse_value
from .engine.errors import ConfigError
from .engine.files import folder_lock, json_safe
from .engine.sweep import SWEEP_FIELDS, applies, check_group, expand, unique_names

RESULT_KEYS = ("name", "out", "layer", "hook_point", "target_hook_point", "skip_connection",
               "encoder_type", "k", "l1_alpha", "l0_coef", "target_l0", "latent_dim",
               "learning_rate", "seed", "fvu", "l0", "dead_frac", "ce_loss_recovered", "kl_div")
"""A run's entry in the final JSON (null where a figure does not apply)."""


def _list_type(name: str) -> Any:
    info = option(name)

    def parse(raw: str) -> list[Any]:
        try:
            return [parse_value(info, part.strip()) for part in raw.split(",") if part.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_parser(sub: Any) -> None:
    """The ``sweep`` subcommand on the ``sae-studio`` parser's subparsers."""
    s = sub.add_parser("sweep", help="train many SAEs from one forward pass (lists of values: "
                                     "their cartesian product)")
    s.add_argument("--config", help="A TOML file: shared options at the top level (a list "
                                    "for a sweepable option is swept), and optionally "
                                    "[[runs]] tables, one per run; flags override it.")
    s.add_argument("--out", help="The sweep folder: DIR/<run name>/ per SAE (as train --out) "
                                 "and DIR/sweep.json (default: sweeps/DATE-TIME).")
    s.add_argument("--resume", action="store_true",
                   help="Continue the sweep in --out from the newest step at which every run "
                        "has a checkpoint that loads.")
    s.add_argument("--metrics-jsonl", help="Also append every run's metrics rows (with its "
                                           "name under \"run\") to this file.")
    s.add_argument("--memory-budget", type=float, metavar="GIB",
                   help="Split the SAEs into groups that each fit this many GiB (the memory "
                        "estimate of SAEs trained together), trained one after another. "
                        "[default: the device's memory: the GPU's, or the machine's RAM]")
    s.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="After training, evaluate each SAE on held-out text into "
                        "DIR/<name>/eval. [default: on]")
    for info in options():
        if info.name in SWEEP_FIELDS:
            s.add_argument(info.flag, dest=info.name, type=_list_type(info.name),
                           default=argparse.SUPPRESS, metavar=info.name.upper() + "[,...]",
                           help=_help(info) + " Several values: comma-separated.")
        else:
            _add_option(s, info.name, info=info, one_value=True)
    s.set_defaults(func=cmd_sweep)


def _toml(path: str) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[Any]]]:
    """(shared options, explicit runs, swept lists) of a sweep file: top-level keys are shared,
    a list for a sweepable option is swept, each ``[[runs]]`` table is one run."""
    data = read_toml(path)
    runs = data.pop("runs", [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ConfigError(f"{path}: runs must be [[runs]] tables.")
    lists = {k: v for k, v in data.items() if isinstance(v, list)}
    shared = parse_options({k: v for k, v in data.items() if k not in lists}, path)
    explicit = [parse_options(run, f"{path}: run {i}") for i, run in enumerate(runs, 1)]
    swept: dict[str, list[Any]] = {}
    for key, values in lists.items():
        name = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if name not in SWEEP_FIELDS:
            raise ConfigError(f"{path}: {name} cannot take several values in a sweep; these "
                              f"can: {', '.join(SWEEP_FIELDS)}.")
        swept[name] = [parse_options({name: v}, path)[name] for v in values]
    return shared, explicit, swept


def sweep_runs(args: argparse.Namespace) -> list[TrainConfig]:
    """The runs the flags and the config file describe, in order, without duplicates."""
    shared, explicit, lists = _toml(args.config) if args.config else ({}, [], {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    lists.update({k: v for k, v in given.items() if k in SWEEP_FIELDS})
    shared.update({k: v for k, v in given.items() if k not in SWEEP_FIELDS})
    empty = [k for k, v in lists.items() if not v]
    if empty:
        raise ConfigError(f"--{empty[0].replace('_', '-')} needs at least one value.")
    bases = [TrainConfig.from_dict({**shared, **run}) for run in explicit or [{}]]
    runs, seen = [], set()
    for base in bases:
        for cfg in expand(base, lists):
            key = repr(sorted(cfg.to_dict().items()))
            if key not in seen:
                seen.add(key)
                runs.append(cfg)
    return runs


def _entry(name: str, cfg: TrainConfig, values: dict[str, Any], d_in: int) -> dict[str, Any]:
    ev = values.get("eval") or {}
    d_sae = cfg.d_sae(d_in)
    return {
        "name": name, "out": values["out"], "layer": cfg.layer, "hook_point": cfg.hook_point,
        "target_hook_point": cfg.target_hook_point, "skip_connection": cfg.skip_connection,
        "encoder_type": cfg.encoder_type,
        "k": cfg.k if applies("k", cfg.encoder_type) else None,
        "l1_alpha": cfg.l1_alpha if applies("l1_alpha", cfg.encoder_type) else None,
        "l0_coef": cfg.l0_coef if applies("l0_coef", cfg.encoder_type) else None,
        "target_l0": cfg.target_l0 if applies("target_l0", cfg.encoder_type) else None,
        "latent_dim": d_sae, "learning_rate": cfg.lr(d_sae),
        "seed": cfg.seed, "fvu": ev.get("fvu"), "l0": ev.get("l0"),
        "dead_frac": ev.get("dead_frac"), "ce_loss_recovered": ev.get("ce_loss_recovered"),
        "kl_div": ev.get("kl_div"), "measured_on": ev.get("measured_on"),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


class _GroupBar:
    """The group's step bar on stderr (from the first run's metrics) and the metrics rows."""

    def __init__(self, total: int, jsonl: str | None, preparing: _StderrProgress) -> None:
        self.total, self.jsonl, self.preparing, self.bar = total, jsonl, preparing, None

    def row(self, name: str, first: bool) -> Any:
        def on_metrics(m: dict[str, Any]) -> None:
            if first:
                if self.bar is None:
                    from tqdm import tqdm

                    self.preparing.close()
                    self.bar = tqdm(total=self.total, desc="sweep", unit="step",
                                    file=sys.stderr, dynamic_ncols=True)
                self.bar.n = m["step"]
                self.bar.set_postfix(tok_s_window=f"{m['tokens_per_s']:.0f}", refresh=False)
                self.bar.refresh()
            if self.jsonl:
                with open(self.jsonl, "a") as fh:
                    fh.write(json.dumps(json_safe(dict(m, run=name)), allow_nan=False) + "\n")
        return on_metrics

    def close(self) -> None:
        self.preparing.close()
        if self.bar is not None:
            self.bar.close()


def _weights_on_disk(folder: Path) -> tuple[int, str]:
    """A model folder's parameter count and dtype from its safetensors headers (no weights are
    read); (0, "float32") without any."""
    n, dtype = 0, "float32"
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, tensor in header.items():
            if key != "__metadata__":
                n += math.prod(tensor["shape"])
                dtype = names.get(tensor["dtype"], dtype)
    return n, dtype


def memory_groups(runs: list[TrainConfig], d_in: int, n_layers: int | None, data_dir: Path,
                  device: Any, budget: int) -> tuple[list[list[int]], list[int]]:
    """The runs split into groups that each fit ``budget`` bytes (``memory.split_group``) and
    each group's estimate (``memory.placed_memory``: per GPU when spread over several)."""
    from .engine.devices import pick_precision
    from .engine.memory import estimate_memory, placed_memory, split_group
    from .engine.models import BUNDLED_MODELS, resolve_model_path

    first = runs[0]
    params, dtype, file_bytes = 0, "float32", 0
    if first.activations:
        file_bytes = Path(first.activations).stat().st_size
    elif first.model in BUNDLED_MODELS or Path(first.model).expanduser().is_dir():
        params, dtype = _weights_on_disk(resolve_model_path(first.model, data_dir=data_dir))
    precision = pick_precision(first.precision, device)
    ests = [estimate_memory(d_in, cfg.d_sae(d_in), encoder_type=cfg.encoder_type, k=cfg.k,
                            batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                            precision=precision, model_params=params, model_dtype=dtype,
                            buffer_tokens=cfg.buffer_tokens,
                            device="cuda" if device.type == "cuda" else "cpu",
                            source="file" if cfg.activations else "live",
                            layer=int(cfg.layer or 0), n_layers=n_layers,
                            tie_weights=cfg.tie_weights, eval_tokens=cfg.eval_tokens,
                            total_steps=cfg.total_steps, file_bytes=file_bytes,
                            transcoder=cfg.target_hook_point is not None,
                            skip_connection=cfg.skip_connection)
            for cfg in runs]
    hooks = [(cfg.layer, cfg.hook_point, cfg.target_hook_point) for cfg in runs]
    gpus = first.gpus  # > 1: a group's SAEs spread over that many GPUs (engine.group.place)
    groups = split_group(ests, hooks, budget, gpus)
    return groups, [placed_memory([ests[i] for i in g], [hooks[i] for i in g], gpus)
                    for g in groups]


def _device_bytes(device: Any) -> int:
    if device.type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cmd_sweep(args: argparse.Namespace) -> int:
    from .engine.devices import pick_device
    from .engine.group import resume_points, train_group
    from .engine.models import default_layer
    from .engine.pipeline import check_before_loading
    from .engine.trainer import Callbacks

    runs = sweep_runs(args)
    data_dir = _data_dir(args)
    preparing = _StderrProgress("preparing")
    d_in = n_layers = None
    for cfg in runs:
        d_in, n_layers = check_before_loading(cfg, data_dir, preparing)
    if n_layers is not None:  # name the middle layer by its number
        runs = [cfg if cfg.layer is not None or cfg.activations
                else cfg.replace(layer=default_layer(n_layers)) for cfg in runs]
    check_group(runs)
    names = unique_names(runs)
    out = Path(args.out) if args.out else Path("sweeps") / time.strftime("%Y%m%d-%H%M%S")
    dirs = [out / name for name in names]
    device = pick_device(runs[0].device)
    groups = [list(range(len(runs)))]
    if d_in is not None:  # a Hub id is sized when it loads: then one group
        budget = (int(args.memory_budget * 2**30) if args.memory_budget
                  else _device_bytes(device))
        groups, sizes = memory_groups(runs, d_in, n_layers, data_dir, device, budget)
        if len(groups) > 1:
            _note(f"The {len(runs)} SAEs need more than the {budget / 2**30:.1f} GiB memory "
                  f"budget together: training them as {len(groups)} groups, one after another "
                  f"(estimated {', '.join(f'{b / 2**30:.2f}' for b in sizes)} GiB).")
    resume: list[Any] = [None] * len(groups)
    if args.resume:
        resume = [resume_points([dirs[i] for i in g], lambda path, exc: _note(
            f"Skipping {path}: {exc} Using an older step for every run of its group."))
            for g in groups]
        if all(r is None for r in resume):
            raise ConfigError(f"No step at which every run in '{out}' has a checkpoint; "
                              "nothing to resume.")
    elif any((d / "checkpoints").is_dir() and any((d / "checkpoints").iterdir()) for d in dirs):
        raise ConfigError(f"'{out}' already holds checkpoints of these runs; pass --resume to "
                          "continue them or choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    sweep = {"runs": [{"name": n, "out": str(d), "config": c.to_dict()}
                      for n, d, c in zip(names, dirs, runs, strict=True)],
             "groups": [[names[i] for i in g] for g in groups], "created_at": time.time()}
    _write_json(out / "sweep.json", sweep)
    start = time.perf_counter()
    values: list[Any] = [None] * len(runs)
    rates, tokens = [], 0
    for g, group_resume in zip(groups, resume, strict=True):
        bar = _GroupBar(runs[0].total_steps, args.metrics_jsonl, preparing)
        member_cbs = [Callbacks(on_log=lambda m, n=names[i]: _note(f"[{n}] {m}"),
                                on_metrics=bar.row(names[i], i == g[0])) for i in g]
        with ExitStack() as locks:
            for i in g:
                locks.enter_context(folder_lock(dirs[i]))
            try:
                done = train_group([runs[i] for i in g], [dirs[i] for i in g],
                                   data_dir=data_dir, device=device,
                                   callbacks=Callbacks(on_log=_note),
                                   member_callbacks=member_cbs, resume=group_resume,
                                   prepare_progress=preparing, evaluate=args.evaluate,
                                   log=_note)
            finally:
                bar.close()
        for i, v in zip(g, done["runs"], strict=True):
            values[i] = v
        rates.append(done["tokens_per_s"])
        tokens, d_in = done["tokens"], done["d_in"]
    result = {"runs": [_entry(n, c, v, d_in)
                       for n, c, v in zip(names, runs, values, strict=True)],
              "tokens": tokens, "tokens_per_s": round(min(rates), 1),
              "wall_s": round(time.perf_counter() - start, 1)}
    _write_json(out / "sweep.json", dict(sweep, result=result, finished_at=time.time()))
    _print_json(result)
    return 0
