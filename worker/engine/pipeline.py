"""Glue shared by the CLI and the worker: config -> model, tokens, activation source -> trainer
-> held-out evaluation. Both run a training through ``train_and_evaluate``:

    values = train_and_evaluate(cfg, out_dir, data_dir=..., device=..., callbacks=...)

which opens the source (``open_source``), trains (``Trainer.fit``), frees a live model and
evaluates on held-out text (``evaluate_run``), returning the result dict with ``eval`` merged;
``definitions(values)`` says in a sentence per figure what each of that dict's numbers measures.
``check_before_loading(cfg, data_dir)`` checks the options against the input size before
anything slow (the CLI calls it first). Under torchrun (``dist``, ``distributed``) each rank
opens its shard of the source (rank 0 first: it builds any token store), trains, and rank 0
alone evaluates on held-out text.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .activations import CachedActivations, LiveActivations, write_activation_file
from .config import TrainConfig
from .distributed import SINGLE, Dist
from .errors import ConfigError, DataError
from .trainer import Trainer

Progress = Callable[[float, str], None]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name or text).strip("_")[:40] or "x"


def token_store_dir(data_dir: Path, dataset: str, model_path: str, context_size: int,
                    max_tokens: int | None, text_field: str) -> Path:
    """Where the tokenised corpus for this (dataset, tokenizer, context) lives in the data dir."""
    ds = str(Path(dataset).resolve()) if Path(dataset).exists() else dataset
    key = f"{ds}|{model_path}|{context_size}|{max_tokens}|{text_field}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return Path(data_dir) / "tokens" / f"{_slug(dataset)}-ctx{context_size}-{digest}"


def prepare_tokens(cfg: TrainConfig, loaded: Any, data_dir: Path,
                   progress: Progress | None = None) -> Any:
    """Open (or build once) the token store for cfg.dataset with the model's tokenizer."""
    from .corpora import TokenStore, build_token_store

    assert cfg.dataset is not None
    ds_path = Path(cfg.dataset)
    if ds_path.is_dir() and (ds_path / "meta.json").is_file():
        return TokenStore.open(ds_path)
    out = token_store_dir(data_dir, cfg.dataset, loaded.info.path, cfg.context_size,
                          cfg.max_tokens, cfg.text_field)
    if (out / "meta.json").is_file():
        return TokenStore.open(out)
    return build_token_store(cfg.dataset, loaded.tokenizer, out, context_size=cfg.context_size,
                             max_tokens=cfg.max_tokens, text_field=cfg.text_field,
                             progress=progress)


def load_for_extraction(cfg: TrainConfig, data_dir: Path, device: torch.device,
                        progress: Progress | None = None) -> tuple[Any, Any, int]:
    """Load the model and token store; resolve and check the layer. Returns (model, store, L)."""
    from .models import check_context_size, default_layer, load_model, max_positions

    assert cfg.model is not None
    loaded = load_model(cfg.model, data_dir=data_dir, device=str(device))
    check_context_size(cfg.context_size, max_positions(getattr(loaded.model, "config", None)),
                       loaded.info.name)
    n_layers = loaded.info.n_layers
    layer = cfg.layer if cfg.layer is not None else default_layer(n_layers)
    if not 0 <= layer < n_layers:
        raise ConfigError(f"Layer {layer} is out of range: {loaded.info.name} has {n_layers} "
                          f"layers (0-{n_layers - 1}).")
    check_hook_points(cfg, loaded.info)
    store = prepare_tokens(cfg, loaded, data_dir, progress)
    return loaded, store, layer


def check_hook_points(cfg: TrainConfig, info: Any) -> None:
    """ConfigError when the model (``ModelInfo``) lacks the hook point or target hook point."""
    for label, point in (("Hook point", cfg.hook_point),
                         ("Target hook point", cfg.target_hook_point)):
        if point is not None and point not in info.hook_points:
            raise ConfigError(f"{label} '{point}' is not available for {info.name}; choose one "
                              f"of {', '.join(info.hook_points)}.")


