"""A training from the web on several processes (``gpus`` > 1): the worker starts real gloo
ranks of ``worker.ddp`` on this machine's CPU, rank 0 reports through the database; a rank
that dies fails the training naming it, and Retry resumes from the newest checkpoint."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from worker import jobs, tasks
from worker.db import LanguageModel

from ..processes import wait_for
from .conftest import form, start_in_thread, status_of


def _rank_pids(training_id: int, rank: int) -> list[int]:
    """Processes running ``python -m worker.ddp TRAINING_ID`` as ``rank`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker.ddp" in argv and str(training_id).encode() in argv \
                and f"RANK={rank}".encode() in env:
            found.append(int(entry.name))
    return found


def test_two_processes_train_one_sae(model: LanguageModel, dataset: Any) -> None:
    t = jobs.create_training(form(model, dataset, gpus="2"))  # immediate mode: runs inline
    assert t.status == "completed", t.error
    assert t.config["gpus"] == 2 and t.device == "cpu x2" and t.current_step == 20
    d = jobs.training_as_dict(t)
    assert d["result"]["steps"] == 20 and d["result"]["fvu"] < 1
    assert [r["step"] for r in jobs.metrics_rows(t.id)] == [5, 10, 15, 20]  # rank 0's only
    assert [c.step for c in jobs.checkpoints(t.id)] == [20, 10]
    assert any("(2 processes)" in line["message"] for line in jobs.log_lines(t.id))
    logs = sorted(p.name for p in (Path(t.out_dir) / "ranks").iterdir())
    assert logs == ["rank-0.log", "rank-1.log"]
    one = jobs.create_training(form(model, dataset))  # the same run on one process
    assert one.status == "completed", one.error
    assert abs(one.result["fvu"] - t.result["fvu"]) < 0.05
    assert not _rank_pids(t.id, 0) and not _rank_pids(t.id, 1)


def test_a_dead_rank_fails_the_training_and_retry_resumes(
        model: LanguageModel, dataset: Any, enqueued: list) -> None:
    t = jobs.create_training(form(model, dataset, gpus="2", total_steps="400",
                                  auto_save_interval="10"))
    thread = start_in_thread(t.id)
    wait_for(lambda: jobs.checkpoints(t.id), timeout=180, what="a first checkpoint")
    (pid,) = _rank_pids(t.id, 1)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive()
    row = jobs.get_training(t.id)
    assert row.status == "failed", row.status
    assert "Training process 1 of 2 was killed by signal 9" in row.error
    assert not _rank_pids(t.id, 0)  # rank 0 was stopped, not left waiting for rank 1
    saved = max(c.step for c in jobs.checkpoints(t.id))
    with tasks.db.atomic():  # a shorter run: the retry resumes and finishes soon
        tasks.Training.update(config=dict(row.config, total_steps=saved + 20)) \
            .where(tasks.Training.id == t.id).execute()
    jobs.request(t.id, "retry")
    tasks.run_training.call_local(t.id, True)
    row = jobs.get_training(t.id)
    assert row.status == "completed", row.error
    assert row.current_step == saved + 20
    steps = [r["step"] for r in jobs.metrics_rows(t.id)]
    assert steps == sorted(set(steps)) and steps[-1] == saved + 20
    assert any(f"step {saved}" in line["message"].lower() for line in jobs.log_lines(t.id))


def test_placement_and_validation(model: LanguageModel, dataset: Any, enqueued: list,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    has = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert tasks.device_fits("cpu", 2) and tasks.device_fits("cpu", 64)
    assert tasks.device_fits("cuda", 2) == tasks.device_fits("auto", 2) == (has >= 2)
    if has < 2:  # a GPU request this worker cannot meet stays queued for another worker
        t = jobs.create_training(form(model, dataset, gpus="2", device="auto"))
        scheduled = []
        monkeypatch.setattr(tasks.run_training, "schedule",
                            lambda args, delay: scheduled.append(args))
        tasks.run_training.call_local(t.id)
        assert status_of(t.id) == "queued" and scheduled == [(t.id, False)]
    for overrides, words in (({"gpus": "2", "device": "cuda:1"}, "needs device cuda, auto"),
                             ({"gpus": "2", "device": "mps"}, "needs device cuda, auto"),
                             ({"gpus": "3"}, "must divide evenly among the 3"),
                             ({"gpus": "0"}, "GPUs")):
        with pytest.raises(jobs.Invalid) as exc:
            jobs.create_training(form(model, dataset, **overrides))
        assert words in exc.value.errors["gpus"], exc.value.errors
    with pytest.raises(jobs.Invalid) as exc:  # a sweep spreads its SAEs over GPUs
        jobs.create_sweep(dict(form(model, dataset, gpus="2"), k="4,8"))
    assert "spreads its SAEs over that many GPUs" in exc.value.errors["gpus"]
    enqueued.clear()
    sweep = jobs.create_sweep(dict(form(model, dataset, gpus="2", device="auto"), k="4,8"))
    ids = jobs.sweep_as_dict(sweep)["groups"][0]
    assert [jobs.get_training(i).config["gpus"] for i in ids] == [2, 2]
    if has < 2:  # not claimed by a worker without two GPUs
        monkeypatch.setattr(tasks.run_group, "schedule", lambda args, delay: None)
        tasks.run_group.call_local(ids)
        assert {status_of(i) for i in ids} == {"queued"}


def test_estimate_is_per_process(model: LanguageModel, dataset: Any) -> None:
    from worker.jobs.estimates import estimate

    one = estimate(model, form(model, dataset, batch_size="4096"))
    two = estimate(model, form(model, dataset, batch_size="4096", gpus="2"))
    assert "processes" not in one and two["processes"] == 2
    # on the CPU: two processes, each with its own runtime and half the batch
    assert one["memory_bytes"] < two["memory_bytes"] < 2 * one["memory_bytes"]
    assert two["parts"]["runtime"] == 2 * one["parts"]["runtime"]


def test_pause_resume_and_stop_reach_every_rank(model: LanguageModel, dataset: Any,
                                                enqueued: list) -> None:
    t = jobs.create_training(form(model, dataset, gpus="2", total_steps="100000",
                                  log_every="2", auto_save_interval="0"))
    thread = start_in_thread(t.id)
    wait_for(lambda: jobs.metrics_rows(t.id), timeout=180, what="a first metric row")
    jobs.request(t.id, "pause")
    wait_for(lambda: status_of(t.id) == "paused", timeout=60, what="paused")
    paused_at = jobs.get_training(t.id).current_step
    wait_for(lambda: [c.reason for c in jobs.checkpoints(t.id)] == ["pause"], timeout=30,
             what="the pause checkpoint (rank 0 writes it with both ranks' positions)")
    jobs.request(t.id, "resume")
    wait_for(lambda: jobs.get_training(t.id).current_step > paused_at + 4, timeout=60,
             what="steps after the resume")
    jobs.request(t.id, "stop")
    thread.join(timeout=120)
    assert not thread.is_alive()
    row = jobs.get_training(t.id)
    assert row.status == "stopped", (row.status, row.error)
    assert not _rank_pids(t.id, 0) and not _rank_pids(t.id, 1)


def test_ranks_of_a_training_stopped_before_they_start_end_soon(
        model: LanguageModel, dataset: Any, enqueued: list) -> None:
    """Rank 0 finds the training no longer running and exits; the worker stops rank 1 (left
    waiting for rank 0 at the rendezvous) after the grace period instead of its 60 minutes."""
    import time

    from worker import ddp

    t = jobs.create_training(form(model, dataset, gpus="2"))
    jobs.request(t.id, "stop")  # a queued training stops at once
    assert status_of(t.id) == "stopped"
    began = time.monotonic()
    ddp.run(t.id, 2, Path(t.out_dir))
    assert time.monotonic() - began < ddp.STOP_GRACE_S + 20
    assert status_of(t.id) == "stopped" and not _rank_pids(t.id, 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_rank_dies_with_the_thread_that_started_it() -> None:
    """The ranks get SIGKILL when the worker thread that started them ends (a killed worker
    leaves no rank training on)."""
    import subprocess
    import threading

    from worker import ddp

    started: list[subprocess.Popen] = []

    def start() -> None:
        started.append(subprocess.Popen(["sleep", "60"], preexec_fn=ddp._die_with_parent))

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    (child,) = started
    wait_for(lambda: child.poll() is not None, timeout=10, what="the child's end")
    assert child.returncode == -signal.SIGKILL
