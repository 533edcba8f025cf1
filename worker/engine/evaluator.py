"""The evaluator: one batch of held-out contexts through the model and the SAE.

``Evaluator.run_batch`` does, for ``ids`` ``[B, T]``:

1. clean forward of the whole model; a hook (``models.add_hook``: a module's output, or its
   input for ``mlp_in``) on ``hook_module(model, layer, hook_point)`` copies the activation (a
   block returning a tuple is read at its first element; OPT's ``fc1`` / ``fc2`` see flattened
   ``[B*T, d]`` tokens, reshaped to ``[B, T, d]``). A non-causal model runs only as far as the
   hooked modules (``models.run_to_many``). The SAE encodes the activations (times ``scale``,
   as in training) of whole contexts at a time; at the scored positions (not position 0, not
   special ids, per ``EvalOptions``) it accumulates (``Totals``) FVU (streaming mean and sum of
   squares, Chan's merge), MSE on the raw scale, L0, firing counts, max and mean activation,
   SAEBench's shrinkage sums (norms of x and x_hat, their ratio, cosine, x_hat . x), for a
   Matryoshka SAE (one with ``prefix_errors``) each prefix's squared error,
   and merges each latent's top-N candidates of the batch, with their windows, into the batch's
   top-N (``TopN``; excluded positions have activation 0 and are never candidates). With
   ``EvalOptions.latent_details`` it also counts the contexts each latent fires in, adds the
   non-zero activations to each latent's exact histogram (``Histogram``) and merges a uniform
   sample of each latent's firings (``Sample``: the ``sample_n`` smallest hash keys of
   (context, position, latent), so the sample does not depend on batching).
   The reconstructions ``decode(encode(x * scale)) / scale`` are kept for step 2;
2. (causal LMs only) spliced forward: the same hook returns the activation with the scored
   positions replaced by the reconstructions (the other positions unchanged);
3. (causal LMs only) zero-ablated forward: the scored positions set to 0.

A transcoder (``target_hook_point``: it reads x at ``hook_point`` and predicts y at the target
hook point of the same block, e.g. the MLP's input -> its output) is read the same way, except
that what it is compared with and spliced into is the target: the clean forward captures both
x and y, the latents are ``encode(x * scale)``, the output is ``reconstruct(x * scale, f) /
target_scale`` (decoded latents plus the skip term), FVU, MSE and the shrinkage sums compare it
with y, a Matryoshka prefix's output is its decoded prefix plus the same skip term, and steps 2
and 3 replace / zero y (so ``ce_loss_recovered`` is the share of the MLP's contribution to the
loss that the transcoder recovers).

In a group (``BatchCache``, several SAEs of one model on one batch) the clean forward runs once
for every SAE, capturing every hook (inputs and targets), and the zero-ablated forward once per
spliced hook; the spliced forward is each SAE's own.

CE losses and KL (clean || spliced, clean || zero-ablated) come from the model's logits
(log-softmax in float32), over every predicted position (``T - 1`` per context). Memory is
bounded by the batch: the dense latents of one group of contexts (``_CHUNK_ELEMENTS``), the
batch's logits, the top-N and the sample ``[d_sae, N, W]``, the histogram ``[d_sae, bins]``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .models import LoadedModel, add_hook, hook_module, hook_not_reached, run_to_many

_CHUNK_ELEMENTS = 1 << 25  # dense latents per SAE chunk (128 MiB in float32); >= 1 context
EMPTY_EXP = -(1 << 20)
"""``Histogram.exp`` of a latent that has not fired yet."""
EXP_MIN = -100
"""The smallest histogram range is 2**EXP_MIN (~8e-31): bins stay exact powers of two."""
KEY_NONE = (1 << 63) - 1
"""``Sample.keys`` of an empty entry (every real key is smaller)."""


@dataclass
class EvalOptions:
    """What an evaluation keeps per latent, which tokens it scores, how many contexts a batch
    holds (the options of docs/eval-format.md)."""

    top_n: int = 10  # top activations kept per latent
    window_before: int = 12  # tokens shown before the activating one
    window_after: int = 4  # and after it
    batch_contexts: int = 8  # contexts per forward (halved for good on out-of-memory)
    dense_threshold: float = 0.1  # firing fraction above which a latent counts as dense
    exclude_pos0: bool = True
    exclude_special: bool = True
    latent_details: bool = True  # histogram, sample, contexts fired, weight statistics
    sample_n: int = 25  # firings sampled uniformly per latent
    hist_bins: int = 64  # activation histogram bins per latent (a power of two)
    neighbours_n: int = 10  # nearest latents by decoder cosine
    logits_n: int = 10  # top and bottom logit-lens tokens per latent
    promoters_n: int = 5  # latents that promote a token most, per token id


@dataclass
class TopN:
    """Each latent's best N activations so far, with their windows (layout [d_sae, N, ...])."""

    acts: Tensor  # [d_sae, N] float32, descending, 0 = no entry
    context: Tensor  # [d_sae, N] int64, -1 = no entry
    position: Tensor  # [d_sae, N] int64
    tokens: Tensor  # [d_sae, N, W] int64, -1 = pad
    window_acts: Tensor  # [d_sae, N, W] float32

    @classmethod
    def empty(cls, d_sae: int, n: int, w: int, device: torch.device) -> TopN:
        return cls(torch.zeros(d_sae, n, device=device),
                   torch.full((d_sae, n), -1, dtype=torch.long, device=device),
                   torch.full((d_sae, n), -1, dtype=torch.long, device=device),
                   torch.full((d_sae, n, w), -1, dtype=torch.long, device=device),
                   torch.zeros(d_sae, n, w, device=device))

    def merge(self, other: TopN) -> TopN:
        """The N best of both (concatenate + topk); entries with activation <= 0 are cleared."""
        n = self.acts.shape[1]
        acts, sel = torch.cat([self.acts, other.acts], 1).topk(n, dim=1)
        return self._take(other, sel, acts <= 0)

    def _fields(self) -> tuple[Tensor, ...]:
        return self.acts, self.context, self.position, self.tokens, self.window_acts

    def _take(self, other: TopN, sel: Tensor, none: Tensor) -> TopN:
        """Entries ``sel`` [d_sae, N] of self and ``other`` side by side; ``none`` cleared."""
        w = self.tokens.shape[2]
        sel_w = sel.unsqueeze(2).expand(-1, -1, w)
        acts, context, position, tokens, window_acts = (
            torch.cat([a, b], 1).gather(1, sel if a.dim() == 2 else sel_w)
            for a, b in zip(self._fields(), other._fields(), strict=True))
        return TopN(acts.masked_fill(none, 0.0), context.masked_fill(none, -1),
                    position.masked_fill(none, -1), tokens.masked_fill(none.unsqueeze(2), -1),
                    window_acts.masked_fill(none.unsqueeze(2), 0.0))