def check_file_target(cfg: TrainConfig, meta: dict[str, Any]) -> None:
    """ConfigError when an activation file's pairs (its ``target_hook_point``) and the config's
    target hook point disagree: a transcoder trains on pairs, an SAE on single vectors."""
    theirs = meta.get("target_hook_point") if meta.get("d_target") else None
    if theirs == cfg.target_hook_point:
        return
    if theirs is None:
        raise ConfigError("The activation file holds one hook point's activations; a "
                          "transcoder (--target-hook-point) needs a file extracted with "
                          "--target-hook-point.")
    raise ConfigError(f"The activation file holds transcoder pairs ({meta.get('hook_point')} -> "
                      f"{theirs}); train on it with --target-hook-point {theirs}.")


def source_meta(cfg: TrainConfig, loaded: Any, store: Any, layer: int) -> dict[str, Any]:
    """The activation source's metadata (written into activation files and exports); a
    transcoder's ``d_target`` is set once its source knows the width."""
    return {"model": loaded.info.name, "model_name": loaded.info.name,
            "model_source": loaded.info.source, "layer": layer,
            "hook_point": cfg.hook_point, "target_hook_point": cfg.target_hook_point,
            "d_target": 0, "context_size": store.context_size,
            "dataset": cfg.dataset, "dataset_path": cfg.dataset,
            "prepend_bos": store.bos_id is not None, "d_in": loaded.info.hidden_size,
            "exclude_special": cfg.exclude_special, "exclude_pos0": cfg.exclude_pos0,
            "outlier_factor": cfg.outlier_factor}


def open_source(cfg: TrainConfig, *, data_dir: Path, device: torch.device,
                progress: Progress | None = None, dist: Dist = SINGLE
                ) -> tuple[Any, dict[str, Any]]:
    """The activation source a training reads (this rank's shard under ``dist``), and the
    metadata its export carries."""
    shard = {"rank": dist.rank, "world": dist.world_size}
    if cfg.activations:
        src = CachedActivations(cfg.activations, seed=cfg.seed, holdout=cfg.eval_tokens,
                                **shard)
        check_file_target(cfg, src.meta)
        return src, dict(src.meta)
    loaded, store, layer = load_for_extraction(cfg, data_dir, device, progress)
    meta = source_meta(cfg, loaded, store, layer)
    src = LiveActivations(
        loaded.model, store, layer, cfg.hook_point, seed=cfg.seed,
        buffer_tokens=cfg.buffer_tokens, exclude_special=cfg.exclude_special,
        exclude_pos0=cfg.exclude_pos0, outlier_factor=cfg.outlier_factor,
        holdout_tokens=cfg.eval_tokens, device=device, meta=meta,
        target_hook_point=cfg.target_hook_point, **shard)
    meta["d_target"] = src.d_target
    return src, meta


def extract_to_file(
    cfg: TrainConfig, out: Path, *, data_dir: Path, device: torch.device, max_tokens: int,
    dtype: torch.dtype = torch.float32, progress: Progress | None = None,
) -> dict[str, Any]:
    """``sae-studio extract``: stream filtered, shuffled activations into a safetensors file."""
    if max_tokens < 1:
        raise ConfigError("--max-tokens must be at least 1.")
    # Tokenise only what the extraction can use (plus slack for excluded tokens).
    per_ctx = cfg.context_size
    tok_cfg = cfg.replace(max_tokens=cfg.max_tokens or int(max_tokens * 1.25) + 4 * per_ctx)
    loaded, store, layer = load_for_extraction(tok_cfg, data_dir, device, progress)
    meta = source_meta(cfg, loaded, store, layer)
    done = [0]

    def counted(n: int) -> None:
        done[0] += n
        if progress:
            progress(min(1.0, done[0] / max_tokens), f"{done[0]:,} activations")

    src = LiveActivations(
        loaded.model, store, layer, cfg.hook_point, seed=cfg.seed,
        buffer_tokens=min(cfg.buffer_tokens, 2 * max_tokens), exclude_special=cfg.exclude_special,
        exclude_pos0=cfg.exclude_pos0, outlier_factor=cfg.outlier_factor, holdout_tokens=0,
        device=device, max_epochs=1, meta=meta, progress=counted,
        target_hook_point=cfg.target_hook_point)
    meta["d_target"] = src.d_target

    def chunks() -> Iterator[torch.Tensor]:
        left = max_tokens
        while left > 0:
            if left <= src.buffered():
                src.drain()  # the buffer already holds enough: extract no more
            try:
                batch = src.next_batch(min(left, 65_536))
            except StopIteration:
                break
            left -= batch.shape[0]
            yield batch
        meta["filtered"] = src.stats.to_dict()  # written into the header after the last chunk

    n = write_activation_file(chunks(), out, dtype=dtype, meta=meta)
    if n == 0:
        raise DataError("No activations were extracted.")
    meta.update(n=n, out=str(out))
    return meta


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    return next((config[k] for k in keys if isinstance(config.get(k), int)), None)


