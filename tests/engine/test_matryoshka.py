"""Matryoshka BatchTopK: its loss against a direct computation, its widths option, exact resume
and its per-prefix reconstruction, on real tensors and the real Trainer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from worker.engine import checkpoints as ck
from worker.engine import kernels
from worker.engine.architectures import build
from worker.engine.architectures.matryoshka import MatryoshkaBatchTopKSAE
from worker.engine.config import TrainConfig, matryoshka_widths
from worker.engine.errors import ConfigError

from .synthetic import train

WIDTHS = (8, 24, 40, 64)


def _cfg(acts: Path, **kw) -> TrainConfig:
    base = dict(activations=str(acts), encoder_type="matryoshka_batchtopk", k=4,
                expansion_factor=4, batch_size=256, total_steps=60, log_every=10,
                auto_save_interval=20, keep_every=20, eval_tokens=2000)
    base.update(kw)
    return TrainConfig(**base)


def _direct_loss(sae: MatryoshkaBatchTopKSAE, x: torch.Tensor, widths: tuple[int, ...]
                 ) -> torch.Tensor:
    """sum over prefixes w of mean((f[:, :w] W_dec[:w] + b_dec - x)^2), f the dense BatchTopK
    latents, written out with autograd through every step."""
    pre = x @ sae.W_enc + (sae.b_enc - sae.b_dec @ sae.W_enc)
    mask = kernels.batch_topk_select(pre.detach(), sae.k * x.shape[0])[0]
    f = pre.relu() * mask
    return sum(((f[:, :w] @ sae.W_dec[:w] + sae.b_dec - x) ** 2).mean() for w in widths)


def test_loss_and_gradients_equal_the_summed_prefix_mses():
    torch.manual_seed(0)
    sae = build("matryoshka_batchtopk", 16, 64, k=5, matryoshka_widths=WIDTHS)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(48, 16) + 0.5
    out = sae(x)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    want = _direct_loss(sae, x, WIDTHS)
    want.backward()
    assert math.isclose(float(out.loss.detach()), float(want.detach()), rel_tol=1e-5)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-7)
    # The whole SAE's MSE is the reported mse (the FVU's), its reconstruction x_hat.
    f = sae.encode_batch_topk(x)
    x_hat = f @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-5, atol=1e-5)
    assert math.isclose(float(out.mse.detach()), float(((x_hat - x) ** 2).mean().detach()),
                        rel_tol=1e-5)
    assert float(out.l0) == pytest.approx(5.0) and int(out.fired.sum()) == 5 * 48
    # Each level adds only its own latents: with one width the loss is BatchTopK's MSE.
    one = build("matryoshka_batchtopk", 16, 64, k=5, matryoshka_widths=(64,))
    one.load_state_dict(sae.state_dict())
    assert math.isclose(float(one(x).loss), float(out.mse), rel_tol=1e-5)


def test_prefix_errors_match_the_dense_decode():
    torch.manual_seed(1)
    sae = build("matryoshka_batchtopk", 16, 64, k=5, matryoshka_widths="8, 24 40,64")
    assert sae.matryoshka_widths == WIDTHS
    x = torch.randn(30, 16)
    f = sae.encode(x)
    errs = sae.prefix_errors(x, f)
    want = [float(((f[:, :w] @ sae.W_dec[:w] + sae.b_dec - x) ** 2).sum()) for w in WIDTHS]
    torch.testing.assert_close(errs, torch.tensor(want, dtype=torch.float64), rtol=1e-5,
                               atol=1e-5)


def test_widths_option_default_and_validation(acts):
    assert matryoshka_widths(None, 4608) == (576, 1152, 2304, 4608)
    assert matryoshka_widths("", 12) == (1, 3, 6, 12)
    assert matryoshka_widths("[1024, 2048, 4608]", 4608) == (1024, 2048, 4608)
    assert matryoshka_widths("1024,2048", None) == (1024, 2048)  # d_sae unknown yet
    assert TrainConfig(matryoshka_widths="16 128").prefix_widths(128) == (16, 128)
    bad = {
        "1024,abc": "Matryoshka widths must be whole numbers separated by commas",
        "0,128": "Matryoshka widths must be positive",
        "64,32,128": "must increase from one to the next (got 64 then 32)",
        "32,64": "The last of the Matryoshka widths (64) must equal the number of latents (128)",
    }
    for text, message in bad.items():
        errors = _cfg(acts, matryoshka_widths=text).errors(d_in=32)
        assert set(errors) == {"matryoshka_widths"}, (text, errors)
        assert message in errors["matryoshka_widths"], (text, errors)
        with pytest.raises(ConfigError, match="Matryoshka widths"):
            _cfg(acts, matryoshka_widths=text).validate(d_in=32)
    # Only the last-width rule needs the number of latents; another type ignores the option.
    assert _cfg(acts, matryoshka_widths="32,64").errors() == {}
    assert _cfg(acts, encoder_type="batchtopk", matryoshka_widths="x").errors(d_in=32) == {}


def test_trains_and_resumes_exactly(acts, tmp_path):
    cfg = _cfg(acts, matryoshka_widths="16,48,128")
    full_tr, full, full_rows = train(cfg, tmp_path / "full")
    assert full_tr.sae.matryoshka_widths == (16, 48, 128)
    assert full.fvu < 0.5 and 0 < full.l0 < 12, full
    # The loss sums three MSEs, each at least the whole SAE's.
    assert all(r["loss"] > 2.9 * r["mse"] for r in full_rows)
    _, part, _ = train(cfg, tmp_path / "part", control=lambda s: "stop" if s == 40 else None)
    assert part.stopped and part.steps == 40
    resumed_tr, resumed, resumed_rows = train(
        cfg, tmp_path / "part", resume=ck.checkpoint_path(tmp_path / "part" / "checkpoints", 40))
    assert resumed.steps == 60 and [r["step"] for r in resumed_rows] == [50, 60]
    for a, b in zip(full_rows[-2:], resumed_rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a["loss"], b["loss"])
    assert math.isclose(full.fvu, resumed.fvu, rel_tol=1e-4)
    assert float(resumed_tr.sae.threshold) == pytest.approx(float(full_tr.sae.threshold),
                                                            rel=1e-4)


def test_small_prefixes_reconstruct_and_nest(acts, tmp_path):
    """After training, each wider prefix reconstructs held-out vectors better, and the first
    prefix alone does much better than the same latents of a plain BatchTopK SAE trained alike
    (the Matryoshka loss trains them to reconstruct on their own)."""
    widths = "16,64,128"
    fvus = {}
    for kind in ("matryoshka_batchtopk", "batchtopk"):
        trainer, result, _ = train(_cfg(acts, encoder_type=kind, total_steps=80,
                                   auto_save_interval=0, matryoshka_widths=widths),
                              tmp_path / kind)
        sae = build("matryoshka_batchtopk", 32, 128, k=4, matryoshka_widths=widths)
        sae.load_state_dict(trainer.sae.state_dict())
        x = trainer.source.holdout().float() * trainer.scale  # never trained on
        errs = sae.prefix_errors(x, sae.encode(x))
        fvus[kind] = (errs / float((x - x.mean(0)).pow(2).sum())).tolist()
        assert fvus[kind][-1] == pytest.approx(result.fvu, rel=1e-4)  # the whole SAE's
    ours = fvus["matryoshka_batchtopk"]
    assert ours[0] > ours[1] > ours[2], fvus
    assert ours[0] < fvus["batchtopk"][0] - 0.05, fvus
