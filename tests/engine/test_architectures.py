"""The four encoder types through the real Trainer on synthetic sparse data (no mocks)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from worker.engine import checkpoints as ck
from worker.engine.activations import CachedActivations
from worker.engine.architectures import names
from worker.engine.config import TrainConfig
from worker.engine.errors import ConfigError
from worker.engine.trainer import Trainer

from .synthetic import sparse_activations, train


def _cfg(acts: Path, **kw) -> TrainConfig:
    base = dict(activations=str(acts), k=4, expansion_factor=4, batch_size=256, total_steps=120,
                log_every=10, auto_save_interval=0, eval_tokens=2000, learning_rate=4e-3,
                l1_alpha=0.2)
    base.update(kw)
    return TrainConfig(**base)


def test_encoder_types_in_order():
    assert names() == ("topk", "standard", "jumprelu", "batchtopk", "matryoshka_batchtopk")
    assert TrainConfig().encoder_type == "topk"


@pytest.mark.parametrize("encoder_type", names())
def test_every_type_learns(acts, tmp_path, encoder_type):
    # Synthetic coefficients are small on the unit scale (~0.2-0.8): a light L0 penalty.
    _, result, rows = train(_cfg(acts, encoder_type=encoder_type, l0_coef=0.02), tmp_path)
    assert rows[0]["fvu"] > rows[-1]["fvu"]
    assert result.fvu < 0.35, result
    assert 0 < result.l0 < 40, result
    if encoder_type == "jumprelu":
        assert rows[-1]["sparsity_loss"] > 0 and rows[-1]["aux_loss"] == rows[-1]["sparsity_loss"]


def test_jumprelu_threshold_learns_and_l0_coef_controls_sparsity(acts, tmp_path):
    low, r_low, _ = train(_cfg(acts, encoder_type="jumprelu", l0_coef=0.02), tmp_path / "low")
    high, r_high, _ = train(_cfg(acts, encoder_type="jumprelu", l0_coef=0.3), tmp_path / "high")
    assert r_high.l0 < 0.7 * r_low.l0, (r_low.l0, r_high.l0)
    # The thresholds moved from their common starting value, differently per latent.
    start = Trainer(_cfg(acts, encoder_type="jumprelu", l0_coef=0.3),
                    CachedActivations(acts, holdout=2000), tmp_path / "start")
    start.initialise()
    theta0 = start.sae.threshold.detach()
    assert torch.allclose(theta0, theta0[0].expand_as(theta0)) and theta0[0] > 0
    moved = high.sae.threshold.detach() - theta0
    assert moved.abs().max() > 0.05 and moved.std() > 0
    assert high.sae.threshold.mean() > low.sae.threshold.mean()
    # The threshold gets a gradient from both the reconstruction and the L0 penalty.
    x = sparse_activations(256, offset=3.0, seed=3) * start.scale
    for coef in (0.0, 1.0):
        start.sae.zero_grad()
        start.sae(x, sparsity_coef=coef).loss.backward()
        assert start.sae.threshold.grad is not None and start.sae.threshold.grad.abs().sum() > 0


def test_jumprelu_init_threshold_option(acts, tmp_path):
    cfg = _cfg(acts, encoder_type="jumprelu", jumprelu_init_threshold=0.25)
    trainer = Trainer(cfg, CachedActivations(acts, holdout=2000), tmp_path)
    trainer.initialise()
    assert torch.all(trainer.sae.threshold == 0.25)


def test_batchtopk_l0_is_k_in_training_and_at_inference(acts, tmp_path):
    trainer, result, rows = train(_cfg(acts, encoder_type="batchtopk"), tmp_path)
    for row in rows:
        assert row["l0"] == pytest.approx(4, abs=0.05)  # k x batch kept over the batch
    theta = float(trainer.sae.threshold)
    assert theta > 0
    # Held-out data encoded with the running threshold: L0 near k.
    assert result.l0 == pytest.approx(4, rel=0.25), result
    x = trainer.source.holdout().float() * trainer.scale
    with torch.no_grad():
        f = trainer.sae.encode(x)
    assert ((f > 0).sum(-1).float().mean()) == pytest.approx(4, rel=0.3)
    assert f[f > 0].min() > theta
    # Per token the count varies (that is the point of BatchTopK); eval mode is restored.
    assert (f > 0).sum(-1).float().std() > 0
    assert trainer.sae.training


def test_batchtopk_threshold_survives_checkpoint(acts, tmp_path):
    cfg = _cfg(acts, encoder_type="batchtopk", total_steps=30, auto_save_interval=20)
    trainer, _, _ = train(cfg, tmp_path)
    path = ck.checkpoint_path(tmp_path / "checkpoints", 20)
    saved = ck.load_checkpoint(path).tensors["sae.threshold"]
    assert saved.shape == () and float(saved) > 0
    again = Trainer(cfg, CachedActivations(acts, holdout=2000), tmp_path / "again")
    again.load(ck.checkpoint_path(tmp_path / "checkpoints", 30))
    assert float(again.sae.threshold) == float(trainer.sae.threshold)


def test_tie_weights_stay_tied_and_resume(acts, tmp_path):
    cfg = _cfg(acts, encoder_type="standard", tie_weights=True, total_steps=60,
               auto_save_interval=20, keep_every=20)
    trainer, full, full_rows = train(cfg, tmp_path / "full")
    sae = trainer.sae
    assert [n for n, _ in sae.named_parameters()] == ["W_enc", "b_enc", "b_dec"]
    assert torch.equal(sae.W_dec, sae.W_enc.T)
    assert full.fvu < 0.6
    ckpt = ck.load_checkpoint(ck.checkpoint_path(tmp_path / "full" / "checkpoints", 60))
    assert "sae.W_dec" not in ckpt.tensors and "sae.W_enc" in ckpt.tensors
    # Interrupt at step 40 and resume: the same losses as the uninterrupted run.
    _, part, _ = train(cfg, tmp_path / "part", control=lambda s: "stop" if s == 40 else None)
    assert part.stopped and part.steps == 40
    resumed_tr, resumed, resumed_rows = train(
        cfg, tmp_path / "part", resume=ck.checkpoint_path(tmp_path / "part" / "checkpoints", 40))
    assert resumed.steps == 60
    for a, b in zip(full_rows[-2:], resumed_rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a["loss"], b["loss"])
    assert torch.equal(resumed_tr.sae.W_dec, resumed_tr.sae.W_enc.T)


@pytest.mark.parametrize(("changes", "match"), [
    ({"tie_weights": True, "encoder_type": "topk"}, "Tie weights works only with the standard"),
    ({"tie_weights": True, "encoder_type": "jumprelu"}, "Tie weights works only"),
    ({"jumprelu_bandwidth": 0.0}, "JumpReLU bandwidth must be greater than 0"),
    ({"l0_coef": -1.0}, "L0 coefficient must not be negative"),
    ({"jumprelu_init_threshold": -0.1}, "JumpReLU initial threshold must not be negative"),
    ({"batchtopk_threshold_momentum": 0.0}, "BatchTopK threshold momentum"),
    ({"encoder_type": "batchtopk", "k": 999, "latent_dim": 64}, "cannot exceed"),
])
def test_new_options_are_validated(acts, changes, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(acts, **changes).validate(d_in=32)


def test_default_learning_rates():
    assert TrainConfig(encoder_type="topk").lr(4096) == pytest.approx(6e-3)
    assert TrainConfig(encoder_type="topk").lr(16384) == pytest.approx(3e-3)
    for t in ("batchtopk", "jumprelu", "matryoshka_batchtopk"):
        assert TrainConfig(encoder_type=t).lr(4096) == pytest.approx(2e-3)
    assert TrainConfig(encoder_type="standard").lr(4096) == pytest.approx(4e-3)
    assert TrainConfig(encoder_type="standard").lr(16384) == pytest.approx(2e-3)