@dataclass
class Sample:
    """A uniform sample of each latent's firings so far (without replacement): the ``S`` firings
    with the smallest keys, a key being a 63-bit hash of (context row, position, latent)
    (``sample_keys``). The S smallest keys of a set do not depend on the order its members
    arrive in, so neither batching nor chunking changes the sample."""

    keys: Tensor  # [d_sae, S] int64 ascending, KEY_NONE = no entry
    top: TopN  # the entries (acts 0, context -1 = no entry)

    @classmethod
    def empty(cls, d_sae: int, s: int, w: int, device: torch.device) -> Sample:
        return cls(torch.full((d_sae, s), KEY_NONE, dtype=torch.long, device=device),
                   TopN.empty(d_sae, s, w, device))

    def merge(self, other: Sample) -> Sample:
        s = self.keys.shape[1]
        keys, sel = torch.cat([self.keys, other.keys], 1).topk(s, dim=1, largest=False)
        none = keys == KEY_NONE
        return Sample(keys, self.top._take(other.top, sel, none))

    def by_activation(self) -> TopN:
        """The entries sorted by activation, descending (empty ones last); equal activations
        in key order."""
        order = self.top.acts.argsort(dim=1, descending=True, stable=True)
        empty = TopN.empty(*self.top.acts.shape, self.top.tokens.shape[2], self.keys.device)
        # _take reads indices >= S from its second argument: every index here is < S
        return self.top._take(empty, order, self.top.acts.gather(1, order) <= 0)


