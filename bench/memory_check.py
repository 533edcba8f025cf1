"""Measured peak memory of training runs vs ``estimate_memory``, one fresh process per config.

    .venv/bin/python bench/memory_check.py                   # CPU: peak RSS (ru_maxrss)
    .venv/bin/python bench/memory_check.py --device cuda     # GPU: torch.cuda.max_memory_allocated

Each config trains a few steps through the engine (``Trainer`` + ``CachedActivations`` on a
synthetic 576-d activation file, or ``LiveActivations`` on SmolLM2-135M over the KJV token store)
in its own subprocess, so the peak is that run's alone: the whole run counts (imports, opening the
source, initialisation, the steps, evaluation, the final checkpoint and the SAELens export). On
CUDA the trainer's own ``reset_peak_memory_stats`` (after initialisation) is disabled so that the
initialisation counts too. The child also records the peak of each phase (on the CPU by resetting
the kernel's RSS high-water mark through ``/proc/self/clear_refs``), which shows where the peak is.

Prints a Markdown table (measured, estimate, estimate/measured) and writes
bench/memory-results.json and bench/memory-results.md (``--tag`` names other files, e.g. for CUDA:
``--tag cuda`` writes bench/memory-results-cuda.{json,md}).

The live SmolLM2 configs use the bundled model when ``data/models/smollm2-135m`` exists, else a
model of exactly its shape with random weights (memory depends only on the shape), and the KJV
token store when it exists under ``data/tokens``, else random tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.engine.memory import estimate_memory  # noqa: E402

MB = 2**20
SYN_D_IN = 576

# name, options. "source": file | live. Sizes: d_in 576 with 4x/8x/16x and batches 1024/4096/8192.
CPU_CONFIGS: list[dict] = [
    dict(name="topk 4x b1024", encoder_type="topk", expansion_factor=4, batch_size=1024),
    dict(name="topk 8x b4096", encoder_type="topk", expansion_factor=8, batch_size=4096),
    dict(name="topk 16x b8192", encoder_type="topk", expansion_factor=16, batch_size=8192),
    dict(name="standard 8x b4096", encoder_type="standard", expansion_factor=8, batch_size=4096),
    dict(name="standard 16x b2048", encoder_type="standard", expansion_factor=16,
         batch_size=2048),
    dict(name="jumprelu 8x b4096", encoder_type="jumprelu", expansion_factor=8, batch_size=4096),
    dict(name="batchtopk 8x b4096", encoder_type="batchtopk", expansion_factor=8,
         batch_size=4096),
    dict(name="smollm2-135m L15 live, 8x topk b4096, buffer 16k", source="live",
         encoder_type="topk", expansion_factor=8, batch_size=4096, buffer_tokens=16_384,
         eval_tokens=4096, total_steps=3),
]
SMOLLM2_LIVE_16X = dict(
    name="smollm2-135m L15 residual, 16x topk k32 b4096, live, bf16", source="live",
    encoder_type="topk", expansion_factor=16, batch_size=4096, precision="bf16",
    total_steps=40)
CUDA_CONFIGS: list[dict] = [
    dict(c, precision="bf16") for c in CPU_CONFIGS if c.get("source", "file") == "file"
] + [dict(CPU_CONFIGS[1], name="topk 8x b4096 fp32", precision="fp32"), SMOLLM2_LIVE_16X]


# ---------------------------------------------------------------------------- the child
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _mapped_rss(suffix: str) -> int:
    """Resident bytes of this process's mappings of files whose name ends with ``suffix``."""
    total, hit = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split(" ", 1)[0]:
            hit = line.rstrip().endswith(suffix)
        elif hit and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


