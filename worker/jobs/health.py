"""The workers' health as the web sees it: the newest heartbeat row (device, speed, age) for the
top bar, and the two thresholds every worker is judged by (alive, dead)."""

from __future__ import annotations

import time
from typing import Any

from ..db import WorkerHeartbeat

HEARTBEAT_ALIVE_S = 5.0
"""A worker whose newest heartbeat is younger than this (seconds) is alive; one that beats every
second (``worker.tasks.HEARTBEAT_S``) and falls silent this long is hung (``worker.supervisor``
kills and restarts it)."""

HEARTBEAT_DEAD_S = 15.0
"""A worker whose newest heartbeat is older than this (seconds) is dead: every live worker marks
the trainings it was running ``interrupted`` (``jobs.workers.reap_dead_workers``; Retry continues
them on any worker). Three times ``HEARTBEAT_ALIVE_S``: under run.py a hung worker is killed and
its trainings interrupted by its supervisor first, and a database too busy to take a heartbeat
for a few seconds does not cost a running training."""


def newest_heartbeat() -> WorkerHeartbeat | None:
    """The most recently updated heartbeat row, or None when no worker ever ran."""
    return WorkerHeartbeat.select().order_by(WorkerHeartbeat.updated_at.desc()).first()


def health() -> dict[str, Any]:
    """The newest worker heartbeat: ``{alive, age_s, name, device, device_name,
    device_memory (bytes), gflops}`` (alive: seen in the last 5 s; all None but alive=False
    when no worker ever ran)."""
    hb = newest_heartbeat()
    if hb is None:
        return {"alive": False, "age_s": None, "name": None, "device": None,
                "device_name": None, "device_memory": None, "gflops": None}
    age = max(0.0, time.time() - hb.updated_at)
    return {"alive": age < HEARTBEAT_ALIVE_S, "age_s": round(age, 1), "name": hb.name,
            "device": hb.device, "device_name": hb.device_name,
            "device_memory": hb.device_memory, "gflops": hb.gflops}


def heartbeat_age(name: str, since: float) -> float | None:
    """Seconds since the worker ``name`` (``host:pid``) last beat, counting only beats after
    ``since`` (epoch seconds: when it was started, so an old row of a reused pid does not count);
    None before its first beat."""
    hb = WorkerHeartbeat.get_or_none((WorkerHeartbeat.name == name)
                                     & (WorkerHeartbeat.updated_at >= since))
    return None if hb is None else max(0.0, time.time() - hb.updated_at)
