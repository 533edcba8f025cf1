"""Each SAE type's forward and gradients against a dense reference (real tensors)."""

import pytest
import torch

from worker.engine import kernels
from worker.engine.architectures import build
from worker.engine.architectures.standard import StandardSAE

K_TYPES = ("topk", "batchtopk")


def _sae(encoder_type="topk", d_in=16, d_sae=64, k=4, **options):
    torch.manual_seed(0)
    if encoder_type in K_TYPES:
        options["k"] = k
    sae = build(encoder_type, d_in, d_sae, **options)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    return sae


def test_topk_forward_matches_dense_reference():
    sae = _sae("topk")
    x = torch.randn(50, 16)
    out = sae(x)
    f = sae.encode(x)
    assert ((f > 0).sum(-1) <= 4).all()
    dense = f @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out.x_hat, dense, rtol=1e-5, atol=1e-5)
    assert torch.isclose(out.mse, (dense - x).pow(2).mean())
    assert out.fired.sum() == (f > 0).sum()
    assert torch.isclose(out.l0, (f > 0).sum(-1).float().mean())


def test_topk_gradients_match_dense_reference():
    sae = _sae("topk")
    ref = _sae("topk")
    x = torch.randn(40, 16)
    sae(x).loss.backward()
    f = ref.encode(x)
    loss = ((f @ ref.W_dec + ref.b_dec) - x).pow(2).mean()
    loss.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(ref, name).grad,
                                   rtol=1e-4, atol=1e-6)


def test_auxk_only_uses_dead_latents_and_excludes_b_dec():
    sae = _sae("topk", aux_k=8, aux_k_coef=1.0)
    x = torch.randn(30, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    assert sae(x, dead_mask=dead).aux == 0
    dead[:10] = True
    out = sae(x, dead_mask=dead)
    # Reference: the residual is reconstructed from the top 8 dead pre-activations, no b_dec.
    with torch.no_grad():
        pre = sae.pre_acts(x)[:, :10]
        vals, idx = pre.topk(8, dim=-1)
        e_hat = (vals.relu()[..., None] * sae.W_dec[:10][idx]).sum(1)
        e = x - out.x_hat
        ref = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.aux, ref, rtol=1e-4, atol=1e-6)
    out.aux.backward()
    # Only dead latents' decoder rows receive the AuxK gradient.
    assert sae.W_dec.grad[10:].abs().sum() == 0
    assert sae.W_dec.grad[:10].abs().sum() > 0


def test_standard_l1_is_weighted_by_decoder_norm():
    sae = _sae("standard")
    x = torch.randn(20, 16)
    a = sae(x, sparsity_coef=1.0).aux
    with torch.no_grad():
        sae.W_dec.mul_(2)
    b = sae(x, sparsity_coef=1.0).aux
    torch.testing.assert_close(b, 2 * a)
    assert sae(x, sparsity_coef=0.0).aux == 0


def test_decoder_unit_norm_and_parallel_grad_removed():
    sae = _sae("topk")
    sae(torch.randn(20, 16)).loss.backward()
    sae.remove_parallel_grad()
    radial = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert radial.abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_init_ties_encoder_to_decoder():
    sae = build("topk", 8, 32, k=4)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_batch_topk_selection_is_exact_even_when_one_row_takes_many():
    g = torch.Generator().manual_seed(0)
    for trial in range(10):
        pre = torch.randn(50, 64, generator=g) * torch.rand(50, 1, generator=g) * 5
        if trial % 2:
            pre[3] += 100  # row 3 alone holds more than 2k of the top entries
        mask, entries = kernels.batch_topk_select(pre, 200)
        want = torch.zeros(50 * 64, dtype=torch.bool)
        want[pre.reshape(-1).topk(200).indices] = True
        assert torch.equal(mask.reshape(-1), want), trial
        assert torch.equal(entries, mask.nonzero()), trial


def test_batchtopk_forward_and_gradients_match_dense_reference():
    sae, ref = _sae("batchtopk"), _sae("batchtopk")
    x = torch.randn(40, 16)
    out = sae(x)
    f = ref.encode_batch_topk(x)
    assert (f > 0).sum() <= 4 * 40 and (f > 0).sum(-1).float().std() > 0
    dense = f @ ref.W_dec + ref.b_dec
    torch.testing.assert_close(out.x_hat, dense, rtol=1e-5, atol=1e-5)
    assert torch.isclose(out.l0, (f > 0).sum() / 40.0)
    assert out.fired.sum() == (f > 0).sum()
    assert out.min_kept == f[f > 0].min()
    out.loss.backward()
    (dense - x).pow(2).mean().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(ref, name).grad,
                                   rtol=1e-4, atol=1e-6)


