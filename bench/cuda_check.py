"""CUDA checks for a GPU machine: bf16/fp16 training, a real out-of-memory back-off, throughput,
and the live model -> SAE path on a SmolLM2-135M-shaped model.

    python bench/cuda_check.py --out results.json

Nothing here is mocked: the OOM comes from capping this process's share of GPU memory
(``torch.cuda.set_per_process_memory_fraction``) below what the first micro-batch needs, and the
model has SmolLM2-135M's exact shape (30 layers, hidden 576, GQA 9/3 heads, vocab 49152) with
random weights (the bundled GGUF does not travel to a GPU box; memory and speed depend only on
the shape). Prints one JSON object and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.engine.activations import (  # noqa: E402
    CachedActivations,
    LiveActivations,
)
from worker.engine.config import TrainConfig  # noqa: E402
from worker.engine.memory import estimate_memory  # noqa: E402
from worker.engine.trainer import Callbacks, Trainer  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from memory_check import smollm2_shaped_model, synthetic_file  # noqa: E402


def train(acts: Path, out: Path, **kw) -> dict:
    logs: list[str] = []
    rows: list[dict] = []
    cfg = TrainConfig(activations=str(acts), log_every=10, auto_save_interval=0,
                      eval_tokens=16_384, **kw)
    src = CachedActivations(acts, seed=0, holdout=16_384)
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, src, out, callbacks=Callbacks(on_metrics=rows.append,
                                                         on_log=logs.append))
    t = time.perf_counter()
    res = trainer.fit()
    d_sae = trainer.d_sae
    est = estimate_memory(src.d_in, d_sae, encoder_type=cfg.encoder_type, k=cfg.k, device="cuda",
                          batch_size=cfg.batch_size, micro_batch_size=trainer.micro,
                          precision=trainer.precision)
    return {"precision": trainer.precision, "d_sae": d_sae, "fvu": res.fvu, "l0": res.l0,
            "dead_frac": res.dead_frac, "tokens_per_s": res.tokens_per_s,
            "steady_tokens_per_s": sum(r["tokens_per_s"] for r in rows[1:])
            / max(1, len(rows) - 1),
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
            "estimate_mb": est.total / 2**20, "micro_batch": trainer.micro,
            "seconds": time.perf_counter() - t,
            "oom_logs": [m for m in logs if "Out of memory" in m]}


class RandomTokens:
    """A token store of random ids (the shape and dtype the live source reads)."""

    def __init__(self, n_contexts: int, context_size: int = 128, vocab: int = 49152) -> None:
        g = torch.Generator().manual_seed(1)
        self.contexts = torch.randint(3, vocab, (n_contexts, context_size), generator=g).numpy()
        self.contexts[:, 0] = 1
        self.n_contexts, self.context_size = n_contexts, context_size
        self.special_ids, self.bos_id = [0, 1, 2], 1


def live_path(tmp: Path, dtype: torch.dtype) -> dict:
    from worker.engine.models import extract_layer

    model = smollm2_shaped_model().to("cuda", dtype)
    store = RandomTokens(4096)
    ids = torch.from_numpy(store.contexts[:64]).long().cuda()
    torch.cuda.synchronize()

    def rate(fn, reps=5):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return reps * ids.numel() / (time.perf_counter() - t)

    with torch.no_grad():
        full = rate(lambda: model(input_ids=ids))
    part = rate(lambda: extract_layer(model, ids, 15))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    src = LiveActivations(model, store, 15, seed=0, buffer_tokens=131_072, device="cuda",
                          holdout_tokens=16_384, batch_contexts=64)
    cfg = TrainConfig(model="smollm2-shaped", dataset="random", layer=15, k=32,
                      expansion_factor=16, batch_size=4096, total_steps=100, log_every=10,
                      auto_save_interval=0, device="cuda", outlier_factor=0)
    t = time.perf_counter()
    res = Trainer(cfg, src, tmp / "live").fit()
    return {"model_dtype": str(dtype), "full_forward_tok_s": full, "extract_tok_s": part,
            "extract_speedup": part / full, "live_train_tokens_per_s": res.tokens_per_s,
            "live_seconds": time.perf_counter() - t,
            "live_peak_mb_16x": torch.cuda.max_memory_allocated() / 2**20,
            "live_fvu": res.fvu}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="cuda_check.json")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        acts = synthetic_file(tmp / "acts.safetensors", 1_000_000)
        for prec in ("fp32", "bf16", "fp16"):
            for ef in (8, 32):
                report[f"topk_{ef}x_{prec}"] = train(
                    acts, tmp / f"r-{prec}-{ef}", encoder_type="topk", k=32, expansion_factor=ef,
                    batch_size=4096, total_steps=args.steps, precision=prec, device="cuda")
        report["standard_8x_bf16"] = train(acts, tmp / "std", encoder_type="standard",
                                           expansion_factor=8, batch_size=4096,
                                           total_steps=args.steps, l1_alpha=0.5, device="cuda")
        # A real OOM: cap the process's GPU memory below what one 32k-vector micro-batch needs.
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(3 * 2**30 / total)
        report["oom_backoff"] = train(acts, tmp / "oom", encoder_type="topk", k=32,
                                      expansion_factor=64, batch_size=32_768, total_steps=20,
                                      min_micro_batch=256, device="cuda")
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
        report["live_smollm2_shape_bf16"] = live_path(tmp, torch.bfloat16)
        report["live_smollm2_shape_fp32"] = live_path(tmp, torch.float32)
    text = json.dumps(report, indent=2)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
