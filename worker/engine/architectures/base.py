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
        self.reset_parameters()

    @classmethod
    def from_config(cls, d_in: int, d_sae: int, cfg: TrainConfig) -> SAE:
        """An untrained SAE of this type for a training run with ``cfg``."""
        return cls(d_in, d_sae, **cls.config_options(cfg, d_in, d_sae))

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
        input gradient (b_dec reaches the pre-activations through one vector-matrix product)."""
        return self.b_enc - self.b_dec @ self.W_enc

    def pre_acts(self, x: Tensor) -> Tensor:
        return x @ self.W_enc + self.enc_bias()

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations [n, d_sae] at inference (evaluation, export checks)."""
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, *, sparsity_coef: float = 0.0,
                dead_mask: Tensor | None = None) -> ForwardOutput:
        """The training loss on ``x`` [n, d_in]. ``sparsity_coef``: the (warmed-up) penalty
        coefficient of types with one; ``dead_mask`` [d_sae]: latents counted dead (AuxK)."""
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
                         from_data: bool = True, seed: int = 0) -> None:
        """Initialise from ``sample`` [m, d_in] (normalised inputs, on the CPU): b_dec its
        geometric median, mean or zeros; decoder rows (at unit norm) centred sample vectors
        (``from_data``; random directions, drawn with ``seed``, for the rest); then the encoder's
        scale and the thresholds (``init_encoder_scale`` on 4,096 of the vectors)."""
        device = self.W_enc.device
        if b_dec_init == "geometric_median":
            b_dec = geometric_median(sample[:8192])
        elif b_dec_init == "mean":
            b_dec = sample.mean(0)
        else:
            b_dec = torch.zeros(self.d_in)
        self.b_dec.copy_(b_dec.to(device))
        g = torch.Generator().manual_seed(seed)
        directions = torch.randn(self.d_sae, self.d_in, generator=g)
        if from_data:
            n = min(self.d_sae, sample.shape[0])
            pick = torch.randperm(sample.shape[0], generator=g)[:n]
            directions[:n] = sample[pick] - b_dec
        self.set_decoder(directions.to(device))
        self.init_encoder_scale(sample[:4096].to(device))

    def init_latents(self, x: Tensor) -> Tensor:
        """The latents that size the encoder at initialisation (``init_encoder_scale``)."""
        return self.encode(x)

    @torch.no_grad()
    def init_encoder_scale(self, x: Tensor) -> None:
        """Scale the encoder so the first reconstructions of ``x`` (a data sample, after b_dec
        and the decoder directions are set) have the right size: the least-squares factor
        between (x_hat - b_dec) and (x - b_dec). Without it, k latents aligned with x each fire
        at ~||x|| and the SAE spends its first steps shrinking them."""
        centred = x - self.b_dec
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

    @classmethod
    def saelens_options(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """Constructor options read back from a SAELens cfg.json of this architecture."""
        return {}
