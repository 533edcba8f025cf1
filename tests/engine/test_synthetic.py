"""The ground-truth generator (worker/engine/synthetic.py): its statistics, its metrics, and a
short TopK training on its data that recovers the true features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.engine.activations import write_activation_file
from worker.engine.config import TrainConfig
from worker.engine.synthetic import (
    GroundTruth,
    SyntheticConfig,
    cosine_matrix,
    greedy_matching,
    have_scipy,
    hungarian_matching,
    mcc,
    recovered_share,
    zipf_probabilities,
)

from .synthetic import train

SMALL = SyntheticConfig(n_features=256, d_in=64, mean_l0=6.0, max_prob=0.2, seed=3)


@pytest.fixture(scope="module")
def truth() -> GroundTruth:
    return GroundTruth.build(SMALL)


@pytest.fixture(scope="module")
def codes(truth):
    return truth.sample_codes(40_000, seed=1)


def test_zipf_probabilities_sum_to_the_mean_l0_and_follow_the_power_law():
    p = zipf_probabilities(1000, mean_l0=20.0, exponent=1.0, max_prob=0.3)
    assert p.sum().item() == pytest.approx(20.0, rel=1e-6)
    assert p.max().item() == pytest.approx(0.3)
    assert (p[1:] <= p[:-1]).all()
    free = p < 0.3  # uncapped ranks: p * rank is constant
    ranks = torch.arange(1, 1001, dtype=torch.float64)[free]
    assert (p[free] * ranks).std() / (p[free] * ranks).mean() < 1e-9
    with pytest.raises(ValueError, match="mean_l0"):
        SyntheticConfig(n_features=10, mean_l0=5.0, max_prob=0.2)


def test_features_are_unit_norm_and_in_superposition(truth):
    assert truth.features.shape == (256, 64)
    assert torch.allclose(truth.features.norm(dim=1), torch.ones(256), atol=1e-5)
    cos = cosine_matrix(truth.features, truth.features) - torch.eye(256)
    assert 0.2 < cos.abs().max() < 0.9  # not orthogonal (256 > 64), not duplicated


def test_frequencies_follow_the_zipf_law(truth, codes):
    assert codes.l0() == pytest.approx(SMALL.mean_l0, rel=0.03)
    freq = torch.bincount(codes.features, minlength=256).double() / codes.n_rows
    # The marginal probability of every feature (grouped or not) is its Zipf value.
    assert torch.allclose(freq, truth.probs, atol=4 * (truth.probs / codes.n_rows).sqrt().max())
    # Sorted by frequency, log frequency against log rank has slope ~ -exponent (uncapped part).
    f = freq.sort(descending=True).values
    rank = torch.arange(1, 257, dtype=torch.float64)
    sel = (f < SMALL.max_prob * 0.9) & (rank <= 128)
    x, y = rank[sel].log(), f[sel].log()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum()
    assert slope.item() == pytest.approx(-SMALL.zipf_exponent, abs=0.15)


def test_correlated_groups_co_fire(truth, codes):
    assert truth.groups.shape == (256 // 2 // 4, 4)
    dense = codes.dense(256) > 0
    fired = dense.double()
    corr = torch.corrcoef(fired.T)
    a, b = truth.groups[:, 0], truth.groups[:, 1]
    in_group = corr[a, b]
    grouped = set(truth.groups.flatten().tolist())
    free = torch.tensor([i for i in range(256) if i not in grouped])
    across = corr[free[:-1:2], free[1::2]]
    assert in_group.mean() > 0.2
    assert across.abs().mean() < 0.02
    # A group's joint event fires all its members: the rarest member never fires alone less
    # often than group_share of its firings come with all the others.
    g = truth.groups[0]
    all_fire = dense[:, g].all(dim=1).double().mean()
    assert all_fire >= 0.8 * truth.group_probs[0]


def test_magnitudes_offset_and_noise(truth, codes):
    assert (codes.magnitudes > 0).all()
    by_feature = torch.zeros(256).index_add_(0, codes.features, codes.magnitudes)
    counts = torch.bincount(codes.features, minlength=256).float()
    common = counts > 2000
    assert torch.allclose(by_feature[common] / counts[common], truth.magnitude_means[common],
                          rtol=0.05)
    x = truth.activations(codes, seed=5)
    clean = codes.dense(256) @ truth.features + truth.offset
    noise = x - clean
    assert noise.std().item() == pytest.approx(SMALL.noise_std, rel=0.02)
    expected_mean = truth.offset + (truth.probs.float() * truth.magnitude_means) @ truth.features
    assert torch.allclose(x.mean(0), expected_mean, atol=0.05)
    assert truth.offset.norm().item() == pytest.approx(SMALL.offset_norm)


def test_generation_is_deterministic(truth):
    a = torch.cat(list(truth.generate(3000, seed=7, chunk=1000)))
    b = torch.cat(list(truth.generate(3000, seed=7, chunk=1000)))
    c = torch.cat(list(truth.generate(3000, seed=8, chunk=1000)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(GroundTruth.build(SMALL).features, truth.features)


def test_mcc_is_one_for_the_truth_and_low_for_a_random_dictionary(truth):
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    signs = torch.where(torch.rand(256, generator=torch.Generator().manual_seed(1)) < 0.5, -1, 1)
    shuffled = truth.features[perm] * signs[:, None] * 3.0  # order, sign and scale do not count
    value, method = mcc(shuffled, truth.features)
    assert value == pytest.approx(1.0, abs=1e-5)
    assert method == ("hungarian" if have_scipy() else "greedy")
    random = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    low, _ = mcc(random, truth.features)
    assert low < 0.45
    assert recovered_share(truth.features[perm], truth.features) == 1.0
    assert recovered_share(random, truth.features) == 0.0
    # Half the features replaced by random directions: about half recovered, MCC in between.
    half = torch.cat([truth.features[:128], random[128:]])
    assert recovered_share(half, truth.features) == pytest.approx(0.5, abs=0.02)
    assert low < mcc(half, truth.features)[0] < 1.0
    # More latents than features: the matching counts min(n_latents, n_features) pairs.
    wide = torch.cat([random, truth.features])
    assert mcc(wide, truth.features)[0] == pytest.approx(1.0, abs=1e-5)


def test_greedy_matching_takes_the_largest_remaining_pair_first():
    score = torch.rand(40, 30, generator=torch.Generator().manual_seed(4))
    rows, cols = greedy_matching(score)
    assert len(rows) == 30 and len(set(rows.tolist())) == 30 and len(set(cols.tolist())) == 30
    # Reference: sort all pairs, take each whose row and column are both free.
    used_r, used_c, ref = set(), set(), set()
    for flat in score.flatten().argsort(descending=True).tolist():
        r, c = divmod(flat, 30)
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            ref.add((r, c))
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == ref
    if have_scipy():
        hr, hc = hungarian_matching(score)
        assert score[hr, hc].sum() >= score[rows, cols].sum() - 1e-6


def test_short_topk_training_recovers_the_features(tmp_path: Path):
    """A short TopK training (150 steps of 512 rows; a few seconds on an idle CPU) on generated
    rows finds most of a small dictionary."""
    cfg = SyntheticConfig(n_features=96, d_in=64, mean_l0=3.0, max_prob=0.2, grouped_frac=0.25,
                          seed=11)
    truth = GroundTruth.build(cfg)
    path = tmp_path / "acts.safetensors"
    write_activation_file(truth.generate(60_000, seed=1, chunk=20_000), path,
                          meta={"model": "synthetic", "layer": 0, "hook_point": "residual",
                                "context_size": 2})
    train_cfg = TrainConfig(activations=str(path), encoder_type="topk", k=3, expansion_factor=4,
                            batch_size=512, total_steps=150, learning_rate=8e-3, log_every=50,
                            auto_save_interval=0, eval_tokens=4000, seed=0)
    trainer, result, _ = train(train_cfg, tmp_path / "run")
    w_dec = trainer.sae.W_dec.detach()
    assert w_dec.shape == (256, 64)
    share = recovered_share(w_dec, truth.features)
    value, _ = mcc(w_dec, truth.features)
    untrained = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    assert share > 0.6, (share, value, result)
    assert value > 0.75 > mcc(untrained, truth.features)[0]
    assert result.fvu < 0.2
