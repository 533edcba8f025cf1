"""The parameters and helpers every SAE type shares; one subclass per type beside this file.

Shapes: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] — the SAELens
layout, so export is a copy. On (normalised) inputs x every type computes

    pre = (x - b_dec) @ W_enc + b_enc,  f = its activation of pre,  x_hat = f @ W_dec + b_dec

and a per-element MSE (comparable across widths) plus its own auxiliary term. A subclass sets
the class attributes below (and ``penalty`` when it has a sparsity penalty) and implements
``encode`` (dense latents at inference) and ``forward`` (the training loss, a
``ForwardOutput``); it may override ``config_options`` (constructor keywords derived from the
config), the hooks the trainer calls (``init_latents``, ``start_thresholds``,
``constrain_grads``, ``after_step``) and the SAELens mapping (``saelens_cfg``,
``saelens_options``, ``thresholds``). The trainer never asks a type's name.

With ``tie_weights`` (standard only) W_dec is the transpose of W_enc, not a parameter of its
own; ``state_dict`` then holds W_enc, b_enc, b_dec only.

Transcoders (``make_transcoder``, any type): the input x is read at one hook point and the
output predicts a target y read at another (e.g. the MLP's input -> its output), so

    pre = x @ W_enc + b_enc  (no b_dec: it lives in y's space),
    y_hat = f @ W_dec + b_dec [+ x @ W_skip with a skip connection],

and every type's ``forward(x, target=...)`` measures its error against the given target instead
of x. The trainer passes ``loss_target(x, y)`` = y - x @ W_skip, so the type's own decode
(f @ W_dec + b_dec) is trained against what the skip leaves: the same loss and gradients as
reconstructing y with the skip term added, with no change to the sparse decode kernels.
``reconstruct(x, f)`` is the full output at inference (evaluation, export checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from . import get

if TYPE_CHECKING:
    from ..config import TrainConfig


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm, started from the mean."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * y.norm().clamp_min(1):
            return y_new
        y = y_new
    return y


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    loss: Tensor
    mse: Tensor
    aux: Tensor
    """Sparsity penalty (standard, jumprelu) or AuxK loss (topk, batchtopk), already weighted."""
    l0: Tensor
    """Mean active latents per token."""
    fired: Tensor
    """Firing count per latent in this batch [d_sae] (int64)."""
    min_kept: Tensor | None = None
    """BatchTopK training: the smallest positive selected activation (feeds the running
    threshold, see ``BatchTopKSAE.after_step``); None for the other types."""


class SAE(nn.Module):
    encoder_type: ClassVar[str]
    """The registry name (``architectures.get(encoder_type)``)."""
    saelens_architecture: ClassVar[str]
    """The ``architecture`` written to SAELens's cfg.json (a type SAELens runs at inference)."""
    unit_decoder: ClassVar[bool] = False
    """Keep decoder rows at unit norm (the L0 / top-k sparsity cannot be gamed by rescaling,
    and a unit decoder keeps JumpReLU thresholds in input units)."""

    def __init__(self, d_in: int, d_sae: int, *, tie_weights: bool = False) -> None:
        super().__init__()
        self.d_in, self.d_sae, self.tie_weights = d_in, d_sae, tie_weights
        self.penalty = 0.0
        """The sparsity penalty's coefficient before warm-up (l1_alpha, l0_coef); 0 for types
        whose auxiliary term is not a penalty (the trainer reports ``aux`` as sparsity_loss
        only when this is set)."""
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        if not tie_weights:
            self.register_parameter("W_dec", nn.Parameter(torch.empty(d_sae, d_in)))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.transcoder = False
        """Input and target at different hook points (``make_transcoder``)."""
        self.W_skip: Tensor | None = None
        """A transcoder's learned linear skip [d_in, d_out] (None without one)."""
        self.reset_parameters()

    def make_transcoder(self, skip_connection: bool = False) -> SAE:
        """Turn this (untrained) SAE into a transcoder: the encoder no longer subtracts b_dec
        (the output bias, in the target's space) and, with ``skip_connection``, the output
        gains x @ W_skip (a learned [d_in, d_out] matrix starting at zero). Returns self."""
        self.transcoder = True
        if skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(self.d_in, self.d_in,
                                                   device=self.W_enc.device))
        return self

    @classmethod
    def from_config(cls, d_in: int, d_sae: int, cfg: TrainConfig) -> SAE:
        """An untrained SAE of this type for a training run with ``cfg`` (a transcoder when
        it names a target hook point)."""
        sae = cls(d_in, d_sae, **cls.config_options(cfg, d_in, d_sae))
        if cfg.target_hook_point:
            sae.make_transcoder(cfg.skip_connection)
        return sae

    @classmethod
    def config_options(cls, cfg: TrainConfig, d_in: int, d_sae: int) -> dict[str, Any]:
        """Constructor keywords from ``cfg``: the options this type uses (its registry entry's
        ``options``, which are its constructor's keyword names); types add derived ones."""
        return {name: getattr(cfg, name) for name in get(cls.encoder_type).options}

    @property
    def W_dec(self) -> Tensor:
        """The decoder [d_sae, d_in]; with tied weights a view of W_enc's transpose."""
        if self.tie_weights:
            return self.W_enc.t()
        try:
            return self._parameters["W_dec"]
        except KeyError:  # before registration (nn.Module.register_parameter asks hasattr)
            raise AttributeError("W_dec") from None

    # ------------------------------------------------------------------ forward
    def enc_bias(self) -> Tensor:
        """b_enc - b_dec @ W_enc: pre = x @ W_enc + this, so that backward needs no [n, d_in]
        input gradient (b_dec reaches the pre-activations through one vector-matrix product).
        A transcoder's is b_enc alone."""
        if self.transcoder:
            return self.b_enc
        return self.b_enc - self.b_dec @ self.W_enc

    def pre_acts(self, x: Tensor) -> Tensor:
        return x @ self.W_enc + self.enc_bias()

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations [n, d_sae] at inference (evaluation, export checks)."""
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def reconstruct(self, x: Tensor, f: Tensor | None = None) -> Tensor:
        """The output for inputs ``x`` (latents ``f`` = ``encode(x)`` unless given): the
        decoded latents, plus a transcoder's skip term."""
        out = self.decode(self.encode(x) if f is None else f)
        if self.W_skip is not None:
            out = out + x.to(self.W_skip.dtype) @ self.W_skip
        return out

    def loss_target(self, x: Tensor, y: Tensor | None) -> Tensor | None:
        """What the type's decode is trained to match: ``y`` (None: x itself), less the skip
        term (with its gradient) for a skip transcoder."""
        if y is None or self.W_skip is None:
            return y
        return y.float() - x.float() @ self.W_skip.float()

    def forward(self, x: Tensor, *, target: Tensor | None = None, sparsity_coef: float = 0.0,
                dead_mask: Tensor | None = None) -> ForwardOutput:
        """The training loss on ``x`` [n, d_in]: the error of the decoded latents against
        ``target`` (a transcoder's ``loss_target``; None: x). ``sparsity_coef``: the
        (warmed-up) penalty coefficient of types with one; ``dead_mask`` [d_sae]: latents
        counted dead (AuxK). ``x_hat`` is the decoded latents without a skip term."""
        raise NotImplementedError

    @staticmethod
    def mse(x: Tensor, x_hat: Tensor) -> Tensor:
        """Per-element mean squared error, in fp32."""
        return (x_hat.float() - x.float()).pow(2).mean()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.set_decoder(torch.randn(self.d_sae, self.d_in, generator=generator))

    @torch.no_grad()
    def set_decoder(self, directions: Tensor) -> None:
        """Decoder rows = the given directions at unit norm; encoder = decoder transpose."""
        w = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_enc.copy_(w.T)
        if not self.tie_weights:
            self.W_dec.copy_(w)

    @torch.no_grad()
    def init_from_sample(self, sample: Tensor, *, b_dec_init: str = "geometric_median",
                         from_data: bool = True, seed: int = 0,
                         target: Tensor | None = None) -> None:
        """Initialise from ``sample`` [m, d_in] (normalised inputs, on the CPU): b_dec its
        geometric median, mean or zeros; decoder rows (at unit norm) centred sample vectors
        (``from_data``; random directions, drawn with ``seed``, for the rest); then the encoder's
        scale and the thresholds (``init_encoder_scale`` on 4,096 of the vectors).

        A transcoder's ``target`` [m, d_out] (its normalised targets, row for row): b_dec
        comes from the targets, and a latent drawn from the data reads its token's centred
        input (the encoder column) and writes its centred target (the decoder row)."""
        device = self.W_enc.device
        out = sample if target is None else target
        if b_dec_init == "geometric_median":
            b_dec = geometric_median(out[:8192])
        elif b_dec_init == "mean":
            b_dec = out.mean(0)
        else:
            b_dec = torch.zeros(out.shape[1])
        self.b_dec.copy_(b_dec.to(device))
        g = torch.Generator().manual_seed(seed)
        directions = torch.randn(self.d_sae, self.d_in, generator=g)
        pick = torch.randperm(sample.shape[0], generator=g)[:min(self.d_sae, sample.shape[0])]
        if from_data:
            directions[:len(pick)] = out[pick] - b_dec
        self.set_decoder(directions.to(device))
        if target is not None and from_data:  # the encoder reads the same tokens' inputs
            reads = torch.randn(self.d_sae, self.d_in, generator=g)
            reads[:len(pick)] = sample[pick] - sample.mean(0)
            reads = reads / reads.norm(dim=1, keepdim=True).clamp_min(1e-8)
            self.W_enc.copy_(reads.T.to(device))
        self.init_encoder_scale(sample[:4096].to(device),
                                None if target is None else target[:4096].to(device))

    def init_latents(self, x: Tensor) -> Tensor:
        """The latents that size the encoder at initialisation (``init_encoder_scale``)."""
        return self.encode(x)

    @torch.no_grad()
    def init_encoder_scale(self, x: Tensor, y: Tensor | None = None) -> None:
        """Scale the encoder so the first reconstructions of ``x`` (a data sample, after b_dec
        and the decoder directions are set) have the right size: the least-squares factor
        between (x_hat - b_dec) and (x - b_dec) (a transcoder's: its targets ``y`` - b_dec).
        Without it, k latents aligned with x each fire at ~||x|| and the SAE spends its first
        steps shrinking them."""
        centred = (x if y is None else y) - self.b_dec
        f = self.init_latents(x)
        recon = self.decode(f) - self.b_dec
        denom = recon.pow(2).sum()
        if denom > 0:
            factor = ((recon * centred).sum() / denom).clamp(1e-3, 1e3)
            if self.tie_weights:  # scaling W_enc scales the decoder too: recon ~ factor^2
                factor = factor.sqrt()
            self.W_enc.mul_(factor)
            self.start_thresholds(f, factor)

    def start_thresholds(self, f: Tensor, factor: Tensor) -> None:
        """Types with thresholds set them from the initial latents ``f`` (before the encoder
        was scaled by ``factor``)."""

    # ------------------------------------------------------------------ around a step
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component that would change decoder row norms (kept at 1)."""
        if self.tie_weights or self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        g.sub_((g * w).sum(dim=1, keepdim=True) * w)

    def constrain_grads(self) -> None:
        """Before clipping and the optimizer step (gradients unscaled)."""
        if self.unit_decoder:
            self.remove_parallel_grad()

    def after_step(self, min_kept: Tensor | None) -> None:
        """After the optimizer step; ``min_kept``: the step's ``ForwardOutput.min_kept``
        (averaged over micro-batches), when the type reports one."""
        if self.unit_decoder:
            self.normalize_decoder()

    # ------------------------------------------------------------------ SAELens
    def thresholds(self) -> Tensor | None:
        """Per-latent inference threshold [d_sae] (written as SAELens's ``threshold``)."""
        return None

    def saelens_cfg(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Extra cfg.json keys: (top level, ``metadata``)."""
        return {}, {}

    def transcoder_architecture(self) -> str | None:
        """SAELens's architecture for this type as a transcoder (``transcoder``,
        ``skip_transcoder``, ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``), or None
        where SAELens has none (the export then writes our own format)."""
        skip = "skip_" if self.W_skip is not None else ""
        if self.saelens_architecture == "standard":
            return f"{skip}transcoder"
        if self.saelens_architecture == "jumprelu":
            return f"jumprelu_{skip}transcoder"
        return None

    @classmethod
    def saelens_options(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """Constructor options read back from a SAELens cfg.json of this architecture."""
        return {}
