"""``sae-studio``: the headless command line (also ``python -m worker``).

    sae-studio train   --model smollm2-135m --dataset kjv --layer 15 --out runs/a
    sae-studio train   --activations acts.safetensors --encoder-type topk --k 32 --out runs/b
    sae-studio extract --model smollm2-135m --dataset kjv --layer 15 --max-tokens 500000 \\
                       --out acts.safetensors
    sae-studio export  runs/a/checkpoints/step_00001000.safetensors --out sae_folder
    sae-studio evaluate runs/a          # CE loss recovered, KL, densities, top contexts
    sae-studio info    smollm2-135m --expansion-factor 16

Bad input ends with one line on stderr and exit status 2. ``train`` prints, as its last stdout
line, one JSON object: steps, tokens, tokens_per_s, fvu, l0, dead_frac, out, checkpoint, eval.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

from .engine import architectures
from .engine.config import (
    B_DEC_INITS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    TrainConfig,
)
from .engine.errors import ConfigError, EngineError

CHOICES = {"encoder_type": architectures.names(), "lr_schedule": LR_SCHEDULES, "precision": PRECISIONS,
           "optimizer": OPTIMIZERS, "b_dec_init": B_DEC_INITS,
           "hook_point": ("residual", "mlp_out", "attn_out")}
SKIP_FIELDS = {"extra"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size`` for batch_size ...), default: unset."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in SKIP_FIELDS:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        doc = (f.metadata.get("help") if f.metadata else None) or ""
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{doc} (default: {default})".strip()
        if base is bool:
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(_flag(f.name), dest=f.name, type=base, default=argparse.SUPPRESS,
                           choices=CHOICES.get(f.name), help=help_text, metavar=f.name.upper())


def _load_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file '{path}' does not exist.")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file '{path}' is not valid TOML ({exc}).") from None
    data = data.get("train", data)
    return {k.replace("-", "_"): v for k, v in data.items()}


def _build_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(_load_toml(args.config))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    cfg = TrainConfig.from_dict(values)
    cfg.validate()
    return cfg


def _data_dir(args: argparse.Namespace) -> Path:
    from .engine.models import data_dir_default

    return Path(args.data_dir) if args.data_dir else data_dir_default()


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


# ---------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .engine.checkpoints import latest_checkpoint, load_checkpoint
    from .engine.pipeline import open_source
    from .engine.trainer import Callbacks, Trainer, pick_device

    resume = None
    base = None
    if args.resume:
        rp = Path(args.resume)
        resume = latest_checkpoint(rp / "checkpoints") or latest_checkpoint(rp) \
            if rp.is_dir() else rp
        if resume is None:
            raise ConfigError(f"No checkpoint found in '{args.resume}'.")
        base = load_checkpoint(resume).meta["config"]
    cfg = _build_config(args, base)
    out = Path(args.out) if args.out else (
        Path(resume).parent.parent if resume else Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    device = pick_device(cfg.device)
    prep = _StderrProgress("preparing")
    try:
        source, meta = open_source(cfg, data_dir=_data_dir(args), device=device, progress=prep)
    finally:
        prep.close()
    cb = Callbacks(on_log=lambda msg: tqdm.write(msg, file=sys.stderr))
    trainer = Trainer(cfg, source, out, callbacks=cb, export_meta=meta)  # validates against d_in
    bar = tqdm(total=cfg.total_steps, desc="train", unit="step", file=sys.stderr,
               dynamic_ncols=True)

    def on_metrics(m: dict[str, Any]) -> None:
        bar.n = m["step"]
        bar.set_postfix(loss=f"{m['loss']:.4f}", fvu=f"{m['fvu']:.3f}", l0=f"{m['l0']:.1f}",
                        dead=m["dead"], tok_s=f"{m['tokens_per_s']:.0f}", refresh=False)
        bar.refresh()
        if args.metrics_jsonl:
            with open(args.metrics_jsonl, "a") as fh:
                fh.write(json.dumps(m) + "\n")

    cb.on_metrics = on_metrics
    try:
        result = trainer.fit(resume=resume)
    finally:
        bar.close()
    out_dict = result.to_dict()
    if args.evaluate:
        del source, trainer.source  # free a live model before the evaluation loads it again
        report = _evaluate(cfg, trainer.sae, trainer.scale, out=out, data_dir=_data_dir(args),
                           device=device, step=trainer.step, meta=meta,
                           precision=trainer.precision)
        if report is not None:
            from .engine.pipeline import eval_summary

            out_dict["eval"].update(eval_summary(report), report=str(out / "eval"))
    print(json.dumps(out_dict))
    return 0


def _evaluate(cfg: TrainConfig, sae: Any, scale: float, *, out: Path, **kwargs: Any
              ) -> dict[str, Any] | None:
    """Held-out evaluation into out/eval; a note on stderr when the config cannot have one."""
    from .engine.pipeline import evaluate_run, evaluation_skipped

    skipped = evaluation_skipped(cfg)
    if skipped:
        print(f"sae-studio: no evaluation report: {skipped}", file=sys.stderr)
        return None
    prog = _StderrProgress("evaluate")
    try:
        return evaluate_run(cfg, sae, scale, out_dir=out, progress=prog, **kwargs)
    finally:
        prog.close()


def _checkpoint_of(path: str) -> Path:
    """A checkpoint file, or a run folder's newest checkpoint."""
    from .engine.checkpoints import latest_checkpoint

    p = Path(path)
    found = (latest_checkpoint(p / "checkpoints") or latest_checkpoint(p)) if p.is_dir() else p
    if found is None or not Path(found).is_file():
        raise ConfigError(f"No checkpoint found at '{path}'.")
    return Path(found)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a run's (or a checkpoint's) SAE on held-out text into OUT/eval."""
    from .engine.export import sae_from_checkpoint
    from .engine.trainer import pick_device, pick_precision

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
    device = pick_device(cfg.device)
    out = Path(args.out) if args.out else ckpt.parent.parent
    report = _evaluate(cfg, sae.to(device), float(meta.get("scale", 1.0)), out=out,
                       data_dir=_data_dir(args), device=device, step=int(meta["step"]),
                       meta=source, precision=pick_precision(cfg.precision, device))
    if report is None:
        raise ConfigError("Nothing to evaluate with: give --model and --dataset.")
    from .engine.pipeline import eval_summary

    print(json.dumps(dict(eval_summary(report), report=str(out / "eval"),
                          checkpoint=str(ckpt))))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    import torch

    from .engine.pipeline import extract_to_file
    from .engine.trainer import pick_device

    cfg = TrainConfig(model=args.model, dataset=args.dataset, layer=args.layer,
                      hook_point=args.hook_point, context_size=args.context_size,
                      seed=args.seed, device=args.device, text_field=args.text_field)
    cfg.validate()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    prog = _StderrProgress("extract")
    t0 = time.perf_counter()
    try:
        meta = extract_to_file(cfg, Path(args.out), data_dir=_data_dir(args),
                               device=pick_device(cfg.device), max_tokens=args.max_tokens,
                               dtype=dtype, progress=prog)
    finally:
        prog.close()
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(meta))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .engine.export import export_checkpoint

    folder = export_checkpoint(args.checkpoint, args.out)
    print(json.dumps({"out": str(folder)}))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .engine.memory import estimate_memory
    from .engine.models import default_layer, load_model
    from .engine.trainer import pick_device, pick_precision

    loaded = load_model(args.model, data_dir=_data_dir(args))
    info = loaded.info
    d_sae = args.latent_dim or args.expansion_factor * info.hidden_size
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
        import os

        budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = dict(info.to_dict(), sae={"d_in": info.hidden_size, "d_sae": d_sae,
                                    "encoder_type": args.encoder_type,
                                    "batch_size": args.batch_size},
               memory={**est.to_dict(), "device": str(device), "device_bytes": budget,
                       "fits": est.total < budget})
    if args.json:
        print(json.dumps(out))
        return 0
    mb = 2**20
    print(f"{info.name}: {info.architecture} ({info.model_type}), {info.n_layers} layers, "
          f"hidden {info.hidden_size}, vocab {info.vocab_size}, "
          f"{info.n_params / 1e6:.1f}M parameters, {info.dtype}")
    print(f"hook points: {', '.join(info.hook_points)} at layers 0-{info.n_layers - 1} "
          f"(blocks: {info.blocks_path})")
    print(f"SAE {info.hidden_size} -> {d_sae} ({args.encoder_type}), batch {args.batch_size}, "
          f"{precision} on {device}: ~{est.total / mb:,.0f} MB "
          f"(SAE+optimizer {(est.sae_params + est.optimizer) / mb:,.0f} MB, activations "
          f"{(est.activations + est.batch) / mb:,.0f} MB, model {est.model / mb:,.0f} MB, "
          f"buffer {est.buffer / mb:,.0f} MB, runtime {est.runtime / mb:,.0f} MB) "
          f"of {budget / mb:,.0f} MB available"
          + ("" if est.total < budget else "  -- DOES NOT FIT"))
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sae-studio", description="Train sparse autoencoders on "
                                "language-model activations.")
    p.add_argument("--data-dir", default=None,
                   help="where converted models and token stores are cached "
                        "(default: $SAE_STUDIO_DATA or ./data)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an SAE (from a model + dataset, or an activation "
                                     "file)")
    t.add_argument("--config", help="TOML file of options (flags override it)")
    t.add_argument("--resume", help="checkpoint file, or a run folder (its newest checkpoint)")
    t.add_argument("--out", help="run folder: checkpoints/ and saelens/ go here")
    t.add_argument("--metrics-jsonl", help="also append every metrics row to this file")
    t.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, evaluate on held-out text (CE loss recovered, KL, "
                        "latent densities, top contexts) into OUT/eval (default: on; needs "
                        "--model and --dataset)")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("evaluate", help="evaluate a run's SAE on held-out text: CE loss "
                                        "recovered, KL, latent densities, top contexts")
    v.add_argument("run", help="run folder (its newest checkpoint) or a checkpoint file")
    v.add_argument("--out", help="write OUT/eval (default: the run folder)")
    v.add_argument("--model", help="model to evaluate with (default: the run's)")
    v.add_argument("--dataset", help="corpus whose last contexts are held out (default: the "
                                     "run's)")
    v.add_argument("--layer", type=int, default=None)
    v.add_argument("--hook-point", default=None, choices=CHOICES["hook_point"])
    v.add_argument("--eval-tokens", type=int, default=None,
                   help="held-out tokens (default: the run's eval_tokens)")
    v.add_argument("--device", default=None)
    v.set_defaults(func=cmd_evaluate)

    e = sub.add_parser("extract", help="write an activation cache (safetensors)")
    e.add_argument("--model", required=True)
    e.add_argument("--dataset", required=True)
    e.add_argument("--layer", type=int, default=None)
    e.add_argument("--hook-point", default="residual", choices=CHOICES["hook_point"])
    e.add_argument("--max-tokens", type=int, required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--context-size", type=int, default=128)
    e.add_argument("--text-field", default="text")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=cmd_extract)

    x = sub.add_parser("export", help="checkpoint -> SAELens folder")
    x.add_argument("checkpoint")
    x.add_argument("--out", required=True)
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("info", help="model layers, hook points and a memory estimate")
    i.add_argument("model")
    i.add_argument("--encoder-type", default="topk", choices=architectures.names())
    i.add_argument("--expansion-factor", type=int, default=8)
    i.add_argument("--latent-dim", type=int, default=None)
    i.add_argument("--k", type=int, default=32)
    i.add_argument("--batch-size", type=int, default=4096)
    i.add_argument("--device", default="auto")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
