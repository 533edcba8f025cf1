"""A web-started training on several processes (its config's ``gpus`` > 1): one SAE, DDP.

The worker that claimed the training starts ``gpus`` processes of this module on its machine,
the way torchrun would (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, a
loopback ``MASTER_ADDR`` / ``MASTER_PORT``), and supervises them (``run``):

    python -m worker.ddp TRAINING_ID      # one rank; the worker starts them all

Rank 0 is the training's reporter: it runs what an in-process training runs
(``tasks._train``: the database rows, metrics, checkpoints, the final status, the held-out
evaluation); the other ranks train their shards silently (``engine.distributed``). Each rank's
output goes to ``OUT/ranks/rank-N.log``. The worker keeps the run folder's lock meanwhile; when
a rank fails, the others are stopped and the training fails with that rank's last line. The
processes die with the worker thread that started them (Linux ``PR_SET_PDEATHSIG``), so a
SIGKILLed worker leaves no rank training on: its training is reaped as interrupted and Retry
resumes it from the newest checkpoint, on the same number of processes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import settings
from .db import RUNNING, Training, db

log = logging.getLogger("sae_studio.worker")

POLL_S = 0.5
STOP_GRACE_S = 10.0
"""Seconds the other ranks get to exit after one failed or rank 0 ended, before they are
stopped (terminated, then killed)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prctl() -> Any:
    """libc's ``prctl``, looked up here in the parent (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec (the worker has other threads: nothing here
    imports or looks anything up): SIGKILL when the thread that started it ends."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment of one rank: torchrun's variables, and this worker's settings resolved
    (data folder, database, queue and artifact folder), so the rank opens what it opens."""
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               SAE_STUDIO_DATA=str(settings.data_dir()),
               SAE_STUDIO_DATABASE_URL=settings.database_url(),
               SAE_STUDIO_QUEUE_URL=settings.queue_url(),
               SAE_STUDIO_ARTIFACTS=str(settings.artifacts_dir()),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS")
               or str(max(1, (os.cpu_count() or 1) // world)))
    return env


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()
                 if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-500:] if lines else ""


def run(training_id: int, world: int, out_dir: Path) -> None:
    """Train ``training_id`` on ``world`` processes of this machine and wait for them (the
    worker's task thread; the run folder's lock held by the caller). Rank 0 stores how the
    training ended; a rank that fails (or dies) stops the rest and fails the training."""
    logs = out_dir / "ranks"
    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(world):
            with open(logs / f"rank-{rank}.log", "ab") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "worker.ddp", str(training_id)],
                    env=rank_env(rank, world, port), stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent if _PRCTL is not None else None))
        failed: list[int] = []
        main_ended: float | None = None
        while not failed and any(p.poll() is None for p in procs):
            time.sleep(POLL_S)
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if main_ended is None and procs[0].poll() is not None:
                main_ended = time.monotonic()
            if main_ended is not None and time.monotonic() - main_ended > STOP_GRACE_S:
                break  # rank 0 ended the training (or never started it): the rest stop
    finally:
        _stop(procs)
    if not failed:
        return
    # The cause: a rank killed by a signal (the others only lost their peer), else the first
    # failed rank by number (rank 0 has stored its own message then).
    rank = min(failed, key=lambda r: (procs[r].returncode >= 0, r))
    code = procs[rank].returncode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    line = _last_line(logs / f"rank-{rank}.log")
    message = (f"Training process {rank} of {world} {how}" + (f": {line}" if line else ".")
               + f" Its output: {logs / f'rank-{rank}.log'}")
    # Rank 0 stores the failures it sees; another rank's cause replaces what rank 0 saw of it
    states = RUNNING + (("failed",) if rank != 0 else ())
    with db.atomic():
        Training.update(status="failed", error=message, requested=None,
                        finished_at=time.time(), updated_at=time.time()) \
            .where((Training.id == training_id) & Training.status.in_(states)).execute()


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate the ranks still running, then kill what ignores it."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in alive:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------ one rank
def rank_main(training_id: int) -> int:
    """One rank of ``run``: join the process group and train (rank 0 reporting)."""
    from .engine import distributed
    from .engine.config import TrainConfig
    from .engine.devices import pick_device
    from .tasks import _fail, _train, connection, local_config

    dist = distributed.from_env()
    with connection():
        t = Training.get_or_none(Training.id == training_id)
        if t is None or (dist.is_main and t.status not in RUNNING):
            return 0  # deleted or stopped before rank 0 started (the worker stops the rest)
        cfg = TrainConfig.from_dict(local_config(t))
        out_dir = Path(t.out_dir or settings.trainings_dir() / str(training_id))
    try:
        distributed.local_batch(cfg.batch_size, dist)
        device = distributed.device_for(dist, pick_device(cfg.device))
        distributed.setup(dist, device)
        with connection():
            _train(t, out_dir, dist=dist, device=device)
    except Exception as exc:
        if dist.is_main:
            log.exception("Training %s failed", training_id)
            with connection():
                _fail(training_id, exc)
        raise
    finally:
        distributed.teardown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m worker.ddp TRAINING_ID (the worker starts these)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return rank_main(int(args[0]))


if __name__ == "__main__":
    sys.exit(main())

