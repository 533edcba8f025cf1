"""Downstream evaluation of a trained SAE on held-out contexts (format: docs/eval-format.md).

    ev = evaluate_sae(sae, scale, loaded, store.contexts[holdout_ids], layer, "residual",
                      special_ids=store.special_ids, meta={"step": 1000})
    save_evaluation(ev, out_dir / "eval")

One pass over the contexts, ``batch_contexts`` at a time. Per batch:

1. clean forward of the whole model; a forward hook on ``hook_module(model, layer, hook_point)``
   copies the activation (a block returning a tuple is read at its first element; OPT's ``fc2``
   returns flattened ``[B*T, d]`` tokens, reshaped to ``[B, T, d]``). The SAE encodes the
   activations (times ``scale``, as in training) of whole contexts at a time; at the scored
   positions (not position 0, not special ids, per ``EvalOptions``) it accumulates FVU (streaming
   mean and sum of squares, Chan's merge), MSE on the raw scale, L0, firing counts, max and mean
   activation, and merges each latent's top-N candidates of the batch, with their windows, into
   the running top-N (excluded positions have activation 0 and are never candidates). The
   reconstructions ``decode(encode(x * scale)) / scale`` are kept for step 2;
2. (causal LMs only) spliced forward: the same hook returns the activation with the scored
   positions replaced by the reconstructions (the other positions unchanged);
3. (causal LMs only) zero-ablated forward: the scored positions set to 0.

CE losses and KL come from the model's logits (log-softmax in float32), over every predicted
position (``T - 1`` per context). A non-causal model runs step 1 only, stopped right after the
hooked module. Memory is bounded by the batch: the dense latents of one group of contexts
(``_CHUNK_ELEMENTS``), the batch's logits, and the running top-N ``[d_sae, N, W]``. On an
out-of-memory error a batch is retried in halves.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, DataError
from .files import file_mode, fsync_dir
from .models import LoadedModel, hook_module
from .trainer import is_oom

FORMAT = "sae-studio-eval/1"
LATENTS_FORMAT = "sae-studio-latents/1"
REPORT_FILE, LATENTS_FILE, VOCAB_FILE = "report.json", "latents.safetensors", "vocab.json"
HIST_MIN, HIST_MAX, HIST_WIDTH = -7.0, 0.0, 0.25
_CHUNK_ELEMENTS = 1 << 25  # dense latents per SAE chunk (128 MiB in float32); >= 1 context
LATENT_KEYS = ("frequency", "max_act", "mean_act", "top_acts", "top_context", "top_position",
               "top_tokens", "top_window_acts")
REPORT_KEYS = (
    "format", "created_at", "step", "d_in", "d_sae", "encoder_type", "model", "layer",
    "hook_point", "is_causal", "contexts", "context_size", "tokens", "scored_tokens", "fvu",
    "explained_variance", "l0", "mse", "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero",
    "ce_loss_recovered", "kl_div", "downstream_note", "dead", "dense", "alive", "dense_threshold",
    "histogram", "top_n", "window_before", "window_after",
)


@dataclass
class EvalOptions:
    top_n: int = 10
    window_before: int = 12
    window_after: int = 4
    batch_contexts: int = 8  # contexts per forward
    dense_threshold: float = 0.1
    exclude_pos0: bool = True
    exclude_special: bool = True


@dataclass
class Evaluation:
    report: dict[str, Any]  # exactly the report.json keys of docs/eval-format.md
    latents: dict[str, Tensor]  # exactly the latents.safetensors tensors
    vocab: dict[str, str]


class _Stop(Exception):
    """Raised by the hook of a non-causal model: nothing after the hooked module is needed."""


# ---------------------------------------------------------------------------- accumulation
@dataclass
class _Top:
    """Each latent's best N activations so far, with their windows (layout [d_sae, N, ...])."""

    acts: Tensor  # [d_sae, N] float32, descending, 0 = no entry
    context: Tensor  # [d_sae, N] int64, -1 = no entry
    position: Tensor  # [d_sae, N] int64
    tokens: Tensor  # [d_sae, N, W] int64, -1 = pad
    window_acts: Tensor  # [d_sae, N, W] float32

    @classmethod
    def empty(cls, d_sae: int, n: int, w: int, device: torch.device) -> _Top:
        return cls(torch.zeros(d_sae, n, device=device),
                   torch.full((d_sae, n), -1, dtype=torch.long, device=device),
                   torch.full((d_sae, n), -1, dtype=torch.long, device=device),
                   torch.full((d_sae, n, w), -1, dtype=torch.long, device=device),
                   torch.zeros(d_sae, n, w, device=device))

    def merge(self, other: _Top) -> _Top:
        """The N best of both (concatenate + topk); entries with activation <= 0 are cleared."""
        n, w = self.acts.shape[1], self.tokens.shape[2]
        acts, sel = torch.cat([self.acts, other.acts], 1).topk(n, dim=1)
        sel_w = sel.unsqueeze(2).expand(-1, -1, w)
        context = torch.cat([self.context, other.context], 1).gather(1, sel)
        position = torch.cat([self.position, other.position], 1).gather(1, sel)
        tokens = torch.cat([self.tokens, other.tokens], 1).gather(1, sel_w)
        window_acts = torch.cat([self.window_acts, other.window_acts], 1).gather(1, sel_w)
        none = acts <= 0
        acts = acts.masked_fill(none, 0.0)
        context = context.masked_fill(none, -1)
        position = position.masked_fill(none, -1)
        tokens = tokens.masked_fill(none.unsqueeze(2), -1)
        window_acts = window_acts.masked_fill(none.unsqueeze(2), 0.0)
        return _Top(acts, context, position, tokens, window_acts)


