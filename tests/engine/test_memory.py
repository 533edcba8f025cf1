"""The memory estimate: a real measurement (peak RSS of a training run in a fresh process) and
arithmetic sanity checks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine.memory import MemoryEstimate, estimate_memory

ROOT = Path(__file__).resolve().parents[2]
MB = 2**20


def _memory_check():
    spec = importlib.util.spec_from_file_location("memory_check", ROOT / "bench" /
                                                  "memory_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (VmHWM)")
def test_estimate_within_15_percent_of_measured_cpu_peak(tmp_path):
    mc = _memory_check()
    rows = 60_000
    acts = mc.synthetic_file(tmp_path / "acts.safetensors", rows)
    spec = dict(name="topk 8x b4096", device="cpu", source="file", precision="fp32",
                encoder_type="topk", expansion_factor=8, batch_size=4096, total_steps=3,
                eval_tokens=4096, file_rows=rows, file=str(acts), out=str(tmp_path / "run"))
    run = mc.run_child(spec, timeout=300)  # a fresh process: the peak is this run's alone
    est = mc.estimate_for(spec, run)
    ratio = est["total"] / run["peak"]
    assert 0.85 <= ratio <= 1.15, (
        f"estimate {est['total'] / MB:.0f} MB vs measured {run['peak'] / MB:.0f} MB "
        f"(ratio {ratio:.3f}); phases {run['phases']}, estimate {est}")


def test_to_dict_keys_and_parts_sum_to_total():
    est = estimate_memory(576, 4608)
    d = est.to_dict()
    for key in ("sae_params", "optimizer", "activations", "batch", "model", "buffer", "total",
                "runtime", "file_pages", "allocator"):
        assert key in d
    assert all(isinstance(v, int) and v >= 0 for v in d.values())
    assert d["total"] == sum(v for k, v in d.items() if k != "total") == est.total
    # the positional / keyword signature callers use keeps working
    assert isinstance(estimate_memory(384, 3072, encoder_type="standard", k=32, batch_size=4096,
                                      micro_batch_size=None, precision="bf16",
                                      model_params=22_000_000, model_dtype="float32",
                                      buffer_tokens=131_072), MemoryEstimate)


@pytest.mark.parametrize("encoder_type", ["topk", "standard", "jumprelu", "batchtopk",
                                          "matryoshka_batchtopk"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_monotone_in_d_sae_and_batch(encoder_type, device):
    def total(d_sae, batch):
        return estimate_memory(576, d_sae, encoder_type=encoder_type, batch_size=batch,
                               device=device, precision="bf16" if device == "cuda" else "fp32"
                               ).total

    sizes = [576 * m for m in (2, 4, 8, 16, 32, 64)]
    assert all(total(a, 4096) < total(b, 4096) for a, b in zip(sizes, sizes[1:], strict=False))
    batches = [256, 1024, 4096, 8192, 16_384, 65_536]
    values = [total(4608, b) for b in batches]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] > values[0]


def test_encoder_types():
    topk = estimate_memory(576, 4608, encoder_type="topk", device="cuda")
    batchtopk = estimate_memory(576, 4608, encoder_type="batchtopk", device="cuda")
    standard = estimate_memory(576, 4608, encoder_type="standard", device="cuda")
    jumprelu = estimate_memory(576, 4608, encoder_type="jumprelu", device="cuda")
    matryoshka = estimate_memory(576, 4608, encoder_type="matryoshka_batchtopk", device="cuda")
    # Matryoshka: BatchTopK's parameters, plus its prefix reconstructions in the step
    assert matryoshka.sae_params == batchtopk.sae_params
    step_bound = {t: estimate_memory(576, 4608, encoder_type=t, device="cuda", eval_tokens=0,
                                     batch_size=65_536) for t in ("batchtopk",
                                                                  "matryoshka_batchtopk")}
    assert step_bound["matryoshka_batchtopk"].total > step_bound["batchtopk"].total
    # jumprelu = standard's dense working set plus a threshold [d_sae] and its Adam state
    assert jumprelu.sae_params == standard.sae_params + 4 * 4608
    # a dense step outweighs a sparse one: at a training-sized batch the step is the peak
    big = {t: estimate_memory(576, 4608, encoder_type=t, device="cuda", eval_tokens=0,
                              batch_size=16_384) for t in ("topk", "standard", "jumprelu")}
    assert big["jumprelu"].peak_phase == big["standard"].peak_phase == "step"
    assert min(big["jumprelu"].total, big["standard"].total) > big["topk"].total
    assert batchtopk.sae_params == topk.sae_params and batchtopk.total >= topk.total
    tied = estimate_memory(576, 4608, encoder_type="standard", tie_weights=True)
    assert tied.sae_params < standard.sae_params


def test_terms_by_device_and_source():
    cpu = estimate_memory(576, 4608, device="cpu")
    gpu = estimate_memory(576, 4608, device="cuda")
    assert cpu.runtime > 0 and gpu.runtime == 0 and gpu.allocator == 0
    # an activation file counts on the CPU (memory-mapped pages), never on the GPU
    f = 500_000 * 576 * 4
    with_file = estimate_memory(576, 4608, source="file", file_bytes=f)
    assert 0 < with_file.file_pages <= f
    assert estimate_memory(576, 4608, source="file", file_bytes=f, device="cuda").file_pages == 0
    short = estimate_memory(576, 4608, source="file", file_bytes=f, total_steps=1)
    assert short.file_pages < with_file.file_pages
    # live extraction: the model's weights and the shuffle buffer
    live = estimate_memory(576, 9216, precision="bf16", device="cuda", model_params=134_515_008,
                           buffer_tokens=131_072)
    assert live.model == 134_515_008 * 4 and live.buffer >= 131_072 * 576 * 4 * 3 // 4
    assert live.total < 2 * 2**30  # smollm2-135m L15, 16x TopK, batch 4096, live, bf16
    part = estimate_memory(576, 9216, model_params=134_515_008, buffer_tokens=131_072,
                           layer=15, n_layers=30)
    assert part.model == int(134_515_008 * 4 * 16 / 30)


def _memory_trace():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("memory_trace", ROOT / "bench" /
                                                  "memory_trace.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_memory_trace_replays_an_allocation_history_phase_by_phase():
    """bench/memory_trace.py: the peak of each phase and what is alive then (recorded for
    real on the CPU, in the format of CUDA's allocation history)."""
    import torch

    mt = _memory_trace()
    with mt.CpuHistory() as history:
        mt._phase_marker("cpu")
        x = torch.empty(4 * MB, dtype=torch.uint8)
        y = torch.empty(8 * MB, dtype=torch.uint8)
        del x
        mt._phase_marker("cpu")
        z = torch.empty(2 * MB, dtype=torch.uint8)
        del y, z
    peaks = mt.phase_peaks(history.events, ["first", "second"], base=MB)
    assert {p: v["peak"] for p, v in peaks.items()} == {"first": 13 * MB, "second": 11 * MB}
    assert [r["sizes"] for r in peaks["first"]["live"]] == [[8 * MB, 4 * MB]]
    assert [r["sizes"] for r in peaks["second"]["live"]] == [[8 * MB, 2 * MB]]


def test_memory_trace_names_the_code_alive_at_a_training_peak(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory_trace.py"), "--device", "cpu", "--only",
         "standard", "--batch-size", "2048", "--precision", "fp32", "--steps", "1",
         "--file-rows", "5000", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "memory-trace-cpu.json").read_text()).values()
    assert list(row["phases"]) == ["init", "steps", "eval+save", "export"]
    steps = row["phases"]["steps"]
    dense = 2048 * 8 * 576 * 4  # one fp32 [micro, d_sae]: CUDA's dense step, taken here too
    assert steps["peak"] >= 3 * dense
    assert any("architectures/standard.py" in r["site"] and dense in r["sizes"]
               for r in steps["live"])


def test_cuda_estimate_covers_the_dense_step_the_run_takes_there(tmp_path):
    """On CUDA standard and JumpReLU take the dense step (on the CPU the sparse one at low
    density): the estimate's step holds at least the tensors the run holds along that path
    (bench/memory_trace.py on the CPU, CUDA's steps; the second step's, with Adam's moments),
    and not much more."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory_trace.py"), "--device", "cpu", "--only",
         "standard,jumprelu", "--batch-size", "2048", "--precision", "fp32", "--steps", "2",
         "--eval-tokens", "1024", "--file-rows", "5000", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "memory-trace-cpu.json").read_text())
    for name, row in rows.items():
        est = estimate_memory(576, row["d_sae"], encoder_type=name.split()[0], precision="fp32",
                              batch_size=2048, device="cuda", source="file")
        step = est.by_phase["step"] + est.sae_params
        held = row["phases"]["steps"]["peak"]
        assert held <= step <= 1.15 * held, (name, step / MB, held / MB)
