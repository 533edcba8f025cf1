"""Quality at matched L0: SAE Studio's ``--target-l0`` against SAELens tuned to the same L0.

    .venv/bin/python bench/target_l0_bench.py                      # standard and jumprelu, 64
    .venv/bin/python bench/target_l0_bench.py --types jumprelu --saelens-runs 3

On the bench activation file (``data/bench/smollm2-l15-kjv.safetensors``, made by
``bench/run_bench.py``; SmolLM2-135M layer 15), for each type (standard, jumprelu):

1. Ours: ``sae-studio train --target-l0 N`` (8x, batch 4096, 100 steps, our defaults otherwise,
   the starting coefficient included) -> the held-out L0 (the trainer's, on the file's last
   ``--holdout`` rows, never trained on), whether it is within 10% of N, the held-out FVU, and
   the coefficient's path from the metrics rows.
2. SAELens (``bench/saelens_train.py`` in .venv-saelens, "tuned" as in run_bench: lr 4e-3,
   expected-average normalisation, its own training SAE and ``SAETrainer``): its L1 (standard)
   or L0 (jumprelu) coefficient is searched so that its held-out L0 lands on OURS (the same
   rows): L0 ~ coefficient^-s, so each next coefficient comes from a secant in log-log space
   through the two runs nearest the aim (the first step assumes s = 1), stopping within
   ``--tolerance`` or after ``--saelens-runs`` runs.
3. FVU at matched L0: SAELens's run nearest our L0, and, when two of its runs bracket our L0,
   its FVU interpolated at exactly our L0 (linear in log FVU vs log L0 between them).

Each run's JSON (ours and SAELens's) is kept in ``--work`` and reused by a later call with
the same settings (``--fresh`` ignores them: rerun ours after changing the code), so the search
can be extended without repeating runs.
Writes ``bench/target-l0-results.json`` and ``.md`` (the table the README shows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run_bench import DEFAULT_FILE, SAELENS_PY, machine  # noqa: E402

PY = sys.executable
SAELENS_TRAIN = ROOT / "bench" / "saelens_train.py"
SAELENS_FLAG = {"standard": "--l1-coefficient", "jumprelu": "--l0-coefficient"}
"""SAELens's sparsity coefficient per type (bench/saelens_train.py's flags)."""
SAELENS_START = {"standard": 1.0, "jumprelu": 1.0}
"""The first coefficient SAELens tries: its own defaults."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--activations", type=Path, default=DEFAULT_FILE)
    p.add_argument("--target-l0", type=float, default=64.0)
    p.add_argument("--types", type=lambda v: v.split(","), default=["standard", "jumprelu"])
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--total-steps", type=int, default=100)
    p.add_argument("--holdout", type=int, default=16_384)
    p.add_argument("--saelens-runs", type=int, default=4,
                   help="most SAELens runs per type in the coefficient search")
    p.add_argument("--tolerance", type=float, default=0.03,
                   help="the search stops when SAELens's L0 is within this of ours (relative)")
    p.add_argument("--saelens-start", type=lambda v: dict(kv.split("=") for kv in v.split(",")),
                   default={}, help="first coefficients, e.g. standard=2,jumprelu=0.1")
    p.add_argument("--ours-only", action="store_true", help="skip SAELens")
    p.add_argument("--fresh", action="store_true", help="do not reuse stored SAELens runs")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "target_l0")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "target-l0-results",
                   help="writes RESULTS.json and RESULTS.md")
    return p.parse_args(argv)


def run_json(cmd: list[str]) -> tuple[dict[str, Any], float]:
    """The command's last stdout line as JSON, and its wall-clock seconds."""
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def common_flags(args: argparse.Namespace) -> list[str]:
    return ["--activations", str(args.activations), "--expansion-factor",
            str(args.expansion_factor), "--batch-size", str(args.batch_size),
            "--total-steps", str(args.total_steps)]


