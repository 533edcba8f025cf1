"""End to end from text vs extraction alone, side by side in one run.

    .venv/bin/python bench/e2e_bench.py                     # CPU, ~4-5 minutes on 2 cores
    .venv/bin/python bench/e2e_bench.py --device cuda --tokens 1000000

Both arms use the same model (SmolLM2-135M, bundled, loaded once), the same token store (KJV,
context 128), the same LiveActivations settings (layer 15 residual, seed 0, default filters,
buffer 131,072) and serve the same number of tokens in batches of 4,096:

- ``extract``: a fresh LiveActivations drained with ``next_batch(4096)``, nothing else;
- ``train``: a fresh LiveActivations feeding ``Trainer.fit`` (the default 8x TopK k=32, batch
  4096, fp32 on the CPU), timed over its training loop, i.e. the ``tokens_per_s`` the trainer
  reports (data fetch + forward/backward/step, not the initialisation sample or the final
  evaluation, which are reported separately as wall-clock seconds).

The arms alternate (extract, train, extract, train, ... for ``--repeats``) and the medians are
compared: ratio = train tokens/s / extract tokens/s; the goal is >= 1/1.2 = 0.833. The default
token count (98,304 = 24 steps) is exactly two buffer rounds (the first round serves half of what
it extracts), so both arms extract 131,072 vectors. Writes bench/e2e-results.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from worker.engine.activations import LiveActivations  # noqa: E402
from worker.engine.config import TrainConfig  # noqa: E402
from worker.engine.devices import pick_device  # noqa: E402
from worker.engine.pipeline import load_for_extraction  # noqa: E402
from worker.engine.trainer import Callbacks, Trainer  # noqa: E402

GOAL = 1 / 1.2


def shaped_source(device, data_dir: Path):
    """(loaded-like object, token store) with SmolLM2-135M's exact shape and random weights."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from worker.engine.corpora import TokenStore

    lcfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(lcfg).eval().requires_grad_(False).to(device)
    stores = sorted(Path(data_dir, "tokens").glob("kjv-ctx128-*/meta.json"))
    store = TokenStore.open(stores[0].parent)
    info = SimpleNamespace(name="smollm2-135m-shaped (random weights)", hidden_size=576)
    return SimpleNamespace(model=model, info=info), store


def make_source(cfg: TrainConfig, loaded, store, layer: int, device) -> LiveActivations:
    # The same arguments as pipeline.open_source.
    return LiveActivations(
        loaded.model, store, layer, cfg.hook_point, seed=cfg.seed,
        buffer_tokens=cfg.buffer_tokens, exclude_special=cfg.exclude_special,
        exclude_pos0=cfg.exclude_pos0, outlier_factor=cfg.outlier_factor,
        holdout_tokens=cfg.eval_tokens, device=device,
        meta={"model": loaded.info.name, "layer": layer, "hook_point": cfg.hook_point,
              "d_in": loaded.info.hidden_size, "context_size": store.context_size,
              "dataset": cfg.dataset})


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def extract_arm(cfg, loaded, store, layer, device, steps: int) -> dict:
    src = make_source(cfg, loaded, store, layer, device)
    sync(device)
    t = time.perf_counter()
    n = 0
    for _ in range(steps):
        n += src.next_batch(cfg.batch_size).shape[0]
    sync(device)
    dt = time.perf_counter() - t
    return {"tokens": n, "seconds": dt, "tokens_per_s": n / dt,
            "extracted_vectors": src.stats.kept}


