"""Tests for worker.engine.latent_stats (weight-only per-latent statistics): every figure
against a direct computation on the whole matrices, real SAEs of every type and tiny real
models (tests/engine/tiny_models.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.engine.tiny_models import TINY_HIDDEN, TINY_VOCAB_SIZE, kjv_lines
from worker.engine import latent_stats as ls
from worker.engine.architectures import build
from worker.engine.evaluate import EvalOptions, GroupSAE, evaluate_sae, evaluate_saes
from worker.engine.models import LoadedModel

D = TINY_HIDDEN
TYPES: dict[str, dict[str, Any]] = {
    "standard": {}, "tied": {"tie_weights": True}, "topk": {"k": 4}, "batchtopk": {"k": 4},
    "jumprelu": {},
}


def _sae(kind: str, d_in: int = D, d_sae: int = 4 * D, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    sae = build("standard" if kind == "tied" else kind, d_in, d_sae, **TYPES[kind])
    with torch.no_grad():
        sae.W_enc.normal_()
        if not getattr(sae, "tie_weights", False):
            sae.W_dec.normal_()
        sae.b_enc.normal_()
    return sae


def _full_cosines(rows: torch.Tensor) -> torch.Tensor:
    """[m, m] cosines with -inf on the diagonal."""
    unit = F.normalize(rows.double(), dim=1)
    sims = unit @ unit.T
    sims.fill_diagonal_(float("-inf"))
    return sims


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few rows, so that every product runs in several pieces."""
    monkeypatch.setattr(ls, "CHUNK_ELEMENTS", 1000)


@pytest.mark.parametrize("kind", TYPES)
def test_one_accessor_for_every_type(kind: str) -> None:
    sae = _sae(kind)
    w = ls.sae_weights(sae)
    assert w is not None
    assert torch.equal(w.W_enc, sae.W_enc) and torch.equal(w.W_dec, sae.W_dec)
    assert torch.equal(w.b_enc, sae.b_enc)
    assert w.W_enc.shape == (D, 4 * D) and w.W_dec.shape == (4 * D, D)
    if kind == "tied":
        assert torch.equal(w.W_dec, w.W_enc.T)
    assert ls.sae_weights(nn.Linear(3, 4)) is None  # no SAE weights: no statistics
    assert ls.latent_stats(nn.Linear(3, 4), 1.0, None) is None


def test_neighbours_and_encoder_stats_match_full_matrices() -> None:
    sae = _sae("topk", d_sae=40)
    with torch.no_grad():  # plant a near-duplicate pair and an opposite pair
        sae.W_dec[5] = sae.W_dec[3] * 2 + 0.05 * torch.randn(D)
        sae.W_dec[7] = -sae.W_dec[2]
        sae.W_enc[:, 9] = sae.W_enc[:, 8] * 0.5
    stats = ls.latent_stats(sae, 1.0, None, neighbours_n=6)
    assert stats is not None
    t, r = stats.tensors, stats.report
    sims = _full_cosines(sae.W_dec.detach())
    vals, ids = sims.topk(6, dim=1)
    torch.testing.assert_close(t["neighbour_cosines"], vals.float())
    gaps = (vals[:, :-1] - vals[:, 1:]).abs().min(1).values > 1e-6  # rows without near-ties
    assert gaps.sum() > 30
    assert torch.equal(t["neighbour_ids"][gaps], ids[gaps].int())
    assert t["neighbour_ids"][5, 0] == 3 and t["neighbour_ids"][3, 0] == 5
    assert (t["neighbour_ids"] != torch.arange(40).unsqueeze(1)).all()  # never itself
    assert torch.equal(t["max_decoder_cosine_per_latent"], t["neighbour_cosines"][:, 0])
    off_diag = sims[~torch.eye(40, dtype=torch.bool)]
    assert r["max_decoder_cosine"] == pytest.approx(float(off_diag.max()), abs=1e-6)
    assert r["max_decoder_cosine"] > 0.99
    share = float((sims.max(1).values > 0.9).double().mean())
    assert r["near_duplicate_share"] == pytest.approx(share) and share >= 2 / 40
    assert r["average_max_decoder_cosine_sim"] == pytest.approx(
        float(sims.max(1).values.mean()), abs=1e-6)

    # SAEBench's per-feature encoder statistics (get_featurewise_weight_based_metrics)
    w_enc = sae.W_enc.detach()
    enc_sims = _full_cosines(w_enc.T)
    torch.testing.assert_close(t["max_encoder_cosine_per_latent"],
                               enc_sims.max(1).values.float())
    assert float(t["max_encoder_cosine_per_latent"][9]) == pytest.approx(1.0, abs=1e-6)
    assert r["average_max_encoder_cosine_sim"] == pytest.approx(
        float(enc_sims.max(1).values.mean()), abs=1e-6)
    torch.testing.assert_close(t["encoder_norm"], w_enc.norm(dim=0))
    torch.testing.assert_close(t["encoder_bias"], sae.b_enc.detach())
    enc_dec = (F.normalize(w_enc.T, dim=1) * F.normalize(sae.W_dec.detach(), dim=1)).sum(1)
    torch.testing.assert_close(t["encoder_decoder_cosine"], enc_dec)
    assert r["has_logits"] is False and "logit_top_ids" not in t  # no model given


