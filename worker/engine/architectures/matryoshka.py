"""Matryoshka BatchTopK SAE: BatchTopK whose nested prefixes of the dictionary each reconstruct
the input on their own (Bussmann et al. 2025, https://arxiv.org/abs/2503.17547).

The prefixes are the first w_1 < w_2 < ... < w_L = d_sae latents (``matryoshka_widths``). The
selection is BatchTopK's over all the latents (k x n over the micro-batch); the prefix of width
w reconstructs x from the selected latents below w alone, x_hat_w = sum_{j < w} f_j W_dec[j] +
b_dec, and

    loss = sum over the L prefixes of mse(x, x_hat_w) + aux_k_coef * auxk,

each MSE per element as every type's, with equal weights, as SAELens's
``MatryoshkaBatchTopKTrainingSAE`` (its outer level is the whole SAE's MSE, plus one inner MSE
per smaller width, each summed over d_in and averaged over tokens: ours divided by d_in). AuxK
is BatchTopK's, on the whole SAE's residual. The reported ``mse`` (and the FVU) is the whole
SAE's.

The prefix reconstructions come from the sparse selection in one ``kernels.BagDecode``: a
token's selected latents are sorted by latent id (row-major), so its bag splits into one
contiguous sub-bag per level (latents in [w_{l-1}, w_l)); the level sums, cumulated over the
levels, are the prefix reconstructions. Decoding therefore costs what BatchTopK's does, plus
[n, L, d_in] of sums. At inference this is BatchTopK (the running threshold), exported to
SAELens as ``jumprelu`` with the widths in the metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import kernels
from ..config import matryoshka_widths as parse_widths
from .base import ForwardOutput
from .batchtopk import BatchTopKSAE

if TYPE_CHECKING:
    from ..config import TrainConfig


def level_sums(csr: kernels.CSR, vals: Tensor, w_dec: Tensor, widths: Sequence[int]) -> Tensor:
    """Per token and level, the decoded sum of the selected latents in [w_{l-1}, w_l) (without
    b_dec) [n, L, d_in], through autograd. ``csr`` and ``vals``: BatchTopK's selection (a
    token's latent ids increasing, so its levels are too): each entry goes to the sub-bag
    (token, level), one ``BagDecode`` over n x L bags."""
    n, levels = csr.shape[0], len(widths)
    bounds = torch.tensor(widths[:-1], device=csr.cols.device)
    level = torch.bucketize(csr.cols, bounds, right=True)
    sub = csr.regroup(csr.rows * levels + level, n * levels)
    return kernels.BagDecode.apply(vals, w_dec, sub).view(n, levels, -1)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    encoder_type = "matryoshka_batchtopk"
    saelens_architecture = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, *, k: int, aux_k: int = 0,
                 aux_k_coef: float = 0.0, aux_k_frac: float = 1.0,
                 batchtopk_threshold_momentum: float = 0.1,
                 matryoshka_widths: Sequence[int] | str | None = None) -> None:
        super().__init__(d_in, d_sae, k=k, aux_k=aux_k, aux_k_coef=aux_k_coef,
                         aux_k_frac=aux_k_frac,
                         batchtopk_threshold_momentum=batchtopk_threshold_momentum)
        if matryoshka_widths is not None and not isinstance(matryoshka_widths, str):
            matryoshka_widths = ",".join(map(str, matryoshka_widths))
        self.matryoshka_widths: tuple[int, ...] = parse_widths(matryoshka_widths, d_sae)
        """The prefix widths, increasing, the last d_sae."""

    @classmethod
    def config_options(cls, cfg: TrainConfig, d_in: int, d_sae: int) -> dict[str, Any]:
        return dict(super().config_options(cfg, d_in, d_sae),
                    matryoshka_widths=cfg.prefix_widths(d_sae))

    def forward(self, x: Tensor, *, target: Tensor | None = None, sparsity_coef: float = 0.0,
                dead_mask: Tensor | None = None) -> ForwardOutput:
        if not self.training:  # the held-out evaluation: BatchTopK's inference
            return super().forward(x, target=target, dead_mask=dead_mask)
        y = x if target is None else target
        bias = self.enc_bias()
        vals, csr, pre = self.select(x, bias)
        vals = vals.relu()
        prefix = level_sums(csr, vals, self.W_dec, self.matryoshka_widths).cumsum(1)
        errs = y.float()[:, None, :] - (prefix.float() + self.b_dec.float())  # [n, L, d_in]
        level_mse = errs.pow(2).mean(dim=(0, 2))
        x_hat = prefix[:, -1] + self.b_dec
        aux = self._auxk(x, pre, bias, errs[:, -1], dead_mask)
        on = vals > 0
        fired = kernels.fired_counts(csr.cols, on, self.d_sae)
        l0 = on.sum().float() / x.shape[0]
        return ForwardOutput(x_hat, level_mse.sum() + aux, level_mse[-1], aux, l0, fired,
                             self.min_kept(vals, on))

    @torch.no_grad()
    def prefix_errors(self, x: Tensor, f: Tensor) -> Tensor:
        """Summed squared error of each prefix's reconstruction of ``x`` [n, d_in] from the
        dense latents ``f`` [n, d_sae] (the evaluation's), per width [L] (float64)."""
        recon = self.b_dec.float().expand_as(x).clone()
        out, lo = [], 0
        for w in self.matryoshka_widths:
            recon += f[:, lo:w].float() @ self.W_dec[lo:w].float()
            out.append(float((x.float() - recon).pow(2).sum()))
            lo = w
        return torch.tensor(out, dtype=torch.float64)

    def saelens_cfg(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {}, {"k": self.k, "matryoshka_widths": list(self.matryoshka_widths)}
