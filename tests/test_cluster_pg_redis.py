"""The lab set-up end to end: PostgreSQL and Redis (throw-away servers on free loopback ports,
``tests/servers.py``), the web with ``--no-worker`` and two ``run.py --worker-only`` processes
with their own data folders that share only the artifacts folder. Four trainings and a sweep
go in; one worker is SIGKILLed mid-run; every job completes (the killed worker's training
retried on the other from its newest checkpoint in the shared folder), both workers were used,
nothing is lost. Real processes throughout; every wait is bounded."""

from __future__ import annotations

import re
from pathlib import Path

from . import cluster
from .processes import RunPy, wait_for
from .servers import postgres_server, postgres_url, redis_server, redis_url  # noqa: F401

FORM = {"layer": 2, "expansion_factor": 2, "k": 8, "batch_size": 128, "log_every": 5,
        "auto_save_interval": 10, "buffer_tokens": 4096, "eval_tokens": 0, "device": "cpu"}
SHORT = 30
"""Steps of the trainings that run to the end on their own."""


def test_postgres_redis_cluster_survives_a_killed_worker(
        tmp_path: Path, postgres_url: str, redis_url: str) -> None:  # noqa: F811 (fixtures)

    shared = cluster.Shared(postgres_url, redis_url, tmp_path / "artifacts")
    web = RunPy(tmp_path / "web", "--no-worker", *shared.args())
    with cluster.Watch(web) as watch:
        a = watch.add("a", cluster.WorkerProcess(tmp_path / "a", shared))
        b = watch.add("b", cluster.WorkerProcess(tmp_path / "b", shared))
        cluster.wait_workers(web, [a.name, b.name])
        by_name = {a.name: a, b.name: b}

        m = web.call("/models", {"source": "minilm-l6"})
        d = web.call("/datasets", {"source": "kjv", "max_tokens": "20000", "context_size": "64"})
        wait_for(lambda: web.call(f"/models/{m['id']}")["status"] == "ready", 180, "the model")
        wait_for(lambda: web.call(f"/datasets/{d['id']}")["status"] == "ready", 180, "the data")
        form = {**FORM, "model_id": m["id"], "dataset_id": d["id"]}

        # the long one is killed with its worker; the others finish on their own
        long_id = web.call("/trainings", {**form, "total_steps": 100_000})["id"]
        first = cluster.wait_status(web, long_id, "training", timeout=180)
        doomed, survivor = by_name[first["worker"]], by_name[({a.name, b.name}
                                                               - {first["worker"]}).pop()]
        short_ids = [web.call("/trainings", {**form, "total_steps": SHORT, "seed": s})["id"]
                     for s in range(3)]
        sweep = web.call("/sweeps", {**form, "total_steps": SHORT, "k": "4,8"})
        ids = short_ids + sweep["trainings"]

        cluster.kill_mid_run(web, doomed, long_id, slack_s=20)

        newest = max(c["step"] for c in web.call(f"/trainings/{long_id}/checkpoints")["items"])
        assert newest > 0
        cluster.set_total_steps(shared.database_url, long_id, newest + 15)
        assert web.call(f"/trainings/{long_id}/retry", {}, "POST")["status"] == "queued"

        finals = {i: cluster.wait_status(web, i, "completed", timeout=400)
                  for i in [*ids, long_id]}
        # the retried training finished on the survivor, from its newest checkpoint
        assert finals[long_id]["worker"] == survivor.name
        assert finals[long_id]["current_step"] == newest + 15
        log = cluster.log_lines(shared.database_url, long_id)
        resumed = [int(mt.group(1)) for line in log
                   if (mt := re.fullmatch(r"Resumed from .* at step (\d+)\.", line))]
        assert resumed and newest <= resumed[-1] < newest + 15, log
        # both workers trained; every job ran to its last step; nothing lost
        assert first["worker"] == doomed.name
        assert {f["worker"] for f in finals.values()} <= {a.name, b.name}
        for i in ids:
            t = finals[i]
            assert t["current_step"] == t["total_steps"] == SHORT, t
            assert t["result"]["steps"] == SHORT and t["latest"]["step"] == SHORT
            steps = [r["step"] for r in web.call(f"/trainings/{i}/metrics")["rows"]]
            assert steps == list(range(5, SHORT + 1, 5)), (i, steps)  # every logged row
            assert (shared.artifacts / "trainings" / str(i) / "checkpoints").is_dir()
        assert web.call(f"/sweeps/{sweep['id']}")["status"] == "completed"
        # the servers held the database and the queue; the workers only their caches
        for folder in (tmp_path / "web", tmp_path / "a", tmp_path / "b"):
            assert not (folder / "app.db").exists() and not (folder / "queue.db").exists()
            assert not (folder / "trainings").exists()
        assert (survivor.data_dir / "models").is_dir() or (survivor.data_dir / "tokens").is_dir()
