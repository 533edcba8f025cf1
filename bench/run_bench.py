"""Side-by-side benchmark: SAE Studio vs SAELens on the same activation file, in one run.

    .venv/bin/python bench/run_bench.py                 # or: make bench
    .venv/bin/python bench/run_bench.py --activations FILE --total-steps 100

Without --activations it first extracts SmolLM2-135M layer-15 residual activations of the KJV
(``sae-studio extract``, 500k vectors) and times that extraction against full forward passes.
Then, for each encoder type (topk, batchtopk, matryoshka_batchtopk, standard, jumprelu), it
trains on the same file and settings (8x, k=32 where it applies, Matryoshka prefixes d_sae / 8,
/ 4, / 2, d_sae on both sides, batch 4096, 100 steps, fp32, CPU): SAE Studio with its
defaults and SAELens tuned (lr 4e-3, expected-average normalisation) — for topk also SAELens with
its defaults. All are evaluated on the same held-out rows (the file's last 16,384).
Writes bench/out/results.json and bench/out/results.md (the table the README shows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"
DEFAULT_FILE = ROOT / "data" / "bench" / "smollm2-l15-kjv.safetensors"


def run_json(cmd: list[str]) -> dict:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def extraction_speed(model: str, layer: int, n_batches: int = 5) -> dict:
    """Tokens/s of extraction up to `layer` vs a full forward pass, on the same batches."""
    import torch

    sys.path.insert(0, str(ROOT))
    from worker.engine.models import extract_layer, load_model

    loaded = load_model(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.info.vocab_size, (n_batches, 16, 128), generator=g)

    def timed(fn) -> float:
        fn(ids[0])  # warm-up
        t = time.perf_counter()
        for b in ids:
            fn(b)
        return ids.numel() / (time.perf_counter() - t)

    with torch.no_grad():
        full = timed(lambda b: loaded.model(input_ids=b))
    part = timed(lambda b: extract_layer(loaded.model, b, layer))
    return {"full_forward_tok_s": full, "extract_tok_s": part, "speedup": part / full}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--activations", type=Path, default=None)
    p.add_argument("--max-tokens", type=int, default=500_000)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--total-steps", type=int, default=100)
    p.add_argument("--holdout", type=int, default=16_384)
    p.add_argument("--types", type=lambda v: v.split(","),
                   default=["topk", "batchtopk", "matryoshka_batchtopk", "standard",
                            "jumprelu"],
                   help="encoder types to compare, comma-separated")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "settings": {
        "k": args.k, "expansion_factor": args.expansion_factor, "batch_size": args.batch_size,
        "total_steps": args.total_steps, "holdout": args.holdout}}

    acts = args.activations
    if acts is None:
        acts = DEFAULT_FILE
        results["extraction_vs_full_forward"] = extraction_speed("smollm2-135m", 15)
        if not acts.exists():
            results["extract"] = run_json([
                PY, "-m", "worker", "extract", "--model", "smollm2-135m", "--dataset", "kjv",
                "--layer", "15", "--max-tokens", str(args.max_tokens), "--out", str(acts)])
    results["activations"] = str(acts)

    common = ["--activations", str(acts), "--k", str(args.k), "--expansion-factor",
              str(args.expansion_factor), "--batch-size", str(args.batch_size),
              "--total-steps", str(args.total_steps)]
    if not SAELENS_PY.exists():
        raise SystemExit("No .venv-saelens: run `make saelens-venv` first.")
    bench = str(ROOT / "bench" / "saelens_train.py")
    runs: list[tuple[str, str, dict]] = []  # (encoder type, label, result)
    for arch in args.types:
        ours = run_json([
            PY, "-m", "worker", "train", *common, "--encoder-type", arch, "--no-evaluate",
            "--eval-tokens", str(args.holdout), "--out", str(args.out / f"sae_studio_{arch}")])
        runs.append((arch, "SAE Studio (defaults)", ours))
        if arch == "topk":
            runs.append((arch, "SAELens (defaults: lr 2e-4)", run_json([
                str(SAELENS_PY), bench, *common, "--holdout", str(args.holdout),
                "--architecture", arch, "--lr", "2e-4", "--normalize", "none"])))
        runs.append((arch, "SAELens (tuned: lr 4e-3, normalised)", run_json([
            str(SAELENS_PY), bench, *common, "--holdout", str(args.holdout),
            "--architecture", arch, "--lr", "4e-3", "--normalize",
            "expected_average_only_in"])))
    results["runs"] = [{"encoder_type": a, "run": label, **r} for a, label, r in runs]
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    ref = {a: r["tokens_per_s"] for a, label, r in runs if label.startswith("SAELens (tuned")}
    lines = [f"Machine: {results['machine']}. Same file ({acts.name}), {args.expansion_factor}x "
             f"({'k=' + str(args.k) + ' where it applies, ' if args.k else ''}"
             "Matryoshka prefixes d_sae/8, /4, /2, d_sae, defaults "
             f"otherwise), batch {args.batch_size}, {args.total_steps} steps, fp32; FVU/L0 on "
             f"the same {args.holdout:,} held-out vectors; dead = latents that never fired "
             "during the run (SAELens: in its last 100 steps).", "",
             "| encoder | run | FVU (held-out) | L0 | dead latents | tokens/s "
             "| speed vs SAELens tuned, same encoder |",
             "|---|---|---|---|---|---|---|"]
    for arch, name, r in runs:
        lines.append(f"| {arch} | {name} | {r['fvu']:.3f} | {r['l0']:.1f} "
                     f"| {100 * r['dead_frac']:.1f}% | {r['tokens_per_s']:,.0f} "
                     f"| {r['tokens_per_s'] / ref[arch]:.2f}x |")
    if "extraction_vs_full_forward" in results:
        e = results["extraction_vs_full_forward"]
        lines += ["", f"Extraction to layer 15 of SmolLM2-135M: {e['extract_tok_s']:,.0f} "
                  f"tokens/s vs full forward {e['full_forward_tok_s']:,.0f} tokens/s "
                  f"({e['speedup']:.2f}x)."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
