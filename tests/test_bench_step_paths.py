"""bench/step_paths.py, the GPU session's "where does the sparse step pay" check, run small on
the CPU: each row took the path it names (the script asserts it), the set densities are met,
the sparse path's loss and gradients are the dense path's at the same density, and
``kernels.SPARSE_DEVICES`` is left as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from worker.engine import architectures, kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import step_paths  # noqa: E402


def test_the_script_times_both_paths_at_the_densities_it_sets(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "bench/step_paths.py", "--d-in", "32", "--expansion", "4", "--batch",
         "512", "--densities", "0.02,0.3", "--warmup", "0", "--reps", "2", "--out-dir",
         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "step-paths-cpu.json").read_text())
    rows = result["rows"]
    paired = [(r["type"], r["density"], r["path"]) for r in rows if r["type"] in
              ("standard", "jumprelu")]
    assert sorted(paired) == sorted((t, d, p) for t in ("standard", "jumprelu")
                                    for d in (0.02, 0.3) for p in ("dense", "sparse"))
    for r in rows:
        assert r["ms"] > 0 and r["peak_mb"] is None  # no CUDA memory on the CPU
        if r["type"] == "standard":  # its floor is 0: the active entries are those set
            assert abs(r["measured_density"] - r["density"]) < 0.02, r
    assert set(result["crossover"]) == {"standard", "jumprelu"}
    assert result["settings"]["precision"] == "fp32"
    assert "| standard | 0.02 /" in (tmp_path / "step-paths-cpu.md").read_text()


def test_the_paths_it_compares_compute_the_same_step() -> None:
    """At a density the script sets, the forced sparse step and the forced dense step give the
    same loss and gradients (so the timing compares two ways of one computation)."""
    x = torch.randn(256, 24) + 1.0
    grads = {}
    for path in ("dense", "sparse"):
        torch.manual_seed(0)
        sae = architectures.build("standard", 24, 96)
        step_paths.set_density(sae, x, 0.05)
        sae.sparse_max_density = 1.0 if path == "sparse" else 0.0
        out = sae(x, sparsity_coef=1.0)
        out.loss.backward()
        assert (sae.sparse_steps > 0) == (path == "sparse")
        grads[path] = (out.loss.detach(), sae.W_enc.grad, sae.W_dec.grad, sae.b_enc.grad)
    for a, b in zip(grads["dense"], grads["sparse"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert kernels.SPARSE_DEVICES == ("cpu",)
