"""``sae-studio``: the headless command line (also ``python -m worker``).

    sae-studio train   --model smollm2-135m --dataset kjv --layer 15 --out runs/a
    sae-studio train   --activations acts.safetensors --encoder-type topk --k 32 --out runs/b
    sae-studio extract --model smollm2-135m --dataset kjv --layer 15 --max-tokens 500000 \\
                       --out acts.safetensors
    sae-studio export  runs/a --out sae_folder          # or a checkpoint file; --force
    sae-studio evaluate runs/a          # CE loss recovered, KL, densities, top contexts
    sae-studio info    smollm2-135m --expansion-factor 16
    torchrun --nproc-per-node 2 -m worker train --activations acts.safetensors --out runs/c

Bad input ends with one line on stderr and exit status 2; what can be checked without the model
(the options against the hidden size and layer count of a model already on disk) is checked
before it loads. Every command's last stdout line is one strict JSON object (null, never NaN;
``info`` prints its table instead unless given ``--json``);
``train``'s: steps, tokens, tokens_per_s, fvu, l0, dead_frac, heldout_vectors,
dead_window_tokens, out, checkpoint, stopped, eval and ``definitions`` (a sentence per figure).
Under torchrun (``WORLD_SIZE`` > 1) ``train`` trains one SAE on all the processes
(``engine.distributed``); rank 0 alone shows progress and prints the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NoReturn

from .engine.config import (
    ALIASES,
    OptionInfo,
    TrainConfig,
    option,
    options,
    parse_value,
    range_text,
)
from .engine.errors import ConfigError, EngineError
from .engine.files import folder_lock, json_safe


class _Parser(argparse.ArgumentParser):
    """Bad flags end like any bad input: one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sae-studio: error: {message}\n")


