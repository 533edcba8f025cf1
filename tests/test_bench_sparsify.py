"""bench/sparsify_train.py, the transcoder benchmark's reference (EleutherAI's sparsify, run in
.venv-saelens): it trains a skip transcoder from a real tiny Llama saved with save_pretrained,
saves it where it says, and its held-out FVU is the benchmark's formula on that saved coder
(recomputed here from the safetensors file alone, with sparsify's TopK skip-transcoder maths)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.engine.models import extract_layers, load_model

from .engine.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"

pytestmark = pytest.mark.skipif(
    not SAELENS_PY.exists() and not os.environ.get("CI"),
    reason="no .venv-saelens (make saelens-venv creates it, with sparsify; CI always does)")


def test_sparsify_driver_trains_a_skip_transcoder_and_reports_its_heldout_fvu(tmp_path):
    model_dir = make_tiny_model("llama", tmp_path / "llama")
    loaded = load_model(str(model_dir))
    g = torch.Generator().manual_seed(0)
    vocab = loaded.info.vocab_size
    train = torch.randint(3, vocab, (8, 32), generator=g)
    np.save(tmp_path / "tokens.npy", train.numpy().astype(np.int32))
    held = torch.randint(3, vocab, (4, 32), generator=g)
    x, y = extract_layers(loaded.model, held, [(0, "mlp_in"), (0, "mlp_out")])
    x, y = x[:, 1:].reshape(-1, x.shape[-1]), y[:, 1:].reshape(-1, y.shape[-1])
    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(tmp_path / "held.safetensors"))

    proc = subprocess.run(
        [str(SAELENS_PY), str(ROOT / "bench" / "sparsify_train.py"), "--model", str(model_dir),
         "--tokens", str(tmp_path / "tokens.npy"), "--layer", "0", "--k", "4",
         "--expansion-factor", "2", "--batch-size", "4", "--skip-connection",
         "--heldout", str(tmp_path / "held.safetensors"), "--out", str(tmp_path / "out"),
         "--json-out", str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 2 and result["train_tokens"] == 256
    assert result["batch_tokens"] == 128 and result["heldout_tokens"] == len(x)
    assert 0.0 <= result["dead_frac"] <= 1.0 and result["tokens_per_s"] > 0

    saved = Path(result["out"])
    assert saved == tmp_path / "out" / "run" / "layers.0.mlp"
    cfg = json.loads((saved / "cfg.json").read_text())
    assert cfg["transcode"] and cfg["skip_connection"] and cfg["k"] == 4
    w = load_file(str(saved / "sae.safetensors"))
    assert w["encoder.weight"].shape == (2 * x.shape[1], x.shape[1])
    assert w["W_skip"].abs().sum() > 0  # trained, not the zero init

    pre = torch.relu(x @ w["encoder.weight"].T + w["encoder.bias"])
    acts, idx = pre.topk(4, dim=-1)
    y_hat = (acts[..., None] * w["W_dec"][idx]).sum(1) + w["b_dec"] + x @ w["W_skip"].T
    fvu = float((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert result["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert result["l0"] == pytest.approx(float((acts != 0).sum()) / len(x))
