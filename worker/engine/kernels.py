"""Shared kernels of the SAE types: the embedding_bag decode, the sparse encoder backward, the
CSR step of ReLU / JumpReLU training and the straight-through functions of JumpReLU.

TopK and BatchTopK never materialise the dense latent matrix for decoding: the decoder reads the
selected rows with ``embedding_bag`` (fixed-size bags for TopK, variable-size bags given by
``offsets`` for BatchTopK), and the encoder's backward touches only the selected latents
(``sparse_encoder_grads``). Standard and JumpReLU training does the same with sparse CSR products
when few latents are active (on the CPU, below ``SPARSE_MAX_DENSITY`` of the (token, latent)
entries; dense otherwise, e.g. early in training), with the same loss and gradients.

Nothing here reads a tensor's value on the host except where a shape depends on it (``nonzero``
and its CSR pattern): the trainer's step makes no other host synchronisation.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

SPARSE_MAX_DENSITY = 0.16
"""Standard/JumpReLU training on the CPU: below this fraction of (token, latent) entries
selected, use the sparse path (see ``CSR``)."""


# ------------------------------------------------------------------ decode and statistics
def bag_decode(idx: Tensor, offsets: Tensor | None, vals: Tensor, w_dec: Tensor) -> Tensor:
    """sum_j vals[b, j] * w_dec[idx[b, j]] per token, without the dense latent matrix.

    ``idx`` [n, k] (fixed bags) or flat [m] with ``offsets`` [n] (variable bags, row-major)."""
    return F.embedding_bag(idx, w_dec, offsets, per_sample_weights=vals.to(w_dec.dtype),
                           mode="sum")


def fired_counts(idx: Tensor, on: Tensor, d_sae: int) -> Tensor:
    """Firing count per latent [d_sae] (int64) of the entries ``idx`` where ``on`` is true
    (same shapes). A sum, not ``bincount(idx[on])``: no host synchronisation."""
    counts = torch.zeros(d_sae, dtype=torch.int64, device=idx.device)
    return counts.index_add_(0, idx.reshape(-1), on.reshape(-1).long())


def active_stats(active: Tensor) -> tuple[Tensor, Tensor]:
    """Mean active latents per token and firing count per latent (int64) of a dense mask.

    (A bool ``sum`` is slow on the CPU: ~50 ms per reduction at 4096 x 4608; these take ~30.)"""
    n = max(active.shape[0], 1)
    l0 = torch.count_nonzero(active).float() / n
    fired = active.view(torch.uint8).sum(0, dtype=torch.int32).long()
    return l0, fired


# ------------------------------------------------------------------ top-k selections
def sparse_encoder_grads(x: Tensor, idx: Tensor, offsets: Tensor | None, g_vals: Tensor,
                         shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Gradients of W_enc [d_in, d_sae] and the bias from those of the selected
    pre-activations: ``embedding_bag``'s backward sums g[b, j] * x[b] into row idx[b, j]
    without a [n, k, d_in] tensor. ``idx`` and ``offsets`` as in ``bag_decode``."""
    d_in, d_sae = shape
    g = g_vals.float()
    g_bias = torch.zeros(d_sae, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
    with torch.enable_grad():
        w_t = torch.zeros(d_sae, d_in, device=x.device, requires_grad=True)
        rows = F.embedding_bag(idx, w_t, offsets, per_sample_weights=g, mode="sum")
        (g_w_t,) = torch.autograd.grad(rows, w_t, grad_outputs=x.float())
    return g_w_t.t(), g_bias


class TopKEncode(torch.autograd.Function):
    """TopK selection whose backward touches only the k selected latents per token.

    Forward: pre = x @ W_enc + bias (dense: every pre-activation is needed to choose the top k),
    then the k largest per row. Backward: the gradient reaches W_enc only at the selected
    (token, latent) pairs (``sparse_encoder_grads``). The inputs ``x`` get no gradient (data).
    Returns (values [n, k], latent ids [n, k], the detached pre-activations [n, d_sae]).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, bias: Tensor, k: int):
        pre = torch.addmm(bias, x, w_enc)  # one fused pass; autocast makes it bf16/fp16
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, idx)
        ctx.shape = w_enc.shape
        ctx.mark_non_differentiable(idx, pre)
        return vals, idx, pre

    @staticmethod
    def backward(ctx, g_vals: Tensor, _g_idx: Tensor, _g_pre: Tensor):
        x, idx = ctx.saved_tensors
        return (None, *sparse_encoder_grads(x, idx, None, g_vals, ctx.shape), None)


def batch_topk_select(pre: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Mask [n, d_sae] of the ``total`` largest entries of ``pre`` (more only on exact ties),
    and its ``nonzero()`` [m, 2] (row-major).

    A flat topk over n x d_sae entries is slow on the CPU, so: take each row's top ``2k``
    candidates (k = total / n) and the total-th largest of those, ``t0``. A subset's total-th
    largest is never above the true one, and equals it unless some row had more than 2k entries
    in the true selection; then ``pre >= t0`` holds more than ``total`` entries and the exact
    threshold is found among them.
    """
    n, d_sae = pre.shape
    total = min(total, pre.numel())
    k_row = min(d_sae, max(2 * -(-total // n), 8))
    cand = pre.topk(k_row, dim=-1, sorted=False)[0]
    t0 = cand.reshape(-1).topk(total, sorted=False)[0].min()
    mask = pre >= t0
    entries = mask.nonzero()
    if entries.shape[0] > total:
        t0 = pre[mask].topk(total, sorted=False)[0].min()
        mask = pre >= t0
        entries = mask.nonzero()
    return mask, entries


def batch_topk_latents(pre: Tensor, k: int) -> Tensor:
    """Dense latents [n, d_sae] of the BatchTopK selection: relu(pre) at the k x n largest."""
    return pre.relu() * batch_topk_select(pre, k * pre.shape[0])[0]


class BatchTopKEncode(torch.autograd.Function):
    """BatchTopK selection: the top k x n pre-activations of the micro-batch, as variable-length
    bags (latent ids ``cols`` in row-major order, ``offsets`` [n] where each token's bag starts).
    Backward as TopK: only the selected (token, latent) pairs reach W_enc."""

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, bias: Tensor, k: int):
        pre = torch.addmm(bias, x, w_enc)
        mask, entries = batch_topk_select(pre, k * pre.shape[0])
        rows, cols = entries[:, 0], entries[:, 1]  # row-major: a token's latents are contiguous
        vals = pre[rows, cols]
        counts = mask.sum(1)
        offsets = counts.cumsum(0) - counts
        ctx.save_for_backward(x, cols, offsets)
        ctx.shape = w_enc.shape
        ctx.mark_non_differentiable(cols, offsets, pre)
        return vals, cols, offsets, pre

    @staticmethod
    def backward(ctx, g_vals, _g_cols, _g_offsets, _g_pre):
        x, cols, offsets = ctx.saved_tensors
        return (None, *sparse_encoder_grads(x, cols, offsets, g_vals, ctx.shape), None)


# ------------------------------------------------------------------ JumpReLU straight-through
def rectangle(z: Tensor) -> Tensor:
    """The straight-through kernel: 1 on (-1/2, 1/2), else 0."""
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class JumpReLUFn(torch.autograd.Function):
    """f = pre * (pre > theta). d f/d pre = (pre > theta); d f/d theta by the straight-through
    estimator -(theta / bandwidth) * rect((pre - theta) / bandwidth)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        g_pre = g * (pre > theta)
        window = rectangle((pre.float() - theta) / bw)
        g_theta = -(theta / bw) * (window * g.float()).sum(0)
        return g_pre, g_theta, None


class StepFn(torch.autograd.Function):
    """H(pre - theta) (the L0 count). No gradient to pre; d/d theta by the straight-through
    estimator -(1 / bandwidth) * rect((pre - theta) / bandwidth)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).float()

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        window = rectangle((pre.float() - theta) / bw)
        return None, -(window * g.float()).sum(0) / bw, None


# ------------------------------------------------------------------ the sparse threshold step
# Standard and JumpReLU training steps at low density: the latents are a CSR matrix (rows =
# tokens, row-major ``cols``, ``crow`` [n + 1]); decoding, the decoder's and the encoder's
# backward are sparse products whose cost scales with the number of active entries. The dense
# matmuls cost ~110 ms each at n=4096, d_in=576, d_sae=4608 on the CPU; the sparse ones ~20 ms
# at 3% density, ~50 ms at 8%.


def _csr_tensor(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class CSR(NamedTuple):
    """Sparsity pattern of the selected (token, latent) entries, plus its transpose.

    ``flat``: row-major flat indices into [n, d_sae]; ``cols``/``crow``: the CSR pattern;
    ``perm``: entry order of the transpose (sorted by latent, stable); ``t_rows``/``t_crow``:
    the transposed CSR pattern [d_sae, n]."""

    shape: tuple[int, int]
    flat: Tensor
    cols: Tensor
    crow: Tensor
    perm: Tensor
    t_rows: Tensor
    t_crow: Tensor

    @staticmethod
    def from_mask(keep: Tensor) -> CSR:
        n, m = keep.shape
        flat = keep.reshape(-1).nonzero().squeeze(1)
        rows, cols = flat // m, flat % m
        bounds = torch.arange(n + 1, device=flat.device) * m
        crow = torch.searchsorted(flat, bounds)
        perm = torch.argsort(cols, stable=True)
        t_crow = torch.zeros(m + 1, dtype=torch.int64, device=flat.device)
        t_crow[1:] = torch.bincount(cols, minlength=m).cumsum(0)
        return CSR((n, m), flat, cols, crow, perm, rows[perm], t_crow)

    def matrix(self, values: Tensor) -> Tensor:
        return _csr_tensor(self.crow, self.cols, values, self.shape)

    def transposed(self, values: Tensor) -> Tensor:
        """The transpose [d_sae, n] as CSR, from values in this (row-major) entry order."""
        return _csr_tensor(self.t_crow, self.t_rows, values[self.perm],
                           (self.shape[1], self.shape[0]))


class PreActs(torch.autograd.Function):
    """pre = x @ w_enc + bias, with ``pre`` already computed (without autograd) by the caller.

    Dense backward, as autograd's for addmm; ``x`` gets no gradient (data)."""

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, bias: Tensor, pre: Tensor):
        ctx.save_for_backward(x)
        return pre

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        return None, x.t().to(g.dtype) @ g, g.sum(0), None


class SparsePreActs(torch.autograd.Function):
    """The pre-activations at the pattern's entries (flat, row-major), from ``pre`` computed by
    the caller. Backward: W_enc's gradient is x^T G with G the sparse [n, d_sae] gradient, done
    as (G^T x)^T with the transposed CSR; the bias's is G's column sums."""

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, bias: Tensor, pre: Tensor, csr: CSR):
        ctx.save_for_backward(x)
        ctx.csr = csr
        return pre.reshape(-1)[csr.flat]

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        csr: CSR = ctx.csr
        g = g.float()
        g_bias = torch.zeros(csr.shape[1], device=g.device).index_add_(0, csr.cols, g)
        with torch.autocast(g.device.type, enabled=False):
            g_w = (csr.transposed(g) @ x.float()).t()
        return None, g_w, g_bias, None, None


class SparseDecode(torch.autograd.Function):
    """x_hat = F @ w_dec for F the CSR latents (values ``vals`` on the pattern ``csr``).

    Backward: d vals = (g @ w_dec^T) sampled at the pattern (``sampled_addmm``), d w_dec = F^T g
    (transposed CSR). fp32 throughout."""

    @staticmethod
    def forward(ctx, vals: Tensor, w_dec: Tensor, csr: CSR):
        vals = vals.float()
        w = w_dec.float()
        ctx.save_for_backward(vals, w)
        ctx.csr = csr
        ctx.w_dtype = w_dec.dtype
        with torch.autocast(w.device.type, enabled=False):  # no bf16/fp16 sparse kernels
            return csr.matrix(vals) @ w

    @staticmethod
    def backward(ctx, g: Tensor):
        vals, w = ctx.saved_tensors
        csr: CSR = ctx.csr
        g = g.float().contiguous()
        g_vals = g_w = None
        with torch.autocast(g.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                pattern = csr.matrix(torch.zeros_like(vals))
                g_vals = torch.sparse.sampled_addmm(pattern, g, w.t(), beta=0.0).values()
            if ctx.needs_input_grad[1]:
                g_w = (csr.transposed(vals) @ g).to(ctx.w_dtype)
        return g_vals, g_w, None


def threshold_pre_acts(x: Tensor, w_enc: Tensor, bias: Tensor, floor: Tensor | float,
                       max_density: float) -> tuple[Tensor, CSR | None]:
    """Pre-activations x @ w_enc + bias of a ReLU / JumpReLU training step.

    Returns ``(pre [n, d_sae], None)`` (dense backward), or — on the CPU when at most
    ``max_density`` of the entries are above ``floor`` — ``(pre at those entries, flat
    row-major, their CSR pattern)`` with a sparse backward. ``max_density`` 0 forces the dense
    path, 1 the sparse one (on the CPU)."""
    with torch.no_grad():
        pre = torch.addmm(bias, x, w_enc)
    if x.device.type == "cpu" and max_density > 0:
        keep = pre > floor
        density = int(torch.count_nonzero(keep)) / max(keep.numel(), 1)
        if density <= max_density:
            csr = CSR.from_mask(keep)
            return SparsePreActs.apply(x, w_enc, bias, pre, csr), csr
    return PreActs.apply(x, w_enc, bias, pre), None


def csr_decode(vals: Tensor, w_dec: Tensor, csr: CSR) -> tuple[Tensor, Tensor, Tensor]:
    """Decoded rows (without b_dec) of the CSR latents ``vals``, their mean active latents per
    token and firing count per latent (int64)."""
    on = vals.detach() > 0
    l0 = on.sum().float() / csr.shape[0]
    return SparseDecode.apply(vals, w_dec, csr), l0, fired_counts(csr.cols, on, csr.shape[1])
