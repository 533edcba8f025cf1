"""Which tensors are alive at a training run's memory peak, phase by phase, and where their code is.

    python bench/memory_trace.py --device cuda                   # the dense types at 8x b4096 bf16
    python bench/memory_trace.py --device cuda --only standard --steps 5

``bench/memory_check.py`` measures each run's peak (``torch.cuda.max_memory_allocated``) against
``estimate_memory``; on CUDA the dense types (standard, JumpReLU, BatchTopK) measured 2-3x their
estimate on an H200 (bench/memory-results-cuda.md), more than the same code allocates on the CPU.
This script runs the same configs (``memory_check.child``, one fresh process each) with CUDA's
allocation history recorded (``torch.cuda.memory._record_memory_history``: every allocation and
free with its Python stack), replays the history, and prints for each phase of the run
(initialisation, steps, evaluation + save, export) the peak of the allocated bytes and the
allocations alive at that moment, grouped by the innermost line of our code that made them. That
is what the estimate's CUDA terms are fitted to. On the CPU (``--device cpu``) the same replay
records what ops return (``CpuHistory``: not a kernel's own temporaries) along the steps CUDA
takes (the dense standard/JumpReLU step): slow, for small configs and for checking this script.

Writes ``<out-dir>/memory-trace-<device>.json`` (per config: per phase the peak in bytes and the
live allocations by site) and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import traceback
import weakref
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MB = 2**20
MARKER_BYTES = 512 * 2048
"""A phase marker: an allocation of this size made (and freed) by ``_phase_marker`` when a phase
starts; the replay finds markers by that function's frame, in order."""
CONFIGS = [
    dict(name=f"{t} 8x b4096", encoder_type=t, expansion_factor=8, batch_size=4096)
    for t in ("standard", "jumprelu", "batchtopk", "topk")
]


# ---------------------------------------------------------------------------- the replay
def _site(frames: Sequence[dict[str, Any]]) -> str:
    """The innermost frame of our code (worker/), else the innermost frame, as
    ``path:line function`` (frames are innermost first, as in CUDA's history)."""
    for f in frames:
        if "/worker/" in str(f.get("filename")):
            path = str(f["filename"]).split(str(ROOT) + "/")[-1]
            return f"{path}:{f.get('line')} {f.get('name')}"
    f = frames[0] if frames else {}
    return f"{f.get('filename', '?')}:{f.get('line', 0)} {f.get('name', '')}"


def _is_marker(event: dict[str, Any]) -> bool:
    return any("_phase_marker" in str(f.get("name", "")) for f in event.get("frames") or ())


def phase_peaks(events: Sequence[dict[str, Any]], names: Sequence[str], base: int = 0
                ) -> dict[str, dict[str, Any]]:
    """Replay an allocation history (the ``device_traces`` entries of a memory snapshot:
    ``{"action": "alloc" | "free_completed" | ..., "addr", "size", "frames"}`` in order). The
    i-th marker allocation starts phase ``names[i]`` (before the first: ``"start"``). Returns
    per phase ``{"peak": bytes, "live": [{"site", "bytes", "count", "sizes"}...]}``: the
    largest allocated total (``base`` + allocations seen and not yet freed) inside the phase,
    and what was alive then, grouped by ``_site`` (largest first)."""
    def replay(stop_at: dict[int, str] | None) -> dict[str, Any]:
        live: dict[int, tuple[int, str]] = {}
        markers: set[int] = set()
        now, phase, seen = base, "start", 0
        peaks: dict[str, tuple[int, int]] = {}  # phase -> (bytes, event index)
        captured: dict[str, dict[int, tuple[int, str]]] = {}
        for i, e in enumerate(events):
            action, addr, size = e.get("action"), e.get("addr"), int(e.get("size") or 0)
            if action == "alloc":
                if _is_marker(e):
                    phase = names[seen] if seen < len(names) else f"phase {seen}"
                    seen += 1
                    markers.add(addr)
                    continue
                live[addr] = (size, _site(e.get("frames") or ()))
                now += size
                if now > peaks.get(phase, (-1, 0))[0]:
                    peaks[phase] = (now, i)
            elif action == "free_completed":
                if addr in markers:
                    markers.discard(addr)
                elif addr in live:
                    now -= live.pop(addr)[0]
            if stop_at and i in stop_at:
                captured[stop_at[i]] = dict(live)
        return {"peaks": peaks, "captured": captured}

    first = replay(None)
    at = {i: p for p, (_, i) in first["peaks"].items()}
    live_at = replay(at)["captured"]
    out: dict[str, dict[str, Any]] = {}
    for phase, (peak, _) in first["peaks"].items():
        sites: dict[str, list[int]] = defaultdict(list)
        for size, site in live_at.get(phase, {}).values():
            sites[site].append(size)
        out[phase] = {"peak": peak, "live": sorted(
            ({"site": s, "bytes": sum(v), "count": len(v), "sizes": sorted(v, reverse=True)[:8]}
             for s, v in sites.items()), key=lambda r: -r["bytes"])}
    return out