def check_before_loading(cfg: TrainConfig, data_dir: Path,
                         progress: Progress | None = None) -> tuple[int | None, int | None]:
    """Check the options against the input size before anything slow: the activation file's
    header, or the hidden size and layer count in the model's config.json when the model is on
    disk (a local folder, a bundled model; the file is read, not the weights). A Hub id is
    checked when it loads. SmolLM2's one-time conversion happens here (``progress``). Returns
    (hidden size, layer count) where known."""
    from .activations import ActivationFile
    from .models import BUNDLED_MODELS, check_context_size, max_positions, resolve_model_path

    d_in = n_layers = None
    if cfg.activations:
        file = ActivationFile(cfg.activations)
        check_file_target(cfg, file.meta)
        d_in = file.d_in
    elif cfg.model and (cfg.model in BUNDLED_MODELS or Path(cfg.model).expanduser().is_dir()):
        path = resolve_model_path(cfg.model, data_dir=data_dir, progress=(
            None if progress is None else lambda message, fraction: progress(fraction, message)))
        config = json.loads((path / "config.json").read_text())
        d_in = _first_int(config, ("hidden_size", "d_model", "n_embd", "dim"))
        n_layers = _first_int(config, ("num_hidden_layers", "n_layer", "num_layers"))
        if cfg.dataset:  # live extraction reads contexts of cfg.context_size tokens
            check_context_size(cfg.context_size, max_positions(config), cfg.model)
    cfg.validate(d_in=d_in, n_layers=n_layers)
    return d_in, n_layers