class Phases:
    """Peak per phase: RSS high-water mark (reset via clear_refs) or CUDA max allocated."""

    def __init__(self, device: str) -> None:
        self.device, self.peaks, self.name, self.t = device, {}, "import", time.perf_counter()
        self.can_reset = True
        if device == "cuda":
            import torch

            self._reset_cuda = torch.cuda.reset_peak_memory_stats
            torch.cuda.reset_peak_memory_stats = lambda *a, **k: None  # the trainer's reset
        self.overall = 0
        self.rss: dict = {}

    def _peak(self) -> int:
        if self.device == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated())
        # VmHWM, the kernel's RSS high-water mark of this process: what ru_maxrss reports,
        # except that ru_maxrss also keeps the *parent's* peak when the parent spawned this
        # process with vfork + exec (as Python's subprocess does), and clear_refs resets it.
        return _status("VmHWM")

    def mark(self, next_name: str) -> None:
        peak = self._peak()
        if self.device != "cuda":
            self.rss[self.name] = {k: _status(k) // MB for k in ("RssAnon", "RssFile")}
            self.rss[self.name]["data_file"] = _mapped_rss(".safetensors") // MB
        self.overall = max(self.overall, peak)
        self.peaks[self.name] = max(self.peaks.get(self.name, 0), peak)
        self.name = next_name
        if self.device == "cuda":
            self._reset_cuda()
        elif self.can_reset:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.can_reset = False


def synthetic_file(path: Path, n: int, d_in: int = SYN_D_IN, seed: int = 0) -> Path:
    import torch

    from worker.engine.activations import write_activation_file

    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(8 * d_in, d_in, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)

    def chunks():
        left = n
        while left > 0:
            m = min(left, 25_000)
            idx = torch.randint(0, atoms.shape[0], (m, 24), generator=g)
            vals = torch.rand(m, 24, generator=g) * 3
            yield torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=vals,
                                                    mode="sum") + 2.0
            left -= m

    write_activation_file(chunks(), path)
    return path


def smollm2_shaped_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=8192, tie_word_embeddings=True)
    import torch

    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


class RandomTokens:
    def __init__(self, n_contexts: int = 4096, context_size: int = 128) -> None:
        import numpy as np

        rng = np.random.default_rng(1)
        self.contexts = rng.integers(3, 49152, (n_contexts, context_size), dtype=np.int32)
        self.contexts[:, 0] = 1
        self.n_contexts, self.context_size = n_contexts, context_size
        self.special_ids, self.bos_id = [0, 1, 2], 1


def open_live(device: str, model_dtype: str):
    """(model, token store, n_params, how) for SmolLM2-135M layer 15 over the KJV corpus."""
    import torch

    dtype = torch.bfloat16 if model_dtype == "bf16" else torch.float32
    model_dir = ROOT / "data" / "models" / "smollm2-135m"
    if (model_dir / "model.safetensors").is_file():
        from worker.engine.models import load_model

        model = load_model(str(model_dir), device=device, dtype=dtype).model
        how = "bundled SmolLM2-135M"
    else:
        model = smollm2_shaped_model().to(device, dtype)
        how = "SmolLM2-135M-shaped model, random weights"
    stores = sorted((ROOT / "data" / "tokens").glob("kjv-ctx128-*/meta.json"))
    if stores:
        from worker.engine.corpora import TokenStore

        store = TokenStore.open(stores[0].parent)
        how += ", KJV token store"
    else:
        store = RandomTokens()
        how += ", random tokens"
    n_params = sum(p.numel() for p in model.parameters())
    return model, store, n_params, how