_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64's multipliers as signed int64
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_SEED = 0x9E3779B97F4A7C15 - (1 << 64)


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 ``x`` by ``s`` bits (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 (multiplication wraps modulo 2**64)."""
    x = x ^ _shr(x, 30)
    x = x * _MIX1
    x = x ^ _shr(x, 27)
    x = x * _MIX2
    return x ^ _shr(x, 31)


def sample_keys(context: Tensor, position: Tensor, latent: Tensor) -> Tensor:
    """The sample key of firings (int64 tensors of context rows, positions, latents): a hash in
    [0, 2**63 - 1), uniform for practical purposes and the same on every device."""
    h = _mix(context.long() ^ _SEED)
    h = _mix(h ^ position.long())
    h = _mix(h ^ latent.long())
    return (h & KEY_NONE).clamp(max=KEY_NONE - 1)


def _pow2(e: Tensor) -> Tensor:
    """2**e as float32 for int64 ``e`` in [-126, 127], built from its bit pattern (exact, and
    on any device: no frexp / ldexp)."""
    return ((e + 127) << 23).to(torch.int32).view(torch.float32)


def _exponent(x: Tensor) -> Tensor:
    """For float32 ``x`` > 0, the int64 ``e`` with 2**(e-1) <= x < 2**e (frexp's exponent;
    -125 below float32's normal range)."""
    biased = (x.float().contiguous().view(torch.int32) >> 23) & 0xFF
    return biased.long().clamp(min=1) - 126


@dataclass
class Histogram:
    """Each latent's exact histogram of its non-zero activations, ``B`` equal bins from 0 to
    ``2**exp``, the smallest power of two above every activation seen (at least 2**EXP_MIN). A
    larger activation doubles the range (once or more); doubling merges adjacent bin pairs,
    which is exact since with B and the range powers of two ``floor(v * B / 2R) ==
    floor(floor(v * B / R) / 2)``. So the counts are those of one pass with the final range,
    whatever the batching."""

    exp: Tensor  # [d_sae] int64; EMPTY_EXP = nothing seen
    counts: Tensor  # [d_sae, B] int64

    @classmethod
    def empty(cls, d_sae: int, bins: int, device: torch.device) -> Histogram:
        return cls(torch.full((d_sae,), EMPTY_EXP, dtype=torch.long, device=device),
                   torch.zeros(d_sae, bins, dtype=torch.long, device=device))

    @property
    def bits(self) -> int:
        return self.counts.shape[1].bit_length() - 1

    def _grow(self, exp: Tensor) -> Tensor:
        """The counts rebinned to ranges ``2**exp`` (each >= the current one)."""
        bins = self.counts.shape[1]
        shift = (exp - self.exp).clamp(0, 62)
        idx = torch.arange(bins, device=exp.device).unsqueeze(0) >> shift.unsqueeze(1)
        return torch.zeros_like(self.counts).scatter_add_(1, idx, self.counts)

    def add(self, latent: Tensor, values: Tensor) -> None:
        """Count positive ``values`` [m] of latents ``latent`` [m] int64."""
        if not latent.numel():
            return
        values = values.float()
        top = torch.zeros(self.exp.shape[0], device=values.device).scatter_reduce_(
            0, latent, values, "amax")
        e = torch.where(top > 0, _exponent(top).clamp(min=EXP_MIN), EMPTY_EXP)
        exp = torch.maximum(self.exp, e)
        self.counts, self.exp = self._grow(exp), exp
        # bin = floor(v * B / 2**exp): v times a power of two is exact, and < B since v < 2**exp
        b = torch.floor(values * _pow2(self.bits - exp[latent])).long()
        b = b.clamp(0, self.counts.shape[1] - 1)
        flat = latent * self.counts.shape[1] + b
        self.counts += torch.bincount(flat, minlength=self.counts.numel()).view_as(self.counts)

    def merge(self, other: Histogram) -> None:
        exp = torch.maximum(self.exp, other.exp)
        self.counts = self._grow(exp) + other._grow(exp)
        self.exp = exp

    def upper(self) -> Tensor:
        """Each latent's upper edge ``2**exp`` (0 for a latent that never fired), float32 on
        the CPU."""
        exp = self.exp.cpu()
        fired = exp != EMPTY_EXP
        return torch.where(fired, torch.exp2(torch.where(fired, exp, 0).double()), 0.0).float()


@dataclass
class Totals:
    """Sums over scored tokens (and predicted positions); ``merge`` combines two batches."""

    d_sae: int
    device: torch.device
    # x below: the raw activation an SAE reconstructs (a transcoder's target y), x_hat its output
    n: int = 0  # scored tokens
    mean: Tensor | None = None  # [d] float64 mean of the raw activations x
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
    kl: float = 0.0  # KL(clean || spliced)
    kl_zero: float = 0.0  # KL(clean || zero-ablated)
    # SAEBench's shrinkage / reconstruction sums over scored tokens (raw activation scale)
    l2_in: float = 0.0  # sum ||x||
    l2_out: float = 0.0  # sum ||x_hat||
    l2_ratio: float = 0.0  # sum ||x_hat|| / ||x|| (||x|| < 1e-4 counted as 1, as SAEBench)
    cossim: float = 0.0  # sum cos(x, x_hat) (0 where either is 0)
    xhat_sq: float = 0.0  # sum ||x_hat||^2
    x_dot_xhat: float = 0.0  # sum x . x_hat
    hist_bins: int = 0  # > 0: keep the latent details below
    prefix_err: Tensor | None = None  # Matryoshka: sum ||x - x_hat_w||^2 per prefix width w
    contexts_fired: Tensor = field(init=False)
    hist: Histogram | None = field(init=False)

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.d_sae, dtype=torch.long, device=self.device)
        self.act_sum = torch.zeros(self.d_sae, dtype=torch.float64)  # on the CPU
        self.act_max = torch.zeros(self.d_sae, device=self.device)
        self.contexts_fired = torch.zeros(self.d_sae, dtype=torch.long, device=self.device)
        self.hist = (Histogram.empty(self.d_sae, self.hist_bins, self.device)
                     if self.hist_bins else None)

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

    def merge(self, o: Totals) -> None:
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
        self.kl_zero += o.kl_zero
        self.l2_in += o.l2_in
        self.l2_out += o.l2_out
        self.l2_ratio += o.l2_ratio
        self.cossim += o.cossim
        self.xhat_sq += o.xhat_sq
        self.x_dot_xhat += o.x_dot_xhat
        self.contexts_fired += o.contexts_fired
        if o.prefix_err is not None:
            self.prefix_err = o.prefix_err if self.prefix_err is None else \
                self.prefix_err + o.prefix_err
        if self.hist is not None and o.hist is not None:
            self.hist.merge(o.hist)


class Evaluator:
    """Runs batches of contexts through ``loaded.model`` (hooked at ``hook_point`` of block
    ``layer``) and ``sae`` (trained on activations times ``scale``) on ``device``; ``special``
    holds the token ids that are not scored, ``autocast_dtype`` applies to the SAE only.

    A transcoder (``sae.transcoder``) names its ``target_hook_point`` (same block) and the
    target's training scale ``target_scale`` (None: ``scale``): its output is compared with and
    spliced into the target (module docstring). ``hook`` is the input's (layer, hook point),
    ``target`` the one compared, spliced and zeroed (= ``hook`` for an SAE)."""

    def __init__(self, sae: nn.Module, scale: float, loaded: LoadedModel, layer: int,
                 hook_point: str, special: Tensor, device: torch.device,
                 autocast_dtype: torch.dtype | None, options: EvalOptions, *,
                 target_hook_point: str | None = None, target_scale: float | None = None):
        self.sae, self.scale = sae, float(scale)
        self.model = loaded.model
        self.layer, self.hook_point, self.device = layer, hook_point, device
        self.special, self.opt = special, options
        self.autocast_dtype = autocast_dtype
        self.causal = bool(loaded.info.is_causal)
        self.d_sae, self.d_in = int(sae.d_sae), int(sae.d_in)
        self.transcoder = target_hook_point is not None
        if bool(getattr(sae, "transcoder", False)) and not self.transcoder:
            raise ConfigError("This SAE is a transcoder: it predicts the activation at another "
                              "hook point, but the evaluation was given no target hook point; "
                              "evaluate it with the target it was trained on.")
        if self.transcoder and not getattr(sae, "transcoder", False):
            raise ConfigError(f"The evaluation was given a target hook point "
                              f"({target_hook_point}), but this SAE is not a transcoder; "
                              f"evaluate it without one.")
        self.target_hook_point = target_hook_point
        self.target_scale = float(scale if target_scale is None else target_scale)
        self.skip_connection = getattr(sae, "W_skip", None) is not None
        self.d_out = int(sae.W_dec.shape[1]) if self.transcoder else self.d_in
        self.W = options.window_before + 1 + options.window_after
        self.hook = (layer, hook_point)
        self.target = (layer, target_hook_point or hook_point)
        self.module = hook_module(self.model, layer, hook_point)
        self.target_module = hook_module(self.model, *self.target)
        self._replacement: Tensor | None = None  # the splice's rows (scored positions)
        self._mask: Tensor | None = None  # the batch's scored positions [B, T]

    def _checked(self, act: Any, b: int, t: int, target: bool = False) -> Tensor:
        """``act``, the activation at the input's hook point (``target``: at the target's) for
        ``[b, t]`` tokens, as ``[b, t, d]``, if the SAE can read (or write) it."""
        layer, hook_point = self.target if target else self.hook
        if not isinstance(act, Tensor):
            raise ConfigError(
                f"The hook point '{hook_point}' of layer {layer} does not output a "
                f"tensor in {type(self.model).__name__}; choose another hook point.")
        d = self.d_out if target else self.d_in
        if act.numel() != b * t * d:
            what = ("The transcoder predicts" if target and self.transcoder
                    else "The SAE reads")
            raise ConfigError(
                f"{what} {d}-dimensional activations, but the hook point "
                f"'{hook_point}' of layer {layer} gives {act.numel() // (b * t)} "
                f"values per token; evaluate it with the model, layer and hook point"
                f"{'s' if self.transcoder else ''} it was trained on.")
        return act.reshape(b, t, d)

    def _forward(self, ids: Tensor, mode: str) -> Tensor:
        """The logits of a causal LM's forward with the target's activation changed at the
        scored positions: ``mode`` "splice" (the SAE's outputs) or "zero"."""
        mask = self._mask
        assert mask is not None
        calls = 0

        def change(act: Tensor) -> Tensor | None:
            nonlocal calls
            calls += 1
            if calls > 1:  # a module reused within one forward: only its first call counts
                return None
            b, t = mask.shape
            new = self._checked(act, b, t, target=True).clone()
            if mode == "splice":
                assert self._replacement is not None
                new[mask] = self._replacement.to(device=new.device, dtype=new.dtype)
            else:
                new[mask] = 0
            return new.reshape(act.shape)

        handle = add_hook(self.target_module, self.target[1], change)
        try:
            out = self.model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
        if calls == 0:
            raise hook_not_reached(self.model, *self.target)
        return out.logits if hasattr(out, "logits") else out[0]

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- one batch of contexts
    def scored(self, ids: Tensor) -> Tensor:
        """The positions of ``ids`` [B, T] that are scored: not position 0, not special ids."""
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        if self.opt.exclude_pos0:
            mask[:, 0] = False
        if self.opt.exclude_special and len(self.special):
            mask &= ~torch.isin(ids, self.special)
        return mask

    def run_batch(self, ids: Tensor, start: int, shared: BatchCache | None = None
                  ) -> tuple[Totals, TopN, Sample | None]:
        """Evaluate ``ids`` [B, T] (global context indices start at ``start``); ``shared``
        holds what this SAE's group shares for the batch (a fresh one for an SAE alone).
        Returns the batch's totals, top-N and sample (None without latent details)."""
        shared = shared or BatchCache([self])
        b, t = ids.shape
        mask = self._mask = self.scored(ids)
        details = self.opt.latent_details
        stats = Totals(self.d_sae, self.device, hist_bins=self.opt.hist_bins if details else 0)
        top = TopN.empty(self.d_sae, self.opt.top_n, self.W, self.device)
        sample = (Sample.empty(self.d_sae, self.opt.sample_n, self.W, self.device)
                  if details else None)

        acts, targets, clean = shared.clean(self, ids)
        recon, top, sample = self._sae_pass(acts, targets, ids, mask, start, stats, top, sample)
        del acts, targets

        if clean is not None and t > 1:  # causal LMs
            self._replacement = recon
            spliced = self._forward(ids, "splice")
            self._replacement = None
            targets_ids = ids[:, 1:]
            for i in range(b):
                lp_clean = F.log_softmax(clean[i, :-1].float(), dim=-1)
                lp_spliced = F.log_softmax(spliced[i, :-1].float(), dim=-1)
                tgt = targets_ids[i].unsqueeze(1)
                stats.ce_clean -= float(lp_clean.gather(1, tgt).sum())
                stats.ce_spliced -= float(lp_spliced.gather(1, tgt).sum())
                p_clean = lp_clean.exp()  # p log(p/q) with 0 log 0 = 0 (masked vocab entries)
                kl = torch.where(p_clean > 0, p_clean * (lp_clean - lp_spliced), 0.0)
                stats.kl += float(kl.sum())
            del spliced
            log_likelihood, kl_zero = shared.zero_ablation(self, ids, clean)
            stats.ce_zero -= log_likelihood
            stats.kl_zero += kl_zero
            stats.n_pred = b * (t - 1)
        self._mask = None
        return stats, top, sample

    def zero_ablation(self, ids: Tensor, clean: Tensor) -> tuple[float, float]:
        """The zero-ablated forward (causal LMs; the target's activation zeroed at the scored
        positions): its summed next-token log-likelihood and the summed KL(clean ||
        zero-ablated) over predicted positions (``clean``: the logits)."""
        zero = self._forward(ids, "zero")
        targets = ids[:, 1:]
        total, kl_sum = 0.0, 0.0
        for i in range(ids.shape[0]):
            lp_zero = F.log_softmax(zero[i, :-1].float(), dim=-1)
            total += float(lp_zero.gather(1, targets[i].unsqueeze(1)).sum())
            lp_clean = F.log_softmax(clean[i, :-1].float(), dim=-1)
            p_clean = lp_clean.exp()
            kl_sum += float(torch.where(p_clean > 0, p_clean * (lp_clean - lp_zero), 0.0).sum())
        return total, kl_sum

    def _output(self, x: Tensor, f: Tensor) -> Tensor:
        """The SAE's output on the target's training scale for raw inputs ``x`` and their
        latents ``f``: ``decode(f)``; a transcoder's ``reconstruct(x * scale, f)`` (the
        decoded latents plus its skip term)."""
        with self._autocast():
            if self.transcoder:
                return self.sae.reconstruct(x * self.scale, f)
            return self.sae.decode(f)

    def _decoded_target(self, x: Tensor, y: Tensor) -> Tensor:
        """What the decoded latents alone (no skip term) aim at, on the training scale, for
        raw inputs ``x`` and raw targets ``y``: ``x * scale`` for an SAE; a transcoder's
        ``loss_target`` (``y * target_scale`` less the skip term, as in training)."""
        if not self.transcoder:
            return x * self.scale
        return self.sae.loss_target(x * self.scale, y * self.target_scale).float()

    def _sae_pass(self, acts: Tensor, targets: Tensor, ids: Tensor, mask: Tensor, start: int,
                  stats: Totals, top: TopN, sample: Sample | None
                  ) -> tuple[Tensor, TopN, Sample | None]:
        """SAE statistics, top-N and sample candidates, a group of whole contexts at a time
        (``acts`` the input activations [B, T, d_in], ``targets`` what the output is compared
        with [B, T, d_out]: ``acts`` itself for an SAE). Returns the raw-scale outputs at the
        scored positions ([n_scored, d_out], in ``acts[mask]`` order) and the updated top-N
        and sample."""
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
            y_s = (targets[c0:c0 + per].to(self.device).reshape(rows, -1)[m_flat]
                   if self.transcoder else x_s)
            f_s = f[m_flat]
            y_hat = self._output(x_s, f_s)
            y_hat = y_hat.float() / self.target_scale
            recons.append(y_hat)
            stats.add_activations(y_s)
            stats.err += float((y_s - y_hat).pow(2).sum())
            if hasattr(self.sae, "prefix_errors"):  # Matryoshka: each prefix's own error
                errs = (self.sae.prefix_errors(self._decoded_target(x_s, y_s), f_s)
                        / self.target_scale ** 2)
                stats.prefix_err = errs if stats.prefix_err is None else stats.prefix_err + errs
            _shrinkage(stats, y_s, y_hat)
            on = f_s > 0
            stats.l0 += float(on.sum())
            stats.fired += on.sum(0)
            stats.act_sum += f_s.sum(0).cpu().double()
            if f_s.shape[0]:
                stats.act_max = torch.maximum(stats.act_max, f_s.max(0).values)
            ids_c = ids[c0:c0 + per].to(self.device)
            cand = self._candidates(f, ids_c, start + c0)
            top = top.merge(cand)
            if sample is not None and stats.hist is not None:
                stats.contexts_fired += (f.reshape(-1, t, self.d_sae).amax(1) > 0).sum(0)
                row, lat = (f > 0).nonzero(as_tuple=True)
                values = f[row, lat]
                stats.hist.add(lat, values)
                sample = sample.merge(self._sample_candidates(f, ids_c, start + c0, row, lat,
                                                              values))
            del f, f_s
        return torch.cat(recons), top, sample

    def _windows(self, f: Tensor, ids: Tensor, row: Tensor, lat: Tensor
                 ) -> tuple[Tensor, Tensor]:
        """Token ids and latent activations [m, W] of the windows around rows ``row`` of ``f``
        [C*T, d_sae] for latents ``lat`` (-1 / 0 where the window leaves the context)."""
        t = ids.shape[1]
        ctx, pos = row // t, row % t
        offsets = torch.arange(-self.opt.window_before, self.opt.window_after + 1,
                               device=f.device)
        q = pos.unsqueeze(1) + offsets
        valid = (q >= 0) & (q < t)
        flat = ctx.unsqueeze(1) * t + q.clamp(0, t - 1)
        window_acts = f[flat, lat.unsqueeze(1)].masked_fill(~valid, 0.0)
        tokens = ids.reshape(-1)[flat].masked_fill(~valid, -1)
        return tokens, window_acts

    def _sample_candidates(self, f: Tensor, ids: Tensor, start: int, row: Tensor, lat: Tensor,
                           values: Tensor) -> Sample:
        """Each latent's ``sample_n`` firings with the smallest keys among these contexts
        (``row``, ``lat``, ``values``: the non-zero entries of ``f`` [C*T, d_sae])."""
        t, s = ids.shape[1], self.opt.sample_n
        out = Sample.empty(self.d_sae, s, self.W, f.device)
        if not row.numel():
            return out
        keys = sample_keys(start + row // t, row % t, lat)
        order = keys.argsort()
        order = order[lat[order].argsort(stable=True)]  # by latent, then by key
        lat_o = lat[order]
        counts = torch.bincount(lat_o, minlength=self.d_sae)
        rank = torch.arange(len(order), device=f.device) - (counts.cumsum(0) - counts)[lat_o]
        keep = rank < s
        order, lat_o, rank = order[keep], lat_o[keep], rank[keep]
        r = row[order]
        tokens, window_acts = self._windows(f, ids, r, lat_o)
        out.keys[lat_o, rank] = keys[order]
        out.top.acts[lat_o, rank] = values[order]
        out.top.context[lat_o, rank] = start + r // t
        out.top.position[lat_o, rank] = r % t
        out.top.tokens[lat_o, rank] = tokens
        out.top.window_acts[lat_o, rank] = window_acts
        return out

    def _candidates(self, f: Tensor, ids: Tensor, start: int) -> TopN:
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
        return TopN(vals.T.contiguous(), (ctx + start).T.contiguous(), pos.T.contiguous(),
                    tokens.contiguous(), window_acts.contiguous())


class BatchCache:
    """What the SAEs of one model share on one batch of contexts: the clean forward (one pass
    that captures every evaluator's input and target hooks; the logits of a causal LM) and, per
    spliced hook, the zero-ablated forward's log-likelihood. Made for each batch;
    ``evaluators`` in any order."""

    def __init__(self, evaluators: list[Evaluator]) -> None:
        self.evaluators = evaluators
        self._clean: tuple[dict[tuple[int, str], Any], Tensor | None] | None = None
        self._zero: dict[tuple[int, str], tuple[float, float]] = {}

    def clean(self, ev: Evaluator, ids: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``ev``'s input activations ``[B, T, d_in]`` float32, its targets ``[B, T, d_out]``
        (the same tensor for an SAE) and the logits (None for a model that is not a causal LM:
        it runs only as far as the deepest hook)."""
        if self._clean is None:
            self._clean = self._clean_pass(ev, ids)
        acts, logits = self._clean
        b, t = ids.shape
        x = ev._checked(acts[ev.hook], b, t)
        y = ev._checked(acts[ev.target], b, t, target=True) if ev.transcoder else x
        return x, y, logits

    def _clean_pass(self, asking: Evaluator, ids: Tensor
                    ) -> tuple[dict[tuple[int, str], Any], Tensor | None]:
        hooks = list(dict.fromkeys(h for e in self.evaluators for h in (e.hook, e.target)))
        model = asking.model
        if not asking.causal:
            outs = run_to_many(model, hooks, input_ids=ids)
            return {h: _float_copy(out) for h, out in zip(hooks, outs, strict=True)}, None
        captured: dict[tuple[int, str], Any] = {}

        def capture(hook: tuple[int, str]) -> Any:
            def keep(act: Tensor) -> None:
                if hook not in captured:  # a module reused within one forward: its first call
                    captured[hook] = _float_copy(act)
            return keep

        handles = [add_hook(hook_module(model, *h), h[1], capture(h)) for h in hooks]
        try:
            out = model(input_ids=ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        for h in hooks:
            if h not in captured:
                raise hook_not_reached(model, *h)
        return captured, out.logits if hasattr(out, "logits") else out[0]

    def zero_ablation(self, ev: Evaluator, ids: Tensor, clean: Tensor) -> tuple[float, float]:
        """``ev.zero_ablation``, run once per spliced hook (``ev.target``)."""
        if ev.target not in self._zero:
            self._zero[ev.target] = ev.zero_ablation(ids, clean)
        return self._zero[ev.target]


def _float_copy(act: Any) -> Any:
    """A float32 copy of a captured activation (anything else as it is: ``_checked`` says
    why it cannot be read)."""
    return act.detach().to(torch.float32, copy=True) if isinstance(act, Tensor) else act


def _shrinkage(stats: Totals, x: Tensor, x_hat: Tensor) -> None:
    """Add SAEBench's per-token norms, ratio and cosine of ``x`` and ``x_hat`` [n, d]."""
    if not x.shape[0]:
        return
    n_in, n_out = x.norm(dim=1), x_hat.norm(dim=1)
    stats.l2_in += float(n_in.sum())
    stats.l2_out += float(n_out.sum())
    stats.l2_ratio += float((n_out / torch.where(n_in < 1e-4, 1.0, n_in)).sum())
    stats.cossim += float(F.cosine_similarity(x, x_hat, dim=1).sum())
    stats.xhat_sq += float(n_out.pow(2).sum())
    stats.x_dot_xhat += float((x * x_hat).sum())
