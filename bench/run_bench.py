"""Side-by-side benchmark: SAE Studio vs SAELens on the same activation file, in one run.

    .venv/bin/python bench/run_bench.py                 # or: make bench
    .venv/bin/python bench/run_bench.py --activations FILE --total-steps 100

Without --activations it first extracts SmolLM2-135M layer-15 residual activations of the KJV
(``sae-studio extract``, 500k vectors) and times that extraction against full forward passes.
Then, for each encoder type (topk, batchtopk, matryoshka_batchtopk, standard, jumprelu), it
trains on the same file and settings (8x, k=32 where it applies, Matryoshka prefixes d_sae / 8,
/ 4, / 2, d_sae on both sides, batch 4096, 100 steps, fp32, CPU): SAE Studio with its
defaults and SAELens tuned (lr 4e-3, expected-average normalisation) — for topk also SAELens with
its defaults. All are evaluated on the same held-out rows (the file's last 16,384). Last,
``topk_skip_transcoder`` (SmolLM2-135M layer 15, mlp_in -> mlp_out, with a learned skip):
SAELens loads transcoders but has no trainer for them, so ours is compared with EleutherAI's
sparsify (``bench/sparsify_train.py``, in .venv-saelens), which trains transcoders from the
model; both therefore train from the model here, on the same KJV contexts, and are evaluated on
the same held-out (mlp_in, mlp_out) pairs (``transcoder_inputs``).

Two speeds per run: tokens/s of the training steps (each tool's own clock around its steps),
and the whole process as a user meets it: the wall-clock seconds from starting the command to
its exit, for the same work — import, open the file, initialise, train, evaluate on the
held-out rows, save (ours: the checkpoint and the SAELens export; SAELens: its inference SAE,
``save_inference_model``). ``--repeats N`` runs each pair N times, interleaved (ours, SAELens,
ours, SAELens: a load that changes during the run hits both), and reports the medians; the
machine's load average (1 min, ``os.getloadavg``) is recorded before each run.
Writes bench/out/results.json and bench/out/results.md (the table the README shows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"
DEFAULT_FILE = ROOT / "data" / "bench" / "smollm2-l15-kjv.safetensors"
TRANSCODER = "topk_skip_transcoder"
"""A TopK skip transcoder, mlp_in -> mlp_out, trained from the model: SAELens loads transcoders
but has no trainer for them, so its reference is EleutherAI's sparsify (bench/sparsify_train.py),
which trains them from the model."""


def run_json(cmd: list[str]) -> dict:
    """Run ``cmd``; its last stdout line (JSON), plus ``process_s`` (wall-clock seconds from
    start to exit), ``process_cpu_s`` (its CPU seconds, user + system, all threads: less
    disturbed than wall time by other processes on the machine) and ``load_1min`` (the load
    average just before it started)."""
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), process_s=seconds,
                process_cpu_s=cpu, load_1min=load)


def median_run(results: list[dict]) -> dict:
    """One row from repeated runs: the last run's figures, with the median tokens/s and
    process seconds and every run's seconds and load listed."""
    def med(values: list[float]) -> float:
        v = sorted(values)
        return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2

    return dict(results[-1], tokens_per_s=med([r["tokens_per_s"] for r in results]),
                process_s=med([r["process_s"] for r in results]),
                process_cpu_s=med([r["process_cpu_s"] for r in results]),
                process_s_runs=[round(r["process_s"], 1) for r in results],
                tokens_per_s_runs=[round(r["tokens_per_s"]) for r in results],
                load_1min_runs=[round(r["load_1min"], 2) for r in results])


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


