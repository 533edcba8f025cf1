"""The sparse autoencoder: one module, four encoder types.

Shapes: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] — the SAELens
layout, so export is a copy. Forward on (normalised) inputs x:

    pre = (x - b_dec) @ W_enc + b_enc
    standard:  f = relu(pre)                                 x_hat = f @ W_dec + b_dec
    topk:      f = relu(topk(pre, k)) (k per token)          x_hat = sum_i f_i W_dec[i] + b_dec
    jumprelu:  f = pre * (pre > theta), theta = ``threshold`` [d_sae] learned (kept >= 0)
    batchtopk: training: the k x n largest relu(pre) over the whole micro-batch of n tokens
               (k active latents per token on average); inference: jumprelu with one running
               threshold (the ``threshold`` buffer, broadcast to every latent)

TopK and BatchTopK never materialise the dense latent matrix for decoding: the decoder reads the
selected rows with ``embedding_bag`` (fixed-size bags for TopK, variable-size bags given by
``offsets`` for BatchTopK), and the encoder's backward touches only the selected latents.
Standard and JumpReLU training does the same with sparse CSR products when few latents are
active (on the CPU, below ``SAE.sparse_max_density`` of the (token, latent) entries; dense
otherwise, e.g. early in training), with the same loss and gradients. Losses (per-element MSE so
values are comparable across widths):

    standard:  mse + l1_coef * mean_tokens(sum_i f_i * ||W_dec[i]||) / d_in
    topk:      mse + aux_k_coef * auxk, where auxk is the normalised error of reconstructing
               the residual (x - x_hat) from the top k_aux *dead* latents (without b_dec).
    batchtopk: as topk.
    jumprelu:  mse + l0_coef * mean_tokens(L0) / d_in — i.e. (sum of squared errors + l0_coef x
               L0) / d_in per token, the GDM/SAELens loss on our per-element scale. The step
               function and the JumpReLU get a straight-through gradient for the threshold with
               a rectangle kernel of width ``bandwidth`` (Rajamanoharan et al. 2024).

``tie_weights`` (standard only): W_dec is the transpose of W_enc, not a parameter of its own;
``state_dict`` then holds W_enc, b_enc, b_dec only.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


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
    threshold, see ``SAE.update_threshold``); None for the other types."""


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
        return (None, *_sparse_encoder_grads(x, idx, None, g_vals, ctx.shape), None)


def _sparse_encoder_grads(x: Tensor, idx: Tensor, offsets: Tensor | None, g_vals: Tensor,
                          shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Gradients of W_enc and the bias from the gradients of the selected pre-activations.

    ``idx`` [n, k] (fixed bags) or flat [m] with ``offsets`` [n] (variable bags, row-major).
    """
    d_in, d_sae = shape
    g = g_vals.float()
    g_bias = torch.zeros(d_sae, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
    with torch.enable_grad():
        w_t = torch.zeros(d_sae, d_in, device=x.device, requires_grad=True)
        rows = F.embedding_bag(idx, w_t, offsets, per_sample_weights=g, mode="sum")
        (g_w_t,) = torch.autograd.grad(rows, w_t, grad_outputs=x.float())
    return g_w_t.t(), g_bias


def _batch_topk_select(pre: Tensor, total: int) -> Tensor:
    """Mask [n, d_sae] of the ``total`` largest entries of ``pre`` (more only on exact ties).

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
    if int(mask.sum()) > total:
        t0 = pre[mask].topk(total, sorted=False)[0].min()
        mask = pre >= t0
    return mask


class _BatchTopKEncode(torch.autograd.Function):
    """BatchTopK selection: the top k x n pre-activations of the micro-batch, as variable-length
    bags (latent ids ``cols`` in row-major order, ``offsets`` [n] where each token's bag starts).
    Backward as TopK: only the selected (token, latent) pairs reach W_enc."""

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, bias: Tensor, k: int):  # type: ignore[override]
        pre = torch.addmm(bias, x, w_enc)
        mask = _batch_topk_select(pre, k * pre.shape[0])
        cols = mask.nonzero()[:, 1]  # row-major: each token's latents are contiguous
        vals = pre[mask]
        counts = mask.sum(1)
        offsets = counts.cumsum(0) - counts
        ctx.save_for_backward(x, cols, offsets)
        ctx.shape = w_enc.shape
        ctx.mark_non_differentiable(cols, offsets, pre)
        return vals, cols, offsets, pre

    @staticmethod
    def backward(ctx, g_vals, _g_cols, _g_offsets, _g_pre):  # type: ignore[override]
        x, cols, offsets = ctx.saved_tensors
        return (None, *_sparse_encoder_grads(x, cols, offsets, g_vals, ctx.shape), None)


