"""How long a sweep's resume takes before its first step, side by side in one run: every member
rebuilding the shared live buffer in turn (as before) vs the group rebuilding it once
(``GroupTrainer.fit``: ``Trainer.load(..., replay=False)``, then one ``load_state_dict``).

    .venv/bin/python bench/group_resume.py                  # CPU, ~15-20 minutes on 2 cores

A group of ``--members`` TopK SAEs (8x, k = 16, 32, 48, ...; batch 4,096, buffer 131,072) on
the bundled SmolLM2-135M layer 15 residual (KJV, context 128) is trained live and stopped at
``--stop`` steps (inside its second buffer round), then its checkpoints are resumed twice on a
fresh source each: every member's ``Trainer.begin(point)`` (the old path: each replays the
source), and every member's ``begin(point, replay=False)`` plus one replay. Timed: from the
first member's load to the source being ready for the next step; both sources then serve the
same next batch (checked). Writes bench/group-resume.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from worker.engine.activations import LiveActivations  # noqa: E402
from worker.engine.config import TrainConfig  # noqa: E402
from worker.engine.devices import pick_device  # noqa: E402
from worker.engine.group import resume_points, train_group  # noqa: E402
from worker.engine.pipeline import load_for_extraction  # noqa: E402
from worker.engine.trainer import Callbacks, Trainer  # noqa: E402


def fresh_source(cfg: TrainConfig, loaded, store, layer, device) -> LiveActivations:
    return LiveActivations(loaded.model, store, layer, cfg.hook_point, seed=cfg.seed,
                           buffer_tokens=cfg.buffer_tokens, holdout_tokens=cfg.eval_tokens,
                           device=device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--stop", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench")
    args = ap.parse_args()
    from worker import settings

    data_dir = args.data_dir or settings.data_dir()
    device = pick_device(args.device)
    base = TrainConfig(model="smollm2-135m", dataset="kjv", layer=15, hook_point="residual",
                       context_size=128, total_steps=40, log_every=10, auto_save_interval=0,
                       device=str(device), eval_tokens=2048)
    cfgs = [base.replace(k=16 * (i + 1)) for i in range(args.members)]
    with tempfile.TemporaryDirectory() as d:
        dirs = [Path(d) / f"k{c.k}" for c in cfgs]
        t = time.perf_counter()
        train_group(cfgs, dirs, data_dir=data_dir, device=device, evaluate=False,
                    callbacks=Callbacks(control=lambda s: "stop" if s == args.stop else None))
        first_s = time.perf_counter() - t
        points = resume_points(dirs)
        assert points is not None
        loaded, store, layer = load_for_extraction(base, data_dir, device)
        arms = {}
        for name in ("every member replays (before)", "one replay per source (now)"):
            src = fresh_source(base, loaded, store, layer, device)
            trainers = [Trainer(c, src, out) for c, out in zip(cfgs, dirs, strict=True)]
            t = time.perf_counter()
            if name.startswith("every"):
                for trainer, point in zip(trainers, points, strict=True):
                    trainer.begin(point)
            else:
                held = [tr.begin(p, replay=False) for tr, p in zip(trainers, points, strict=True)]
                assert all(h == held[0] for h in held)
                src.load_state_dict(held[0])
            arms[name] = {"seconds": time.perf_counter() - t,
                          "next_batch": src.next_batch(base.batch_size)}
            print(f"{name}: {arms[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
    a, b = (arm.pop("next_batch") for arm in arms.values())
    assert torch.equal(a, b), "the two resumes serve different batches"
    env = (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} "
           f"threads, Python {platform.python_version()}")
    result = {"environment": env, "device": str(device), "members": args.members,
              "stopped_at_step": args.stop, "first_run_seconds": first_s, "arms": arms,
              "sae": "topk 8x, k = 16, 32, ..., batch 4096, buffer 131,072"}
    rows = "".join(f"| {name} | {arm['seconds']:.1f} |\n" for name, arm in arms.items())
    md = (f"# A sweep's resume before its first step\n\n{env}; smollm2-135m layer 15 residual, "
          f"kjv, context 128; {args.members} TopK SAEs (8x, batch 4,096, buffer 131,072) on one "
          f"hook, stopped at step {args.stop} and resumed from those checkpoints; the same next "
          "batch served after both (checked).\n\n| resume | seconds |\n|---|---|\n" + rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "group-resume.json").write_text(json.dumps(result, indent=2))
    (args.out_dir / "group-resume.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
