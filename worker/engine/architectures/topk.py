"""TopK SAE: f = relu(topk(pre, k)), the k largest pre-activations per token.

loss = mse + aux_k_coef * auxk, where auxk is the normalised error of reconstructing the residual
(x - x_hat) from the top ``aux_k`` *dead* latents (without b_dec), on a random ``aux_k_frac`` of
the rows. The training step is sparse past the encoder's dense product: decoding reads the k
selected decoder rows per token and both weight gradients touch only the selected (token,
latent) entries (``kernels.topk_select``, ``kernels.BagDecode``). Decoder rows are kept at
unit norm. BatchTopK (``batchtopk.py``) is this type with another selection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import kernels
from .base import SAE, ForwardOutput

if TYPE_CHECKING:
    from ..config import TrainConfig


class TopKSAE(SAE):
    encoder_type = "topk"
    saelens_architecture = "topk"
    unit_decoder = True

    def __init__(self, d_in: int, d_sae: int, *, k: int, aux_k: int = 0,
                 aux_k_coef: float = 0.0, aux_k_frac: float = 1.0) -> None:
        super().__init__(d_in, d_sae)
        self.k = k
        self.aux_k, self.aux_k_coef, self.aux_k_frac = aux_k, aux_k_coef, aux_k_frac
        """AuxK: dead latents used, weight of the term, fraction of rows it is computed on."""

    @classmethod
    def config_options(cls, cfg: TrainConfig, d_in: int, d_sae: int) -> dict[str, Any]:
        return dict(super().config_options(cfg, d_in, d_sae), aux_k=cfg.k_aux(d_in, d_sae))

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def select(self, x: Tensor, bias: Tensor) -> tuple[Tensor, kernels.CSR, Tensor]:
        """Training selection: (the selected pre-activations [entries] through autograd, their
        pattern, the detached pre-activations [n, d_sae])."""
        return kernels.topk_select(x, self.W_enc, bias, self.k)

    def forward(self, x: Tensor, *, target: Tensor | None = None, sparsity_coef: float = 0.0,
                dead_mask: Tensor | None = None) -> ForwardOutput:
        y = x if target is None else target
        bias = self.enc_bias()  # the pre-activation offset, through autograd
        vals, csr, pre = self.select(x, bias)
        vals = vals.relu()
        x_hat = kernels.BagDecode.apply(vals, self.W_dec, csr) + self.b_dec
        err = y.float() - x_hat.float()
        mse = err.pow(2).mean()
        aux = self._auxk(x, pre, bias, err, dead_mask)
        on = vals > 0
        fired = kernels.fired_counts(csr.cols, on, self.d_sae)
        l0 = on.sum().float() / x.shape[0]
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired, self.min_kept(vals, on))

    def min_kept(self, vals: Tensor, on: Tensor) -> Tensor | None:
        """The step's statistic for ``after_step`` (BatchTopK's running threshold)."""
        return None

    def _auxk(self, x: Tensor, pre: Tensor, bias: Tensor, err: Tensor,
              dead_mask: Tensor | None) -> Tensor:
        """AuxK: the top aux_k dead latents reconstruct the residual (without b_dec)."""
        aux = err.new_zeros(())
        if dead_mask is None or self.aux_k_coef <= 0 or self.aux_k <= 0:
            return aux
        dead_idx = dead_mask.nonzero().squeeze(1)
        if dead_idx.numel() == 0:
            return aux
        kk = min(self.aux_k, dead_idx.numel())
        rows = max(1, int(x.shape[0] * self.aux_k_frac))  # a random subset: rows are shuffled
        # Select on the detached pre-activations (the dead columns of a fraction of the rows);
        # the chosen entries' values and decode go through the sparse step's kernels.
        a_pos = pre[:rows].index_select(1, dead_idx).topk(kk, dim=-1, sorted=False)[1]
        csr = kernels.CSR.from_bags(dead_idx[a_pos].reshape(-1), kk, (rows, self.d_sae))
        vals = kernels.SparsePreActs.apply(x[:rows], self.W_enc, bias, pre[:rows], csr)
        e_hat = kernels.BagDecode.apply(vals.relu(), self.W_dec, csr)
        e = err[:rows].detach()
        denom = (e - e.mean(0)).pow(2).sum().clamp_min(1e-8)
        auxk = (e_hat.float() - e).pow(2).sum() / denom
        return self.aux_k_coef * torch.nan_to_num(auxk, nan=0.0)

    def saelens_cfg(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"k": self.k}, {}

    @classmethod
    def saelens_options(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"k": int(cfg["k"])}