def transcoder_inputs(args: argparse.Namespace) -> dict:
    """The shared inputs of the transcoder comparison, made once before the timed runs: the
    KJV token store both tools read (SmolLM2-135M's tokenizer, context 128, sized so the
    training contexts hold the steps' tokens and the last ones the held-out tokens), the first
    training contexts as a .npy for sparsify (steps x batch tokens), and the held-out
    (mlp_in, mlp_out) pairs of layer 15 on the store's held-out contexts (positions 1.. and no
    special tokens, as our trainer keeps them; no outlier filter): both transcoders' FVU is
    measured on these."""
    import math

    import numpy as np
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from worker.engine.activations import LiveActivations
    from worker.engine.config import TrainConfig
    from worker.engine.models import data_dir_default, load_model
    from worker.engine.pipeline import prepare_tokens

    context = 128
    per_ctx = context - 1  # position 0 is not trained on
    n_train = math.ceil(args.total_steps * args.batch_size / per_ctx)
    n_hold = math.ceil(args.holdout / per_ctx)
    max_tokens = (n_train + n_hold) * context
    cfg = TrainConfig(model="smollm2-135m", dataset="kjv", context_size=context,
                      max_tokens=max_tokens)
    loaded = load_model(cfg.model)
    store = prepare_tokens(cfg, loaded, data_dir_default())
    folder = args.out / "transcoder_inputs"
    folder.mkdir(parents=True, exist_ok=True)
    tokens = folder / "train_tokens.npy"
    np.save(tokens, np.asarray(store.contexts[:args.total_steps * args.batch_size // context]))
    # Our trainer's own held-out rows [x | y] (its held-out contexts, its position-0 and
    # special-token filter), without the outlier filter: the same pairs for both tools.
    src = LiveActivations(loaded.model, store, 15, "mlp_in", target_hook_point="mlp_out",
                          outlier_factor=0, holdout_tokens=args.holdout)
    rows = src.holdout()[:args.holdout]
    heldout = folder / "heldout_pairs.safetensors"
    save_file({"x": rows[:, :src.d_in].contiguous(), "y": rows[:, src.d_in:].contiguous()},
              str(heldout))
    return {"max_tokens": max_tokens, "tokens": str(tokens), "heldout": str(heldout),
            "train_contexts": src.n_train_ctx, "heldout_contexts": len(src.holdout_ids)}


def heldout_fvu(saelens_folder: Path, heldout: Path) -> dict:
    """FVU of the mlp_out targets and L0 of our exported transcoder (the SAELens folder, raw
    activations in and out) on the held-out pairs; the same formula as sparsify_train.py."""
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from worker.engine.export import load_saelens

    sae = load_saelens(saelens_folder).eval()
    pairs = load_file(str(heldout))
    x, y = pairs["x"].float(), pairs["y"].float()
    mean, err, total, nonzero = y.mean(0), 0.0, 0.0, 0.0
    with torch.no_grad():
        for xc, yc in zip(x.split(4096), y.split(4096), strict=True):
            f = sae.encode(xc)
            err += float((sae.reconstruct(xc, f) - yc).pow(2).sum())
            total += float((yc - mean).pow(2).sum())
            nonzero += float((f != 0).sum())
    return {"fvu": err / total, "l0": nonzero / len(x), "heldout_tokens": len(x)}


def transcoder_runs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """Ours and sparsify, both from the model on the same KJV contexts (``--repeats`` runs,
    interleaved; medians): a TopK skip transcoder of SmolLM2-135M layer 15, mlp_in -> mlp_out,
    k and expansion as the other types, 100 steps of 4,096 tokens."""
    shared = transcoder_inputs(args)
    ours_out = args.out / f"sae_studio_{TRANSCODER}"
    theirs_out = args.out / f"sparsify_{TRANSCODER}"
    ours = [PY, "-m", "worker", "train", "--model", "smollm2-135m", "--dataset", "kjv",
            "--layer", "15", "--hook-point", "mlp_in", "--target-hook-point", "mlp_out",
            "--skip-connection", "--encoder-type", "topk", "--k", str(args.k),
            "--expansion-factor", str(args.expansion_factor), "--batch-size",
            str(args.batch_size), "--total-steps", str(args.total_steps), "--max-tokens",
            str(shared["max_tokens"]), "--eval-tokens", str(args.holdout), "--no-evaluate",
            "--out", str(ours_out)]
    theirs = [str(SAELENS_PY), str(ROOT / "bench" / "sparsify_train.py"), "--model",
              str(ROOT / "data" / "models" / "smollm2-135m"), "--tokens", str(shared["tokens"]),
              "--layer", "15", "--k", str(args.k), "--expansion-factor",
              str(args.expansion_factor), "--batch-size", str(args.batch_size // 128),
              "--skip-connection", "--heldout", str(shared["heldout"]), "--out", str(theirs_out)]
    done: dict[str, list[dict]] = {"ours": [], "sparsify": []}
    for _ in range(args.repeats):  # interleaved: ours, sparsify, ours, sparsify
        shutil.rmtree(ours_out, ignore_errors=True)
        r = run_json(ours)
        done["ours"].append(dict(r, fvu_own_heldout=r["fvu"],
                                 **heldout_fvu(ours_out / "saelens", shared["heldout"])))
        shutil.rmtree(theirs_out, ignore_errors=True)
        done["sparsify"].append(run_json(theirs))
    version = done["sparsify"][-1]["sparsify_version"]
    return [("SAE Studio (defaults; from the model)", dict(median_run(done["ours"]), **shared)),
            (f"sparsify {version} (defaults; from the model)", median_run(done["sparsify"]))]


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
                            "jumprelu", TRANSCODER],
                   help="encoder types to compare, comma-separated")
    p.add_argument("--no-saelens-defaults", action="store_true",
                   help="skip SAELens at its default settings (topk; not used by the ratios)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each (ours, SAELens) pair, interleaved; medians reported")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "settings": {
        "k": args.k, "expansion_factor": args.expansion_factor, "batch_size": args.batch_size,
        "total_steps": args.total_steps, "holdout": args.holdout, "repeats": args.repeats},
        "load_1min_start": os.getloadavg()[0]}

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

    def write() -> None:
        """results.json and results.md so far (after each encoder type: a run cut short keeps
        what it measured)."""
        results["runs"] = [{"encoder_type": a, "run": label, **r} for a, label, r in runs]
        results["load_1min_end"] = os.getloadavg()[0]
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        ref = {a: r for a, label, r in runs
               if label.startswith(("SAELens (tuned", "sparsify"))}
        loads = [x for _, _, r in runs for x in r["load_1min_runs"]]
        ours_tc = next((r for a, label, r in runs
                        if a == TRANSCODER and label.startswith("SAE Studio")), None)
        data = "; ".join(([f"the SAE types on the same file ({acts.name})"]
                          if any(a != TRANSCODER for a, _, _ in runs) else [])
                         + ([f"{TRANSCODER} from the model (below)"] if ours_tc else []))
        lines = [
            f"Machine: {results['machine']}. Data: {data}. {args.expansion_factor}x "
            f"({'k=' + str(args.k) + ' where it applies, ' if args.k else ''}"
            "Matryoshka prefixes d_sae/8, /4, /2, d_sae, defaults "
            f"otherwise), batch {args.batch_size}, {args.total_steps} steps, fp32; FVU/L0 on "
            f"the same held-out vectors (a file's last {args.holdout:,}; {TRANSCODER}: "
            "below); dead = latents that never fired "
            "during the run (SAELens: in its last 100 steps). Training tokens/s: vectors per "
            "second of the training steps (each tool's clock around its steps). Whole process: "
            "from starting the command to its exit (import, open the file, initialise, train, "
            "evaluate the held-out vectors, save / export), wall-clock seconds and CPU seconds "
            "(user + system, all threads). Ratios: vs SAELens tuned, same encoder "
            f"({TRANSCODER}: vs sparsify)"
            + (f"; medians of {args.repeats} interleaved runs each" if args.repeats > 1 else "")
            + f". Load average (1 min) before the runs: {min(loads):.2f}-{max(loads):.2f}.",
            "",
            "| encoder | run | FVU (held-out) | L0 | dead latents | training tokens/s "
            "| ratio | whole process (s) | ratio | whole process, CPU s | ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
        for arch, name, r in runs:
            lines.append(f"| {arch} | {name} | {r['fvu']:.3f} | {r['l0']:.1f} "
                         f"| {100 * r['dead_frac']:.1f}% | {r['tokens_per_s']:,.0f} "
                         f"| {r['tokens_per_s'] / ref[arch]['tokens_per_s']:.2f}x "
                         f"| {r['process_s']:.1f} "
                         f"| {ref[arch]['process_s'] / r['process_s']:.2f}x "
                         f"| {r['process_cpu_s']:.1f} "
                         f"| {ref[arch]['process_cpu_s'] / r['process_cpu_s']:.2f}x |")
        if ours_tc is not None:
            lines += ["", f"{TRANSCODER}: TopK with a learned skip connection, reading mlp_in "
                      "and predicting mlp_out of SmolLM2-135M layer 15, trained from the model "
                      f"by both tools on the same {ours_tc['train_contexts']:,} KJV contexts of "
                      f"128 tokens (sparsify: the first {args.total_steps * args.batch_size:,} "
                      "tokens of them, 32 contexts a step; ours: "
                      f"{args.total_steps * args.batch_size:,} vectors of positions 1.., "
                      f"--max-tokens {ours_tc['max_tokens']:,}); FVU of the mlp_out targets and "
                      f"L0 on the same {ours_tc['heldout_tokens']:,} held-out pairs "
                      f"({ours_tc['heldout_contexts']} held-out contexts, positions 1..; our "
                      "exported SAELens folder vs sparsify's saved coder, each tool's own "
                      "forward). Training tokens/s here include the model's forward pass "
                      "(ours runs the model up to layer 15's MLP, sparsify the whole model). "
                      "dead = latents that fired on none of the training tokens. SAELens loads "
                      "transcoders but has no trainer for them: the reference is EleutherAI's "
                      "sparsify at its defaults (Signum, schedule-free, its own learning rate, "
                      f"no AuxK). Ours' own held-out FVU: {ours_tc['fvu_own_heldout']:.3f}."]
        if "extraction_vs_full_forward" in results:
            e = results["extraction_vs_full_forward"]
            lines += ["", f"Extraction to layer 15 of SmolLM2-135M: {e['extract_tok_s']:,.0f} "
                      f"tokens/s vs full forward {e['full_forward_tok_s']:,.0f} tokens/s "
                      f"({e['speedup']:.2f}x)."]
        (args.out / "results.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)

    for arch in args.types:
        if arch == TRANSCODER:
            runs += [(arch, label, r) for label, r in transcoder_runs(args)]
            write()
            continue
        ours_cmd = [PY, "-m", "worker", "train", *common, "--encoder-type", arch,
                    "--no-evaluate", "--eval-tokens", str(args.holdout),
                    "--out", str(args.out / f"sae_studio_{arch}")]
        lens = [str(SAELENS_PY), bench, *common, "--holdout", str(args.holdout),
                "--architecture", arch, "--save-sae", str(args.out / f"saelens_{arch}")]
        pairs: list[tuple[str, list[str]]] = [("SAE Studio (defaults)", ours_cmd)]
        if arch == "topk" and not args.no_saelens_defaults:
            pairs.append(("SAELens (defaults: lr 2e-4)",
                          [*lens, "--lr", "2e-4", "--normalize", "none"]))
        pairs.append(("SAELens (tuned: lr 4e-3, normalised)",
                      [*lens, "--lr", "4e-3", "--normalize", "expected_average_only_in"]))
        done: dict[str, list[dict]] = {label: [] for label, _ in pairs}
        for _ in range(args.repeats):  # interleaved: ours, SAELens, ours, SAELens
            for label, cmd in pairs:
                shutil.rmtree(cmd[-1], ignore_errors=True)  # its output folder: a fresh run
                done[label].append(run_json(cmd))
        runs += [(arch, label, median_run(done[label])) for label, _ in pairs]
        write()
    return 0

if __name__ == "__main__":
    sys.exit(main())