@dataclass
class _Stats:
    """Sums over scored tokens (and predicted positions); ``merge`` combines two batches."""

    d_sae: int
    device: torch.device
    n: int = 0  # scored tokens
    mean: Tensor | None = None  # [d_in] float64 mean of the raw activations
    m2: float = 0.0  # sum ||x - mean||^2
    err: float = 0.0  # sum ||x - x_hat||^2
    l0: float = 0.0  # sum of active latents
    fired: Tensor = field(init=False)
    act_sum: Tensor = field(init=False)
    act_max: Tensor = field(init=False)
    n_pred: int = 0  # predicted positions (causal LMs)
    ce_clean: float = 0.0
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    kl: float = 0.0

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.d_sae, dtype=torch.long, device=self.device)
        self.act_sum = torch.zeros(self.d_sae, dtype=torch.float64)  # on the CPU
        self.act_max = torch.zeros(self.d_sae, device=self.device)

    def add_activations(self, x: Tensor) -> None:
        """Chan's parallel update of the mean and sum of squared deviations ([n, d] float)."""
        nb = x.shape[0]
        if nb == 0:
            return
        # float32 on the device (MPS has no float64), merged in float64 on the CPU
        mean_b = x.mean(0)
        m2_b = float((x - mean_b).pow(2).sum())
        self._merge_moments(nb, mean_b.cpu().double(), m2_b)

    def _merge_moments(self, nb: int, mean_b: Tensor | None, m2_b: float) -> None:
        if nb == 0 or mean_b is None:
            return
        if self.n == 0 or self.mean is None:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.m2 += m2_b + float(delta.pow(2).sum()) * self.n * nb / n
        self.mean = self.mean + delta * (nb / n)
        self.n = n

    def merge(self, o: _Stats) -> None:
        self._merge_moments(o.n, o.mean, o.m2)
        self.err += o.err
        self.l0 += o.l0
        self.fired += o.fired
        self.act_sum += o.act_sum
        self.act_max = torch.maximum(self.act_max, o.act_max)
        self.n_pred += o.n_pred
        self.ce_clean += o.ce_clean
        self.ce_spliced += o.ce_spliced
        self.ce_zero += o.ce_zero
        self.kl += o.kl