def _parser_type(info: OptionInfo) -> Callable[[str], Any]:
    """The flag's argparse ``type``: ``parse_value``, so flags parse like the form and JSON."""

    def parse(raw: str) -> Any:
        try:
            return parse_value(info, raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _help(info: OptionInfo, shown_default: str | None = None) -> str:
    """The option's help sentence, then its unit, range, encoder types and default."""
    notes = []
    if info.unit:
        notes.append(f"unit: {info.unit}")
    if range_text(info):
        notes.append(f"range: {range_text(info)}")
    if info.applies_to:
        notes.append(f"used by {', '.join(info.applies_to)}")
    if shown_default is None and info.default is not None:
        shown_default = ({True: "on", False: "off"}[info.default] if info.kind == "bool"
                         else str(info.default))
    if shown_default is not None:
        notes.append(f"default: {shown_default}")
    text = info.help + (f" [{'; '.join(notes)}]" if notes else "")
    return text.replace("%", "%%")  # argparse formats help with %


def _add_option(p: argparse.ArgumentParser, name: str, *, default: Any = argparse.SUPPRESS,
                required: bool = False, shown_default: str | None = None,
                info: OptionInfo | None = None, one_value: bool = False) -> None:
    """The flag of TrainConfig option ``name`` (``--batch-size`` for batch_size ...), its help
    and choices from ``options()``; ``default=SUPPRESS`` leaves it out of the namespace unless
    given. ``one_value``: a comma is refused (a sweep lists several values only for the options
    it can sweep), not read as a thousands separator."""
    info = info or option(name)
    help_text = _help(info, shown_default)
    if info.kind == "bool":
        p.add_argument(info.flag, dest=name, action=argparse.BooleanOptionalAction,
                       default=default, help=help_text)
        return
    choices = info.choices if info.kind == "choice" else None
    parse = _parser_type(info)
    if one_value:
        def parse_one(raw: str, parse: Callable[[str], Any] = parse) -> Any:
            if "," in raw:
                raise argparse.ArgumentTypeError(
                    f"{name} cannot take several values in a sweep")
            return parse(raw)
    p.add_argument(info.flag, dest=name, type=parse_one if one_value else parse, default=default,
                   required=required, choices=choices, help=help_text,
                   metavar=None if choices else name.upper())


def _load_toml(path: str) -> dict[str, Any]:
    """A TOML file's options (keys with ``_`` or ``-``; a ``[train]`` table or the top level),
    each through ``parse_value``."""
    data = read_toml(path)
    return parse_options(data.get("train", data), path)


def read_toml(path: str) -> dict[str, Any]:
    """A TOML file's tables and keys; ConfigError when missing or not TOML."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file '{path}' does not exist.")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file '{path}' is not valid TOML ({exc}).") from None


def parse_options(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Options by name (keys with ``_`` or ``-``, aliases accepted), each through
    ``parse_value``; ConfigError naming ``where`` and the first bad value."""
    known = {info.name: info for info in options()}
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for key, raw in data.items():
        name = key.replace("-", "_")
        name = ALIASES.get(name, name)
        try:
            values[name] = parse_value(known[name], raw) if name in known else raw
        except ValueError as exc:
            errors[name] = f"{where}: {exc}"
    if errors:
        raise ConfigError(next(iter(errors.values())), errors=errors)
    return values


def _build_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(_load_toml(args.config))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    cfg = TrainConfig.from_dict(values)
    cfg.validate()
    return cfg


def _given(args: argparse.Namespace) -> list[str]:
    """The options named on the command line or in ``--config``'s file."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    toml = _load_toml(args.config) if getattr(args, "config", None) else {}
    return [k for k in {**toml, **vars(args)} if k in names]


def unused_notes(cfg: TrainConfig, given: list[str]) -> list[str]:
    """A note for each option given (flag or TOML key) that the chosen encoder type does not
    use (``--target-l0`` with topk, ``--k`` with standard ...): it is kept in the config, so a
    sweep or a later change of type can use it, but this training ignores it."""
    out = []
    for name in given:
        info = option(name)
        if info.applies_to and cfg.encoder_type not in info.applies_to:
            out.append(f"note: {info.flag} is not used by the {cfg.encoder_type} encoder type "
                       f"(only by {', '.join(info.applies_to)}); this training ignores it.")
    return out


def _data_dir(args: argparse.Namespace) -> Path:
    from .engine.models import data_dir_default

    return Path(args.data_dir) if args.data_dir else data_dir_default()


def _print_json(values: dict[str, Any]) -> None:
    """The command's result: one line of strict JSON (NaN and infinities as null)."""
    print(json.dumps(json_safe(values), allow_nan=False))


class _StderrProgress:
    """A tqdm bar on stderr, created on the first update (quiet when nothing is slow)."""

    def __init__(self, label: str) -> None:
        self.label, self.bar = label, None

    def __call__(self, fraction: float, message: str = "") -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=1.0, desc=self.label, file=sys.stderr, leave=False,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
        self.bar.n = min(1.0, max(0.0, fraction))
        self.bar.set_postfix_str(message, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _StepBar:
    """The training's step bar on stderr (from the first metrics row; it closes the preparing
    bar) and the ``--metrics-jsonl`` rows. ``tok_s_window``: activation vectors per second over
    the last metrics window (``log_every`` steps); the final JSON's ``tokens_per_s`` is the
    whole run's training rate."""

    def __init__(self, total_steps: int, jsonl: str | None, preparing: _StderrProgress) -> None:
        self.total, self.jsonl, self.preparing, self.bar = total_steps, jsonl, preparing, None

    def __call__(self, m: dict[str, Any]) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.preparing.close()
            self.bar = tqdm(total=self.total, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)
        self.bar.n = m["step"]
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", fvu=f"{m['fvu']:.3f}", l0=f"{m['l0']:.1f}",
                             dead=m["dead"], tok_s_window=f"{m['tokens_per_s']:.0f}",
                             refresh=False)
        self.bar.refresh()
        if self.jsonl:
            with open(self.jsonl, "a") as fh:
                fh.write(json.dumps(json_safe(m), allow_nan=False) + "\n")

    def close(self) -> None:
        self.preparing.close()
        if self.bar is not None:
            self.bar.close()


def _note(message: str) -> None:
    """A line on stderr that leaves the progress bars intact."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


# ---------------------------------------------------------------------------- commands
def _skipped(path: Path, exc: Exception) -> None:
    _note(f"Skipping {path}: {exc} Using an older checkpoint.")


def _checkpoint_of(path: str) -> Path:
    """A checkpoint file, or a run folder's newest checkpoint that loads (a newer one that
    does not, e.g. truncated by a crash, is skipped with a note on stderr)."""
    from .engine.checkpoints import newest_loadable

    p = Path(path)
    if p.is_file():
        return p
    found = p.is_dir() and (newest_loadable(p / "checkpoints", _skipped)
                            or newest_loadable(p, _skipped))
    if not found:
        raise ConfigError(f"No checkpoint found at '{path}'.")
    return found[0]


def cmd_train(args: argparse.Namespace) -> int:
    """Train one SAE: in this process, or under torchrun on all its processes (the
    combination checked before the process group starts: one line and exit 2 when bad)."""
    from .engine import distributed
    from .engine.checkpoints import load_checkpoint
    from .engine.devices import pick_device
    from .engine.pipeline import check_before_loading, definitions, train_and_evaluate
    from .engine.trainer import Callbacks

    dist = distributed.from_env()
    resume = _checkpoint_of(args.resume) if args.resume else None
    base = load_checkpoint(resume).meta["config"] if resume else None
    cfg = _build_config(args, base)
    if dist.is_main:
        for message in unused_notes(cfg, _given(args)):
            _note(message)
    if cfg.gpus > 1 and not dist.enabled:  # --gpus N: the same command on N processes
        return _under_torchrun(cfg.gpus, args.argv)
    if dist.enabled and cfg.gpus not in (1, dist.world_size):
        raise ConfigError(f"--gpus {cfg.gpus} does not match the {dist.world_size} processes "
                          "torchrun started; leave --gpus out under torchrun.")
    distributed.local_batch(cfg.batch_size, dist)
    device = distributed.device_for(dist, pick_device(cfg.device))
    data_dir = _data_dir(args)
    distributed.setup(dist, device)
    try:
        out = Path(args.out) if args.out else (  # rank 0's name, whenever each rank starts
            resume.parent.parent if resume else
            Path(dist.broadcast_object(str(Path("runs") / time.strftime("%Y%m%d-%H%M%S")))))
        main = dist.is_main
        preparing, evaluating = _StderrProgress("preparing"), _StderrProgress("evaluate")
        steps = _StepBar(cfg.total_steps, args.metrics_jsonl if main else None, preparing)
        try:
            with dist.main_first():  # rank 0 converts a model once; the others read it
                check_before_loading(cfg, data_dir, preparing if main else None)
            # one trainer per run folder (a worker may train there); rank 0 holds it
            with folder_lock(out) if main else nullcontext():
                values = train_and_evaluate(
                    cfg, out, data_dir=data_dir, device=device,
                    callbacks=Callbacks(on_log=_note, on_metrics=steps), resume=resume,
                    prepare_progress=preparing if main else None, after_fit=steps.close,
                    evaluate=args.evaluate, eval_progress=evaluating, log=_note, dist=dist)
        finally:
            steps.close()
            evaluating.close()
    finally:
        distributed.teardown()
    if main:
        _print_json(dict(values, definitions=definitions(values)))
    return 0


def _under_torchrun(n: int, argv: list[str]) -> int:
    """Run this command again as ``torchrun --standalone --nproc-per-node n -m worker ...``
    (one machine, a free rendezvous port); its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={n}", "-m", "worker", *argv]
    print(f"Starting {n} training processes: torchrun --standalone --nproc-per-node {n} "
          "-m worker ...", file=sys.stderr)
    return subprocess.call(cmd)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a run's (or a checkpoint's) SAE on held-out text into OUT/eval."""
    from .engine.devices import pick_device, pick_precision
    from .engine.export import sae_from_checkpoint
    from .engine.pipeline import eval_summary, evaluate_run, evaluation_skipped

    ckpt = _checkpoint_of(args.run)
    sae, meta = sae_from_checkpoint(ckpt)
    source = meta.get("source_meta") or {}
    values = dict(meta["config"])
    for key in ("model", "dataset", "layer", "hook_point", "eval_tokens", "device"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    values["model"] = values.get("model") or source.get("model_source") or source.get("model")
    values["dataset"] = values.get("dataset") or source.get("dataset")
    cfg = TrainConfig.from_dict(values)
    skipped = evaluation_skipped(cfg)
    if skipped:
        raise ConfigError(f"Nothing to evaluate with: {skipped}")
    device = pick_device(cfg.device)
    out = Path(args.out) if args.out else ckpt.parent.parent
    progress = _StderrProgress("evaluate")
    try:
        scale = float(meta.get("scale", 1.0))
        report = evaluate_run(cfg, sae.to(device), scale, out_dir=out,
                              data_dir=_data_dir(args), device=device, step=int(meta["step"]),
                              meta=source, precision=pick_precision(cfg.precision, device),
                              progress=progress,
                              target_scale=float(meta.get("target_scale") or scale))
    finally:
        progress.close()
    assert report is not None  # evaluation_skipped said it runs
    _print_json(dict(eval_summary(report), report=str(out / "eval"), checkpoint=str(ckpt)))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    import torch

    from .engine.devices import pick_device
    from .engine.pipeline import check_before_loading, extract_to_file

    cfg = TrainConfig(model=args.model, dataset=args.dataset, layer=args.layer,
                      hook_point=args.hook_point, target_hook_point=args.target_hook_point,
                      context_size=args.context_size,
                      seed=args.seed, device=args.device, text_field=args.text_field)
    data_dir = _data_dir(args)
    check_before_loading(cfg, data_dir)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    prog = _StderrProgress("extract")
    t0 = time.perf_counter()
    try:
        meta = extract_to_file(cfg, Path(args.out), data_dir=data_dir,
                               device=pick_device(cfg.device), max_tokens=args.max_tokens,
                               dtype=dtype, progress=prog)
    finally:
        prog.close()
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    _print_json(meta)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A checkpoint (or a run folder's newest) -> a SAELens folder; an existing folder is
    replaced only with --force."""
    from .engine.export import export_checkpoint

    out = Path(args.out)
    if (out.exists() or out.is_symlink()) and not args.force:
        raise ConfigError(f"'{out}' already exists; pass --force to replace it.")
    ckpt = _checkpoint_of(args.checkpoint)
    folder = export_checkpoint(ckpt, out)
    sparsity = (folder / "sparsity.safetensors").is_file()
    if not sparsity:
        _note(f"No sparsity.safetensors: firing frequencies are measured when a run ends, and "
              f"{ckpt.name} is not the checkpoint its run's saelens/ export was written from.")
    _print_json({"out": str(folder), "checkpoint": str(ckpt), "sparsity": sparsity})
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .engine.devices import pick_device, pick_precision
    from .engine.memory import estimate_memory
    from .engine.models import default_layer, load_model
    from .engine.pipeline import check_before_loading

    cfg = TrainConfig(model=args.model, dataset="-", encoder_type=args.encoder_type,
                      expansion_factor=args.expansion_factor, latent_dim=args.latent_dim,
                      k=args.k, batch_size=args.batch_size, device=args.device)
    check_before_loading(cfg, _data_dir(args))
    loaded = load_model(args.model, data_dir=_data_dir(args))
    info = loaded.info
    d_sae = cfg.d_sae(info.hidden_size)
    device = pick_device(args.device)
    precision = pick_precision("auto", device)
    est = estimate_memory(info.hidden_size, d_sae, encoder_type=args.encoder_type, k=args.k,
                          batch_size=args.batch_size, precision=precision,
                          model_params=info.n_params, buffer_tokens=131_072,
                          device=device.type, source="live",
                          layer=default_layer(info.n_layers), n_layers=info.n_layers)
    if device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory
    else:
        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = dict(info.to_dict(), sae={"d_in": info.hidden_size, "d_sae": d_sae,
                                    "encoder_type": args.encoder_type,
                                    "batch_size": args.batch_size},
               memory={**est.to_dict(), "device": str(device), "device_bytes": budget,
                       "fits": est.total < budget})
    if args.json:
        _print_json(out)
        return 0
    mib = 2**20
    print(f"{info.name}: {info.architecture} ({info.model_type}), {info.n_layers} layers, "
          f"hidden {info.hidden_size}, vocab {info.vocab_size}, "
          f"{info.n_params / 1e6:.1f}M parameters, {info.dtype}")
    print(f"hook points: {', '.join(info.hook_points)} at layers 0-{info.n_layers - 1} "
          f"(blocks: {info.blocks_path})")
    print(f"SAE {info.hidden_size} -> {d_sae} ({args.encoder_type}), batch {args.batch_size}, "
          f"{precision} on {device}: ~{est.total / mib:,.0f} MiB "
          f"(SAE+optimizer {(est.sae_params + est.optimizer) / mib:,.0f} MiB, activations "
          f"{(est.activations + est.batch) / mib:,.0f} MiB, model {est.model / mib:,.0f} MiB, "
          f"buffer {est.buffer / mib:,.0f} MiB, runtime {est.runtime / mib:,.0f} MiB) "
          f"of {budget / mib:,.0f} MiB available"
          + ("" if est.total < budget else "  -- DOES NOT FIT"))
    return 0