# ---------------------------------------------------------------------------- evaluation
def heldout_contexts(store: Any, eval_tokens: int) -> np.ndarray:
    """The last contexts of the token store: the ones ``LiveActivations`` holds out of training
    (ceil(eval_tokens / (context - 1)) of them, at most a tenth of the store)."""
    n_ctx, per_ctx = store.n_contexts, max(1, store.context_size - 1)
    n_hold = min(math.ceil(eval_tokens / per_ctx) if eval_tokens > 0 else 0, n_ctx // 10)
    return np.asarray(store.contexts[n_ctx - n_hold:], dtype=np.int64)


def evaluation_skipped(cfg: TrainConfig) -> str | None:
    """Why ``evaluate_run`` will not run for this config (None when it will)."""
    if cfg.eval_tokens == 0:
        return "eval_tokens is 0."
    if not (cfg.model and cfg.dataset):
        return ("the run trains from an activation file alone; give --model and --dataset as "
                "well to evaluate it on held-out text.")
    return None


def evaluate_run(
    cfg: TrainConfig, sae: Any, scale: float, *, out_dir: Path, data_dir: Path,
    device: torch.device, step: int, meta: dict[str, Any] | None = None,
    precision: str = "fp32", progress: Progress | None = None,
    target_scale: float | None = None,
) -> dict[str, Any] | None:
    """Evaluate a trained SAE on the held-out contexts of its corpus and write
    ``out_dir/eval`` (report.json, latents.safetensors, vocab.json: docs/eval-format.md).

    Loads the model and token store again (the training's may be freed by then). The hook
    point and context size come from ``meta`` (the activation source's), and the layer too when
    the config leaves it open, so a run from an activation file is evaluated where it was
    trained.
    Returns the report dict, or None when ``evaluation_skipped(cfg)`` gives a reason.
    """
    if evaluation_skipped(cfg):
        return None
    return evaluate_runs([EvalTarget(cfg, sae, scale, Path(out_dir), step, meta or {},
                                     target_scale)],
                         data_dir=data_dir, device=device, precision=precision,
                         progress=progress)[0]


@dataclass
class EvalTarget:
    """A trained SAE to evaluate: its config, weights, input scale, run folder, step and the
    activation source's metadata (``evaluate_run``'s arguments)."""

    cfg: TrainConfig
    sae: Any
    scale: float
    out_dir: Path
    step: int
    meta: dict[str, Any]
    target_scale: float | None = None
    """A transcoder's target scale (None: ``scale``)."""


def evaluate_runs(targets: list[EvalTarget], *, data_dir: Path, device: torch.device,
                  precision: str = "fp32", progress: Progress | None = None
                  ) -> list[dict[str, Any]]:
    """``evaluate_run`` for SAEs of one model and corpus (a sweep's): the model and the
    held-out contexts are loaded once and every batch's clean forward serves them all
    (``evaluate.evaluate_saes``). Returns each one's report, in order."""
    from .evaluate import EvalOptions, GroupSAE, evaluate_saes, save_evaluation

    cfgs = []
    for t in targets:
        layer = t.cfg.layer if t.cfg.layer is not None else t.meta.get("layer")
        cfgs.append(t.cfg.replace(
            layer=layer, hook_point=t.meta.get("hook_point", t.cfg.hook_point),
            target_hook_point=t.meta.get("target_hook_point", t.cfg.target_hook_point),
            context_size=t.meta.get("context_size") or t.cfg.context_size))
    cfg = cfgs[0]
    loaded, store, _ = load_for_extraction(cfg, data_dir, device, progress)
    contexts = heldout_contexts(store, cfg.eval_tokens)
    if not len(contexts):
        raise DataError(f"The corpus has too few contexts ({store.n_contexts}) to hold any out "
                        "for evaluation.")
    options = EvalOptions(dense_threshold=cfg.dense_threshold, exclude_pos0=cfg.exclude_pos0,
                          exclude_special=cfg.exclude_special)
    saes = [GroupSAE(t.sae, t.scale, c.layer, c.hook_point,
                     {"model": t.meta.get("model_name") or loaded.info.name, "layer": c.layer,
                      "hook_point": c.hook_point, "step": t.step,
                      "context_size": store.context_size},
                     target_hook_point=c.target_hook_point, target_scale=t.target_scale)
            for t, c in zip(targets, cfgs, strict=True)]
    evaluations = evaluate_saes(
        saes, loaded, contexts,
        special_ids=store.special_ids if cfg.exclude_special else (), device=device,
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision),
        options=options, progress=progress)
    for ev, t in zip(evaluations, targets, strict=True):
        save_evaluation(ev, t.out_dir / "eval")
    return [ev.report for ev in evaluations]


EVAL_SUMMARY_KEYS = ("tokens", "scored_tokens", "fvu", "explained_variance", "l0",
                     "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero", "ce_loss_recovered",
                     "kl_div", "downstream_note", "dead", "dense", "alive")


def eval_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report's headline numbers, stored with the training result (``result["eval"]``)."""
    return {k: report.get(k) for k in EVAL_SUMMARY_KEYS}