# ---------------------------------------------------------------------------- the evaluation
class _Evaluator:
    def __init__(self, sae: nn.Module, scale: float, loaded: LoadedModel, layer: int,
                 hook_point: str, special: Tensor, device: torch.device,
                 autocast_dtype: torch.dtype | None, options: EvalOptions, context_size: int):
        self.sae, self.scale, self.loaded = sae, float(scale), loaded
        self.model = loaded.model
        self.layer, self.hook_point, self.device = layer, hook_point, device
        self.special, self.opt, self.T = special, options, context_size
        self.autocast_dtype = autocast_dtype
        self.causal = bool(loaded.info.is_causal)
        self.d_sae, self.d_in = int(sae.d_sae), int(sae.d_in)
        self.W = options.window_before + 1 + options.window_after
        self.module = hook_module(self.model, layer, hook_point)
        # hook state: mode "capture" | "splice" | "zero"
        self._mode = "capture"
        self._captured: Tensor | None = None
        self._replacement: Tensor | None = None
        self._mask: Tensor | None = None
        self._calls = 0

    # -- the forward hook
    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        self._calls += 1
        if self._calls > 1:  # a module reused within one forward: only its first call counts
            return None
        tup = isinstance(output, (tuple, list))
        act = output[0] if tup else output
        if not isinstance(act, Tensor):
            raise ConfigError(
                f"The hook point '{self.hook_point}' of layer {self.layer} does not output a "
                f"tensor in {type(self.model).__name__}; choose another hook point.")
        mask = self._mask
        b, t = mask.shape
        if act.numel() != b * t * self.d_in:
            raise ConfigError(
                f"The SAE reads {self.d_in}-dimensional activations, but the hook point "
                f"'{self.hook_point}' of layer {self.layer} gives {act.numel() // (b * t)} "
                f"values per token; evaluate it with the model, layer and hook point it was "
                f"trained on.")
        if self._mode == "capture":
            self._captured = act.detach().reshape(b, t, -1).to(torch.float32, copy=True)
            if not self.causal:
                raise _Stop
            return None
        new = act.reshape(b, t, -1).clone()
        if self._mode == "splice":
            new[mask] = self._replacement.to(device=new.device, dtype=new.dtype)
        else:
            new[mask] = 0
        new = new.reshape(act.shape)
        if not tup:
            return new
        rest = list(output[1:])
        return type(output)([new, *rest]) if isinstance(output, list) else (new, *rest)

    def _forward(self, ids: Tensor, mode: str) -> Tensor | None:
        """Run the model with the hook in ``mode``; the logits (causal) or None."""
        self._mode, self._calls = mode, 0
        kwargs: dict[str, Any] = {"input_ids": ids}
        if self.causal:
            kwargs["use_cache"] = False
        handle = self.module.register_forward_hook(self._hook)
        try:
            out = self.model(**kwargs)
        except _Stop:
            out = None
        finally:
            handle.remove()
        if self._calls == 0:
            raise ConfigError(
                f"The hook point '{self.hook_point}' of layer {self.layer} was not reached in the "
                f"forward pass of {type(self.model).__name__}; choose another hook point.")
        if out is None:
            return None
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- one batch of contexts
    def run_batch(self, ids: Tensor, start: int) -> tuple[_Stats, _Top]:
        """Evaluate ``ids`` [B, T] (global context indices start at ``start``)."""
        b, t = ids.shape
        mask = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        if self.opt.exclude_pos0:
            mask[:, 0] = False
        if self.opt.exclude_special and len(self.special):
            mask &= ~torch.isin(ids, self.special)
        self._mask = mask
        stats = _Stats(self.d_sae, self.device)
        top = _Top.empty(self.d_sae, self.opt.top_n, self.W, self.device)

        clean = self._forward(ids, "capture")
        acts, self._captured = self._captured, None
        recon, top = self._sae_pass(acts, ids, mask, start, stats, top)
        del acts

        if self.causal and clean is not None and t > 1:
            self._replacement = recon
            spliced = self._forward(ids, "splice")
            self._replacement = None
            targets = ids[:, 1:]
            for i in range(b):
                lp_clean = F.log_softmax(clean[i, :-1].float(), dim=-1)
                lp_spliced = F.log_softmax(spliced[i, :-1].float(), dim=-1)
                tgt = targets[i].unsqueeze(1)
                stats.ce_clean -= float(lp_clean.gather(1, tgt).sum())
                stats.ce_spliced -= float(lp_spliced.gather(1, tgt).sum())
                p_clean = lp_clean.exp()  # p log(p/q) with 0 log 0 = 0 (masked vocab entries)
                kl = torch.where(p_clean > 0, p_clean * (lp_clean - lp_spliced), 0.0)
                stats.kl += float(kl.sum())
            del spliced
            zero = self._forward(ids, "zero")
            for i in range(b):
                lp_zero = F.log_softmax(zero[i, :-1].float(), dim=-1)
                stats.ce_zero -= float(lp_zero.gather(1, targets[i].unsqueeze(1)).sum())
            del zero
            stats.n_pred = b * (t - 1)
        self._mask = None
        return stats, top

    def _sae_pass(self, acts: Tensor, ids: Tensor, mask: Tensor, start: int, stats: _Stats,
                  top: _Top) -> tuple[Tensor, _Top]:
        """SAE statistics and top-N candidates, a group of whole contexts at a time. Returns the
        raw-scale reconstructions of the scored positions ([n_scored, d_in], in ``acts[mask]``
        order) and the updated top-N."""
        b, t, _ = acts.shape
        per = max(1, _CHUNK_ELEMENTS // max(1, t * self.d_sae))
        recons = []
        for c0 in range(0, b, per):
            x = acts[c0:c0 + per].to(self.device)
            m = mask[c0:c0 + per].to(self.device)
            rows = x.shape[0] * t
            with self._autocast():
                f = self.sae.encode(x.reshape(rows, -1) * self.scale)
            f = f.float()
            m_flat = m.reshape(-1)
            f[~m_flat] = 0.0
            x_s = x.reshape(rows, -1)[m_flat]
            f_s = f[m_flat]
            with self._autocast():
                x_hat = self.sae.decode(f_s)
            x_hat = x_hat.float() / self.scale
            recons.append(x_hat)
            stats.add_activations(x_s)
            stats.err += float((x_s - x_hat).pow(2).sum())
            on = f_s > 0
            stats.l0 += float(on.sum())
            stats.fired += on.sum(0)
            stats.act_sum += f_s.sum(0).cpu().double()
            if f_s.shape[0]:
                stats.act_max = torch.maximum(stats.act_max, f_s.max(0).values)
            cand = self._candidates(f, ids[c0:c0 + per].to(self.device), start + c0)
            top = top.merge(cand)
            del f, f_s
        return torch.cat(recons), top

    def _candidates(self, f: Tensor, ids: Tensor, start: int) -> _Top:
        """Each latent's top-N tokens of these contexts ([C*T, d_sae] latents), with windows."""
        rows, d_sae = f.shape
        t = ids.shape[1]
        k = min(self.opt.top_n, rows)
        vals, idx = f.topk(k, dim=0)  # [k, d_sae]
        ctx, pos = idx // t, idx % t
        offsets = torch.arange(-self.opt.window_before, self.opt.window_after + 1,
                               device=f.device)
        q = pos.unsqueeze(2) + offsets  # [k, d_sae, W]
        valid = (q >= 0) & (q < t)
        flat = ctx.unsqueeze(2) * t + q.clamp(0, t - 1)
        w = offsets.numel()
        # window_acts[i, j, w] = f[flat[i, j, w], j]: gather along dim 0 with latents as columns
        g = f.gather(0, flat.permute(0, 2, 1).reshape(k * w, d_sae)).reshape(k, w, d_sae)
        window_acts = g.permute(2, 0, 1).masked_fill(~valid.permute(1, 0, 2), 0.0)
        tokens = ids.reshape(-1)[flat].masked_fill(~valid, -1).permute(1, 0, 2)
        # running.merge(cand) keeps N columns even when k < N
        return _Top(vals.T.contiguous(), (ctx + start).T.contiguous(), pos.T.contiguous(),
                    tokens.contiguous(), window_acts.contiguous())


# ---------------------------------------------------------------------------- entry points
def _check_options(o: EvalOptions) -> None:
    if o.top_n < 1 or o.batch_contexts < 1 or o.window_before < 0 or o.window_after < 0:
        raise ConfigError(
            f"Evaluation options out of range (top_n={o.top_n}, batch_contexts="
            f"{o.batch_contexts}, window_before={o.window_before}, window_after="
            f"{o.window_after}): top_n and batch_contexts must be at least 1, windows 0 or more.")
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
    config = getattr(loaded.model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions",
                                                                        None)
    if isinstance(limit, int) and t > limit:
        raise ConfigError(f"The contexts are {t} tokens long, but {loaded.info.name} reads at "
                          f"most {limit} positions; build the token store with a shorter "
                          f"context size.")
    return n, t


def _batch(contexts: np.ndarray | Tensor, a: int, b: int, device: torch.device) -> Tensor:
    if isinstance(contexts, Tensor):
        return contexts[a:b].to(device=device, dtype=torch.long)
    return torch.from_numpy(np.asarray(contexts[a:b], dtype=np.int64)).to(device)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


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


def _token_text(tokenizer: Any, token_id: int) -> str:
    """One id decoded on its own, keeping a leading space (SentencePiece ``▁``; a WordPiece
    token that starts a word gets one, a ``##`` continuation loses its marks)."""
    try:
        text = tokenizer.decode([token_id], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
    except TypeError:
        text = tokenizer.decode([token_id])
    try:
        piece = tokenizer.convert_ids_to_tokens(token_id)
    except (AttributeError, IndexError, KeyError, ValueError, TypeError):
        piece = None
    if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
        text = " " + text
    elif _is_wordpiece(tokenizer) and isinstance(piece, str):
        # WordPiece (BERT): "##x" continues a word; any other piece starts one.
        if piece.startswith("##"):
            text = piece[2:]
        elif token_id not in set(getattr(tokenizer, "all_special_ids", ()) or ()):
            text = " " + piece
    return text


def _is_wordpiece(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    return type(model).__name__ == "WordPiece"


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
) -> Evaluation:
    """Evaluate ``sae`` (trained on activations times ``scale``) on ``contexts`` [n, T].

    The model and the SAE are moved to ``device`` (in place) and run without gradients;
    ``autocast_dtype`` (bf16/fp16) applies to the SAE only. ``meta`` may give the report's
    ``model`` (default: the model's name), ``step`` and ``created_at``. ``progress(fraction,
    message)`` is called after each batch. The top contexts' indices are rows of ``contexts``.
    """
    opts = options or EvalOptions()
    _check_options(opts)
    meta = dict(meta or {})
    n, t = _check_contexts(contexts, loaded)
    dev = torch.device(device)
    model = loaded.model
    model_training, sae_training = model.training, sae.training
    model.to(dev).eval()
    sae.to(dev).eval()
    special = torch.tensor(sorted({int(i) for i in special_ids}), dtype=torch.long, device=dev)
    ev = _Evaluator(sae, scale, loaded, layer, hook_point, special, dev, autocast_dtype, opts, t)
    total = _Stats(ev.d_sae, dev)
    top = _Top.empty(ev.d_sae, opts.top_n, ev.W, dev)

    def run(a: int, b: int) -> None:
        nonlocal top
        try:
            stats, batch_top = ev.run_batch(_batch(contexts, a, b, dev), a)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
            if not is_oom(exc) or b - a <= 1:
                raise
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            mid = (a + b) // 2
            run(a, mid)
            run(mid, b)
            return
        total.merge(stats)
        top = top.merge(batch_top)

    try:
        with torch.no_grad():
            for a in range(0, n, opts.batch_contexts):
                b = min(n, a + opts.batch_contexts)
                run(a, b)
                if progress is not None:
                    progress(b / n, f"Evaluated {b} of {n} held-out contexts")
    finally:
        model.train(model_training)
        sae.train(sae_training)

    if total.n == 0:
        raise DataError("No held-out token was scored: every position is position 0 or a "
                        "special token; use longer contexts.")
    report = _report(ev, total, loaded, meta, n, t)
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
    ids = torch.unique(latents["top_tokens"][latents["top_tokens"] >= 0]).tolist()
    vocab = {str(i): _token_text(loaded.tokenizer, int(i)) for i in ids}
    return Evaluation(report=report, latents=latents, vocab=vocab)


def _report(ev: _Evaluator, s: _Stats, loaded: LoadedModel, meta: dict[str, Any], n: int,
            t: int) -> dict[str, Any]:
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
    dead = int((fired == 0).sum())
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
        "fvu": _finite(fvu), "explained_variance": None if fvu is None else _finite(1 - fvu),
        "l0": s.l0 / s.n, "mse": s.err / (s.n * ev.d_in),
        **{k: _finite(v) for k, v in ce.items()},
        "downstream_note": note,
        "dead": dead, "dense": int((freq > o.dense_threshold).sum()), "alive": ev.d_sae - dead,
        "dense_threshold": float(o.dense_threshold),
        "histogram": _histogram(freq, fired),
        "top_n": o.top_n, "window_before": o.window_before, "window_after": o.window_after,
    }
    assert tuple(report) == REPORT_KEYS
    return report


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_evaluation(ev: Evaluation, folder: Path | str) -> Path:
    """Write ``folder`` (report.json, latents.safetensors, vocab.json) atomically.

    The files are built in a sibling temporary folder that is then renamed into place; an
    existing ``folder`` is first renamed aside and removed once the new one is in place (and put
    back if that rename fails). Returns ``folder``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    old: Path | None = None
    try:
        report = json.dumps(_json_safe(ev.report), indent=1, allow_nan=False)
        _write(tmp / REPORT_FILE, report.encode("utf-8"))
        vocab = json.dumps({str(k): str(v) for k, v in ev.vocab.items()}, ensure_ascii=False,
                           allow_nan=False)
        _write(tmp / VOCAB_FILE, vocab.encode("utf-8"))
        tensors = {k: v.detach().cpu().contiguous() for k, v in ev.latents.items()}
        save_file(tensors, str(tmp / LATENTS_FILE), metadata={"format": LATENTS_FORMAT})
        with open(tmp / LATENTS_FILE, "rb") as fh:
            os.fsync(fh.fileno())
        mode = file_mode()
        for name in (REPORT_FILE, VOCAB_FILE, LATENTS_FILE):
            os.chmod(tmp / name, mode)
        os.chmod(tmp, mode | ((mode & 0o444) >> 2))  # mkdtemp makes 0700: give x where r
        fsync_dir(tmp)
        if folder.exists() or folder.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=parent))
            os.rmdir(old)
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if old is not None:
                os.replace(old, folder)
                old = None
            raise
        fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    return folder


def load_evaluation(folder: Path | str) -> Evaluation:
    """Read a folder written by ``save_evaluation``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise DataError(f"{folder / REPORT_FILE} is not a {FORMAT} report; run the evaluation "
                        f"again.")
    return Evaluation(report=report, latents=latents, vocab=vocab)