# ---------------------------------------------------------------------------- parser
EVALUATE_OPTIONS = ("model", "dataset", "layer", "hook_point", "eval_tokens", "device")
EXTRACT_OPTIONS = ("model", "dataset", "layer", "hook_point", "target_hook_point",
                   "context_size", "text_field", "seed", "device")
INFO_OPTIONS = ("encoder_type", "expansion_factor", "latent_dim", "k", "batch_size", "device")


def build_parser() -> argparse.ArgumentParser:
    """The parser; every option flag (and its help and choices) comes from ``options()`` as it
    is now, so an encoder type registered before this call is a choice."""
    p = _Parser(prog="sae-studio", description="Train sparse autoencoders on language-model "
                "activations.")
    p.add_argument("--data-dir", default=None,
                   help="Where converted models and token stores are cached (default: "
                        "$SAE_STUDIO_DATA or ./data).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an SAE (from a model + dataset, or an activation "
                                     "file)")
    t.add_argument("--config", help="A TOML file of options (keys are the option names with _ "
                                    "or -); flags override it.")
    t.add_argument("--resume", help="Continue from a checkpoint file, or a run folder's newest "
                                    "checkpoint that loads, with its configuration.")
    t.add_argument("--out", help="The run folder: checkpoints/, saelens/ and eval/ go here "
                                 "(default: runs/DATE-TIME, or the resumed run's folder).")
    t.add_argument("--metrics-jsonl", help="Also append every metrics row to this file.")
    t.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="After training, evaluate on held-out text (CE loss recovered, KL, "
                        "latent densities, top contexts) into OUT/eval; needs --model and "
                        "--dataset. [default: on]")
    for info in options():
        _add_option(t, info.name, info=info)
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("evaluate", help="evaluate a run's SAE on held-out text: CE loss "
                                        "recovered, KL, latent densities, top contexts")
    v.add_argument("run", help="A run folder (its newest checkpoint) or a checkpoint file.")
    v.add_argument("--out", help="Write OUT/eval (default: the run folder).")
    for name in EVALUATE_OPTIONS:
        _add_option(v, name, default=None, shown_default="the run's")
    v.set_defaults(func=cmd_evaluate)

    e = sub.add_parser("extract", help="write an activation cache (safetensors)")
    for name in EXTRACT_OPTIONS:
        info = option(name)
        _add_option(e, name, default=info.default, required=name in ("model", "dataset"))
    _add_option(e, "max_tokens", required=True, info=dataclasses.replace(
        option("max_tokens"), label="Activations", optional=False,
        help="Activation vectors to extract (the corpus is tokenised as far as needed)."))
    e.add_argument("--out", required=True, help="The activation file to write (safetensors).")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="Precision of the stored activations. [default: float32]")
    e.set_defaults(func=cmd_extract)

    x = sub.add_parser("export", help="checkpoint or run folder -> SAELens folder")
    x.add_argument("checkpoint", help="A checkpoint file (.safetensors), or a run folder (its "
                                      "newest checkpoint that loads).")
    x.add_argument("--out", required=True, help="The SAELens folder to write (as the web's "
                                                "export: cfg.json, sae_weights.safetensors, "
                                                "sparsity.safetensors for a run's last "
                                                "checkpoint).")
    x.add_argument("--force", action="store_true", help="Replace OUT if it exists.")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("info", help="model layers, hook points and a memory estimate")
    i.add_argument("model", help="A bundled model name (smollm2-135m, minilm-l6), a local "
                                 "folder with config.json, or a Hugging Face Hub id.")
    for name in INFO_OPTIONS:
        _add_option(i, name, default=option(name).default)
    i.add_argument("--json", action="store_true", help="Print one JSON object.")
    i.set_defaults(func=cmd_info)

    from .sweep_cli import add_parser

    add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (already reported on one line)
        return int(exc.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except EngineError as exc:
        print(f"sae-studio: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sae-studio: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
