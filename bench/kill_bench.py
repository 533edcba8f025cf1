"""Kill test: SIGKILL run.py, then the worker alone, again and again while a training runs and
saves, and check what a user would: one trainer at a time, checkpoints that load, no stale
temporary files, at most one save interval lost, and the run completing after Retry.

    .venv/bin/python bench/kill_bench.py [--kills 10] [--steps 600] [--save-every 20]

Everything runs on the loopback against a throw-away data folder; every wait is bounded.
Prints one JSON object (also written to bench/out/kill-results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.processes import RunPy, alive, consumers, stop_all, wait_for  # noqa: E402


def status(app: RunPy, tid: int) -> dict:
    return app.call(f"/trainings/{tid}")


def kill_once(app: RunPy, data: Path, run: Path, tid: int, i: int, rng: random.Random,
              args: argparse.Namespace) -> tuple[RunPy, dict | None]:
    """Let the run go a random number of steps (up to three save intervals: sometimes mid-step,
    sometimes mid-save), SIGKILL run.py (even kills) or the worker alone (odd kills), check the
    aftermath, Retry. Returns the app now serving and what was seen (None: the run is too near
    its end for another kill)."""
    start = status(app, tid)["current_step"]
    target = start + rng.randint(1, 3 * args.save_every)
    if target >= args.steps:
        return app, None
    wait_for(lambda: status(app, tid)["current_step"] >= target, 300, "steps")
    at = status(app, tid)["current_step"]
    victim = "run.py" if i % 2 == 0 else "worker"
    worker = app.worker()
    restarts = app.restarts()
    if victim == "run.py":
        os.kill(app.proc.pid, signal.SIGKILL)
        app.proc.wait(10)
        wait_for(lambda: not alive(worker), 180, "the orphaned worker to stop")
        app = RunPy(data)
    else:
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: app.restarts() > restarts, 30,
             "the supervisor's new worker")
    # interrupted — or completed, when the kill came within its last steps and the trainer
    # finished them before it heard the stop
    row = wait_for(lambda: (r := status(app, tid))["status"] in ("interrupted", "completed") and r,
               180, "the training to be interrupted")
    problems = []
    n_workers = len(consumers(data))  # a second one may only wait on <data>/worker.lock
    tmp = [str(x) for x in run.rglob("*") if ".tmp" in x.name]
    if tmp:
        problems.append(f"kill {i}: stale temporary files {tmp}")
    broken = []
    for ck in sorted((run / "checkpoints").glob("*.safetensors")):
        try:
            with safe_open(str(ck), "pt") as fh:
                fh.keys()
        except Exception as exc:  # a corrupt checkpoint is what this test looks for
            broken.append(f"{ck.name}: {exc}")
    if broken:
        problems.append(f"kill {i}: corrupt checkpoints {broken}")
    steps = [c["step"] for c in app.call(f"/trainings/{tid}/checkpoints")["items"]]
    resume_from = max(steps, default=0)
    lost = max(0, at - resume_from)  # steps done before the kill that the retry redoes
    if lost > args.save_every:
        problems.append(f"kill {i}: {lost} steps lost (save interval {args.save_every})")
    if row["status"] == "interrupted":
        app.call(f"/trainings/{tid}/retry", {}, "POST")
        wait_for(lambda: status(app, tid)["status"] in ("training", "completed"), 240,
             "the retried run to train")
    return app, {"kill": i, "victim": victim, "at_step": at, "resumed_from": resume_from,
                 "lost_steps": lost, "stale_tmp": tmp, "corrupt": broken,
                 "workers_after": n_workers, "row_error": row["error"], "problems": problems}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    data = Path(tempfile.mkdtemp(prefix="sae-kill-"))
    app = RunPy(data)
    m = app.call("/models", {"source": "minilm-l6"})
    d = app.call("/datasets", {"source": "kjv", "max_tokens": "200000", "context_size": "64"})
    wait_for(lambda: app.call(f"/models/{m['id']}")["status"] == "ready", 300, "the model")
    wait_for(lambda: app.call(f"/datasets/{d['id']}")["status"] == "ready", 300, "the dataset")
    t = app.call("/trainings", {"model_id": m["id"], "dataset_id": d["id"], "layer": 3,
                                "encoder_type": "topk", "k": 16, "expansion_factor": 4,
                                "batch_size": 512, "total_steps": args.steps, "log_every": 5,
                                "auto_save_interval": args.save_every, "eval_tokens": 0})
    tid, run = t["id"], data / "trainings" / str(t["id"])
    events, problems = [], []
    for i in range(args.kills):
        app, event = kill_once(app, data, run, tid, i, rng, args)
        if event is None:
            break
        events.append(event)
        problems += event.pop("problems")
        print(json.dumps(event), file=sys.stderr, flush=True)
    final = wait_for(lambda: (r := status(app, tid))["status"] in
                 ("completed", "failed") and r, 900, "the training to end")
    if final["status"] != "completed":
        problems.append(f"the run ended {final['status']}: {final['error']}")
    app.proc.send_signal(signal.SIGINT)
    app.proc.wait(120)
    out = {"kills": len(events), "events": events, "final_status": final["status"],
           "final_step": final["current_step"], "problems": problems,
           "settings": vars(args), "data_dir": str(data)}
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "kill-results.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "events"}))
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        for folder in Path(tempfile.gettempdir()).glob("sae-kill-*"):
            stop_all(folder)