def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """f = pre * (pre > theta). d f/d pre = (pre > theta); d f/d theta by the straight-through
    estimator -(theta / bandwidth) * rect((pre - theta) / bandwidth)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        g_pre = g * (pre > theta)
        window = _rectangle((pre.float() - theta) / bw)
        g_theta = -(theta / bw) * (window * g.float()).sum(0)
        return g_pre, g_theta, None


class _Step(torch.autograd.Function):
    """H(pre - theta) (the L0 count). No gradient to pre; d/d theta by the straight-through
    estimator -(1 / bandwidth) * rect((pre - theta) / bandwidth)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).float()

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        window = _rectangle((pre.float() - theta) / bw)
        return None, -(window * g.float()).sum(0) / bw, None


# ---------------------------------------------------------------------- sparse threshold path
# Standard and JumpReLU training steps at low density: the latents are a CSR matrix (rows =
# tokens, row-major ``cols``, ``crow`` [n + 1]); decoding, the decoder's and the encoder's
# backward are sparse products whose cost scales with the number of active entries. The dense
# matmuls cost ~110 ms each at n=4096, d_in=576, d_sae=4608 on the CPU; the sparse ones ~20 ms
# at 3% density, ~50 ms at 8%. Above ``SAE.sparse_max_density`` the dense path is used.


class _CSR(NamedTuple):
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
    def from_mask(keep: Tensor) -> _CSR:
        n, m = keep.shape
        flat = keep.reshape(-1).nonzero().squeeze(1)
        rows, cols = flat // m, flat % m
        bounds = torch.arange(n + 1, device=flat.device) * m
        crow = torch.searchsorted(flat, bounds)
        perm = torch.argsort(cols, stable=True)
        t_crow = torch.zeros(m + 1, dtype=torch.int64, device=flat.device)
        t_crow[1:] = torch.bincount(cols, minlength=m).cumsum(0)
        return _CSR((n, m), flat, cols, crow, perm, rows[perm], t_crow)

    def matrix(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.crow, self.cols, values, self.shape,
                                       check_invariants=False)

    def transposed(self, values: Tensor) -> Tensor:
        """The transpose [d_sae, n] as CSR, from values in this (row-major) entry order."""
        return torch.sparse_csr_tensor(self.t_crow, self.t_rows, values[self.perm],
                                       (self.shape[1], self.shape[0]), check_invariants=False)


class _PreActs(torch.autograd.Function):
    """pre = x @ w_enc + bias, with ``pre`` already computed (without autograd) by the caller.

    Dense backward, as autograd's for addmm; ``x`` gets no gradient (data)."""

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, bias: Tensor, pre: Tensor):  # type: ignore[override]
        ctx.save_for_backward(x)
        return pre

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return None, x.t().to(g.dtype) @ g, g.sum(0), None


class _SparsePreActs(torch.autograd.Function):
    """The pre-activations at the pattern's entries (flat, row-major), from ``pre`` computed by
    the caller. Backward: W_enc's gradient is x^T G with G the sparse [n, d_sae] gradient, done
    as (G^T x)^T with the transposed CSR; the bias's is G's column sums."""

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, bias: Tensor, pre: Tensor,  # type: ignore[override]
                csr: _CSR):
        ctx.save_for_backward(x)
        ctx.csr = csr
        return pre.reshape(-1)[csr.flat]

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        csr: _CSR = ctx.csr
        g = g.float()
        g_bias = torch.zeros(csr.shape[1], device=g.device).index_add_(0, csr.cols, g)
        with torch.autocast(g.device.type, enabled=False):
            g_w = (csr.transposed(g) @ x.float()).t()
        return None, g_w, g_bias, None, None


