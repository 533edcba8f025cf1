"""Where the sparse step pays: one training step of standard and JumpReLU SAEs, dense path vs
sparse path, at controlled densities, on one device (TopK and BatchTopK, which always take
their sparse kernels, timed beside them for scale).

    .venv/bin/python bench/step_paths.py                      # CPU (the sparse path's home)
    python3 bench/step_paths.py --device cuda --out-dir DIR   # a GPU session

A step is what the trainer does per micro-batch: zero the gradients, forward under the run's
precision (bf16 autocast on CUDA, fp32 on the CPU unless --precision), backward, Adam's step.
The learning rate is 0, so every repeat sees the same weights and the density stays where it
was set: each latent's encoder bias is shifted so that the given fraction of the batch's
(token, latent) entries lie above the step's floor (0 for standard; JumpReLU's threshold less
0.75 bandwidths, its sparse superset). Times are medians of --reps steps after --warmup, the
device synchronised around each; peak memory is ``torch.cuda.max_memory_allocated`` per config
on CUDA (nothing on the CPU).

The sparse path runs on a device only when its type is in ``kernels.SPARSE_DEVICES``; this
script adds the device for the sparse rows. ``crossover`` in the output is the largest density
measured at which the sparse step is faster than the dense one (per type): the value
``kernels.SPARSE_MAX_DENSITY`` stands for on the CPU (0.16), and what a GPU session needs to
decide whether "cuda" joins ``SPARSE_DEVICES``. Writes step-paths-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.engine import architectures, kernels  # noqa: E402

DENSITIES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.16, 0.25)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_density(sae: torch.nn.Module, x: torch.Tensor, density: float) -> None:
    """Shift b_enc so that ``density`` of the entries of ``x``'s pre-activations are above the
    step's floor (per latent: its own quantile)."""
    with torch.no_grad():
        pre = (x @ sae.W_enc + sae.enc_bias()).float()
        floor = 0.0
        if hasattr(sae, "bandwidth"):
            floor = (sae.threshold - 0.75 * sae.bandwidth).float()
        q = torch.quantile((pre - floor)[: min(len(pre), 8192)], 1.0 - density, dim=0)
        sae.b_enc.sub_(q.to(sae.b_enc.dtype))


def time_steps(sae: torch.nn.Module, x: torch.Tensor, precision: str, warmup: int,
               reps: int) -> dict:
    device = x.device
    opt = torch.optim.Adam(sae.parameters(), lr=0.0, fused=device.type in ("cpu", "cuda"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    times: list[float] = []
    l0 = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + reps):
        sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = sae(x, sparsity_coef=1.0)
        out.loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        l0 = float(out.l0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"ms": 1000 * statistics.median(times), "l0": l0,
            "peak_mb": None if peak is None else peak / 2**20}


def run(device: torch.device, d_in: int, expansion: int, batch: int, precision: str,
        densities: tuple[float, ...], warmup: int, reps: int, seed: int = 0) -> list[dict]:
    d_sae = expansion * d_in
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, d_in, generator=g) + 1.0).to(device)
    rows: list[dict] = []
    for name in ("standard", "jumprelu"):
        for density in densities:
            for path in ("dense", "sparse"):
                torch.manual_seed(seed)
                sae = architectures.build(name, d_in, d_sae).to(device)
                set_density(sae, x, density)
                sae.sparse_max_density = 1.0 if path == "sparse" else 0.0
                saved = kernels.SPARSE_DEVICES
                if path == "sparse":
                    kernels.SPARSE_DEVICES = tuple({*saved, device.type})
                try:
                    r = time_steps(sae, x, precision, warmup, reps)
                finally:
                    kernels.SPARSE_DEVICES = saved
                took = "sparse" if sae.sparse_steps else "dense"
                assert took == path, (name, path, took)
                rows.append(dict(type=name, path=path, density=density,
                                 measured_density=r["l0"] / d_sae, **r))
                print(f"{name:9s} {path:6s} density {density:<6} {r['ms']:8.2f} ms "
                      f"(L0 {r['l0']:.1f})", file=sys.stderr, flush=True)
    for name in ("topk", "batchtopk"):
        torch.manual_seed(seed)
        sae = architectures.build(name, d_in, d_sae, k=32).to(device)
        r = time_steps(sae, x, precision, warmup, reps)
        rows.append(dict(type=name, path="sparse", density=32 / d_sae,
                         measured_density=r["l0"] / d_sae, **r))
        print(f"{name:9s} k=32         {r['ms']:8.2f} ms", file=sys.stderr, flush=True)
    return rows


def crossover(rows: list[dict]) -> dict[str, float | None]:
    """Per type: the largest density at which the sparse step beat the dense one (None: never)."""
    out: dict[str, float | None] = {}
    for name in ("standard", "jumprelu"):
        ms = {(r["density"], r["path"]): r["ms"] for r in rows if r["type"] == name}
        wins = [d for (d, p) in ms if p == "sparse" and ms[(d, "sparse")] < ms[(d, "dense")]]
        out[name] = max(wins) if wins else None
    return out


def table(rows: list[dict]) -> str:
    lines = ["| type | density: entries above the floor (set) / active (L0 / latents) | dense ms "
             "| sparse ms | sparse / dense |",
             "|---|---|---|---|---|"]
    for name in ("standard", "jumprelu"):
        by = {(r["density"], r["path"]): r for r in rows if r["type"] == name}
        for d in sorted({k[0] for k in by}):
            dense, sparse = by[(d, "dense")], by[(d, "sparse")]
            lines.append(f"| {name} | {d:g} / {sparse['measured_density']:.4f} | "
                         f"{dense['ms']:.2f} | {sparse['ms']:.2f} | "
                         f"{sparse['ms'] / dense['ms']:.2f} |")
    for r in rows:
        if r["type"] in ("topk", "batchtopk"):
            lines.append(f"| {r['type']} (k=32, its sparse kernels) | {r['density']:.4f} | - | "
                         f"{r['ms']:.2f} | - |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int, default=576, help="input width (default 576: SmolLM2)")
    p.add_argument("--expansion", type=int, default=8, help="latents / d_in (default 8)")
    p.add_argument("--batch", type=int, default=4096, help="vectors per step (default 4096)")
    p.add_argument("--precision", default=None,
                   help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--densities", default=",".join(map(str, DENSITIES)),
                   help="comma-separated fractions of entries above the floor")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench")
    args = p.parse_args()
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    densities = tuple(float(s) for s in args.densities.split(","))
    rows = run(device, args.d_in, args.expansion, args.batch, precision, densities,
               args.warmup, args.reps)
    env = (f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()}"
           f", torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    settings = dict(device=str(device), d_in=args.d_in, d_sae=args.expansion * args.d_in,
                    batch=args.batch, precision=precision, warmup=args.warmup, reps=args.reps)
    result = dict(environment=env, settings=settings, crossover=crossover(rows), rows=rows)
    text = table(rows)
    print(text)
    print(json.dumps({"crossover": result["crossover"]}))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"step-paths-{device.type}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (args.out_dir / f"{stem}.md").write_text(
        f"# One training step, dense vs sparse path ({env})\n\n"
        f"`bench/step_paths.py`: {settings}. Median of {args.reps} steps (zero_grad, forward, "
        f"backward, Adam), learning rate 0.\n\nSparse path faster up to density: "
        f"{result['crossover']}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
