"""BatchTopK SAE: in training, the k x n largest relu(pre) over the whole micro-batch of n tokens
(k active latents per token on average, variable per token); at inference, JumpReLU with one
running threshold (the ``threshold`` buffer, broadcast to every latent), which is how it is
exported to SAELens (``"architecture": "jumprelu"``, the training k in the metadata).

The running threshold moves after each step towards the smallest kept activation (an
exponential moving average with weight ``batchtopk_threshold_momentum``); it starts at the
smallest kept activation of the initialisation sample. Loss and AuxK as TopK.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import kernels
from .base import ForwardOutput
from .topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    encoder_type = "batchtopk"
    saelens_architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, *, k: int, aux_k: int = 0,
                 aux_k_coef: float = 0.0, aux_k_frac: float = 1.0,
                 batchtopk_threshold_momentum: float = 0.1) -> None:
        super().__init__(d_in, d_sae, k=k, aux_k=aux_k, aux_k_coef=aux_k_coef,
                         aux_k_frac=aux_k_frac)
        self.momentum = batchtopk_threshold_momentum
        self.register_buffer("threshold", torch.zeros(()))

    def thresholds(self) -> Tensor:
        return self.threshold.expand(self.d_sae)

    def encode(self, x: Tensor) -> Tensor:
        """With the running threshold (as SAELens runs the export)."""
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold)

    def encode_batch_topk(self, x: Tensor) -> Tensor:
        """Dense latents of the training selection (k x n largest over the batch)."""
        return kernels.batch_topk_latents(self.pre_acts(x), self.k)

    def select(self, x: Tensor, bias: Tensor) -> tuple[Tensor, kernels.CSR, Tensor]:
        return kernels.batch_topk_train_select(x, self.W_enc, bias, self.k)

    def forward(self, x: Tensor, *, target: Tensor | None = None, sparsity_coef: float = 0.0,
                dead_mask: Tensor | None = None) -> ForwardOutput:
        if self.training:
            return super().forward(x, target=target, dead_mask=dead_mask)
        # inference (the trainer's held-out evaluation): the fixed threshold, no gradient path
        f = self.encode(x)
        x_hat = self.decode(f)
        mse = self.mse(x if target is None else target, x_hat)
        l0, fired = kernels.active_stats(f > 0)
        return ForwardOutput(x_hat, mse, mse, mse.new_zeros(()), l0, fired)

    def min_kept(self, vals: Tensor, on: Tensor) -> Tensor:
        """The smallest positive kept activation (0 when none), without a host sync."""
        if not vals.numel():
            return vals.new_zeros((), dtype=torch.float32)
        least = vals.detach().float().masked_fill(~on, float("inf")).amin()
        return torch.where(on.any(), least, torch.zeros_like(least))

    # ------------------------------------------------------------------ trainer hooks
    def init_latents(self, x: Tensor) -> Tensor:
        return self.encode_batch_topk(x)

    def start_thresholds(self, f: Tensor, factor: Tensor) -> None:
        kept = f[f > 0]
        self.threshold.fill_(float(kept.min() * factor) if kept.numel() else 0.0)

    @torch.no_grad()
    def update_threshold(self, value: float | Tensor, momentum: float) -> None:
        """Move the running inference threshold towards ``value`` (exponential moving average
        with weight ``momentum`` on the new value)."""
        self.threshold.lerp_(torch.as_tensor(value, dtype=self.threshold.dtype,
                                             device=self.threshold.device), momentum)

    def after_step(self, min_kept: Tensor | None) -> None:
        super().after_step(min_kept)
        if min_kept is not None:
            self.update_threshold(min_kept, self.momentum)

    def saelens_cfg(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {"k": self.k}  # the training k; SAELens runs it as jumprelu
