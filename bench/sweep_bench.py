"""Sweep benchmark: 8 SAEs from one forward pass against one SAE and against the 8 one by one.

    .venv/bin/python bench/sweep_bench.py                   # defaults below; ~15 min on 2 cores
    .venv/bin/python bench/sweep_bench.py --total-steps 30   # a quick look

SmolLM2-135M, layer 15 residual, live extraction over the KJV (tokens cached once before any
timing), TopK 8x, k 16/32/64/128 x seeds 0/1, batch 1024, no text evaluation (the held-out
vectors' FVU is compared). Three ways, each timed as a user meets it (one ``sae-studio``
process, wall clock from its start to its last line):

1. ``sae-studio sweep`` with the 8 SAEs;
2. ``sae-studio train`` of one of them (k 32, seed 0): the same tokens;
3. ``sae-studio train`` of each of the 8, one after another.

Goal (issue 10): (1) takes at most 2x (2); every SAE of (1) reaches an FVU within 0.01 of the
same config trained alone (3). Writes bench/out/sweep-results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KS, SEEDS = (16, 32, 64, 128), (0, 1)


def timed(cmd: list[str]) -> tuple[float, dict]:
    """Wall seconds of one CLI process and its last JSON line."""
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total-steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--skip-one-by-one", action="store_true",
                   help="skip (3): no per-SAE FVU comparison")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="sae-sweep-bench-"))
    cli = [sys.executable, "-m", "worker", "--data-dir", args.data_dir]
    common = ["--model", "smollm2-135m", "--dataset", "kjv", "--layer", "15",
              "--encoder-type", "topk", "--expansion-factor", "8", "--batch-size",
              str(args.batch_size), "--total-steps", str(args.total_steps),
              "--auto-save-interval", "0", "--device", "cpu", "--no-evaluate"]
    # Warm the caches (SmolLM2 conversion, KJV token store) outside any timing.
    timed([*cli, "train", *common, "--total-steps", "1", "--k", "32",
           "--out", str(out / "warm")])

    sweep_s, sweep = timed([*cli, "sweep", *common, "--k", ",".join(map(str, KS)), "--seed",
                            ",".join(map(str, SEEDS)), "--out", str(out / "sweep")])
    one_s, one = timed([*cli, "train", *common, "--k", "32", "--seed", "0",
                        "--out", str(out / "one")])
    alone: dict[str, tuple[float, float]] = {}
    if not args.skip_one_by_one:
        for k in KS:
            for seed in SEEDS:
                wall, res = timed([*cli, "train", *common, "--k", str(k), "--seed", str(seed),
                                   "--out", str(out / f"alone-k{k}-s{seed}")])
                alone[f"k{k}-s{seed}"] = (wall, res["fvu"])
    rows = []
    for run in sweep["runs"]:
        key = f"k{run['k']}-s{run['seed']}"
        solo = alone.get(key) or ((one_s, one["fvu"]) if key == "k32-s0" else None)
        rows.append({"run": run["name"], "fvu_sweep": run["fvu"],
                     "fvu_alone": solo[1] if solo else None,
                     "diff": abs(run["fvu"] - solo[1]) if solo else None})
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "settings": {"model": "smollm2-135m", "layer": 15, "encoder": "topk", "expansion": 8,
                     "k": KS, "seeds": SEEDS, "batch_size": args.batch_size,
                     "total_steps": args.total_steps, "device": "cpu", "evaluate": False},
        "sweep_8_s": round(sweep_s, 1), "one_s": round(one_s, 1),
        "one_by_one_s": round(sum(w for w, _ in alone.values()), 1) if alone else None,
        "sweep_over_one": round(sweep_s / one_s, 2),
        "sweep_tokens_per_s": sweep["tokens_per_s"], "one_tokens_per_s": one["tokens_per_s"],
        "runs": rows, "max_fvu_diff": max((r["diff"] for r in rows if r["diff"] is not None),
                                          default=None),
    }
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "sweep-results.json").write_text(json.dumps(result, indent=2))
    print(f"| 8 SAEs, one sweep | {result['sweep_8_s']} s | {result['sweep_tokens_per_s']:,.0f} "
          f"tok/s per SAE |")
    print(f"| 1 SAE, train | {result['one_s']} s | {result['one_tokens_per_s']:,.0f} tok/s |")
    if alone:
        print(f"| 8 SAEs, one train after another | {result['one_by_one_s']} s | |")
    print(f"sweep / one: {result['sweep_over_one']}x; largest FVU difference sweep vs alone: "
          f"{result['max_fvu_diff']}")
    for r in rows:
        print(f"  {r['run']}: FVU {r['fvu_sweep']:.4f} in the sweep, "
              + (f"{r['fvu_alone']:.4f} alone" if r["fvu_alone"] is not None else "not alone"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
