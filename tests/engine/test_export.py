"""SAELens export: our loader round trip, and SAELens itself (in its own venv) agreeing with us."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.engine.activations import CachedActivations
from worker.engine.architectures import build
from worker.engine.config import TrainConfig
from worker.engine.export import export_checkpoint, export_saelens, load_saelens
from worker.engine.trainer import Trainer

from .synthetic import sparse_activations, write_sparse_file

ROOT = Path(__file__).resolve().parents[2]
SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"
SAELENS_ARCH = {"topk": "topk", "standard": "standard", "jumprelu": "jumprelu",
                "batchtopk": "jumprelu",  # BatchTopK runs as jumprelu with its threshold
                "matryoshka_batchtopk": "jumprelu"}


@pytest.fixture(scope="module", params=list(SAELENS_ARCH))
def trained(request, tmp_path_factory):
    """A short real training run (scale != 1, b_dec != 0) and its run folder."""
    root = tmp_path_factory.mktemp(f"run-{request.param}")
    acts = write_sparse_file(root / "acts.safetensors", n=8000, offset=5.0)
    cfg = TrainConfig(activations=str(acts), encoder_type=request.param, k=4, expansion_factor=4,
                      batch_size=256, total_steps=30, auto_save_interval=0, eval_tokens=1000,
                      l1_alpha=0.2)
    trainer = Trainer(cfg, CachedActivations(acts, holdout=1000), root / "run")
    trainer.fit()
    return trainer, root / "run"


def _ours(trainer: Trainer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction of raw x by the trained SAE (normalise, encode, decode, un-normalise)."""
    with torch.no_grad():
        f = trainer.sae.encode(x * trainer.scale)
        return trainer.sae.decode(f) / trainer.scale, f


def test_export_folder_layout(trained):
    trainer, run = trained
    folder = run / "saelens"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == SAELENS_ARCH[trainer.cfg.encoder_type]
    assert cfg["metadata"]["trained_architecture"] == trainer.cfg.encoder_type
    assert (cfg["d_in"], cfg["d_sae"]) == (32, 128)
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["sae_lens_version"] >= "6.0.0"
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert ("k" in cfg) == (trainer.cfg.encoder_type == "topk")
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (32, 128) and w["W_dec"].shape == (128, 32)
    if cfg["architecture"] == "jumprelu":
        # Pre-activations are unchanged by the input-scale folding: so is the threshold.
        torch.testing.assert_close(w["threshold"], trainer.sae.thresholds().detach())
        assert w["threshold"].shape == (128,) and (w["threshold"] > 0).all()
        if trainer.cfg.encoder_type in ("batchtopk", "matryoshka_batchtopk"):
            assert (w["threshold"] == float(trainer.sae.threshold)).all()
            assert cfg["metadata"]["k"] == 4
    else:
        assert "threshold" not in w
    if trainer.cfg.encoder_type == "matryoshka_batchtopk":
        assert cfg["metadata"]["matryoshka_widths"] == [16, 32, 64, 128]  # the default
    else:
        assert "matryoshka_widths" not in cfg["metadata"]
    sp = load_file(str(folder / "sparsity.safetensors"))["sparsity"]
    assert sp.shape == (128,) and sp.max() <= 0 and sp.min() >= -10
    assert trainer.scale != pytest.approx(1.0)


def test_export_round_trips_through_our_loader(trained, tmp_path):
    trainer, run = trained
    x = sparse_activations(500, offset=5.0, seed=9)
    want, f_want = _ours(trainer, x)
    sae = load_saelens(run / "saelens")
    assert sae.encoder_type == SAELENS_ARCH[trainer.cfg.encoder_type]
    with torch.no_grad():
        f = sae.encode(x)
        got = sae.decode(f)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f, f_want, rtol=1e-4, atol=1e-4)
    # sae-studio export from the final checkpoint gives the same folder contents.
    ckpt = sorted((run / "checkpoints").glob("step_*.safetensors"))[-1]
    again = export_checkpoint(ckpt, tmp_path / "again")
    for key, val in load_file(str(again / "sae_weights.safetensors")).items():
        torch.testing.assert_close(val, load_file(str(run / "saelens" /
                                                      "sae_weights.safetensors"))[key])


def test_export_replaces_existing_folder_atomically(tmp_path):
    folder = tmp_path / "sae"
    export_saelens(build("topk", 8, 16, k=2), folder)
    (folder / "stale.txt").write_text("old")
    export_saelens(build("topk", 8, 32, k=2), folder)
    assert not (folder / "stale.txt").exists()
    assert json.loads((folder / "cfg.json").read_text())["d_sae"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


@pytest.mark.skipif(not SAELENS_PY.exists() and not os.environ.get("CI"),
                    reason="no .venv-saelens (make saelens-venv creates it; CI always does)")
def test_sae_lens_loads_export_with_matching_reconstruction(trained, tmp_path):
    trainer, run = trained
    x = sparse_activations(300, offset=5.0, seed=11)
    save_file({"x": x.contiguous()}, str(tmp_path / "in.safetensors"))
    proc = subprocess.run(
        [str(SAELENS_PY), str(ROOT / "tests" / "saelens_bridge.py"), str(run / "saelens"),
         str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["architecture"] == SAELENS_ARCH[trainer.cfg.encoder_type]
    out = load_file(str(tmp_path / "out.safetensors"))
    want, f_want = _ours(trainer, x)
    torch.testing.assert_close(out["feature_acts"], f_want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["x_hat"], want, rtol=1e-4, atol=1e-4)


def test_tied_weights_export_untied_copies(tmp_path):
    acts = write_sparse_file(tmp_path / "acts.safetensors", n=4000, offset=5.0)
    cfg = TrainConfig(activations=str(acts), encoder_type="standard", tie_weights=True,
                      expansion_factor=4, batch_size=256, total_steps=10, auto_save_interval=0,
                      eval_tokens=500, l1_alpha=0.2)
    trainer = Trainer(cfg, CachedActivations(acts, holdout=500), tmp_path / "run")
    trainer.fit()
    w = load_file(str(tmp_path / "run" / "saelens" / "sae_weights.safetensors"))
    s = trainer.scale
    torch.testing.assert_close(w["W_dec"] * s, (w["W_enc"] / s).T)
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*.safetensors"))[-1]
    again = load_file(str(export_checkpoint(ckpt, tmp_path / "again") /
                          "sae_weights.safetensors"))
    for key, val in w.items():
        torch.testing.assert_close(again[key], val)
    sae = load_saelens(tmp_path / "run" / "saelens")
    x = sparse_activations(100, offset=5.0, seed=2)
    want, _ = _ours(trainer, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(sae.encode(x)), want, rtol=1e-4, atol=1e-4)
