"""Shared kernels of the SAE types: the sparse training step (selected pre-activations and
their decode, with sparse backward passes), the top-k selections and the straight-through
functions of JumpReLU.

Every sparse step works on a set of selected (token, latent) entries, held as a ``CSR``
pattern and its transpose: TopK's k per token, BatchTopK's k x n per micro-batch, and the
entries of standard / JumpReLU training above a floor when few latents are active (on the CPU,
below ``SPARSE_MAX_DENSITY`` of the entries; dense otherwise, e.g. early in training). The
dense latent matrix is never built: the pre-activations at the entries come with
``SparsePreActs`` (backward: W_enc's gradient from the selected entries only) and decoding is
``BagDecode``. All three products of the step (decode, the decoder's gradient, the encoder's
gradient) are ``embedding_bag`` gather-sums: the decode gathers decoder rows per token, and the
two gradients gather the tokens' output gradients / inputs per latent (the transposed pattern,
one stable sort of the latent ids per step). On the CPU that is 4x faster than CSR products and
2x faster than ``embedding_bag``'s own backward (which sorts again per call). Loss and gradients
equal the dense computation's.

Nothing here reads a tensor's value on the host except where a shape depends on it (``nonzero``
and its CSR pattern): the trainer's step makes no other host synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

SPARSE_MAX_DENSITY = 0.16
"""Standard/JumpReLU training on the CPU: below this fraction of (token, latent) entries
selected, use the sparse path (see ``CSR``)."""
SPARSE_DEVICES: tuple[str, ...] = ("cpu",)
"""The device types whose standard/JumpReLU steps may take the sparse path (``bench/
step_paths.py`` times both paths per density on a device: the crossover it finds on a GPU
decides whether "cuda" joins)."""


# ------------------------------------------------------------------ statistics
def fired_counts(idx: Tensor, on: Tensor, d_sae: int) -> Tensor:
    """Firing count per latent [d_sae] (int64) of the entries ``idx`` where ``on`` is true
    (same shapes). A sum, not ``bincount(idx[on])``: no host synchronisation."""
    counts = torch.zeros(d_sae, dtype=torch.int64, device=idx.device)
    return counts.index_add_(0, idx.reshape(-1), on.reshape(-1).long())


def active_stats(active: Tensor) -> tuple[Tensor, Tensor]:
    """Mean active latents per token and firing count per latent (int64) of a dense mask
    [n, d_sae] (``column_counts``; the L0 is their sum over n: no second pass)."""
    fired = column_counts(active)
    return fired.sum().float() / max(active.shape[0], 1), fired


def column_counts(active: Tensor) -> Tensor:
    """True entries per column [d] (int64) of a bool mask [n, d], with no [n, d] temporary.

    A reduction whose result type differs from its input's casts the whole input first (ATen's
    ``make_reduction``): ``sum(0, dtype=int32)`` of the mask wrote a 4-byte copy of it, and
    ``count_nonzero`` on CUDA (``(x != 0).sum()``) an 8-byte one — 151 MB at 4,096 x 4,608 on
    the GPU, for a count. Here blocks of 255 rows are summed in uint8 (a block's count fits),
    then the [n / 255, d] block sums in int64: ~1 ms instead of ~40 at 4,096 x 4,608 on one CPU
    core, exact."""
    u = active.view(torch.uint8)
    m = u.shape[0] // 255 * 255
    counts = u[m:].sum(0, dtype=torch.uint8).long()
    if m:
        blocks = u[:m].reshape(m // 255, 255, u.shape[1]).sum(1, dtype=torch.uint8)
        counts += blocks.sum(0, dtype=torch.int64)
    return counts


# ------------------------------------------------------------------ top-k selections
def topk_select(x: Tensor, w_enc: Tensor, bias: Tensor, k: int) -> tuple[Tensor, CSR, Tensor]:
    """TopK's training selection: pre = x @ W_enc + bias (dense: every pre-activation is needed
    to choose the top k), then the k largest per row. Returns (the selected pre-activations
    [n * k] through autograd, row-major — ``SparsePreActs`` —, their pattern, the detached
    pre-activations [n, d_sae])."""
    with torch.no_grad():
        pre = torch.addmm(bias, x, w_enc)  # one fused pass; autocast makes it bf16/fp16
        idx = pre.topk(k, dim=-1, sorted=False)[1]
    csr = CSR.from_bags(idx.reshape(-1), k, pre.shape)
    return SparsePreActs.apply(x, w_enc, bias, pre, csr), csr, pre


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


def batch_topk_train_select(x: Tensor, w_enc: Tensor, bias: Tensor, k: int
                            ) -> tuple[Tensor, CSR, Tensor]:
    """BatchTopK's training selection: the top k x n pre-activations of the micro-batch, as
    ``topk_select`` returns them (row-major: a token's latents are contiguous, their ids
    increasing)."""
    with torch.no_grad():
        pre = torch.addmm(bias, x, w_enc)
        entries = batch_topk_select(pre, k * pre.shape[0])[1]
    csr = CSR.from_entries(entries[:, 0], entries[:, 1], pre.shape)
    return SparsePreActs.apply(x, w_enc, bias, pre, csr), csr, pre


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


# ------------------------------------------------------------------ the sparse step
# The selected entries as a CSR pattern (rows = tokens, row-major ``cols``, ``crow`` [n + 1]) and
# its transpose (entries sorted by latent). The dense matmuls of a step cost ~110 ms each at
# n=4096, d_in=576, d_sae=4608 on the CPU; the gather-sums here ~10 ms at TopK's 0.7% density.


class CSR(NamedTuple):
    """Sparsity pattern of the selected (token, latent) entries, plus its transpose.

    ``flat``: row-major flat indices into [n, d_sae]; ``rows``/``cols``/``crow``: the CSR
    pattern (``rows``: each entry's token); ``perm``: entry order of the transpose (sorted by
    latent, stable); ``t_rows``/``t_crow``: the transposed CSR pattern [d_sae, n]."""

    shape: tuple[int, int]
    flat: Tensor
    rows: Tensor
    cols: Tensor
    crow: Tensor
    perm: Tensor
    t_rows: Tensor
    t_crow: Tensor

    @staticmethod
    def from_entries(rows: Tensor, cols: Tensor, shape: tuple[int, int] | torch.Size,
                     crow: Tensor | None = None) -> CSR:
        """The pattern of the entries (``rows``, ``cols``) of an [n, m] matrix, row-major
        (``crow`` when the caller knows it). No host synchronisation."""
        n, m = int(shape[0]), int(shape[1])
        if crow is None:
            bounds = torch.arange(n + 1, device=rows.device)
            crow = torch.searchsorted(rows, bounds)
        sorted_cols, perm = torch.sort(cols, stable=True)
        t_crow = torch.searchsorted(sorted_cols, torch.arange(m + 1, device=cols.device))
        return CSR((n, m), rows * m + cols, rows, cols, crow, perm, rows[perm], t_crow)

    @staticmethod
    def from_bags(cols: Tensor, k: int, shape: tuple[int, int] | torch.Size) -> CSR:
        """The pattern of k entries per row (``cols`` [n * k], row by row, any order within
        a row)."""
        n = int(shape[0])
        rows = torch.arange(n, device=cols.device).repeat_interleave(k)
        crow = torch.arange(0, n * k + 1, k, device=cols.device)
        return CSR.from_entries(rows, cols, shape, crow)

    @staticmethod
    def from_mask(keep: Tensor) -> CSR:
        n, m = keep.shape
        flat = keep.reshape(-1).nonzero().squeeze(1)
        return CSR.from_entries(flat // m, flat % m, (n, m))

    def regroup(self, rows: Tensor, n_rows: int) -> CSR:
        """The same entries grouped into other rows: entry i into row ``rows[i]`` of an
        [n_rows, m] pattern (``rows`` non-decreasing, e.g. a token's entries split by latent
        range). Shares the transposition (no new sort)."""
        m = self.shape[1]
        crow = torch.searchsorted(rows, torch.arange(n_rows + 1, device=rows.device))
        return CSR((n_rows, m), rows * m + self.cols, rows, self.cols, crow, self.perm,
                   rows[self.perm], self.t_crow)

    def gather_rows(self, table: Tensor, values: Tensor) -> Tensor:
        """Per row r of the pattern: sum over its entries (r, c) of values * table[c] [n, d]
        (``values`` in entry order; the products in ``table``'s dtype)."""
        return F.embedding_bag(self.cols, table, self.crow[:-1],
                               per_sample_weights=values.to(table.dtype), mode="sum")

    def gather_cols(self, table: Tensor, values: Tensor) -> Tensor:
        """Per column c: sum over its entries (r, c) of values * table[r] [m, d] (the
        transposed product, e.g. a weight gradient; ``values`` in entry order)."""
        return F.embedding_bag(self.t_rows, table, self.t_crow[:-1],
                               per_sample_weights=values[self.perm].to(table.dtype),
                               mode="sum")

    def row_dots(self, a: Tensor, b: Tensor) -> Tensor:
        """Per entry (r, c): a[r] . b[c] [n_entries] (a [n, d], b [m, d])."""
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            a.to(b.dtype).contiguous(), b, self.cols, self.crow[:-1], self.rows, 0, -1)


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
    the caller. Backward: W_enc's gradient is x^T G with G the sparse [n, d_sae] gradient: per
    latent, the sum of its entries' gradients times their tokens' inputs (``gather_cols``); the
    bias's is G's column sums. ``x`` gets no gradient (data)."""

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
            g_w = csr.gather_cols(x.float(), g).t()
        return None, g_w, g_bias, None, None


class BagDecode(torch.autograd.Function):
    """x_hat = F @ w_dec for F the sparse latents (values ``vals`` on the pattern ``csr``):
    per token, the sum of its entries' values times their decoder rows.

    Backward: d vals = g . w_dec[latent] per entry, d w_dec = F^T g (per latent, the sum of its
    entries' values times their tokens' output gradients). In w_dec's dtype."""

    @staticmethod
    def forward(ctx, vals: Tensor, w_dec: Tensor, csr: CSR):
        ctx.save_for_backward(vals, w_dec)
        ctx.csr = csr
        with torch.autocast(w_dec.device.type, enabled=False):
            return csr.gather_rows(w_dec, vals)

    @staticmethod
    def backward(ctx, g: Tensor):
        vals, w = ctx.saved_tensors
        csr: CSR = ctx.csr
        g_vals = g_w = None
        with torch.autocast(g.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                g_vals = csr.row_dots(g, w).to(vals.dtype)
            if ctx.needs_input_grad[1]:
                g_w = csr.gather_cols(g.to(w.dtype).contiguous(), vals)
        return g_vals, g_w, None


def threshold_pre_acts(x: Tensor, w_enc: Tensor, bias: Tensor, floor: Tensor | float,
                       max_density: float) -> tuple[Tensor, CSR | None]:
    """Pre-activations x @ w_enc + bias of a ReLU / JumpReLU training step.

    Returns ``(pre [n, d_sae], None)`` (dense backward), or — on a device type in
    ``SPARSE_DEVICES`` (the CPU) when at most ``max_density`` of the entries are above
    ``floor`` — ``(pre at those entries, flat row-major, their CSR pattern)`` with a sparse
    backward. ``max_density`` 0 forces the dense path, 1 the sparse one (on those devices)."""
    with torch.no_grad():
        pre = torch.addmm(bias, x, w_enc)
    if x.device.type in SPARSE_DEVICES and max_density > 0:
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
    decoded = BagDecode.apply(vals.float(), w_dec.float(), csr)
    return decoded, l0, fired_counts(csr.cols, on, csr.shape[1])
