"""JumpReLU SAE: f = pre * (pre > theta) with a learned threshold theta [d_sae] (kept >= 0).

loss = mse + l0_coef * mean_tokens(L0) / d_in — i.e. (sum of squared errors + l0_coef x L0) /
d_in per token, the GDM/SAELens loss on our per-element scale. The step function and the JumpReLU
get a straight-through gradient for the threshold with a rectangle kernel of width
``bandwidth`` (Rajamanoharan et al. 2024). Training takes the sparse CSR step on the CPU when
few entries are active or inside the straight-through window (``kernels.threshold_pre_acts``).
Decoder rows are kept at unit norm, so thresholds stay in input units.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import kernels
from .base import SAE, ForwardOutput

if TYPE_CHECKING:
    from ..config import TrainConfig


TARGET_START = 0.1
"""Under a target L0 the controller starts from this fraction of ``l0_coef``: with its
straight-through gradient also on the pre-activations the penalty is far stronger than on the
thresholds alone. On SmolLM2-135M layer 15 (8x, target 64) the controller ended near 0.11-0.15
from any start; from the default 5 the first 10% of the steps at full strength collapsed L0 to
~8, and the recovery overshot (held-out L0 72.5, +13%, FVU 0.214); from 0.5 L0 did not collapse
(FVU 0.154)."""


class JumpReLUSAE(SAE):
    encoder_type = "jumprelu"
    saelens_architecture = "jumprelu"
    unit_decoder = True

    def __init__(self, d_in: int, d_sae: int, *, l0_coef: float = 0.0,
                 jumprelu_bandwidth: float = 0.05, jumprelu_init_threshold: float | None = None,
                 k: int = 32, target_l0: float | None = None) -> None:
        super().__init__(d_in, d_sae)
        self.penalty = l0_coef if target_l0 is None else l0_coef * TARGET_START
        """The L0 coefficient; under a target L0 the controller's start (``TARGET_START``)."""
        self.target_l0 = target_l0
        """The trainer's controller steers the penalty toward this L0 (None: fixed penalty)."""
        self.penalty_to_pre = target_l0 is not None
        """The L0 penalty's straight-through gradient also reaches the pre-activations (so the
        encoder), not only the thresholds. Under Adam a threshold moves at most ~lr per step
        whatever the coefficient, so a penalty on the thresholds alone saturates (SAELens
        #494): pre-activations outgrow it and L0 rises however high the coefficient goes. On
        with a target L0, whose controller needs a coefficient that acts."""
        self.bandwidth = jumprelu_bandwidth
        self.init_threshold = jumprelu_init_threshold
        """The thresholds' start; None = where ``k`` latents per token fire on the
        initialisation sample (BatchTopK's selection)."""
        self.k = k
        self.threshold = nn.Parameter(torch.full((d_sae,), float(jumprelu_init_threshold or 0.0)))
        self.sparse_max_density = kernels.SPARSE_MAX_DENSITY
        """Set to 0 to force the dense step, to 1 to force the sparse one (on the CPU)."""
        self.sparse_steps = 0
        """Forward passes that took the sparse path."""

    @classmethod
    def config_options(cls, cfg: TrainConfig, d_in: int, d_sae: int) -> dict[str, Any]:
        """Plus ``k``: the initial thresholds are where cfg.k latents per token would fire,
        unless jumprelu_init_threshold is set (k is not among the type's options, so the form
        does not ask for it)."""
        return dict(super().config_options(cfg, d_in, d_sae), k=cfg.k)

    def thresholds(self) -> Tensor:
        return self.threshold

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold)

    def forward(self, x: Tensor, *, target: Tensor | None = None,
                sparsity_coef: float | Tensor = 0.0,
                dead_mask: Tensor | None = None) -> ForwardOutput:
        y = x if target is None else target
        # The sparse step keeps a superset of the active entries and of the straight-through
        # window (pre - theta) / bw > -1/2; entries outside both get no value and no gradient.
        floor = self.threshold.detach() - 0.75 * self.bandwidth
        pre, csr = kernels.threshold_pre_acts(x, self.W_enc, self.enc_bias(), floor,
                                              self.sparse_max_density)
        if csr is None:
            return self._dense(y, pre, sparsity_coef)
        self.sparse_steps += 1
        n = x.shape[0]
        theta = self.threshold.index_select(0, csr.cols)
        theta_c = theta.detach()
        p = pre.detach().float()
        active = p > theta_c
        window = kernels.rectangle((p - theta_c) / self.bandwidth)
        st = theta - theta_c  # value 0, gradient 1 to the threshold
        f = pre.float() * active + st * (-(theta_c / self.bandwidth) * window)
        decoded, l0, fired = kernels.csr_decode(f, self.W_dec, csr)
        x_hat = decoded + self.b_dec
        mse = self.mse(y, x_hat)
        if isinstance(sparsity_coef, Tensor) or sparsity_coef > 0:  # a tensor: target-L0 control
            step = active.float() + st * (-window / self.bandwidth)
            if self.penalty_to_pre:  # value 0, gradient window / bandwidth to pre
                step = step + (pre.float() - p) * (window / self.bandwidth)
            aux = sparsity_coef * (step.sum() / n) / self.d_in
        else:
            aux = mse.new_zeros(())
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired)

    def _dense(self, y: Tensor, pre: Tensor, l0_coef: float | Tensor) -> ForwardOutput:
        """The dense step on pre-activations ``pre``; ``y`` the decode's target."""
        theta = self.threshold
        f = kernels.JumpReLUFn.apply(pre, theta, self.bandwidth)
        x_hat = f @ self.W_dec + self.b_dec
        mse = self.mse(y, x_hat)
        if isinstance(l0_coef, Tensor) or l0_coef > 0:
            l0_ste = kernels.StepFn.apply(pre, theta, self.bandwidth).sum(-1).mean()
            if self.penalty_to_pre:  # value 0, gradient window / bandwidth to pre
                p = pre.detach().float()
                window = kernels.rectangle((p - theta.detach()) / self.bandwidth)
                l0_ste = l0_ste + ((pre.float() - p) * window).sum(-1).mean() / self.bandwidth
            aux = l0_coef * l0_ste / self.d_in
        else:
            aux = mse.new_zeros(())
        l0, fired = kernels.active_stats(f.detach() > 0)
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired)

    # ------------------------------------------------------------------ trainer hooks
    def init_latents(self, x: Tensor) -> Tensor:
        """BatchTopK's selection: k latents per token on average."""
        return kernels.batch_topk_latents(self.pre_acts(x), self.k)

    def start_thresholds(self, f: Tensor, factor: Tensor) -> None:
        if self.init_threshold is not None:
            self.threshold.fill_(self.init_threshold)
        else:
            kept = f[f > 0]
            self.threshold.fill_(float(kept.min() * factor) if kept.numel() else 0.0)

    @torch.no_grad()
    def after_step(self, min_kept: Tensor | None) -> None:
        super().after_step(min_kept)
        self.threshold.clamp_(min=0.0)
