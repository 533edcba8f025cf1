"""Evaluation-pass benchmark: format 2 (per-latent details) against the evaluation before it.

    .venv/bin/python bench/eval_bench.py           # 130 held-out contexts, old/new twice each
    .venv/bin/python bench/eval_bench.py --small   # 16 contexts, once each: a quick check

Duration on the 2-core CPU machine while other jobs loaded it (load ~2): one evaluation of 16
contexts took 112 s, so one of 130 takes ~15 min and the default run (2 pairs) about an hour;
``--small`` 4 min (plus 2.5 min the first time, converting SmolLM2 and tokenising the KJV).

Issue 11's goal: "the evaluation pass stays within 1.5x of today's time for the same held-out
tokens". Today's code is commit ``BASE`` (``git archive BASE worker/__init__.py worker/engine``
into a temporary folder); the new code is this checkout's ``worker/engine``. Both evaluate the
same SAE on the same contexts with the same model, each in a fresh subprocess that imports only
its own engine (``--child``), timed from the call of ``evaluate_sae`` to its return (model
loading is not timed; the new code's time includes its weight-only statistics and the whole
vocabulary's text, which it also reports apart). Old and new alternate (old-new, new-old, ...)
``--repeats`` times, so a load that changes during the run touches both alike.

Settings: SmolLM2-135M (bundled, ``data/models/smollm2-135m``), layer 15 residual, the KJV token
store at context 128 (both built once in ``--data-dir`` if missing, outside any timing), the
held-out contexts a training with ``eval_tokens`` 16,384 evaluates on (the store's last 130
contexts), a TopK SAE with d_sae 4,608 (8x) and k 32 initialised from 8,192 activation vectors of
the store's first contexts (as a training starts), ``EvalOptions`` defaults (8 contexts a batch).

Prints a table and writes bench/eval-results.json (``--small``: bench/eval-results-small.json)
with the machine, the settings, every time, the medians and their ratio new / old.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "24432bf"  # the last commit before evaluation format 2
MODEL, DATASET, LAYER, HOOK, CONTEXT = "smollm2-135m", "kjv", 15, "residual", 128
D_SAE, K, EVAL_TOKENS, INIT_VECTORS = 4608, 32, 16_384, 8192


# ---------------------------------------------------------------------------- setup
def prepare(work: Path, data_dir: Path, n_contexts: int | None) -> dict:
    """Model, token store, held-out contexts and the initialised SAE, saved into ``work``."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from worker.engine.architectures import build
    from worker.engine.config import TrainConfig
    from worker.engine.models import extract_layer
    from worker.engine.pipeline import heldout_contexts, load_for_extraction

    cfg = TrainConfig(model=MODEL, dataset=DATASET, layer=LAYER, hook_point=HOOK,
                      context_size=CONTEXT)
    loaded, store, layer = load_for_extraction(cfg, data_dir, torch.device("cpu"))
    contexts = heldout_contexts(store, EVAL_TOKENS)
    if n_contexts is not None:
        contexts = contexts[:n_contexts]
    first = torch.from_numpy(np.asarray(store.contexts[:INIT_VECTORS // (CONTEXT - 1) + 1],
                                        dtype=np.int64))
    x = torch.cat([extract_layer(loaded.model, first[i:i + 8], layer, HOOK)[:, 1:]
                   .reshape(-1, loaded.info.hidden_size) for i in range(0, len(first), 8)])
    x = x[:INIT_VECTORS]
    scale = float(x.shape[1] ** 0.5 / x.norm(dim=1).mean())
    torch.manual_seed(0)
    sae = build("topk", loaded.info.hidden_size, D_SAE, k=K)
    sae.init_from_sample(x * scale, seed=0)
    save_file({k: v.detach().contiguous() for k, v in sae.state_dict().items()},
              str(work / "sae.safetensors"))
    np.save(work / "contexts.npy", contexts)
    spec = {"model_path": loaded.info.path, "scale": scale, "layer": layer,
            "special_ids": list(store.special_ids), "d_in": loaded.info.hidden_size,
            "contexts": int(len(contexts)), "context_size": int(contexts.shape[1])}
    (work / "spec.json").write_text(json.dumps(spec))
    return spec


def export_base(dest: Path) -> None:
    """Commit BASE's engine into ``dest`` (dest/worker/engine)."""
    archive = subprocess.run(["git", "archive", BASE, "worker/__init__.py", "worker/engine"],
                             cwd=ROOT, check=True, stdout=subprocess.PIPE).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


# ---------------------------------------------------------------------------- one timing
def child(code_root: Path, work: Path, device: str) -> None:
    """Evaluate the saved SAE with the engine under ``code_root``; print one JSON line."""
    sys.path.insert(0, str(code_root))
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from worker.engine import evaluate
    from worker.engine.architectures import build
    from worker.engine.models import load_model

    assert Path(evaluate.__file__).resolve().is_relative_to(code_root.resolve())
    spec = json.loads((work / "spec.json").read_text())
    loaded = load_model(spec["model_path"], device=device)
    sae = build("topk", spec["d_in"], D_SAE, k=K)
    sae.load_state_dict(load_file(str(work / "sae.safetensors")))
    contexts = np.load(work / "contexts.npy")
    t0 = time.perf_counter()
    ev = evaluate.evaluate_sae(sae, spec["scale"], loaded, contexts, spec["layer"], HOOK,
                               special_ids=spec["special_ids"], device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "format": ev.report["format"], "fvu": ev.report["fvu"],
           "l0": ev.report["l0"], "tensors": len(ev.latents), "vocab": len(ev.vocab)}
    if hasattr(evaluate, "latent_stats"):  # the new engine: its extra parts alone
        from worker.engine.models import vocabulary_texts

        t1 = time.perf_counter()
        evaluate.latent_stats(sae, spec["scale"], loaded.model)
        out["weight_stats_seconds"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        vocabulary_texts(loaded.tokenizer, len(ev.vocab))
        out["vocab_seconds"] = time.perf_counter() - t2
    print(json.dumps(out), flush=True)


def run_child(code_root: Path, work: Path, device: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(code_root),
           "--work", str(work), "--device", device]
    env = dict(os.environ, PYTHONPATH="")  # only code_root's worker package is importable
    proc = subprocess.run(cmd, cwd=work, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="old/new pairs (default 2; "
                   "--small: 1)")
    p.add_argument("--small", action="store_true", help="16 contexts, one pair: a quick check")
    p.add_argument("--contexts", type=int, default=None, help="held-out contexts (default: "
                   "all 130 of eval_tokens 16,384; --small: 16)")
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(Path(args.child), Path(args.work), args.device)
        return 0

    repeats = args.repeats or (1 if args.small else 2)
    n_contexts = args.contexts or (16 if args.small else None)
    work = Path(tempfile.mkdtemp(prefix="sae-eval-bench-"))
    base = work / "base"
    base.mkdir()
    export_base(base)
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    spec = prepare(work, Path(args.data_dir), n_contexts)
    print(f"prepared in {time.perf_counter() - t0:.0f} s: {spec['contexts']} contexts x "
          f"{spec['context_size']} tokens, scale {spec['scale']:.4f}", file=sys.stderr)
    times: dict[str, list[float]] = {"old": [], "new": []}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(repeats):
        for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
            res = run_child(base if label == "old" else ROOT, work, args.device)
            times[label].append(round(res["seconds"], 2))
            runs[label].append(res)
            print(f"{label}: {res['seconds']:.1f} s ({res['format']}, fvu {res['fvu']:.4f})",
                  file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    new = runs["new"][-1]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, "
                   f"{os.cpu_count()} logical CPUs, 1-min load average at the start "
                   f"{load_start:.2f}, at the end {os.getloadavg()[0]:.2f}",
        "settings": {"model": MODEL, "layer": LAYER, "hook_point": HOOK, "dataset": DATASET,
                     "contexts": spec["contexts"], "context_size": spec["context_size"],
                     "encoder": "topk", "d_sae": D_SAE, "k": K, "device": args.device,
                     "batch_contexts": 8, "base_commit": BASE, "repeats": repeats},
        "old_seconds": times["old"], "new_seconds": times["new"],
        "old_median_s": med["old"], "new_median_s": med["new"],
        "new_over_old": round(med["new"] / med["old"], 3),
        "new_weight_stats_s": round(new.get("weight_stats_seconds", 0.0), 2),
        "new_vocab_text_s": round(new.get("vocab_seconds", 0.0), 2),
        "fvu_old": runs["old"][-1]["fvu"], "fvu_new": new["fvu"],
        "goal": "new_over_old <= 1.5",
    }
    name = "eval-results-small.json" if args.small else "eval-results.json"
    (ROOT / "bench" / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"| code | evaluation of {spec['contexts']} contexts (median of {repeats}) |")
    print("| --- | --- |")
    print(f"| before ({BASE}) | {med['old']:.1f} s |")
    print(f"| format 2 | {med['new']:.1f} s (weight statistics {result['new_weight_stats_s']} s, "
          f"vocabulary text {result['new_vocab_text_s']} s) |")
    print(f"new / old: {result['new_over_old']}x (goal <= 1.5x); wrote bench/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