# ---------------------------------------------------------------------------- one training
def train_and_evaluate(
    cfg: TrainConfig, out_dir: Path, *, data_dir: Path, device: torch.device,
    callbacks: Any = None, resume: Path | None = None, names: dict[str, Any] | None = None,
    prepare_progress: Progress | None = None, after_fit: Callable[[], None] | None = None,
    evaluate: bool | Callable[[], bool] = True, eval_progress: Progress | None = None,
    log: Callable[[str], None] = lambda message: None,
    on_eval_start: Callable[[], None] | None = None,
    on_eval_error: Callable[[Exception], None] | None = None, dist: Dist = SINGLE,
) -> dict[str, Any]:
    """Open the activation source, train (continuing from ``resume``), free a live model, then
    evaluate on held-out text into ``out_dir/eval``. Returns ``TrainResult.to_dict()`` plus
    ``heldout_vectors`` (the held-out activation vectors its ``fvu`` and ``l0`` are measured on)
    and ``dead_window_tokens`` (the training window of its ``dead_frac``). ``eval`` holds one
    evaluation, named by ``eval["measured_on"]``: ``"heldout_text"`` when the text evaluation
    ran (the report's headline numbers, ``eval_summary``, with ``dead_frac = dead / latents``
    over the same tokens), else ``"heldout_vectors"`` (the trainer's, over the held-out
    vectors); empty without either. ``eval["report"]``: the eval folder's path when one was
    written, False when the config has none to write (``evaluation_skipped``) or the
    evaluation failed.

    ``names`` overrides the export metadata's names (the model and dataset as the user gave
    them). ``after_fit`` runs once training ends, even on an exception (flush metrics, close a
    bar). ``evaluate`` (a bool, or a predicate asked after training: the worker skips an
    interrupted run) turns the evaluation off; the result then has no ``report`` key.
    ``on_eval_start`` runs when the held-out evaluation begins (not when it is skipped: the
    worker's ``evaluating`` status); ``eval_progress`` then gets (fraction, message). ``log``
    receives one sentence per evaluation stage. An evaluation failure raises unless
    ``on_eval_error`` takes it (the training's result stands).

    ``dist``: this process's place under torchrun (``distributed``; its process group set up):
    each rank trains on its shard; only rank 0's values carry the evaluations (the other
    ranks' have no held-out figures and no ``report``).
    """
    with dist.main_first():  # rank 0 first: it may convert the model, build the token store
        source, meta = open_source(cfg, data_dir=data_dir, device=device,
                                   progress=prepare_progress, dist=dist)
    meta = dict(meta, **(names or {}))
    trainer = Trainer(cfg, source, out_dir, callbacks=callbacks, export_meta=meta, dist=dist)
    try:
        result = trainer.fit(resume=resume)
    finally:
        if after_fit is not None:
            after_fit()
    values = result_values(result, cfg)
    if not dist.is_main or not (evaluate() if callable(evaluate) else evaluate):
        return values
    del source, trainer.source  # free a live model before the evaluation loads it again
    return held_out_evaluation([values], [trainer], [out_dir], data_dir=data_dir, metas=[meta],
                               log=log, on_eval_start=on_eval_start,
                               eval_progress=eval_progress, on_eval_error=on_eval_error)[0]


def result_values(result: Any, cfg: TrainConfig) -> dict[str, Any]:
    values = result.to_dict()
    values.update(heldout_vectors=values["eval"].get("tokens", 0),
                  dead_window_tokens=cfg.dead_window_tokens)
    if values["eval"]:
        values["eval"]["measured_on"] = "heldout_vectors"
    return values