class _SparseDecode(torch.autograd.Function):
    """x_hat = F @ w_dec for F the CSR latents (values ``vals`` on the pattern ``csr``).

    Backward: d vals = (g @ w_dec^T) sampled at the pattern (``sampled_addmm``), d w_dec = F^T g
    (transposed CSR). fp32 throughout."""

    @staticmethod
    def forward(ctx, vals: Tensor, w_dec: Tensor, csr: _CSR):  # type: ignore[override]
        vals = vals.float()
        w = w_dec.float()
        ctx.save_for_backward(vals, w)
        ctx.csr = csr
        ctx.w_dtype = w_dec.dtype
        with torch.autocast(w.device.type, enabled=False):  # no bf16/fp16 sparse kernels
            return csr.matrix(vals) @ w

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        vals, w = ctx.saved_tensors
        csr: _CSR = ctx.csr
        g = g.float().contiguous()
        g_vals = g_w = None
        with torch.autocast(g.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                pattern = csr.matrix(torch.zeros_like(vals))
                g_vals = torch.sparse.sampled_addmm(pattern, g, w.t(), beta=0.0).values()
            if ctx.needs_input_grad[1]:
                g_w = (csr.transposed(vals) @ g).to(ctx.w_dtype)
        return g_vals, g_w, None


def _active_stats(active: Tensor) -> tuple[Tensor, Tensor]:
    """Mean active latents per token and firing count per latent (int64) of a dense mask.

    (A bool ``sum`` is slow on the CPU: ~50 ms per reduction at 4096 x 4608; these take ~30.)"""
    n = max(active.shape[0], 1)
    l0 = torch.count_nonzero(active).float() / n
    fired = active.view(torch.uint8).sum(0, dtype=torch.int32).long()
    return l0, fired


class SAE(nn.Module):
    SPARSE_MAX_DENSITY = 0.16
    """Standard/JumpReLU training on the CPU: below this fraction of (token, latent) entries
    selected, use the sparse path (see ``_CSR``); set ``sparse_max_density`` to 0 to force the
    dense one, to 1 to force the sparse one."""

    def __init__(
        self, d_in: int, d_sae: int, encoder_type: str = "topk", k: int = 32, *,
        tie_weights: bool = False, bandwidth: float = 0.05, init_threshold: float = 0.01,
    ) -> None:
        super().__init__()
        if tie_weights and encoder_type != "standard":
            raise ValueError("tie_weights is only supported by the standard encoder type.")
        self.d_in, self.d_sae, self.encoder_type, self.k = d_in, d_sae, encoder_type, k
        self.tie_weights, self.bandwidth = tie_weights, bandwidth
        self.sparse_max_density = self.SPARSE_MAX_DENSITY
        self.sparse_steps = 0  # forward passes that took the sparse path (standard, jumprelu)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        if not tie_weights:
            self.register_parameter("W_dec", nn.Parameter(torch.empty(d_sae, d_in)))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if encoder_type == "jumprelu":
            self.threshold = nn.Parameter(torch.full((d_sae,), float(init_threshold)))
        if encoder_type == "batchtopk":
            self.register_buffer("threshold", torch.zeros(()))
        self.reset_parameters()

    @property
    def W_dec(self) -> Tensor:  # noqa: N802 - the SAELens name
        """The decoder [d_sae, d_in]; with tied weights a view of W_enc's transpose."""
        if self.tie_weights:
            return self.W_enc.t()
        try:
            return self._parameters["W_dec"]  # type: ignore[return-value]
        except KeyError:  # before registration (nn.Module.register_parameter asks hasattr)
            raise AttributeError("W_dec") from None

    def thresholds(self) -> Tensor | None:
        """Per-latent inference threshold [d_sae] (jumprelu, batchtopk), else None."""
        if self.encoder_type == "jumprelu":
            return self.threshold
        if self.encoder_type == "batchtopk":
            return self.threshold.expand(self.d_sae)
        return None

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        w = torch.randn(self.d_sae, self.d_in, generator=generator)
        self.set_decoder(w)

    @torch.no_grad()
    def set_decoder(self, directions: Tensor) -> None:
        """Decoder rows = the given directions at unit norm; encoder = decoder transpose."""
        w = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_enc.copy_(w.T)
        if not self.tie_weights:
            self.W_dec.copy_(w)

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

    @torch.no_grad()
    def clamp_threshold(self) -> None:
        """JumpReLU: thresholds stay >= 0 (called after each optimizer step)."""
        if self.encoder_type == "jumprelu":
            self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def update_threshold(self, value: float | Tensor, momentum: float) -> None:
        """BatchTopK: move the running inference threshold towards ``value`` (exponential moving
        average with weight ``momentum`` on the new value)."""
        self.threshold.lerp_(torch.as_tensor(value, dtype=self.threshold.dtype,
                                             device=self.threshold.device), momentum)

    # ------------------------------------------------------------------ forward
    def pre_acts(self, x: Tensor) -> Tensor:
        # = (x - b_dec) @ W_enc + b_enc, arranged so that backward needs no [n, d_in] input
        # gradient: b_dec reaches the pre-activations through one vector-matrix product.
        return x @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations [n, d_sae] at inference (for evaluation and export checks).

        BatchTopK encodes with its running threshold here (as SAELens does after export)."""
        pre = self.pre_acts(x)
        if self.encoder_type == "topk":
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        theta = self.thresholds()
        if theta is not None:
            return pre.relu() * (pre > theta)
        return pre.relu()

    def encode_batch_topk(self, x: Tensor) -> Tensor:
        """Dense latents of BatchTopK's training selection (k x n largest over the batch)."""
        pre = self.pre_acts(x)
        return pre.relu() * _batch_topk_select(pre, self.k * pre.shape[0])

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(
        self,
        x: Tensor,
        *,
        l1_coef: float = 0.0,
        l0_coef: float = 0.0,
        dead_mask: Tensor | None = None,
        k_aux: int = 0,
        aux_coef: float = 0.0,
        aux_frac: float = 1.0,
    ) -> ForwardOutput:
        if self.encoder_type == "topk":
            return self._forward_topk(x, dead_mask, k_aux, aux_coef, aux_frac)
        if self.encoder_type == "batchtopk":
            if self.training:
                return self._forward_batchtopk(x, dead_mask, k_aux, aux_coef, aux_frac)
            return self._forward_threshold(x, self.threshold)
        if self.encoder_type == "jumprelu":
            return self._forward_threshold_train(x, 0.0, l0_coef)
        if self.tie_weights:
            return self._forward_standard(x, self.pre_acts(x), l1_coef)
        return self._forward_threshold_train(x, l1_coef, 0.0)

    def _forward_standard(self, x: Tensor, pre: Tensor, l1_coef: float) -> ForwardOutput:
        f = pre.relu()
        w_dec = self.W_dec
        x_hat = f @ w_dec + self.b_dec
        mse = (x_hat.float() - x.float()).pow(2).mean()
        # sum_i f_i ||W_dec[i]|| as a matrix-vector product (no [n, d_sae] temporary), in fp32
        with torch.autocast(f.device.type, enabled=False):
            weighted = (f.float() @ w_dec.float().norm(dim=1)).mean() / self.d_in
        aux = l1_coef * weighted
        l0, fired = _active_stats(f.detach() > 0)
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired)

    def _forward_threshold(self, x: Tensor, theta: Tensor) -> ForwardOutput:
        """Inference with a fixed threshold (BatchTopK in eval mode): no gradient path needed."""
        pre = self.pre_acts(x)
        f = pre.relu() * (pre > theta)
        x_hat = f @ self.W_dec + self.b_dec
        mse = (x_hat.float() - x.float()).pow(2).mean()
        active = f > 0
        return ForwardOutput(x_hat, mse, mse, mse.new_zeros(()), active.sum(-1).float().mean(),
                             active.sum(0, dtype=torch.int64))

    def _forward_threshold_train(self, x: Tensor, l1_coef: float, l0_coef: float
                                 ) -> ForwardOutput:
        """Standard (theta = 0) and JumpReLU training: sparse when few latents are selected."""
        jump = self.encoder_type == "jumprelu"
        bias = self.b_enc - self.b_dec @ self.W_enc
        with torch.no_grad():
            pre = torch.addmm(bias, x, self.W_enc)
        if x.device.type != "cpu" or self.sparse_max_density <= 0:
            density = 1.0
        else:
            if jump:
                # A superset of the active entries and of the straight-through window
                # (pre - theta) / bw > -1/2; entries outside both get no value and no gradient.
                keep = pre > (self.threshold.detach() - 0.75 * self.bandwidth)
            else:
                keep = pre > 0
            density = int(torch.count_nonzero(keep)) / max(keep.numel(), 1)
        if density > self.sparse_max_density:
            pre = _PreActs.apply(x, self.W_enc, bias, pre)
            if jump:
                return self._forward_jumprelu(x, l0_coef, pre)
            return self._forward_standard(x, pre, l1_coef)
        self.sparse_steps += 1
        csr = _CSR.from_mask(keep)
        del keep
        n = x.shape[0]
        pre_flat = _SparsePreActs.apply(x, self.W_enc, bias, pre, csr)
        w_dec = self.W_dec
        if jump:
            theta = self.threshold.index_select(0, csr.cols)
            theta_c = theta.detach()
            p = pre_flat.detach().float()
            active = p > theta_c
            window = _rectangle((p - theta_c) / self.bandwidth)
            st = theta - theta_c  # value 0, gradient 1 to the threshold
            f = pre_flat.float() * active + st * (-(theta_c / self.bandwidth) * window)
        else:
            f = pre_flat.float()  # every selected entry is > 0: f = relu(pre) there
        x_hat = _SparseDecode.apply(f, w_dec, csr) + self.b_dec
        mse = (x_hat.float() - x.float()).pow(2).mean()
        if jump and l0_coef > 0:
            step = active.float() + st * (-window / self.bandwidth)
            aux = l0_coef * (step.sum() / n) / self.d_in
        elif not jump:
            norms = w_dec.float().norm(dim=1).index_select(0, csr.cols)
            aux = l1_coef * ((f * norms).sum() / n) / self.d_in
        else:
            aux = mse.new_zeros(())
        on = f.detach() > 0
        fired = torch.bincount(csr.cols[on], minlength=self.d_sae)
        l0 = on.sum().float() / n
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired)

    def _forward_jumprelu(self, x: Tensor, l0_coef: float, pre: Tensor) -> ForwardOutput:
        theta = self.threshold
        f = _JumpReLU.apply(pre, theta, self.bandwidth)
        x_hat = f @ self.W_dec + self.b_dec
        mse = (x_hat.float() - x.float()).pow(2).mean()
        if l0_coef > 0:
            l0_ste = _Step.apply(pre, theta, self.bandwidth).sum(-1).mean()
            aux = l0_coef * l0_ste / self.d_in
        else:
            aux = mse.new_zeros(())
        l0, fired = _active_stats(f.detach() > 0)
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired)

    def _auxk(self, x: Tensor, pre: Tensor, bias: Tensor, err: Tensor,
              dead_mask: Tensor | None, k_aux: int, aux_coef: float, aux_frac: float) -> Tensor:
        """AuxK: the top k_aux dead latents reconstruct the residual (without b_dec)."""
        aux = err.new_zeros(())
        if dead_mask is None or aux_coef <= 0 or k_aux <= 0:
            return aux
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return aux
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
        return aux_coef * torch.nan_to_num(auxk, nan=0.0)

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
        aux = self._auxk(x, pre, bias, err, dead_mask, k_aux, aux_coef, aux_frac)
        fired_idx = idx[vals > 0]
        fired = torch.bincount(fired_idx, minlength=self.d_sae)
        l0 = (vals > 0).sum(-1).float().mean()
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired)

    def _forward_batchtopk(
        self, x: Tensor, dead_mask: Tensor | None, k_aux: int, aux_coef: float,
        aux_frac: float = 1.0,
    ) -> ForwardOutput:
        bias = self.b_enc - self.b_dec @ self.W_enc
        vals, cols, offsets, pre = _BatchTopKEncode.apply(x, self.W_enc, bias, self.k)
        vals = vals.relu()
        x_hat = F.embedding_bag(cols, self.W_dec, offsets,
                                per_sample_weights=vals.to(self.W_dec.dtype),
                                mode="sum") + self.b_dec
        err = x.float() - x_hat.float()
        mse = err.pow(2).mean()
        aux = self._auxk(x, pre, bias, err, dead_mask, k_aux, aux_coef, aux_frac)
        on = vals > 0
        fired = torch.bincount(cols[on], minlength=self.d_sae)
        l0 = on.sum().float() / x.shape[0]
        positive = vals.detach()[on]
        min_kept = positive.min().float() if positive.numel() else vals.new_zeros((), )
        return ForwardOutput(x_hat, mse + aux, mse, aux, l0, fired, min_kept.float())