def child(spec: dict) -> dict:
    device = spec["device"]
    phases = Phases(device)
    import torch

    from worker.engine.activations import CachedActivations, LiveActivations
    from worker.engine.config import TrainConfig
    from worker.engine.trainer import Callbacks, Trainer

    if device == "cuda":
        torch.zeros(1, device="cuda")
    phases.mark("source")
    out = Path(spec["out"])
    kw = dict(encoder_type=spec["encoder_type"], k=spec.get("k", 32),
              expansion_factor=spec["expansion_factor"], batch_size=spec["batch_size"],
              total_steps=spec["total_steps"], log_every=spec["total_steps"],
              auto_save_interval=0, eval_tokens=spec["eval_tokens"],
              precision=spec["precision"], device=device,
              buffer_tokens=spec.get("buffer_tokens", 131_072))
    extra: dict = {}
    if spec["source"] == "file":
        cfg = TrainConfig(activations=spec["file"], **kw)
        src = CachedActivations(spec["file"], seed=0, holdout=cfg.eval_tokens)
    else:
        cfg = TrainConfig(model="smollm2-135m", dataset="kjv", layer=15, **kw)
        model, store, n_params, how = open_live(device, spec.get("model_dtype", "fp32"))
        src = LiveActivations(model, store, 15, "residual", seed=0,
                              buffer_tokens=cfg.buffer_tokens, holdout_tokens=cfg.eval_tokens,
                              device=device)
        extra = dict(model_params=n_params, live=how)
    phases.mark("init")

    def on_log(msg: str) -> None:
        if msg.startswith("Started"):
            phases.mark("steps")
        elif msg.startswith("Finished"):
            phases.mark("end")

    def on_checkpoint(_info: dict) -> None:
        phases.mark("export")

    def on_metrics(row: dict) -> None:
        if row["step"] == cfg.total_steps:
            phases.mark("eval+save")

    trainer = Trainer(cfg, src, out, callbacks=Callbacks(on_log=on_log, on_metrics=on_metrics,
                                                         on_checkpoint=on_checkpoint))
    t = time.perf_counter()
    res = trainer.fit()
    seconds = time.perf_counter() - t
    phases.mark("end")
    return dict(peak=phases.overall, phases=phases.peaks, rss_at_end_of=phases.rss,
                seconds=seconds, d_sae=trainer.d_sae,
                d_in=trainer.d_in, precision=trainer.precision, micro=trainer.micro,
                fvu=res.fvu, ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                vm_rss_end=_status("VmRSS"), **extra)


# ---------------------------------------------------------------------------- the parent
def estimate_for(spec: dict, run: dict | None = None) -> dict:
    d_in = SYN_D_IN
    d_sae = spec["expansion_factor"] * d_in
    kw = dict(encoder_type=spec["encoder_type"], k=spec.get("k", 32),
              batch_size=spec["batch_size"], precision=spec["precision"], device=spec["device"],
              total_steps=spec["total_steps"], eval_tokens=spec["eval_tokens"])
    if spec["source"] == "live":
        n_params = (run or {}).get("model_params") or 134_515_008
        kw.update(source="live", model_params=n_params, layer=15, n_layers=30,
                  model_dtype=spec.get("model_dtype", "fp32"),
                  buffer_tokens=spec.get("buffer_tokens", 131_072))
    else:
        kw.update(source="file", file_bytes=spec["file_rows"] * d_in * 4)
    return estimate_memory(d_in, d_sae, **kw).to_dict()


def _cache_file(path: str) -> None:
    """Read a file through the page cache in 8 MB chunks (nothing is mapped, so this process's
    RSS does not grow). A memory-mapped read faults in a whole window of pages only when they
    are cached; a file the page cache dropped (other tests' I/O) would make the measured peak
    tens of MB lower than the estimate, which models the usual case: a file just written."""
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def run_child(spec: dict, timeout: float = 900) -> dict:
    if spec.get("source", "file") == "file":
        _cache_file(spec["file"])
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed for {spec['name']}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(spec: dict) -> dict:
    run = run_child(spec)
    est = estimate_for(spec, run)
    return dict(name=spec["name"], device=spec["device"], source=spec["source"],
                encoder_type=spec["encoder_type"], d_in=run["d_in"], d_sae=run["d_sae"],
                batch_size=spec["batch_size"], precision=run["precision"],
                total_steps=spec["total_steps"], measured_bytes=run["peak"],
                estimate_bytes=est["total"], ratio=est["total"] / run["peak"],
                phases=run["phases"], rss_at_end_of=run.get("rss_at_end_of"), estimate=est,
                seconds=round(run["seconds"], 1),
                **{k: run[k] for k in ("live", "model_params") if k in run})