def train_arm(cfg, loaded, store, layer, device, out: Path) -> dict:
    src = make_source(cfg, loaded, store, layer, device)
    marks: dict[str, float] = {}

    def on_log(msg: str) -> None:
        if msg.startswith("Started"):
            marks["started"] = time.perf_counter()

    def on_metrics(row: dict) -> None:
        if row["step"] == cfg.total_steps:
            marks["loop_end"] = time.perf_counter()

    t = time.perf_counter()
    res = Trainer(cfg, src, out, callbacks=Callbacks(on_log=on_log,
                                                     on_metrics=on_metrics)).fit()
    end = time.perf_counter()
    return {"tokens": res.tokens, "tokens_per_s": res.tokens_per_s,
            "loop_seconds": marks["loop_end"] - marks["started"],
            "loop_tokens_per_s": res.tokens / (marks["loop_end"] - marks["started"]),
            "init_seconds": marks["started"] - t, "eval_save_export_seconds":
            end - marks["loop_end"], "wall_seconds": end - t,
            "extracted_vectors": src.stats.kept, "fvu": res.fvu, "l0": res.l0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=98_304, help="tokens served per arm")
    p.add_argument("--repeats", type=int, default=1, help="alternating pairs (median reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="kjv")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench")
    p.add_argument("--tag", default="", help="results file suffix, e.g. 'before'")
    p.add_argument("--shaped", action="store_true",
                   help="a SmolLM2-135M-shaped model with random weights (same compute; for a "
                        "machine without the bundled model) over the KJV token store in "
                        "data/tokens if there, else random tokens")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--buffer-tokens", type=int, default=131_072)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from worker import settings

    data_dir = args.data_dir or settings.data_dir()
    device = pick_device(args.device)
    steps = max(1, args.tokens // 4096)
    cfg = TrainConfig(model=args.model, dataset=args.dataset, layer=args.layer,
                      hook_point="residual", context_size=128, total_steps=steps,
                      log_every=steps, auto_save_interval=0, device=str(device),
                      buffer_tokens=args.buffer_tokens)
    t = time.perf_counter()
    if args.shaped:
        (loaded, store), layer = shaped_source(device, data_dir), args.layer
    else:
        loaded, store, layer = load_for_extraction(cfg, data_dir, device)
    load_s = time.perf_counter() - t
    runs: dict[str, list[dict]] = {"extract": [], "train": []}
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.repeats):
            runs["extract"].append(extract_arm(cfg, loaded, store, layer, device, steps))
            print(f"extract {i}: {runs['extract'][-1]['tokens_per_s']:,.0f} tokens/s",
                  file=sys.stderr, flush=True)
            runs["train"].append(train_arm(cfg, loaded, store, layer, device,
                                           Path(d) / f"run{i}"))
            print(f"train {i}: {runs['train'][-1]['tokens_per_s']:,.0f} tokens/s",
                  file=sys.stderr, flush=True)
    ext = statistics.median(r["tokens_per_s"] for r in runs["extract"])
    trn = statistics.median(r["tokens_per_s"] for r in runs["train"])
    ratio = trn / ext
    env = (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} "
           f"threads, Python {platform.python_version()}")
    if device.type == "cuda":
        env += f", {torch.cuda.get_device_name(device)}"
    model_name = loaded.info.name if args.shaped else args.model
    result = {"environment": env, "device": str(device), "model": model_name,
              "dataset": args.dataset, "layer": layer, "context_size": 128,
              "sae": "topk 8x k=32, batch 4096", "tokens_per_arm": steps * 4096,
              "repeats": args.repeats, "model_load_seconds": load_s,
              "extract_tokens_per_s": ext, "train_tokens_per_s": trn, "ratio": ratio,
              "goal": GOAL, "passes": ratio >= GOAL, "runs": runs}
    md = (f"# End to end from text vs extraction alone\n\n{env}; {model_name} layer {layer} "
          f"residual, {args.dataset}, context 128, LiveActivations defaults (buffer "
          f"{args.buffer_tokens:,}), "
          f"{steps * 4096:,} tokens per arm, {args.repeats} alternating pair(s), medians.\n\n"
          "| arm | tokens/s |\n|---|---|\n"
          f"| extraction alone (LiveActivations.next_batch) | {ext:,.0f} |\n"
          f"| training live (Trainer.fit loop, 8x TopK k=32, batch 4096) | {trn:,.0f} |\n"
          f"| ratio (goal >= {GOAL:.3f}) | {ratio:.3f} |\n\n"
          f"Outside the timed loop, the training arm also spent "
          f"{statistics.median(r['init_seconds'] for r in runs['train']):.1f} s initialising "
          f"(sample for the normaliser and decoder init) and "
          f"{statistics.median(r['eval_save_export_seconds'] for r in runs['train']):.1f} s "
          "on held-out evaluation, final checkpoint and export.\n")
    suffix = f"-{args.tag}" if args.tag else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"e2e-results{suffix}.json").write_text(json.dumps(result, indent=2))
    (args.out_dir / f"e2e-results{suffix}.md").write_text(md)
    print(md)
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
