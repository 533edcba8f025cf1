"""Ground-truth benchmark: SAE Studio and SAELens on activations from a known sparse dictionary.

    .venv/bin/python bench/synthetic.py            # the full run (~10 minutes on 2 idle cores)
    .venv/bin/python bench/synthetic.py --small    # a quick check (~2 minutes)

1. Draws a dictionary (``worker/engine/synthetic.py``; here by default 2,048 unit-norm features
   in 256 dimensions, Zipf firing frequencies with 16 features per row on average, correlated
   groups of 4, log-normal magnitudes, Gaussian noise, a mean offset) and writes generated rows
   to an activation file (``write_activation_file``); the last ``--holdout`` rows are held out
   by both tools.
2. Trains every architecture of ours (``architectures.names()``) with ``sae-studio train
   --activations FILE`` (a subprocess; our defaults otherwise) and, where
   ``bench/saelens_train.py`` supports it, SAELens's on the same file with matched settings:
   the same number of latents (= the number of true features), k (= the true mean L0) for the
   TopK family, batch, steps, learning rate (ours's default for the type), input normalisation
   (both scale inputs to E||x|| = sqrt(d_in)), the JumpReLU L0 coefficient (the same definition
   in both); the standard SAE's L1 coefficients are each tool's default (their definitions
   differ): compare the standard rows at their L0s.
3. Reads each SAE's decoder (``W_dec`` of the SAELens-format folder each tool saves) and scores
   it against the true features: MCC (Hungarian matching, SAELens's definition) and the share
   of true features recovered (some latent with cosine >= ``--threshold``). FVU and L0 are each
   tool's own figures on the same held-out rows (same definitions: FVU = sum ||x - x_hat||^2 /
   sum ||x - mean||^2, L0 = mean active latents per row).

Size: 2,048 latents x 256 dims, 150 steps of 2,048 rows (307,200 rows, one epoch) is what fits
ten trainings (five types x two tools) into about ten minutes on this 2-core machine; the
generator's own defaults (4,096 features in 512 dims, L0 32: ``--n-features 4096 --d-in 512
--mean-l0 32``) cost about four times as much per step.

The Hungarian matching uses scipy: in this interpreter when it has scipy, else in
.venv-saelens (a subprocess on the |cosine| matrix), else a greedy matching (a lower bound; the
table says which).

Writes bench/synthetic-results.json and bench/synthetic-results.md (the table for the README);
scratch files go to bench/out/synthetic/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run_bench import machine  # noqa: E402
from bench.target_l0_bench import (  # noqa: E402
    SAELENS_FLAG,
    SAELENS_START,
    next_coef,
    run_json,
)
from worker.engine import architectures  # noqa: E402
from worker.engine.activations import write_activation_file  # noqa: E402
from worker.engine.synthetic import (  # noqa: E402
    GroundTruth,
    SyntheticConfig,
    cosine_matrix,
    greedy_matching,
    have_scipy,
    hungarian_matching,
)

PY = sys.executable
SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"
SAELENS_TRAIN = ROOT / "bench" / "saelens_train.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true",
                   help="a quick run: 512 features in 128 dims, 60 steps of 1,024")
    p.add_argument("--n-features", type=int, default=None, help="default 2048 (small: 512)")
    p.add_argument("--d-in", type=int, default=None, help="default 256 (small: 128)")
    p.add_argument("--mean-l0", type=float, default=None, help="default 16 (small: 8)")
    p.add_argument("--steps", type=int, default=None, help="default 150 (small: 60)")
    p.add_argument("--batch-size", type=int, default=None, help="default 2048 (small: 1024)")
    p.add_argument("--rows", type=int, default=None,
                   help="training rows in the file (default: steps x batch, one epoch)")
    p.add_argument("--holdout", type=int, default=None, help="default 16384 (small: 4096)")
    p.add_argument("--types", type=lambda v: v.split(","), default=None,
                   help="our types to run, comma-separated (default: all registered)")
    p.add_argument("--no-saelens", action="store_true", help="ours only")
    p.add_argument("--no-match-l0", dest="match_l0", action="store_false",
                   help="standard / jumprelu at each tool's default coefficient instead of "
                        "ours at --target-l0 = the true mean L0 and SAELens's coefficient "
                        "searched to land on our L0")
    p.add_argument("--saelens-runs", type=int, default=3,
                   help="most SAELens runs per type in that search")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="the search stops when SAELens's L0 is within this of ours (relative)")
    p.add_argument("--saelens-start", type=lambda v: dict(kv.split("=") for kv in v.split(",")),
                   default={}, help="the search's first coefficients, e.g. standard=5,jumprelu=50"
                                    " (default: SAELens's defaults)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other types' rows of the existing results file (a partial "
                        "rerun, e.g. --types standard,jumprelu; the same data: same seed/sizes)")
    p.add_argument("--threshold", type=float, default=0.9, help="cosine for 'recovered'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "synthetic")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "synthetic-results",
                   help="writes RESULTS.json and RESULTS.md")
    args = p.parse_args(argv)
    small = args.small
    defaults = {"n_features": (2048, 512), "d_in": (256, 128), "mean_l0": (16.0, 8.0),
                "steps": (150, 60), "batch_size": (2048, 1024), "holdout": (16_384, 4096)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if small else full)
    if args.rows is None:
        args.rows = args.steps * args.batch_size
    args.rows = max(args.rows, 9 * args.holdout)  # ours holds out at most a tenth of the file
    if small and args.results == ROOT / "bench" / "synthetic-results":
        args.results = args.work / "synthetic-results-small"
    return args


def saelens_choices() -> list[str]:
    """The --architecture choices of bench/saelens_train.py (from its --help)."""
    if not SAELENS_PY.exists():
        return []
    out = subprocess.run([str(SAELENS_PY), str(SAELENS_TRAIN), "--help"], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
    m = re.search(r"--architecture \{([^}]*)\}", out)
    return m.group(1).split(",") if m else []


def saelens_name(ours: str, choices: list[str]) -> str | None:
    """SAELens's counterpart of our type: the same name, or its first word
    (matryoshka_batchtopk -> matryoshka)."""
    for name in (ours, ours.split("_")[0]):
        if name in choices:
            return name
    return None


def make_data(truth: GroundTruth, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Write train rows then held-out rows (each its own seeded draw) to ``path``."""
    t0 = time.perf_counter()
    chunks = list(truth.generate(args.rows, seed=args.seed + 1))
    held = truth.sample_codes(args.holdout, seed=args.seed + 2)
    chunks.append(truth.activations(held, seed=args.seed + 3))
    write_activation_file(iter(chunks), path, meta={
        "model": "synthetic", "layer": 0, "hook_point": "residual", "context_size": 2,
        "synthetic": json.dumps(truth.config.to_dict())})
    x = chunks[-1]
    return {"file": str(path), "rows": args.rows + args.holdout, "train_rows": args.rows,
            "holdout_rows": args.holdout, "true_l0_heldout": held.l0(),
            "noise_var_share": truth.config.noise_std ** 2 * x.shape[1]
            / float((x - x.mean(0)).pow(2).sum(1).mean()),
            "seconds": time.perf_counter() - t0}


