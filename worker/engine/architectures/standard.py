"""Standard SAE: f = relu(pre), loss = mse + l1_coef * mean_tokens(sum_i f_i * ||W_dec[i]||) / d_in.

The L1 term is weighted by the decoder row norms (rows are free to grow: no unit-norm
constraint). Training takes the sparse CSR step on the CPU when few latents are active
(``kernels.threshold_pre_acts``). ``tie_weights``: W_dec is W_enc's transpose (one matrix); the
SAELens export writes both.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from .base import SAE, ForwardOutput


class StandardSAE(SAE):
    encoder_type = "standard"
    saelens_architecture = "standard"

    def __init__(self, d_in: int, d_sae: int, *, l1_alpha: float = 0.0,
                 tie_weights: bool = False, target_l0: float | None = None) -> None:
        super().__init__(d_in, d_sae, tie_weights=tie_weights)
        self.penalty = l1_alpha
        self.target_l0 = target_l0
        """The trainer's controller steers the penalty toward this L0 (None: fixed penalty)."""
        self.sparse_max_density = kernels.SPARSE_MAX_DENSITY
        """Set to 0 to force the dense step, to 1 to force the sparse one (on the CPU)."""
        self.sparse_steps = 0
        """Forward passes that took the sparse path."""

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def forward(self, x: Tensor, *, target: Tensor | None = None,
                sparsity_coef: float | Tensor = 0.0,
                dead_mask: Tensor | None = None) -> ForwardOutput:
        y = x if target is None else target
        if self.tie_weights:  # the decoder is W_enc: plain autograd, dense
            return self._dense(y, self.pre_acts(x), sparsity_coef)
        pre, csr = kernels.threshold_pre_acts(x, self.W_enc, self.enc_bias(), 0.0,
                                              self.sparse_max_density)
        if csr is None:
            return self._dense(y, pre, sparsity_coef)
        self.sparse_steps += 1
        f = pre.float()  # every selected entry is > 0: f = relu(pre) there
        decoded, l0, fired = kernels.csr_decode(f, self.W_dec, csr)
        x_hat = decoded + self.b_dec
        mse = self.mse(y, x_hat)
        norms = self.W_dec.float().norm(dim=1).index_select(0, csr.cols)
        aux = sparsity_coef * ((f * norms).sum() / x.shape[0]) / self.d_in
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired)

    def _dense(self, y: Tensor, pre: Tensor, l1_coef: float | Tensor) -> ForwardOutput:
        """The dense step on pre-activations ``pre``; ``y`` the decode's target."""
        f = pre.relu()
        w_dec = self.W_dec
        x_hat = f @ w_dec + self.b_dec
        mse = self.mse(y, x_hat)
        # sum_i f_i ||W_dec[i]|| as a matrix-vector product (no [n, d_sae] temporary), in fp32
        with torch.autocast(f.device.type, enabled=False):
            weighted = (f.float() @ w_dec.float().norm(dim=1)).mean() / self.d_in
        aux = l1_coef * weighted
        l0, fired = kernels.active_stats(f.detach() > 0)
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired)