def held_out_evaluation(
    values: list[dict[str, Any]], trainers: list[Trainer], out_dirs: list[Path], *,
    data_dir: Path, metas: list[dict[str, Any]],
    log: Callable[[str], None] = lambda message: None,
    on_eval_start: Callable[[], None] | None = None, eval_progress: Progress | None = None,
    on_eval_error: Callable[[Exception], None] | None = None,
    run_logs: list[Callable[[str], None]] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate trained SAEs (one, or a sweep's, sharing their source) on held-out text into
    each ``out_dir/eval`` and merge the headline figures into each ``values["eval"]`` (see
    ``train_and_evaluate``). ``log`` gets the lines about them all (evaluating, no report);
    each SAE's own result line (Report ready: its FVU, L0...) goes to its ``run_logs`` entry
    (a group's members' logs), or without them to ``log``, naming the run folder when there
    are several."""
    cfg = trainers[0].cfg
    skipped = evaluation_skipped(cfg)
    if skipped:
        log(f"No report: {skipped}")
        for v in values:
            v["eval"]["report"] = False
        return values
    if on_eval_start is not None:
        on_eval_start()
    log("Evaluating on held-out contexts (CE loss, latent statistics, top contexts)...")
    device = trainers[0].device  # a group spread over GPUs is evaluated on the first
    targets = [EvalTarget(t.cfg, t.sae.to(device), t.scale, Path(out), t.step, meta,
                          t.target_scale)
               for t, out, meta in zip(trainers, out_dirs, metas, strict=True)]
    try:
        reports = evaluate_runs(targets, data_dir=data_dir, device=device,
                                precision=trainers[0].precision, progress=eval_progress)
    except Exception as exc:
        if on_eval_error is None:
            raise
        on_eval_error(exc)
        for v in values:
            v["eval"]["report"] = False
        return values
    for i, (v, report, out) in enumerate(zip(values, reports, out_dirs, strict=True)):
        v["eval"].update(eval_summary(report), measured_on="heldout_text",
                         dead_frac=report["dead"] / max(1, report["dead"] + report["alive"]),
                         report=str(Path(out) / "eval"))
        recovered = report.get("ce_loss_recovered")
        target = report.get("target_hook_point")
        run_log = log if run_logs is None else run_logs[i]
        run_log("Report ready{}: held-out FVU {:.4f}{}, L0 {:.1f}, {} dead, {} dense{}.".format(
            f" ({Path(out).name})" if run_logs is None and len(values) > 1 else "",
            report["fvu"], f" (of {target})" if target else "", report["l0"], report["dead"],
            report["dense"],
            "" if recovered is None else f", CE loss recovered {100 * recovered:.1f}%"
            + (f" (spliced at {target})" if target else "")))
    return values


def definitions(values: dict[str, Any]) -> dict[str, str]:
    """A sentence per figure of ``train``'s JSON: what it measures, over which tokens."""
    out = {
        "tokens_per_s": "Activation vectors trained on per second over the whole run's "
                        "training steps (batch fetching with any live extraction, forward, "
                        "backward, optimizer step; not start-up, saves, pauses or evaluation). "
                        "The progress bar's tok_s_window (a metrics row's tokens_per_s) is the "
                        "same rate over the last log_every steps.",
        "fvu": f"Fraction of variance unexplained after the last step on the "
               f"{values['heldout_vectors']:,} held-out activation vectors (heldout_vectors; "
               "never trained on); null without any.",
        "l0": "Mean active latents per vector on the same held-out vectors.",
        "dead_frac": f"Fraction of latents that did not fire in the last "
                     f"{values['dead_window_tokens']:,} training tokens (dead_window_tokens); "
                     "the web card's Dead latents.",
    }
    if values.get("filtered"):
        out["filtered"] = ("The training stream's live extraction, in tokens: seen (read by "
                           "the model), position0, special and outliers (excluded), kept (the "
                           "vectors it extracted for the training steps; not the "
                           "initialisation sample or the held-out vectors).")
    measured_on = (values.get("eval") or {}).get("measured_on")
    if measured_on == "heldout_text":
        out["eval"] = ("The held-out text evaluation of OUT/eval/report.json: fvu, l0 and the "
                       "latent statistics over its scored_tokens (dead: latents that never "
                       "fired on them, dead_frac = dead / latents), CE losses and KL.")
    elif measured_on == "heldout_vectors":
        out["eval"] = ("The evaluation on the held-out activation vectors (eval.tokens of "
                       "them): fvu, l0, dead_frac (latents that never fired on them), dense.")
    return out