def train_ours(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    """Our run with --target-l0: held-out FVU / L0 and the coefficient's path; stored in
    --work and reused unless --fresh (rerun it after changing the code)."""
    stored = args.work / (f"ours_{arch}_t{args.target_l0:g}_x{args.expansion_factor}"
                          f"_b{args.batch_size}_s{args.total_steps}_h{args.holdout}"
                          f"_{args.activations.stem}.json")
    if stored.exists() and not args.fresh:
        return json.loads(stored.read_text())
    out = args.work / f"ours_{arch}"
    metrics = args.work / f"ours_{arch}.metrics.jsonl"
    metrics.unlink(missing_ok=True)
    res, wall = run_json([
        PY, "-m", "worker", "train", *common_flags(args), "--encoder-type", arch,
        "--target-l0", f"{args.target_l0:g}", "--eval-tokens", str(args.holdout),
        "--no-evaluate", "--metrics-jsonl", str(metrics), "--out", str(out)])
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    path = [{"step": r["step"], "l0": r["l0"], "coef": r["sparsity_coef"]} for r in rows]
    run = {"fvu": res["fvu"], "l0": res["l0"], "dead_frac": res["dead_frac"],
           "start_coef": path[0]["coef"], "end_coef": path[-1]["coef"], "path": path,
           "tokens_per_s": res["tokens_per_s"], "process_s": wall,
           "commit": git_commit()}
    stored.write_text(json.dumps(run) + "\n")
    return run


def git_commit() -> str:
    """The working tree's HEAD commit (what our run's code was), or "" outside git."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return proc.stdout.strip()


def train_saelens(arch: str, coef: float, args: argparse.Namespace) -> dict[str, Any]:
    """One SAELens run (tuned: lr 4e-3, normalised) at sparsity coefficient ``coef``;
    stored in --work and reused unless --fresh."""
    key = (f"saelens_{arch}_c{coef:.6g}_x{args.expansion_factor}_b{args.batch_size}"
           f"_s{args.total_steps}_h{args.holdout}_{args.activations.stem}.json")
    stored = args.work / key
    if stored.exists() and not args.fresh:
        return json.loads(stored.read_text())
    res, wall = run_json([
        str(SAELENS_PY), str(SAELENS_TRAIN), *common_flags(args), "--architecture", arch,
        SAELENS_FLAG[arch], f"{coef:.6g}", "--holdout", str(args.holdout), "--lr", "4e-3",
        "--normalize", "expected_average_only_in"])
    run = {"coef": coef, "fvu": res["fvu"], "l0": res["l0"], "dead_frac": res["dead_frac"],
           "tokens_per_s": res["tokens_per_s"], "process_s": wall}
    stored.write_text(json.dumps(run) + "\n")
    return run


def next_coef(runs: list[dict[str, Any]], aim: float) -> float | None:
    """The next coefficient: secant in log L0 vs log coefficient through the two runs
    nearest ``aim`` (slope -1 assumed with one run, or when L0 did not fall with the
    coefficient); kept inside a bracket when there is one. None when that is a coefficient
    already tried (within 1%): the search cannot progress."""
    near = sorted(runs, key=lambda r: abs(math.log(r["l0"] / aim)))
    a = near[0]
    slope = -1.0
    if len(near) > 1:
        b = near[1]
        if b["coef"] != a["coef"] and b["l0"] != a["l0"]:
            slope = (math.log(a["l0"]) - math.log(b["l0"])) / (
                math.log(a["coef"]) - math.log(b["coef"]))
        if slope >= 0:  # noise: L0 did not fall with the coefficient
            slope = -1.0
    log_c = math.log(a["coef"]) + (math.log(aim) - math.log(a["l0"])) / slope
    above = [r["coef"] for r in runs if r["l0"] > aim]  # too dense: coefficient too low
    below = [r["coef"] for r in runs if r["l0"] < aim]
    if above and below:
        lo, hi = math.log(max(above)), math.log(min(below))
        if not lo < log_c < hi:
            log_c = (lo + hi) / 2
    if any(abs(log_c - math.log(r["coef"])) < 0.01 for r in runs):
        return None
    return math.exp(log_c)


def interpolate_fvu(runs: list[dict[str, Any]], l0: float) -> float | None:
    """FVU at exactly ``l0`` from the nearest runs on either side (linear in log-log); None
    when no two runs bracket it."""
    above = [r for r in runs if r["l0"] >= l0]
    below = [r for r in runs if r["l0"] <= l0]
    if not above or not below:
        return None
    a = min(above, key=lambda r: r["l0"])
    b = max(below, key=lambda r: r["l0"])
    if a["l0"] == b["l0"]:
        return a["fvu"]
    t = (math.log(l0) - math.log(b["l0"])) / (math.log(a["l0"]) - math.log(b["l0"]))
    return math.exp(math.log(b["fvu"]) + t * (math.log(a["fvu"]) - math.log(b["fvu"])))


def search_saelens(arch: str, aim: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    coef = float(args.saelens_start.get(arch, SAELENS_START[arch]))
    runs: list[dict[str, Any]] = []
    for _ in range(args.saelens_runs):
        runs.append(train_saelens(arch, coef, args))
        print(json.dumps({"saelens": arch, **runs[-1]}), file=sys.stderr, flush=True)
        if abs(runs[-1]["l0"] / aim - 1) <= args.tolerance:
            break
        coef = next_coef(runs, aim)
        if coef is None:
            break
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.activations.exists():
        raise SystemExit(f"No {args.activations}: run bench/run_bench.py (it extracts it) first.")
    if not args.ours_only and not SAELENS_PY.exists():
        raise SystemExit("No .venv-saelens: run `make saelens-venv` first (or --ours-only).")
    args.work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    types: list[dict[str, Any]] = []
    for arch in args.types:
        ours = train_ours(arch, args)
        print(json.dumps({"ours": arch, **{k: v for k, v in ours.items() if k != "path"}}),
              file=sys.stderr, flush=True)
        entry: dict[str, Any] = {
            "encoder_type": arch, "ours": ours,
            "ours_within_10pct": abs(ours["l0"] / args.target_l0 - 1) <= 0.10}
        if not args.ours_only:
            runs = search_saelens(arch, ours["l0"], args)
            nearest = min(runs, key=lambda r: abs(math.log(r["l0"] / ours["l0"])))
            at_ours = interpolate_fvu(runs, ours["l0"])
            entry.update(saelens_runs=runs, saelens_nearest=nearest,
                         saelens_fvu_at_our_l0=at_ours,
                         ours_no_worse=ours["fvu"] <= (at_ours if at_ours is not None
                                                       else nearest["fvu"]))
        types.append(entry)
    results = {
        "machine": machine(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "wall_s": time.perf_counter() - t0,
        "settings": {"activations": str(args.activations), "target_l0": args.target_l0,
                     "expansion_factor": args.expansion_factor, "batch_size": args.batch_size,
                     "total_steps": args.total_steps, "holdout": args.holdout,
                     "saelens": "lr 4e-3, expected_average_only_in normalisation, "
                                "coefficient searched to our held-out L0",
                     "tolerance": args.tolerance},
        "definitions": {
            "l0": "mean active latents per held-out row (the file's last --holdout rows)",
            "fvu": "sum ||x - x_hat||^2 / sum ||x - mean||^2 on the same rows",
            "coef": "ours: the sparsity coefficient (standard: L1, jumprelu: L0; the "
                    "controller's, first and last metrics row); SAELens: its l1_coefficient "
                    "/ l0_coefficient",
            "saelens_fvu_at_our_l0": "SAELens's FVU interpolated at our L0 (log-log) between "
                                     "its two runs that bracket it; null if none do"},
        "types": types}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.results.with_suffix(".md").write_text(table)
    print(table)
    return 0


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"Target L0 {s['target_l0']:g} on {Path(s['activations']).name}: {s['expansion_factor']}x, "
        f"batch {s['batch_size']:,}, {s['total_steps']} steps, fp32, CPU; L0 and FVU on the "
        f"file's last {s['holdout']:,} rows (never trained on). Ours: `--target-l0 "
        f"{s['target_l0']:g}`, defaults otherwise (coefficient: start -> end). SAELens 6: lr "
        f"4e-3, normalised, its coefficient searched to land on our L0 (every run listed). "
        f"Machine: {results['machine']} (shared; load average {results['load_avg_start'][0]:.1f}"
        f" at the start, {results['load_avg_end'][0]:.1f} at the end).", "",
        "| encoder | tool | coefficient | L0 (held-out) | L0 vs target | FVU (held-out) |",
        "|---|---|---|---|---|---|"]
    for t in results["types"]:
        o = t["ours"]
        lines.append(f"| {t['encoder_type']} | SAE Studio `--target-l0 {s['target_l0']:g}` "
                     f"| {o['start_coef']:.3g} -> {o['end_coef']:.3g} | {o['l0']:.1f} "
                     f"| {o['l0'] / s['target_l0'] - 1:+.1%} | **{o['fvu']:.3f}** |")
        for r in sorted(t.get("saelens_runs", []), key=lambda r: r["coef"]):
            lines.append(f"| {t['encoder_type']} | SAELens | {r['coef']:.4g} | {r['l0']:.1f} "
                         f"| {r['l0'] / s['target_l0'] - 1:+.1%} | {r['fvu']:.3f} |")
        if t.get("saelens_fvu_at_our_l0") is not None:
            lines.append(f"| {t['encoder_type']} | SAELens, interpolated at our L0 | | "
                         f"{o['l0']:.1f} | | **{t['saelens_fvu_at_our_l0']:.3f}** |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
