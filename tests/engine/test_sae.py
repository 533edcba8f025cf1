import torch

from worker.engine.sae import SAE


def _sae(encoder_type="topk", d_in=16, d_sae=64, k=4):
    torch.manual_seed(0)
    sae = SAE(d_in, d_sae, encoder_type, k)
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
    sae = _sae("topk")
    x = torch.randn(30, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    assert sae(x, dead_mask=dead, k_aux=8, aux_coef=1.0).aux == 0
    dead[:10] = True
    out = sae(x, dead_mask=dead, k_aux=8, aux_coef=1.0)
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
    a = sae(x, l1_coef=1.0).aux
    with torch.no_grad():
        sae.W_dec.mul_(2)
    b = sae(x, l1_coef=1.0).aux
    torch.testing.assert_close(b, 2 * a)
    assert sae(x, l1_coef=0.0).aux == 0


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
    sae = SAE(8, 32)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