def table(rows: list[dict]) -> str:
    lines = ["| config | device | d_sae | batch | prec | steps | measured MB | estimate MB "
             "| est/measured | peak phase |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "measured_bytes" not in r:
            lines.append(f"| {r['name']} | {r['device']} | {r['d_sae']} | {r['batch_size']} | "
                         f"{r['precision']} | - | not run | {r['estimate_bytes'] / MB:,.0f} | - "
                         "| - |")
            continue
        peak_phase = max(r["phases"], key=r["phases"].get)
        lines.append(
            f"| {r['name']} | {r['device']} | {r['d_sae']} | {r['batch_size']} | "
            f"{r['precision']} | {r['total_steps']} | {r['measured_bytes'] / MB:,.0f} | "
            f"{r['estimate_bytes'] / MB:,.0f} | {r['ratio']:.3f} | {peak_phase} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=5, help="steps per file config (default 5)")
    p.add_argument("--file-rows", type=int, default=200_000,
                   help="rows of the synthetic activation file (default 200,000: 461 MB)")
    p.add_argument("--only", help="comma-separated substrings of config names to run")
    p.add_argument("--no-live", action="store_true", help="skip the live SmolLM2 configs")
    p.add_argument("--tag", default=None, help="results file suffix (default: none on the CPU, "
                   "'cuda' on CUDA)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    import torch

    configs = CUDA_CONFIGS if args.device == "cuda" else CPU_CONFIGS
    if args.only:
        keys = [s.strip() for s in args.only.split(",")]
        configs = [c for c in configs if any(s in c["name"] for s in keys)]
    if args.no_live:
        configs = [c for c in configs if c.get("source", "file") == "file"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        acts = None
        for i, c in enumerate(configs):
            spec = dict(device=args.device, source="file", precision="fp32",
                        total_steps=args.steps, eval_tokens=16_384, file_rows=args.file_rows)
            spec.update(c)
            spec["out"] = str(tmp / f"run{i}")
            if spec["source"] == "file":
                if acts is None:
                    acts = synthetic_file(tmp / "acts.safetensors", args.file_rows)
                spec["file"] = str(acts)
            print(f"running {spec['name']} ...", file=sys.stderr, flush=True)
            rows.append(measure(spec))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    if args.device == "cpu" and not any("16x topk k32 b4096, live, bf16" in r["name"]
                                        for r in rows):
        spec = dict(SMOLLM2_LIVE_16X, device="cuda", eval_tokens=16_384)
        est = estimate_for(spec)
        rows.append(dict(name=spec["name"] + " (estimate only: CUDA)", device="cuda",
                         d_sae=16 * SYN_D_IN, batch_size=4096, precision="bf16",
                         estimate_bytes=est["total"], estimate=est))
    env = (f"{platform.node() and 'host'}: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
           f"Python {platform.python_version()}")
    if args.device == "cuda":
        env += f", {torch.cuda.get_device_name(0)}"
    text = table(rows)
    print(text)
    tag = args.tag if args.tag is not None else ("cuda" if args.device == "cuda" else "")
    stem = "memory-results" + (f"-{tag}" if tag else "")
    measure_name = "torch.cuda.max_memory_allocated" if args.device == "cuda" else \
        "peak RSS (ru_maxrss)"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.json").write_text(json.dumps(
        {"device": args.device, "measured": measure_name, "environment": env,
         "file_rows": args.file_rows, "rows": rows}, indent=2))
    (args.out_dir / f"{stem}.md").write_text(
        f"# Memory: estimate vs measured ({args.device}, {measure_name})\n\n{env}. "
        f"Synthetic file: {args.file_rows:,} x {SYN_D_IN} fp32 rows. Each config ran in a fresh "
        "process (`bench/memory_check.py`).\n\n" + text + "\n")
    bad = [r for r in rows if "ratio" in r and not 0.85 <= r["ratio"] <= 1.15]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