def test_logit_lens_matches_matmul(tiny: dict[str, LoadedModel]) -> None:
    loaded = tiny["llama"]
    sae = _sae("jumprelu", d_sae=50)
    scale = 2.5
    stats = ls.latent_stats(sae, scale, loaded.model, logits_n=10, promoters_n=5)
    assert stats is not None and stats.report["has_logits"] is True
    t = stats.tensors
    w_u = loaded.model.get_output_embeddings().weight.detach()
    assert w_u.shape == (TINY_VOCAB_SIZE, D)
    logits = (sae.W_dec.detach().double() / scale) @ w_u.double().T  # [d_sae, vocab]
    top, bottom = logits.topk(10, dim=1), logits.topk(10, dim=1, largest=False)
    torch.testing.assert_close(t["logit_top_values"], top.values.float())
    torch.testing.assert_close(t["logit_bottom_values"], bottom.values.float())
    assert torch.equal(t["logit_top_ids"], top.indices.int())
    assert torch.equal(t["logit_bottom_ids"], bottom.indices.int())
    assert (t["logit_top_values"][:, :-1] >= t["logit_top_values"][:, 1:]).all()
    assert (t["logit_bottom_values"][:, :-1] <= t["logit_bottom_values"][:, 1:]).all()
    prom = logits.topk(5, dim=0)  # per token, the latents of highest value
    assert t["token_promoter_ids"].shape == (TINY_VOCAB_SIZE, 5)
    torch.testing.assert_close(t["token_promoter_values"], prom.values.T.float())
    assert torch.equal(t["token_promoter_ids"], prom.indices.T.int())
    # the scale divides: the same SAE at scale 1 has 2.5x the values
    at_one = ls.latent_stats(sae, 1.0, loaded.model)
    assert at_one is not None
    torch.testing.assert_close(at_one.tensors["logit_top_values"], t["logit_top_values"] * scale)


class _TinyHead(nn.Module):
    """A real module with a 4-token output embedding (fewer tokens than logits_n)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.head = nn.Linear(d, 4, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def test_padding_and_models_without_a_lens(tiny: dict[str, LoadedModel]) -> None:
    sae = _sae("topk", d_sae=3)
    stats = ls.latent_stats(sae, 1.0, _TinyHead(D), neighbours_n=10, logits_n=10, promoters_n=5)
    assert stats is not None
    t = stats.tensors
    assert (t["neighbour_ids"][:, 2:] == -1).all() and (t["neighbour_cosines"][:, 2:] == 0).all()
    assert (t["neighbour_ids"][:, :2] >= 0).all()
    assert (t["logit_top_ids"][:, 4:] == -1).all() and (t["logit_top_ids"][:, :4] >= 0).all()
    assert t["token_promoter_ids"].shape == (4, 5)
    assert (t["token_promoter_ids"][:, 3:] == -1).all()
    assert sorted(t["token_promoter_ids"][0, :3].tolist()) == [0, 1, 2]
    lone = ls.latent_stats(_sae("topk", d_sae=1), 1.0, None)
    assert lone is not None and lone.report["max_decoder_cosine"] is None
    assert (lone.tensors["neighbour_ids"] == -1).all()

    # an encoder without an output embedding, and a width that is not the model's: no lens
    assert ls.unembedding(tiny["bert"].model, D) is None
    assert ls.unembedding(tiny["llama"].model, 16) is None
    assert ls.unembedding(tiny["llama"].model, D) is not None


def test_evaluation_carries_the_statistics(tiny: dict[str, LoadedModel]) -> None:
    """evaluate_sae's tensors are latent_stats' for the SAE; a group gives each SAE the same as
    alone (incl. the pass details)."""
    loaded = tiny["gpt2"]
    tok = loaded.tokenizer
    ids: list[int] = []
    for line in kjv_lines(100):
        ids += [tok.bos_token_id, *tok(line)["input_ids"]]
    ctx = np.array(ids[: 6 * 16]).reshape(6, 16)
    opts = EvalOptions(batch_contexts=4, sample_n=5, hist_bins=8, neighbours_n=3)
    sae_a, sae_b = _sae("topk", d_sae=64, seed=1), _sae("standard", d_sae=96, seed=2)
    special = list(tok.all_special_ids)
    alone = [evaluate_sae(s, 1.5, loaded, ctx, layer, "residual", special_ids=special,
                          options=opts) for s, layer in ((sae_a, 0), (sae_b, 1))]
    group = evaluate_saes([GroupSAE(sae_a, 1.5, 0, "residual", {}),
                           GroupSAE(sae_b, 1.5, 1, "residual", {})], loaded, ctx,
                          special_ids=special, options=opts)
    for solo, member, sae in zip(alone, group, (sae_a, sae_b), strict=True):
        direct = ls.latent_stats(sae, 1.5, loaded.model, neighbours_n=3)
        assert direct is not None
        for key, value in direct.tensors.items():
            assert torch.equal(solo.latents[key], value), key
        assert set(member.latents) == set(solo.latents)
        for key, value in solo.latents.items():
            assert torch.equal(member.latents[key], value), key
        assert {k: v for k, v in member.report.items() if k != "created_at"} == {
            k: v for k, v in solo.report.items() if k != "created_at"}
        assert solo.latents["neighbour_ids"].shape == (sae.d_sae, 3)
        assert solo.latents["hist_counts"].shape == (sae.d_sae, 8)
