"""Many connections at once on a real PostgreSQL database (worker processes, and threads with
their own connections as the worker's and the web's threads have): the worker's claim gives
each queued training to one worker and keeps to the slot limit, and a control request written
while the worker writes progress is neither lost nor turns the progress back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.processes import ROOT, wait_for
from worker import jobs, tasks
from worker.db import Training, db
from worker.progress import TrainingReporter

from ..web.conftest import make_dataset, make_model, make_training

ROUNDS = 20


def _together(n: int, work: Any) -> list[Any]:
    """Run ``work(k)`` in ``n`` threads with their own connections; their results (or raise
    the first error)."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            with db.connection_context():
                results[k] = work(k)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


CLAIM = textwrap.dedent("""
    import json, random, sys, time
    from pathlib import Path
    from worker import tasks
    from worker.db import db, init_db
    init_db(sys.argv[1])
    ids = json.loads(sys.argv[2])
    random.Random(int(sys.argv[4])).shuffle(ids)
    tasks.device_fits("cpu")  # imports torch now, not inside the first claim
    go = Path(sys.argv[3])
    Path(f"{go}.ready{sys.argv[4]}").touch()
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    mine = []
    with db.connection_context():
        for i in ids:
            mine += tasks._claim([i])
    print(json.dumps({"worker": tasks.worker_name(), "claimed": mine}))
""")


def test_each_queued_training_is_claimed_exactly_once(data_dir: Path, postgres_url: str,
                                                      tmp_path: Path) -> None:
    """Three worker processes claim the same queued trainings at once (each in its own
    order): every training goes to exactly one, the one its ``worker`` column names."""
    m, d = make_model(), make_dataset()
    ids = [make_training(m, d, "queued", log=0).id for _ in range(3 * ROUNDS)]
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(ROOT), SAE_STUDIO_MAX_TRAININGS="1000")
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM, postgres_url, json.dumps(ids),
                               str(go), str(k)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(3)]
    wait_for(lambda: all(Path(f"{go}.ready{k}").exists() for k in range(3)), 120,
             "the claimers to start")  # all three imported the worker and wait for the file
    go.touch()
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    answers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    claimed = [i for a in answers for i in a["claimed"]]
    assert sorted(claimed) == ids, answers
    assert sum(bool(a["claimed"]) for a in answers) >= 2  # they did compete
    by = {i: a["worker"] for a in answers for i in a["claimed"]}
    with db.connection_context():
        rows = list(Training.select())
        assert {t.status for t in rows} == {"initializing"}
        assert {t.id: t.worker for t in rows} == by


def test_claims_keep_to_the_slot_limit(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker with one slot, two of its threads claiming two trainings at once: one runs."""
    monkeypatch.setenv("SAE_STUDIO_MAX_TRAININGS", "1")
    m, d = make_model(), make_dataset()
    pair = [make_training(m, d, "queued", log=0).id for _ in range(2)]
    barrier = threading.Barrier(2)

    def claim_rounds(k: int) -> list[int]:
        got = []
        for _ in range(ROUNDS):
            barrier.wait(30)
            got.append(len(tasks._claim([pair[k]])))
            barrier.wait(30)
            if k == 0:  # both back to queued for the next round
                with db.atomic():
                    Training.update(status="queued").where(Training.id.in_(pair)).execute()
        return got

    a, b = _together(2, claim_rounds)
    assert [x + y for x, y in zip(a, b)] == [1] * ROUNDS, (a, b)


def test_a_pause_request_survives_concurrent_progress_writes(data_dir: Path) -> None:
    t = make_training(make_model(), make_dataset(), "training", log=0)
    reporter = TrainingReporter(t.id)
    done = threading.Event()
    last_step = 300

    def write_progress(k: int) -> None:  # the worker: a flush per step
        for step in range(1, last_step + 1):
            reporter.pending.append({"step": step, "loss": 1.0 / step})
            reporter.flush()
        done.set()

    def ask_pause(k: int) -> int:  # the web: pause, cleared, asked again, ...
        asked = 0
        while not done.is_set():
            jobs.request(t.id, "pause")
            asked += 1
            assert Training.get_by_id(t.id).requested == "pause"
            with db.atomic():
                Training.update(requested=None).where(Training.id == t.id).execute()
        jobs.request(t.id, "pause")
        return asked

    def watch(k: int) -> list[int]:  # a live page: the step never goes back
        seen = []
        while not done.is_set():
            seen.append(Training.get_by_id(t.id).current_step)
            time.sleep(0.001)
        return seen

    _, asked, seen = _together(3, lambda k: (write_progress, ask_pause, watch)[k](k))
    assert asked > 5
    assert seen == sorted(seen), "the progress went back"
    with db.connection_context():
        row = Training.get_by_id(t.id)
        assert row.requested == "pause" and row.current_step == last_step
        assert row.latest["step"] == last_step
        reporter.last_poll = 0.0
        assert reporter.control(last_step) == "pause"  # the worker hears it
        assert Training.get_by_id(t.id).status == "paused"