class CpuHistory:
    """The CPU's stand-in for CUDA's allocation history: each new tensor storage an op returns
    (a ``TorchDispatchMode``) and its free (a finalizer on the storage), as snapshot trace
    entries with the Python stack, innermost frame first. It sees what ops return, not a
    kernel's own temporaries (CUDA's history sees every allocation)."""

    def __init__(self) -> None:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        self.events: list[dict[str, Any]] = []
        live: set[int] = set()
        events = self.events

        def freed(addr: int, size: int) -> None:
            live.discard(addr)
            events.append({"action": "free_completed", "addr": addr, "size": size})

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if not isinstance(t, torch.Tensor):
                        continue
                    storage = t.untyped_storage()
                    addr, size = storage.data_ptr(), storage.nbytes()
                    if addr and size and addr not in live:
                        live.add(addr)
                        frames = [{"filename": f.filename, "line": f.lineno, "name": f.name}
                                  for f in reversed(traceback.extract_stack()[:-1])]
                        events.append({"action": "alloc", "addr": addr, "size": size,
                                       "frames": frames})
                        weakref.finalize(storage, freed, addr, size)
                return out

        self.mode = Mode()

    def __enter__(self) -> CpuHistory:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)


def _phase_marker(device: str) -> None:
    import torch

    torch.empty(MARKER_BYTES, dtype=torch.uint8, device=device)  # freed at once


# ---------------------------------------------------------------------------- the child
def child(spec: dict[str, Any]) -> dict[str, Any]:
    import memory_check as mc
    import torch

    device = spec["device"]
    names: list[str] = []
    mark = mc.Phases.mark

    def marking(self: Any, next_name: str) -> None:
        names.append(next_name)
        _phase_marker(device)
        mark(self, next_name)

    mc.Phases.mark = marking
    if device == "cuda":
        torch.zeros(1, device="cuda")
        base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
        run = mc.child(spec)
        events = torch.cuda.memory._snapshot()["device_traces"][0]
        torch.cuda.memory._record_memory_history(enabled=None)
    else:  # the steps CUDA takes (the dense standard/JumpReLU step: kernels.SPARSE_DEVICES)
        from worker.engine import kernels

        kernels.SPARSE_DEVICES = ()
        base = 0
        with CpuHistory() as history:
            run = mc.child(spec)
        events = history.events
    return {"measured_peak": run["peak"], "phases": phase_peaks(events, names, base),
            "d_sae": run["d_sae"], "micro": run["micro"], "precision": run["precision"]}


def summary(name: str, row: dict[str, Any], top: int = 8) -> str:
    unit = row["micro"] * row["d_sae"] * 4
    lines = [f"### {name} (micro {row['micro']}, d_sae {row['d_sae']}; "
             f"one fp32 [micro, d_sae] = {unit / MB:.1f} MB; measured peak "
             f"{row['measured_peak'] / MB:,.1f} MB)", "",
             "| phase | peak MB | alive at the peak (MB, count, site) |", "|---|---|---|"]
    for phase, p in row["phases"].items():
        alive = "; ".join(f"{r['bytes'] / MB:.1f} x{r['count']} `{r['site']}`"
                          for r in p["live"][:top])
        lines.append(f"| {phase} | {p['peak'] / MB:,.1f} | {alive} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--expansion-factor", type=int, default=None,
                   help="override the configs' 8x (e.g. 2 for a quick CPU run)")
    p.add_argument("--batch-size", type=int, default=None, help="override the configs' 4096")
    p.add_argument("--file-rows", type=int, default=60_000)
    p.add_argument("--eval-tokens", type=int, default=16_384)
    p.add_argument("--only", help="comma-separated substrings of config names")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import memory_check as mc

    configs = CONFIGS
    if args.only:
        keys = [s.strip() for s in args.only.split(",")]
        configs = [c for c in configs if any(k in c["name"] for k in keys)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        acts = mc.synthetic_file(Path(d) / "acts.safetensors", args.file_rows)
        for i, c in enumerate(configs):
            spec = dict(c, device=args.device, source="file", precision=args.precision,
                        total_steps=args.steps, eval_tokens=args.eval_tokens,
                        file_rows=args.file_rows,
                        file=str(acts), out=str(Path(d) / f"run{i}"))
            if args.expansion_factor:
                spec["expansion_factor"] = args.expansion_factor
            if args.batch_size:
                spec["batch_size"] = args.batch_size
            name = (f"{spec['encoder_type']} {spec['expansion_factor']}x b{spec['batch_size']} "
                    f"{args.precision}")
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name] = row
            print(summary(name, row) + "\n", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"memory-trace-{args.device}.json").write_text(json.dumps(results, indent=1))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