def hungarian_in_saelens_venv(score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scipy's linear_sum_assignment (maximize) on ``score``, run by .venv-saelens's Python."""
    code = ("import sys, numpy as np; from scipy.optimize import linear_sum_assignment as f; "
            "r, c = f(np.load(sys.argv[1]), maximize=True); np.save(sys.argv[2], np.stack([r, c]))")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "score.npy", Path(tmp) / "match.npy"
        np.save(src, score.float().numpy())
        subprocess.run([str(SAELENS_PY), "-c", code, str(src), str(dst)], check=True)
        rc = torch.as_tensor(np.load(dst))
    return rc[0], rc[1]


def matching_method() -> str:
    if have_scipy():
        return "hungarian (scipy)"
    if SAELENS_PY.exists():
        return "hungarian (scipy in .venv-saelens)"
    return "greedy"


def score_decoder(w_dec: torch.Tensor, truth: GroundTruth, threshold: float,
                  method: str) -> dict[str, float]:
    cos = cosine_matrix(w_dec, truth.features)
    score = cos.abs()
    if method == "hungarian (scipy)":
        r, c = hungarian_matching(score)
    elif method.startswith("hungarian"):
        r, c = hungarian_in_saelens_venv(score)
    else:
        r, c = greedy_matching(score)
    return {"mcc": score[r, c].mean().item(),
            "recovered": (cos.max(dim=0).values >= threshold).float().mean().item()}


def saelens_run(arch: str, theirs: str, coef_flags: list[str], lr: float, k: int,
                uses_k: bool, common: list[str], args: argparse.Namespace, truth: GroundTruth,
                method: str, tag: str = "") -> dict[str, Any]:
    """One SAELens training of ``theirs`` (our ``arch``'s counterpart), scored like ours."""
    folder = args.work / f"saelens_{arch}{tag}"
    res, wall = run_json([
        str(SAELENS_PY), str(SAELENS_TRAIN), *common, "--architecture", theirs,
        "--k", str(k), *coef_flags,
        "--total-steps", str(args.steps), "--lr", f"{lr:g}", "--holdout", str(args.holdout),
        "--normalize", "expected_average_only_in", "--save-sae", str(folder)])
    w_dec = load_file(str(folder / "sae_weights.safetensors"))["W_dec"]
    return {"encoder_type": arch, "tool": f"SAELens ({theirs})", "fvu": res["fvu"],
            "l0": res["l0"], "dead_frac": res["dead_frac"], "train_s": res["seconds"],
            "process_s": wall, "lr": lr, "k": k if uses_k else None,
            **score_decoder(w_dec, truth, args.threshold, method)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = SyntheticConfig(n_features=args.n_features, d_in=args.d_in, mean_l0=args.mean_l0,
                          seed=args.seed)
    truth = GroundTruth.build(cfg)
    save_file({"features": truth.features.contiguous()},
              str(args.work / "true_features.safetensors"))
    acts = args.work / "activations.safetensors"
    data = make_data(truth, args, acts)
    print(f"data: {data}", file=sys.stderr)

    if args.n_features % args.d_in:
        raise SystemExit("--n-features must be a multiple of --d-in (SAELens takes an integer "
                         "expansion factor)")
    expansion = args.n_features // args.d_in
    k = round(args.mean_l0)
    types = args.types or list(architectures.names())
    choices = [] if args.no_saelens else saelens_choices()
    method = matching_method()
    common = ["--activations", str(acts), "--expansion-factor", str(expansion),
              "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    from worker.engine.config import TrainConfig

    defaults = TrainConfig()
    l0_types = architectures.applies_to("target_l0") or ()
    runs: list[dict[str, Any]] = []
    for arch in types:
        info = architectures.get(arch)
        lr = info.lr_base * (4096 / args.n_features) ** 0.5  # our default for this type
        uses_k = "k" in info.options
        extra = ["--k", str(k)] if uses_k else []
        matched = args.match_l0 and arch in l0_types
        if matched:  # standard / jumprelu: steered to the true mean L0
            extra = ["--target-l0", f"{args.mean_l0:g}"]
        out = args.work / f"ours_{arch}"
        res, wall = run_json([
            PY, "-m", "worker", "train", *common, "--encoder-type", arch, *extra,
            "--learning-rate", f"{lr:g}",
            "--total-steps", str(args.steps), "--eval-tokens", str(args.holdout),
            "--no-evaluate", "--out", str(out)])
        w_dec = load_file(str(out / "saelens" / "sae_weights.safetensors"))["W_dec"]
        runs.append({"encoder_type": arch, "tool": "SAE Studio", "fvu": res["fvu"],
                     "l0": res["l0"], "dead_frac": res["dead_frac"],
                     "train_s": res["steps"] * args.batch_size / res["tokens_per_s"],
                     "process_s": wall, "lr": lr, "k": k if uses_k else None,
                     "target_l0": args.mean_l0 if matched else None,
                     **score_decoder(w_dec, truth, args.threshold, method)})
        print(json.dumps(runs[-1]), file=sys.stderr)
        theirs = saelens_name(arch, choices)
        if theirs is None:
            continue
        if matched:  # SAELens's coefficient searched to land on our L0
            aim = res["l0"]
            coef = float(args.saelens_start.get(theirs, SAELENS_START[theirs]))
            tried: list[dict[str, Any]] = []
            for _ in range(args.saelens_runs):
                tried.append(saelens_run(arch, theirs, [SAELENS_FLAG[theirs], f"{coef:.6g}"],
                                         lr, k, uses_k, common, args, truth, method,
                                         tag=f"_c{coef:.6g}"))
                tried[-1]["coef"] = coef
                if abs(tried[-1]["l0"] / aim - 1) <= args.tolerance:
                    break
                coef = next_coef(tried, aim)
                if coef is None:  # nothing new to try (L0 did not fall with the coefficient)
                    break
            best = min(tried, key=lambda r: abs(math.log(max(r["l0"], 1e-3) / aim)))
            best["search"] = [{key: r[key] for key in ("coef", "l0", "fvu", "mcc")}
                              for r in tried]
            runs.append(best)
        else:
            runs.append(saelens_run(arch, theirs, ["--l0-coefficient", str(defaults.l0_coef)],
                                    lr, k, uses_k, common, args, truth, method))
        print(json.dumps(runs[-1]), file=sys.stderr)

    write_results(args, cfg, data, runs, types, expansion, k, method)
    return 0


def write_results(args: argparse.Namespace, cfg: SyntheticConfig, data: dict[str, Any],
                  runs: list[dict[str, Any]], types: list[str], expansion: int, k: int,
                  method: str) -> None:
    """Write RESULTS.json and RESULTS.md (with --merge: plus the other types' earlier rows)."""
    results = {
        "machine": machine(), "load_avg_at_end": os.getloadavg(),
        "synthetic": cfg.to_dict(), "data": data,
        "settings": {"latents": args.n_features, "expansion_factor": expansion, "k": k,
                     "steps": args.steps, "batch_size": args.batch_size,
                     "holdout": args.holdout, "threshold": args.threshold,
                     "matching": method},
        "definitions": {
            "mcc": "mean |cosine| between decoder rows and true features over an optimal "
                   "one-to-one matching (SAELens's mean_correlation_coefficient)",
            "recovered": f"share of true features with a decoder row at cosine >= "
                         f"{args.threshold}",
            "fvu": "sum ||x - x_hat||^2 / sum ||x - mean||^2 on the held-out rows",
            "l0": "mean active latents per held-out row",
            "train_s": "seconds of the training steps (each tool's own clock)",
            "process_s": "wall seconds of the whole training process (start to exit)"},
        "runs": runs}
    for r in runs:
        r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.merge:
        results = merge(results, args.results.with_suffix(".json"), types)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.results.with_suffix(".md").write_text(table)
    print(table)


def merge(results: dict[str, Any], previous: Path, types: list[str]) -> dict[str, Any]:
    """``results`` (this run, of ``types``) with the other types' rows from ``previous``,
    which must describe the same data; rows in the registry's order."""
    if not previous.exists():
        return results
    old = json.loads(previous.read_text())
    same = json.loads(json.dumps(results["synthetic"])) == old["synthetic"]
    if not same or old["data"]["rows"] != results["data"]["rows"]:
        raise SystemExit(f"--merge: {previous} is about other data; rerun every type instead")
    kept = [r for r in old["runs"] if r["encoder_type"] not in types]
    for r in kept:
        r.setdefault("date", "earlier run")
        r.setdefault("load_avg_at_end", old["load_avg_at_end"][0])
    for r in results["runs"]:
        r["load_avg_at_end"] = results["load_avg_at_end"][0]
    order = {name: i for i, name in enumerate(architectures.names())}
    results["runs"] = sorted(kept + results["runs"],
                             key=lambda r: order.get(r["encoder_type"], len(order)))
    results["merged"] = {"rerun_types": types, "kept_from_earlier": sorted(
        {r["encoder_type"] for r in kept}), "earlier_load_avg_at_end": old["load_avg_at_end"]}
    return results


def markdown(results: dict[str, Any]) -> str:
    s, c, d = results["settings"], results["synthetic"], results["data"]
    head = (
        f"Ground truth: {c['n_features']:,} unit-norm features in {c['d_in']} dimensions, Zipf "
        f"frequencies (exponent {c['zipf_exponent']:g}, at most {c['max_prob']:g}), "
        f"{d['true_l0_heldout']:.1f} firing per row on the held-out rows, {c['grouped_frac']:.0%}"
        f" of them in correlated groups of {c['group_size']}, log-normal magnitudes, noise "
        f"{d['noise_var_share']:.1%} of the variance, a mean offset. {d['train_rows']:,} "
        f"training rows, {d['holdout_rows']:,} held out. Both tools: {s['latents']:,} latents, "
        f"k = {s['k']} (TopK family), batch {s['batch_size']:,}, {s['steps']} steps, fp32, CPU. "
        f"MCC: mean |cosine| over the {s['matching']} one-to-one matching of decoder rows to "
        f"true features; recovered: share of true features with a decoder row at cosine >= "
        f"{s['threshold']:g}; FVU and L0 on the held-out rows; train s: the training steps; "
        f"process s: start to exit; sparsity: what set the L0 (k; our `--target-l0`; "
        f"SAELens's coefficient, searched over the runs listed to land on our L0). Machine: "
        f"{results['machine']} (shared; load average at the end "
        f"{results['load_avg_at_end'][0]:.1f}).")
    if "merged" in results:
        m = results["merged"]
        head += (f" Rows of {', '.join(m['rerun_types'])} from a later run (`--types "
                 f"{','.join(m['rerun_types'])} --merge`, same data); the others from the "
                 f"earlier run (load average at its end {m['earlier_load_avg_at_end'][0]:.1f}).")
    lines = [head, "", "| encoder | tool | sparsity | MCC | recovered | FVU | L0 | train s "
             "| process s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['encoder_type']} | {r['tool']} | {sparsity(r)} | {r['mcc']:.3f} "
                     f"| {r['recovered']:.1%} | {r['fvu']:.3f} | {r['l0']:.1f} "
                     f"| {r['train_s']:.1f} | {r['process_s']:.1f} |")
    return "\n".join(lines) + "\n"


def sparsity(run: dict[str, Any]) -> str:
    """What set a row's L0, for the table."""
    if run.get("k") is not None:
        return f"k = {run['k']}"
    if run.get("target_l0") is not None:
        return f"target L0 {run['target_l0']:g}"
    if "search" in run:
        tried = ", ".join(f"{t['coef']:.3g} -> L0 {t['l0']:.1f}" for t in run["search"])
        return f"coef {run['coef']:.3g} (tried {tried})"
    return "default coefficient"


if __name__ == "__main__":
    sys.exit(main())
