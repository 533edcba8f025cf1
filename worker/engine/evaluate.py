"""Downstream evaluation of a trained SAE on held-out contexts, and its files.

    ev = evaluate_sae(sae, scale, loaded, store.contexts[holdout_ids], layer, "residual",
                      special_ids=store.special_ids, meta={"step": 1000})
    save_evaluation(ev, out_dir / "eval")

``evaluate_sae`` checks its inputs and runs the contexts through ``evaluator.Evaluator``
``batch_contexts`` at a time (what happens to one batch is described there), merging each batch's
totals, top-N, histograms and sample into the whole run's. On an out-of-memory error the batch
size is halved (``devices.halve_on_oom``) and stays halved for the rest of the run. From the
totals it computes the report (FVU, L0, CE losses, densities, histogram, SAEBench's core
metrics, a Matryoshka SAE's FVU per prefix) and the per-latent tensors; with
``EvalOptions.latent_details`` the weight-only statistics of ``latent_stats`` (decoder
neighbours, encoder statistics, logit lens) join them.

A transcoder (``GroupSAE.target_hook_point``, ``evaluate_sae(..., target_hook_point=...)``) is
encoded from its input hook point and compared with, and spliced into, its target hook point
(``evaluator`` says how); its report names the target (``target_hook_point``,
``skip_connection``).

``save_evaluation`` writes ``report.json``, ``latents.safetensors`` and ``vocab.json`` (the whole
vocabulary) into a folder atomically (``files.replace_folder``); ``load_evaluation`` reads them
back. The format is docs/eval-format.md (``sae-studio-eval/2``; ``load_evaluation`` also reads
``/1`` folders).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .devices import halve_on_oom
from .errors import ConfigError, DataError
from .evaluator import BatchCache, EvalOptions, Evaluator, Sample, TopN, Totals
from .files import json_safe, replace_folder
from .latent_stats import REPORT_KEYS as STATS_KEYS
from .latent_stats import latent_stats
from .models import LoadedModel, max_positions, vocabulary_texts

__all__ = ["EvalOptions", "Evaluation", "GroupSAE", "evaluate_sae", "evaluate_saes",
           "load_evaluation", "save_evaluation"]

FORMAT = "sae-studio-eval/2"
LATENTS_FORMAT = "sae-studio-latents/2"
READS = ("sae-studio-eval/1", FORMAT)  # report formats load_evaluation reads
REPORT_FILE, LATENTS_FILE, VOCAB_FILE = "report.json", "latents.safetensors", "vocab.json"
HIST_MIN, HIST_MAX, HIST_WIDTH = -7.0, 0.0, 0.25  # log10 firing frequency bins
REPORT_KEYS = (
    "format", "created_at", "step", "d_in", "d_sae", "encoder_type", "model", "layer",
    "hook_point", "is_causal", "contexts", "context_size", "tokens", "scored_tokens", "fvu",
    "explained_variance", "l0", "mse", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero",
    "ce_loss_recovered", "kl_div", "downstream_note", "dead", "dense", "alive", "dense_threshold",
    "histogram", "top_n", "window_before", "window_after",
    # format 2: SAEBench's core metrics, weight statistics, the per-latent details' settings
    "l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias", "cossim", "l1",
    "kl_div_with_ablation", "kl_div_score", "freq_over_1_percent", "freq_over_10_percent",
    "normalized_freq_over_1_percent", "normalized_freq_over_10_percent", "frac_alive",
    "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim", "max_decoder_cosine",
    "near_duplicate_share", "has_logits", "latent_details", "sample_n", "hist_bins",
    "neighbours_n", "logits_n", "promoters_n",
    "matryoshka_fvu",  # Matryoshka SAEs: FVU of each prefix of the dictionary; else null
    "target_hook_point", "skip_connection",  # transcoders: the target; null / false for an SAE
)


@dataclass
class Evaluation:
    report: dict[str, Any]  # exactly the report.json keys of docs/eval-format.md
    latents: dict[str, Tensor]  # exactly the latents.safetensors tensors
    vocab: dict[str, str]


# ---------------------------------------------------------------------------- the evaluation
def _check_options(o: EvalOptions) -> None:
    if o.top_n < 1 or o.batch_contexts < 1 or o.window_before < 0 or o.window_after < 0:
        raise ConfigError(
            f"Evaluation options out of range (top_n={o.top_n}, batch_contexts="
            f"{o.batch_contexts}, window_before={o.window_before}, window_after="
            f"{o.window_after}): top_n and batch_contexts must be at least 1, windows 0 or more.")
    counts = {"sample_n": o.sample_n, "neighbours_n": o.neighbours_n, "logits_n": o.logits_n,
              "promoters_n": o.promoters_n}
    if min(counts.values()) < 1:
        raise ConfigError(f"Evaluation options out of range ({counts}): each must be at least "
                          f"1.")
    if o.hist_bins < 2 or o.hist_bins & (o.hist_bins - 1):
        raise ConfigError(f"hist_bins must be a power of two of at least 2 (the histogram "
                          f"doubles its range by merging bin pairs), not {o.hist_bins}.")
    if not 0 <= o.dense_threshold <= 1:
        raise ConfigError(f"dense_threshold must be a firing fraction between 0 and 1, not "
                          f"{o.dense_threshold}.")


def _check_contexts(contexts: np.ndarray | Tensor, loaded: LoadedModel) -> tuple[int, int]:
    shape = tuple(contexts.shape)
    if len(shape) != 2:
        raise DataError(f"The held-out contexts must be a 2-D array [contexts, context_size] of "
                        f"token ids, not of shape {list(shape)}.")
    n, t = shape
    if n == 0 or t == 0:
        raise DataError("There are no held-out contexts to evaluate on: the token store is too "
                        "small to keep contexts aside; build a larger token store.")
    if isinstance(contexts, Tensor):
        if contexts.is_floating_point() or contexts.is_complex() or contexts.dtype == torch.bool:
            raise DataError(f"The held-out contexts must hold integer token ids, not "
                            f"{contexts.dtype}.")
        lo, hi = int(contexts.min()), int(contexts.max())
    else:
        if not np.issubdtype(np.asarray(contexts[:1]).dtype, np.integer):
            raise DataError(f"The held-out contexts must hold integer token ids, not "
                            f"{contexts.dtype}.")
        lo, hi = int(np.min(contexts)), int(np.max(contexts))
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    if lo < 0 or hi >= vocab:
        raise DataError(
            f"The held-out contexts hold token id {hi if hi >= vocab else lo}, but the model "
            f"{loaded.info.name} has a vocabulary of {vocab} tokens: the token store was built "
            f"with another tokenizer; evaluate with the model it was built for.")
    limit = max_positions(getattr(loaded.model, "config", None))
    if limit is not None and t > limit:
        raise ConfigError(f"The contexts are {t} tokens long, but {loaded.info.name} reads at "
                          f"most {limit} positions; build the token store with a shorter "
                          f"context size.")
    return n, t


def _batch(contexts: np.ndarray | Tensor, a: int, b: int, device: torch.device) -> Tensor:
    if isinstance(contexts, Tensor):
        return contexts[a:b].to(device=device, dtype=torch.long)
    return torch.from_numpy(np.asarray(contexts[a:b], dtype=np.int64)).to(device)


def _histogram(freq: np.ndarray, fired: np.ndarray) -> dict[str, Any]:
    n_bins = round((HIST_MAX - HIST_MIN) / HIST_WIDTH)
    edges = [HIST_MIN + i * HIST_WIDTH for i in range(n_bins + 1)]
    alive = fired > 0
    logf = np.log10(freq[alive])
    # a tiny tolerance so that exact powers (0.1 -> -1.0) land in the bin they start
    bins = np.clip(np.floor((logf - HIST_MIN) / HIST_WIDTH + 1e-9), 0, n_bins - 1).astype(int)
    counts = np.bincount(bins, minlength=n_bins)
    return {"edges": edges, "counts": [int(c) for c in counts],
            "dead": int((~alive).sum())}


def evaluate_sae(
    sae: nn.Module,
    scale: float,
    loaded: LoadedModel,
    contexts: np.ndarray | Tensor,
    layer: int,
    hook_point: str,
    *,
    special_ids: Sequence[int] = (),
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    options: EvalOptions | None = None,
    meta: dict[str, Any] | None = None,
    progress: Callable[[float, str], None] | None = None,
    target_hook_point: str | None = None,
    target_scale: float | None = None,
) -> Evaluation:
    """Evaluate ``sae`` (trained on activations times ``scale``) on ``contexts`` [n, T].

    The model and the SAE are moved to ``device`` (in place) and run without gradients;
    ``autocast_dtype`` (bf16/fp16) applies to the SAE only. ``meta`` may give the report's
    ``model`` (default: the model's name), ``step`` and ``created_at``. ``progress(fraction,
    message)`` is called after each batch. The top contexts' indices are rows of ``contexts``.
    A transcoder needs its ``target_hook_point`` and ``target_scale`` (``GroupSAE``'s).
    """
    group = GroupSAE(sae, scale, layer, hook_point, meta or {},
                     target_hook_point=target_hook_point, target_scale=target_scale)
    return evaluate_saes([group], loaded, contexts, special_ids=special_ids, device=device,
                         autocast_dtype=autocast_dtype, options=options, progress=progress)[0]


@dataclass
class GroupSAE:
    """One SAE of ``evaluate_saes``: trained on activations times ``scale`` at ``hook_point``
    of block ``layer``; ``meta`` as ``evaluate_sae``'s."""

    sae: nn.Module
    scale: float
    layer: int
    hook_point: str
    meta: dict[str, Any]
    target_hook_point: str | None = None
    """A transcoder's target (same layer): FVU on it, its output spliced there; None for an
    SAE (a transcoder without one, or an SAE with one, is a ConfigError)."""
    target_scale: float | None = None
    """The target's scale in training (the checkpoint meta's ``target_scale``; None:
    ``scale``)."""


def evaluate_saes(
    saes: Sequence[GroupSAE],
    loaded: LoadedModel,
    contexts: np.ndarray | Tensor,
    *,
    special_ids: Sequence[int] = (),
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    options: EvalOptions | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> list[Evaluation]:
    """``evaluate_sae`` for several SAEs of one model on the same contexts, in one pass over
    them: per batch the clean forward runs once for all (``evaluator.BatchCache``), the
    zero-ablated forward once per hook, the spliced forward once per SAE. One Evaluation per
    SAE, in order; each is what ``evaluate_sae`` gives for that SAE alone."""
    opts = options or EvalOptions()
    _check_options(opts)
    n, t = _check_contexts(contexts, loaded)
    dev = torch.device(device)
    model = loaded.model
    model_training = model.training
    sae_training = [g.sae.training for g in saes]
    model.to(dev).eval()
    for g in saes:
        g.sae.to(dev).eval()
    special = torch.tensor(sorted({int(i) for i in special_ids}), dtype=torch.long, device=dev)
    evs = [Evaluator(g.sae, g.scale, loaded, g.layer, g.hook_point, special, dev,
                     autocast_dtype, opts, target_hook_point=g.target_hook_point,
                     target_scale=g.target_scale) for g in saes]
    bins = opts.hist_bins if opts.latent_details else 0
    totals = [Totals(ev.d_sae, dev, hist_bins=bins) for ev in evs]
    tops = [TopN.empty(ev.d_sae, opts.top_n, ev.W, dev) for ev in evs]
    samples = [Sample.empty(ev.d_sae, opts.sample_n, ev.W, dev) if opts.latent_details
               else None for ev in evs]

    def batch_at(a: int, size: int) -> list[tuple[Totals, TopN, Sample | None]]:
        """Contexts ``a`` to ``a + size - 1``, through every SAE."""
        ids = _batch(contexts, a, a + size, dev)
        shared = BatchCache(evs)
        return [ev.run_batch(ids, a, shared) for ev in evs]

    try:
        with torch.no_grad():
            a, size = 0, opts.batch_contexts
            while a < n:
                results, size = halve_on_oom(partial(batch_at, a), min(size, n - a))
                for i, (stats, batch_top, batch_sample) in enumerate(results):
                    totals[i].merge(stats)
                    tops[i] = tops[i].merge(batch_top)
                    running = samples[i]
                    if running is not None and batch_sample is not None:
                        samples[i] = running.merge(batch_sample)
                a += size
                if progress is not None:
                    progress(a / n, f"Evaluated {a} of {n} held-out contexts")
        if totals[0].n == 0:
            raise DataError("No held-out token was scored: every position is position 0 or a "
                            "special token; use longer contexts.")
        if progress is not None and opts.latent_details:
            progress(1.0, "Computing the latents' weight statistics (decoder neighbours, "
                          "logit lens)")
        vocab = vocabulary_texts(loaded.tokenizer, _vocab_size(loaded))
        return [_evaluation(ev, total, top, sample, loaded, dict(g.meta), n, t, vocab)
                for ev, total, top, sample, g in zip(evs, totals, tops, samples, saes,
                                                     strict=True)]
    finally:
        model.train(model_training)
        for g, was in zip(saes, sae_training, strict=True):
            g.sae.train(was)


def _vocab_size(loaded: LoadedModel) -> int:
    """Every token id the tokenizer or the model's embeddings know."""
    sizes = [len(loaded.tokenizer), int(loaded.model.get_input_embeddings().weight.shape[0])]
    get = getattr(loaded.model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        sizes.append(int(weight.shape[0]))
    return max(sizes)


def _evaluation(ev: Evaluator, total: Totals, top: TopN, sample: Sample | None,
                loaded: LoadedModel, meta: dict[str, Any], n: int, t: int,
                vocab: dict[str, str]) -> Evaluation:
    """One SAE's report, per-latent tensors and vocabulary from its totals, top-N and sample
    (and, with latent details, its weight statistics)."""
    stats = None
    if ev.opt.latent_details:
        o = ev.opt
        # the decoder writes on the target's scale (a transcoder's; = scale for an SAE)
        stats = latent_stats(ev.sae, ev.target_scale, loaded.model, neighbours_n=o.neighbours_n,
                             logits_n=o.logits_n, promoters_n=o.promoters_n)
    report = _report(ev, total, loaded, meta, n, t, stats.report if stats else None)
    fired = total.fired.cpu()
    freq = fired.double() / total.n
    mean_act = torch.where(fired > 0, total.act_sum / fired.clamp_min(1), 0.0)
    latents = {
        "frequency": freq.float(),
        "max_act": total.act_max.cpu().float(),
        "mean_act": mean_act.float(),
        "top_acts": top.acts.cpu().float().contiguous(),
        "top_context": top.context.cpu().to(torch.int32).contiguous(),
        "top_position": top.position.cpu().to(torch.int32).contiguous(),
        "top_tokens": top.tokens.cpu().to(torch.int32).contiguous(),
        "top_window_acts": top.window_acts.cpu().float().contiguous(),
    }
    if sample is not None and total.hist is not None:
        chosen = sample.by_activation()
        latents.update({
            "hist_max": total.hist.upper().cpu(),
            "hist_counts": total.hist.counts.cpu().to(torch.int32).contiguous(),
            "contexts_fired": total.contexts_fired.cpu().to(torch.int32),
            "sample_acts": chosen.acts.cpu().float().contiguous(),
            "sample_context": chosen.context.cpu().to(torch.int32).contiguous(),
            "sample_position": chosen.position.cpu().to(torch.int32).contiguous(),
            "sample_tokens": chosen.tokens.cpu().to(torch.int32).contiguous(),
            "sample_window_acts": chosen.window_acts.cpu().float().contiguous(),
        })
    if stats is not None:
        latents.update(stats.tensors)
    return Evaluation(report=report, latents=latents, vocab=vocab)


def _report(ev: Evaluator, s: Totals, loaded: LoadedModel, meta: dict[str, Any], n: int,
            t: int, weight_report: dict[str, Any] | None) -> dict[str, Any]:
    """report.json's content from the run's totals (``n`` contexts of ``t`` tokens) and the
    weight statistics' report keys (None: not computed)."""
    fired = s.fired.cpu().numpy()
    freq = fired.astype(np.float64) / s.n
    fvu = s.err / s.m2 if s.m2 > 0 else None
    o = ev.opt
    ce: dict[str, float | None] = dict.fromkeys(
        ("ce_loss_clean", "ce_loss_spliced", "ce_loss_zero", "ce_loss_recovered", "kl_div"))
    note = None
    if not ev.causal:
        note = (f"{meta.get('model') or loaded.info.name} is not a causal LM: CE loss and KL "
                "need next-token predictions.")
    elif s.n_pred == 0:
        note = "The contexts are one token long: there is no next token to predict."
    else:
        clean, spliced, zero = (s.ce_clean / s.n_pred, s.ce_spliced / s.n_pred,
                                s.ce_zero / s.n_pred)
        ce.update(ce_loss_clean=clean, ce_loss_spliced=spliced, ce_loss_zero=zero,
                  ce_loss_recovered=(zero - spliced) / (zero - clean) if zero != clean else None,
                  kl_div=s.kl / s.n_pred)
    kl_abl = kl_score = None
    if ev.causal and s.n_pred:
        kl_abl = s.kl_zero / s.n_pred
        kl_score = (kl_abl - s.kl / s.n_pred) / kl_abl if kl_abl > 0 else None
    dead = int((fired == 0).sum())
    total_freq = float(freq.sum())

    def share(above: float) -> float:
        return float((freq > above).mean())

    def normalized(above: float) -> float:
        return float(freq[freq > above].sum()) / total_freq if total_freq > 0 else 0.0

    weights = weight_report or dict.fromkeys(STATS_KEYS)
    report = {
        "format": FORMAT,
        "created_at": float(meta.get("created_at") or time.time()),
        "step": None if meta.get("step") is None else int(meta["step"]),
        "d_in": ev.d_in, "d_sae": ev.d_sae, "encoder_type": str(ev.sae.encoder_type),
        "model": str(meta.get("model") or loaded.info.name),
        "layer": int(ev.layer), "hook_point": ev.hook_point,
        "is_causal": ev.causal,
        "contexts": n, "context_size": t, "tokens": n * t,
        "scored_tokens": int(s.n),
        "fvu": json_safe(fvu), "explained_variance": json_safe(None if fvu is None else 1 - fvu),
        "l0": s.l0 / s.n, "mse": s.err / (s.n * ev.d_out),
        **json_safe(ce),
        "downstream_note": note,
        "dead": dead, "dense": int((freq > o.dense_threshold).sum()), "alive": ev.d_sae - dead,
        "dense_threshold": float(o.dense_threshold),
        "histogram": _histogram(freq, fired),
        "top_n": o.top_n, "window_before": o.window_before, "window_after": o.window_after,
        "l2_norm_in": s.l2_in / s.n, "l2_norm_out": s.l2_out / s.n,
        "l2_ratio": s.l2_ratio / s.n,
        "relative_reconstruction_bias": json_safe(
            s.xhat_sq / s.x_dot_xhat if s.x_dot_xhat != 0 else None),
        "cossim": s.cossim / s.n,
        "l1": float(s.act_sum.sum()) / s.n,
        "kl_div_with_ablation": json_safe(kl_abl), "kl_div_score": json_safe(kl_score),
        "freq_over_1_percent": share(0.01), "freq_over_10_percent": share(0.1),
        "normalized_freq_over_1_percent": normalized(0.01),
        "normalized_freq_over_10_percent": normalized(0.1),
        "frac_alive": (ev.d_sae - dead) / ev.d_sae,
        "average_max_encoder_cosine_sim": json_safe(weights["average_max_encoder_cosine_sim"]),
        "average_max_decoder_cosine_sim": json_safe(weights["average_max_decoder_cosine_sim"]),
        "max_decoder_cosine": json_safe(weights["max_decoder_cosine"]),
        "near_duplicate_share": json_safe(weights["near_duplicate_share"]),
        "has_logits": bool(weights["has_logits"]),
        "latent_details": bool(o.latent_details),
        "sample_n": o.sample_n, "hist_bins": o.hist_bins, "neighbours_n": o.neighbours_n,
        "logits_n": o.logits_n, "promoters_n": o.promoters_n,
        "matryoshka_fvu": _prefix_fvu(ev, s),
        "target_hook_point": ev.target_hook_point, "skip_connection": ev.skip_connection,
    }
    assert tuple(report) == REPORT_KEYS
    return report


def _prefix_fvu(ev: Evaluator, s: Totals) -> list[dict[str, Any]] | None:
    """A Matryoshka SAE's FVU of each prefix (its latents below ``width`` alone, plus a skip
    transcoder's skip term, against what ``fvu`` compares with, about the same mean; the last
    is the whole SAE's ``fvu``); None for the other types."""
    widths = getattr(ev.sae, "matryoshka_widths", None)
    if s.prefix_err is None or not widths:
        return None
    return [{"width": int(w), "fvu": json_safe(float(e) / s.m2 if s.m2 > 0 else None)}
            for w, e in zip(widths, s.prefix_err.tolist(), strict=True)]


# ---------------------------------------------------------------------------- files
def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_evaluation(ev: Evaluation, folder: Path | str) -> Path:
    """Write ``folder`` (report.json, latents.safetensors, vocab.json) atomically: an existing
    ``folder`` is replaced as a whole once the new files are complete. NaN and infinities in the
    report are written as null. Returns ``folder``."""
    folder = Path(folder)
    with replace_folder(folder) as tmp:
        report = json.dumps(json_safe(ev.report), indent=1, allow_nan=False)
        _write(tmp / REPORT_FILE, report.encode("utf-8"))
        vocab = json.dumps({str(k): str(v) for k, v in ev.vocab.items()}, ensure_ascii=False,
                           allow_nan=False)
        _write(tmp / VOCAB_FILE, vocab.encode("utf-8"))
        tensors = {k: v.detach().cpu().contiguous() for k, v in ev.latents.items()}
        save_file(tensors, str(tmp / LATENTS_FILE), metadata={"format": LATENTS_FORMAT})
        with open(tmp / LATENTS_FILE, "rb") as fh:
            os.fsync(fh.fileno())
    return folder


def load_evaluation(folder: Path | str) -> Evaluation:
    """Read a folder written by ``save_evaluation``."""
    folder = Path(folder)
    missing = [name for name in (REPORT_FILE, LATENTS_FILE, VOCAB_FILE)
               if not (folder / name).is_file()]
    if missing:
        raise DataError(f"The evaluation folder {folder} is incomplete ({', '.join(missing)} "
                        f"missing); run the evaluation again.")
    try:
        report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
        vocab = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
        latents = load_file(str(folder / LATENTS_FILE))
    except (OSError, UnicodeDecodeError, ValueError, SafetensorError) as exc:
        raise DataError(f"The evaluation folder {folder} is corrupt ({exc}); run the "
                        f"evaluation again.") from None
    if not isinstance(report, dict) or report.get("format") not in READS:
        raise DataError(f"{folder / REPORT_FILE} is not a {FORMAT} report; run the evaluation "
                        f"again.")
    return Evaluation(report=report, latents=latents, vocab=vocab)
