"""How long a pause takes to act during a live training, as a user meets it: side by side, the
caller heard between steps only (as before) vs also between batches of contexts while a buffer
round is extracted (``trainer.listening``).

    .venv/bin/python bench/pause_latency.py                 # CPU, ~5-6 minutes on 2 cores

Both arms train the bundled SmolLM2-135M layer 15 residual (KJV, context 128) live, with the
default 8x TopK k=32, batch 4,096 and buffer 131,072 (a round extracts 65,536 vectors inside
the step that needs it), for ``--steps`` steps. A timer thread asks for a pause, one request
at a time, each a seeded 2-10 s after the previous one was answered (the same gaps in both
arms; the first counted from the first step's start); the trainer hears it, saves the pause
checkpoint, holds 0.5 s and resumes. Latency: from the request to the log line "Paused at
step N" (after the checkpoint is written), i.e. to the card's paused state. Writes
bench/pause-latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
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

HOLD_S = 0.5


class BetweenStepsOnly(LiveActivations):
    """The stream as before: nothing is heard while a round is extracted."""

    between = property(lambda self: None, lambda self, value: None)


class Requests:
    """Pause requests, each ``gaps[i]`` s after the previous one was answered (the first: after
    the first step began); answers the trainer's control."""

    def __init__(self, gaps: list[float]) -> None:
        self.gaps, self.lock = gaps, threading.Lock()
        self.due: float | None = None  # when the next request is made
        self.asked: float | None = None  # when the pending request was made
        self.heard: float | None = None  # when the trainer first heard it
        self.latencies: list[dict] = []
        self.t0: float | None = None
        self.thread = threading.Thread(target=self._fire, daemon=True)

    def _fire(self) -> None:
        """Each request ``gap`` seconds after the previous one was answered (one at a time)."""
        for gap in self.gaps:
            with self.lock:
                self.due = time.perf_counter() + gap
            while True:
                time.sleep(0.01)
                with self.lock:
                    if self.due is not None and time.perf_counter() >= self.due:
                        self.asked, self.due = time.perf_counter(), None
                    if self.asked is None and self.due is None:
                        break

    def control(self, step: int) -> str | None:
        if self.t0 is None:
            self.t0 = time.perf_counter()
            self.thread.start()
        with self.lock:
            if self.asked is None:
                return None
            now = time.perf_counter()
            if self.heard is None:
                self.heard = now
            if now - self.heard < HOLD_S:
                return "pause"
            self.asked = self.heard = None  # answered: the next one is scheduled
            return None

    def on_log(self, msg: str) -> None:
        if msg.startswith("Paused at step"):
            with self.lock:
                self.latencies.append({"seconds": time.perf_counter() - self.asked,
                                       "line": msg})


def arm(cls, cfg, loaded, store, layer, device, gaps, out: Path) -> dict:
    src = cls(loaded.model, store, layer, cfg.hook_point, seed=cfg.seed,
              buffer_tokens=cfg.buffer_tokens, holdout_tokens=cfg.eval_tokens, device=device)
    req = Requests(gaps)
    cb = Callbacks(control=req.control, on_log=req.on_log, pause_poll_s=0.05)
    t = time.perf_counter()
    res = Trainer(cfg, src, out, callbacks=cb).fit()
    secs = [r["seconds"] for r in req.latencies]
    return {"wall_seconds": time.perf_counter() - t, "tokens_per_s": res.tokens_per_s,
            "pauses": req.latencies, "median_s": statistics.median(secs) if secs else None,
            "max_s": max(secs) if secs else None, "requests": len(gaps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="kjv")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench")
    args = ap.parse_args()
    from worker import settings

    data_dir = args.data_dir or settings.data_dir()
    device = pick_device(args.device)
    cfg = TrainConfig(model=args.model, dataset=args.dataset, layer=args.layer,
                      hook_point="residual", context_size=128, total_steps=args.steps,
                      log_every=10, auto_save_interval=0, device=str(device), eval_tokens=2048)
    loaded, store, layer = load_for_extraction(cfg, data_dir, device)
    # Seeded gaps: each request 2-10 s after the previous was answered, the same in both arms.
    rng = random.Random(0)
    gaps = [round(rng.uniform(2.0, 10.0), 2) for _ in range(args.requests)]
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        for name, cls in (("between steps only", BetweenStepsOnly),
                          ("also inside rounds", LiveActivations)):
            runs[name] = arm(cls, cfg, loaded, store, layer, device, gaps, Path(d) / name[:4])
            print(f"{name}: median {runs[name]['median_s']:.2f} s, max "
                  f"{runs[name]['max_s']:.2f} s over {len(runs[name]['pauses'])} pauses",
                  file=sys.stderr, flush=True)
    env = (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} "
           f"threads, Python {platform.python_version()}")
    result = {"environment": env, "device": str(device), "model": args.model, "layer": layer,
              "sae": "topk 8x k=32, batch 4096, buffer 131,072", "steps": args.steps,
              "request_gaps_s": gaps, "hold_s": HOLD_S, "runs": runs}
    rows = "".join(
        f"| {name} | {len(r['pauses'])} of {r['requests']} | {r['median_s']:.2f} | "
        f"{r['max_s']:.2f} | {r['tokens_per_s']:,.0f} |\n" for name, r in runs.items())
    md = (f"# Time from a pause request to the paused state (live training)\n\n{env}; "
          f"{args.model} layer {layer} residual, {args.dataset}, context 128, 8x TopK k=32, "
          f"batch 4,096, buffer 131,072, {args.steps} steps per arm; up to {args.requests} "
          "requests, each 2-10 s (seeded, the same gaps in both arms) after the previous was "
          "answered.\n\n"
          "| caller heard | pauses | median s | max s | training tokens/s |\n"
          "|---|---|---|---|---|\n" + rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "pause-latency.json").write_text(json.dumps(result, indent=2))
    (args.out_dir / "pause-latency.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