def test_batchtopk_inference_uses_running_threshold():
    sae = _sae("batchtopk")
    x = torch.randn(30, 16)
    assert "threshold" in sae.state_dict()
    sae.update_threshold(torch.tensor(2.0), 0.5)
    assert float(sae.threshold) == 1.0
    pre = sae.pre_acts(x)
    f = sae.encode(x)
    torch.testing.assert_close(f, pre * (pre > 1.0))
    sae.eval()
    out = sae(x)
    torch.testing.assert_close(out.x_hat, sae.decode(f))
    assert out.min_kept is None and torch.isclose(out.l0, (f > 0).sum(-1).float().mean())


def test_jumprelu_straight_through_gradients():
    sae = _sae("jumprelu")
    bw = sae.bandwidth
    with torch.no_grad():
        sae.threshold.uniform_(0.0, 1.0)
    x = torch.randn(64, 16)
    pre = sae.pre_acts(x).detach()
    theta = sae.threshold.detach()
    f = sae.encode(x)
    torch.testing.assert_close(f, pre * (pre > theta))
    # L0 penalty alone: d/dtheta = -coef / d_in / n * sum_b rect((pre - theta) / bw) / bw.
    out = sae(x, sparsity_coef=2.0)
    assert torch.isclose(out.l0, (f > 0).sum(-1).float().mean())
    torch.testing.assert_close(out.aux, 2.0 * (pre > theta).sum(-1).float().mean() / 16)
    out.aux.backward()
    window = ((pre - theta).abs() < bw / 2).float()
    torch.testing.assert_close(sae.threshold.grad, -2.0 / 16 / 64 * window.sum(0) / bw)
    # Reconstruction: d/dtheta = -(theta / bw) * sum_b rect(...) * dL/df.
    sae.zero_grad()
    f_ref = f.detach().clone().requires_grad_(True)
    ((f_ref @ sae.W_dec.detach() + sae.b_dec.detach()) - x).pow(2).mean().backward()
    sae(x).mse.backward()
    torch.testing.assert_close(sae.threshold.grad,
                               -(theta / bw) * (window * f_ref.grad).sum(0), rtol=1e-4, atol=1e-7)
    sae.after_step(None)  # thresholds clamped at 0, decoder rows at unit norm
    assert (sae.threshold >= 0).all()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_tied_weights_are_one_parameter():
    sae = StandardSAE(8, 32, tie_weights=True)
    assert list(sae.state_dict()) == ["W_enc", "b_enc", "b_dec"]
    assert sae.W_dec.data_ptr() == sae.W_enc.data_ptr()
    x = torch.randn(10, 8)
    sae(x, sparsity_coef=0.1).loss.backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    other = StandardSAE(8, 32, tie_weights=True)
    other.load_state_dict(sae.state_dict())
    torch.testing.assert_close(other.W_dec, sae.W_enc.T)
    with pytest.raises(TypeError, match="tie_weights"):
        build("topk", 8, 32, k=4, tie_weights=True)


def _threshold_sae(encoder_type, shift, d_in=32, d_sae=128):
    torch.manual_seed(0)
    bandwidth = {"jumprelu_bandwidth": 0.2} if encoder_type == "jumprelu" else {}
    sae = build(encoder_type, d_in, d_sae, **bandwidth)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(shift, 0.1)
        if encoder_type == "jumprelu":
            sae.threshold.uniform_(0.0, 1.0)
    return sae


