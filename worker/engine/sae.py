"""The sparse autoencoder: one module, several encoder types.

Shapes: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] — the SAELens
layout, so export is a copy. Forward on (normalised) inputs x:

    pre = (x - b_dec) @ W_enc + b_enc
    standard: f = relu(pre)                        x_hat = f @ W_dec + b_dec
    topk:     f = relu(topk(pre, k)) (k per token)  x_hat = sum_i f_i W_dec[i] + b_dec

TopK never materialises the dense latent matrix for decoding: the decoder reads the k selected
rows per token with ``embedding_bag``. Losses (per-element MSE so values are comparable across
widths):

    standard: mse + l1_coef * mean_tokens(sum_i f_i * ||W_dec[i]||) / d_in
    topk:     mse + aux_k_coef * auxk, where auxk is the normalised error of reconstructing
              the residual (x - x_hat) from the top k_aux *dead* latents (without b_dec).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    loss: Tensor
    mse: Tensor
    aux: Tensor
    """Sparsity penalty (standard) or AuxK loss (topk), already weighted."""
    l0: Tensor
    """Mean active latents per token."""
    fired: Tensor
    """Firing count per latent in this batch [d_sae] (int64)."""


class _TopKEncode(torch.autograd.Function):
    """TopK selection whose backward touches only the k selected latents per token.

    Forward: pre = x @ W_enc + bias (dense: every pre-activation is needed to choose the top k),
    then the k largest per row. Backward: the gradient reaches W_enc only at the selected
    (token, latent) pairs, so instead of a dense [d_in, n] x [n, d_sae] product it is a sparse
    accumulation of k rows per token — computed by ``embedding_bag``'s backward, which sums
    g[b, j] * x[b] into row idx[b, j] without materialising a [n, k, d_in] tensor. The inputs
    ``x`` get no gradient (they are data).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, bias: Tensor, k: int):  # type: ignore[override]
        pre = torch.addmm(bias, x, w_enc)  # one fused pass; autocast makes it bf16/fp16
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, idx)
        ctx.shape = w_enc.shape
        ctx.mark_non_differentiable(idx, pre)
        return vals, idx, pre

    @staticmethod
    def backward(ctx, g_vals: Tensor, _g_idx: Tensor, _g_pre: Tensor):  # type: ignore[override]
        x, idx = ctx.saved_tensors
        d_in, d_sae = ctx.shape
        g = g_vals.float()
        g_bias = torch.zeros(d_sae, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        with torch.enable_grad():
            w_t = torch.zeros(d_sae, d_in, device=x.device, requires_grad=True)
            rows = F.embedding_bag(idx, w_t, per_sample_weights=g, mode="sum")
            (g_w_t,) = torch.autograd.grad(rows, w_t, grad_outputs=x.float())
        return None, g_w_t.t(), g_bias, None


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, encoder_type: str = "topk", k: int = 32) -> None:
        super().__init__()
        self.d_in, self.d_sae, self.encoder_type, self.k = d_in, d_sae, encoder_type, k
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.reset_parameters()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        w = torch.randn(self.d_sae, self.d_in, generator=generator)
        self.set_decoder(w)

    @torch.no_grad()
    def set_decoder(self, directions: Tensor) -> None:
        """Decoder rows = the given directions at unit norm; encoder = decoder transpose."""
        w = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component that would change decoder row norms (TopK keeps them 1)."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        g.sub_((g * w).sum(dim=1, keepdim=True) * w)

    # ------------------------------------------------------------------ forward
    def pre_acts(self, x: Tensor) -> Tensor:
        # = (x - b_dec) @ W_enc + b_enc, arranged so that backward needs no [n, d_in] input
        # gradient: b_dec reaches the pre-activations through one vector-matrix product.
        return x @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations [n, d_sae] (for evaluation and export checks)."""
        pre = self.pre_acts(x)
        if self.encoder_type == "topk":
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        return pre.relu()

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(
        self,
        x: Tensor,
        *,
        l1_coef: float = 0.0,
        dead_mask: Tensor | None = None,
        k_aux: int = 0,
        aux_coef: float = 0.0,
        aux_frac: float = 1.0,
    ) -> ForwardOutput:
        if self.encoder_type == "topk":
            return self._forward_topk(x, dead_mask, k_aux, aux_coef, aux_frac)
        return self._forward_standard(x, self.pre_acts(x), l1_coef)

    def _forward_standard(self, x: Tensor, pre: Tensor, l1_coef: float) -> ForwardOutput:
        f = pre.relu()
        x_hat = f @ self.W_dec + self.b_dec
        mse = (x_hat.float() - x.float()).pow(2).mean()
        weighted = (f.float() * self.W_dec.float().norm(dim=1)).sum(-1).mean() / self.d_in
        aux = l1_coef * weighted
        active = f > 0
        return ForwardOutput(
            x_hat, mse + aux, mse, aux, active.sum(-1).float().mean(),
            active.sum(0, dtype=torch.int64),
        )

    def _forward_topk(
        self, x: Tensor, dead_mask: Tensor | None, k_aux: int, aux_coef: float,
        aux_frac: float = 1.0,
    ) -> ForwardOutput:
        bias = self.b_enc - self.b_dec @ self.W_enc  # = pre-activation offset, through autograd
        vals, idx, pre = _TopKEncode.apply(x, self.W_enc, bias, self.k)
        vals = vals.relu()
        x_hat = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype),
                                mode="sum") + self.b_dec
        err = x.float() - x_hat.float()
        mse = err.pow(2).mean()
        aux = mse.new_zeros(())
        if dead_mask is not None and aux_coef > 0 and k_aux > 0:
            n_dead = int(dead_mask.sum())
            if n_dead > 0:
                kk = min(k_aux, n_dead)
                rows = max(1, int(x.shape[0] * aux_frac))  # a random subset: rows are shuffled
                dead_idx = dead_mask.nonzero().squeeze(1)
                # Select on the detached pre-activations, then recompute the chosen dead
                # latents' values with autograd (only n_dead columns, on a quarter of the rows).
                a_pos = pre[:rows].index_select(1, dead_idx).topk(kk, dim=-1, sorted=False)[1]
                a_idx = dead_idx[a_pos]
                w_dead = self.W_enc.index_select(1, dead_idx)
                sub = x[:rows] @ w_dead + bias.index_select(0, dead_idx)
                a_vals = sub.gather(1, a_pos)
                e_hat = F.embedding_bag(a_idx, self.W_dec,
                                        per_sample_weights=a_vals.relu().to(self.W_dec.dtype),
                                        mode="sum")
                e = err[:rows].detach()
                denom = (e - e.mean(0)).pow(2).sum().clamp_min(1e-8)
                auxk = (e_hat.float() - e).pow(2).sum() / denom
                aux = aux_coef * torch.nan_to_num(auxk, nan=0.0)
        fired_idx = idx[vals > 0]
        fired = torch.bincount(fired_idx, minlength=self.d_sae)
        l0 = (vals > 0).sum(-1).float().mean()
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired)