def _dense_reference(sae, x, coef):
    """Standard / JumpReLU training loss from dense [n, d_sae] tensors (the pre-sparse code)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.encoder_type == "jumprelu":
        f = kernels.JumpReLUFn.apply(pre, sae.threshold, sae.bandwidth)
        aux = coef * kernels.StepFn.apply(pre, sae.threshold, sae.bandwidth).sum(-1).mean() \
            / sae.d_in
    else:
        f = pre.relu()
        aux = coef * (f * sae.W_dec.norm(dim=1)).sum(-1).mean() / sae.d_in
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = (x_hat - x).pow(2).mean()
    active = f.detach() > 0
    return x_hat, mse + aux, active.sum(-1).float().mean(), active.sum(0)


@pytest.mark.parametrize("encoder_type", ["standard", "jumprelu"])
@pytest.mark.parametrize("shift, sparse_expected", [(-2.0, True), (0.5, False)])
@pytest.mark.parametrize("force", [None, 0.0, 1.0])
def test_threshold_sparse_and_dense_paths_match_dense_reference(encoder_type, shift,
                                                                sparse_expected, force):
    sae, ref = _threshold_sae(encoder_type, shift), _threshold_sae(encoder_type, shift)
    if force is not None:  # 0: always dense, 1: always sparse
        sae.sparse_max_density = force
        sparse_expected = force == 1.0
    x = torch.randn(96, 32)
    coef = 0.7
    out = sae(x, sparsity_coef=coef)
    assert sae.sparse_steps == int(sparse_expected)
    x_hat, loss, l0, fired = _dense_reference(ref, x, coef)
    density = float(l0) / sae.d_sae
    assert (density < 0.1) if shift < 0 else (density > 0.3)
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-6)
    assert torch.isclose(out.l0, l0) and torch.equal(out.fired, fired)
    out.loss.backward()
    loss.backward()
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if encoder_type == "jumprelu"
                                                    else [])
    for name in names:
        got, want = getattr(sae, name).grad, getattr(ref, name).grad
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_jumprelu_sparse_threshold_gradient_covers_inactive_window():
    """The straight-through threshold gradient needs dL/df at inactive entries just below the
    threshold: the sparse path must match the dense one when only those entries are in the
    window (reconstruction term alone, no L0 penalty)."""
    sae, ref = _threshold_sae("jumprelu", -1.0), _threshold_sae("jumprelu", -1.0)
    x = torch.randn(96, 32)
    with torch.no_grad():
        pre = ref.pre_acts(x)
        below = ((pre < ref.threshold) & (pre > ref.threshold - 0.1)).sum()
    assert below > 0
    sae(x).loss.backward()
    assert sae.sparse_steps == 1
    _dense_reference(ref, x, 0.0)[1].backward()
    torch.testing.assert_close(sae.threshold.grad, ref.threshold.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("encoder_type", ["standard", "jumprelu"])
def test_threshold_sparse_path_with_nothing_active(encoder_type):
    sae = _threshold_sae(encoder_type, -50.0)
    x = torch.randn(8, 32)
    out = sae(x, sparsity_coef=1.0)
    assert sae.sparse_steps == 1 and out.l0 == 0 and out.fired.sum() == 0
    torch.testing.assert_close(out.x_hat, sae.b_dec.expand(8, -1))
    out.loss.backward()
    assert sae.W_dec.grad.abs().sum() == 0 and sae.b_dec.grad.abs().sum() > 0


def test_threshold_sparse_path_under_bf16_autocast():
    sae, ref = _threshold_sae("jumprelu", -2.0), _threshold_sae("jumprelu", -2.0)
    ref.sparse_max_density = 0.0
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = sae(x, sparsity_coef=1.0), ref(x, sparsity_coef=1.0)
    assert sae.sparse_steps == 1 and ref.sparse_steps == 0
    torch.testing.assert_close(a.loss, b.loss, rtol=2e-2, atol=1e-3)
    a.loss.backward()
    b.loss.backward()
    for name in ("W_enc", "W_dec", "threshold"):
        got, want = getattr(sae, name).grad, getattr(ref, name).grad
        assert (got - want).norm() <= 2e-2 * want.norm(), name


def _allocated_peak(fn) -> int:
    """Peak bytes the CPU allocator handed out while ``fn`` ran (the profiler's memory events:
    every allocation, a kernel's own temporaries included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("n", [1, 254, 255, 256, 1000, 4096])
def test_column_counts_are_exact_without_a_copy_of_the_mask(n):
    g = torch.Generator().manual_seed(n)
    for active in (torch.rand(n, 700, generator=g) < 0.05, torch.ones(n, 700, dtype=torch.bool),
                   (torch.rand(700, n, generator=g) < 0.5).t()):  # all on; a transposed view
        assert torch.equal(kernels.column_counts(active), active.sum(0))
        l0, fired = kernels.active_stats(active)
        assert torch.equal(fired, active.sum(0))
        assert l0.item() == pytest.approx(active.sum().item() / n)
    # The counts take a few [d] vectors and [n / 255, d] block sums, not a widened copy of the
    # [n, d] mask (a sum with dtype=int32 wrote 4 bytes per entry, count_nonzero on CUDA 8)
    mask = torch.rand(n, 4096, generator=g) < 0.05
    assert _allocated_peak(lambda: kernels.active_stats(mask)) < max(mask.numel() // 4, 2**17)
