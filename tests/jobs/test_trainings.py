"""Trainings: the form, the estimate, a full run, the control state machine and recovery."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import pytest

from worker import jobs, tasks
from worker.db import (
    SCHEMA_VERSION,
    Checkpoint,
    LanguageModel,
    Metric,
    Training,
    db,
    init_db,
)
from worker.engine.files import folder_lock
from worker.progress import TrainingReporter

from ..processes import wait_for
from .conftest import form, start_in_thread, status_of


# ---------------------------------------------------------------------------- the form
def test_form_fields_and_defaults(model: LanguageModel, dataset: Any) -> None:
    names = [info.name for info in jobs.form_options()]
    for name in ("encoder_type", "layer", "latent_dim", "l1_alpha", "learning_rate",
                 "batch_size", "total_steps", "auto_save_interval", "hook_point",
                 "expansion_factor", "k", "seed", "lr_schedule", "lr_warmup_steps", "precision",
                 "micro_batch_size", "log_every", "keep_every", "dead_window_tokens", "device"):
        assert name in names
    assert not {"model", "dataset", "context_size", "max_tokens", "text_field"} & set(names)
    d = jobs.training_defaults(model)
    assert set(d) == set(names) | {"model_id", "dataset_id"}
    assert (d["model_id"], d["dataset_id"]) == (model.id, dataset.id)
    assert (d["layer"], d["expansion_factor"], d["latent_dim"]) == (3, 8, None)
    assert (d["encoder_type"], d["k"], d["l1_alpha"], d["learning_rate"]) == ("topk", 32, 2.0,
                                                                               None)
    assert (d["batch_size"], d["total_steps"], d["auto_save_interval"], d["seed"]) == \
        (4096, 1000, 500, 0)
    assert d["hook_point"] == "residual"
    assert jobs.training_defaults(None)["layer"] is None
    assert [m.id for m in jobs.ready_models()] == [model.id]


def test_create_training_validation(model: LanguageModel, dataset: Any, enqueued: list) -> None:
    pending = jobs.add_model("minilm-l6")  # recorded, not run: stays queued
    bad = form(model, dataset, layer="40", latent_dim="16", k="32", total_steps="many",
               batch_size="0", hook_point="bogus", learning_rate="2", lr_schedule="weird")
    with pytest.raises(jobs.Invalid) as exc:
        jobs.create_training(bad)
    errors = exc.value.errors
    assert exc.value.status == 422
    assert errors["layer"] == "Layer 40 is out of range: the model has 6 layers (0-5)."
    assert "k (32) cannot exceed the number of latents (16)." == errors["k"]
    assert "whole number" in errors["total_steps"]
    assert "batch_size" in errors and "hook_point" in errors and "lr_schedule" in errors
    assert "learning_rate" in errors
    with pytest.raises(jobs.Invalid) as exc:
        jobs.create_training(form(pending, dataset))
    assert exc.value.errors["model_id"] == \
        f"Model {pending.id} is not ready (status: queued)."
    with pytest.raises(jobs.Invalid) as exc:
        jobs.create_training({"model_id": "", "dataset_id": "77"})
    assert set(exc.value.errors) == {"model_id", "dataset_id"}
    assert Training.select().count() == 0
    assert [name for name, _ in enqueued] == ["prepare_model"]


def test_create_training_config(model: LanguageModel, dataset: Any, enqueued: list,
                                data_dir: Path) -> None:
    t = jobs.create_training(form(model, dataset, latent_dim="1000", expansion_factor="4",
                                  layer="", seed=" "))
    assert enqueued == [("run_training", (t.id, False))]
    cfg = t.config
    assert cfg["model"] == model.path and cfg["dataset"] == "kjv" and cfg["layer"] == 3
    assert (cfg["context_size"], cfg["max_tokens"], cfg["text_field"]) == (64, 16384, "text")
    assert cfg["latent_dim"] == 1000 and cfg["seed"] == 0 and cfg["total_steps"] == 20
    assert t.status == "queued" and t.total_steps == 20
    assert t.out_dir == str(data_dir / "trainings" / str(t.id))
    assert t.estimate["d_sae"] == 1000 and t.estimate["fits"]
    d = jobs.training_as_dict(t)
    for key in ("id", "status", "current_step", "total_steps", "error", "latest", "model_id",
                "dataset_id", "config", "created_at", "started_at", "finished_at", "result"):
        assert key in d
    assert d["latest"] is None
    # a queued training: stop at once, then delete
    with pytest.raises(jobs.Conflict):
        jobs.delete_training(t.id)
    assert jobs.request(t.id, "stop").status == "stopped"
    with pytest.raises(jobs.Conflict, match="is stopped; only a running training can be paused"):
        jobs.request(t.id, "pause")
    jobs.delete_training(t.id)
    with pytest.raises(jobs.NotFound):
        jobs.get_training(t.id)


def test_health_without_and_with_worker(data_dir: Path) -> None:
    assert jobs.health()["alive"] is False
    device = tasks.measure_device()
    assert device["device"] == "cpu" and device["gflops"] > 0 and device["device_memory"] > 0
    tasks.write_heartbeat("host:1", device)
    tasks.write_heartbeat("host:1", device)
    h = jobs.health()
    assert h["alive"] and h["name"] == "host:1" and h["age_s"] < 5


# ---------------------------------------------------------------------------- a full run
def test_training_completes(model: LanguageModel, dataset: Any, data_dir: Path) -> None:
    t = jobs.create_training(form(model, dataset))  # immediate mode: runs inline
    assert t.status == "completed", t.error
    assert t.current_step == 20 and t.started_at and t.finished_at and t.device == "cpu"
    d = jobs.training_as_dict(t)
    assert set(d["latest"]) == set(jobs.LATEST_KEYS) and d["latest"]["step"] == 20
    assert d["result"]["steps"] == 20 and not d["result"]["stopped"]
    rows = jobs.metrics_rows(t.id)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert rows[0]["dead_neurons"] == rows[0]["dead"] and rows[0]["lr"] == rows[0]["learning_rate"]
    assert d["latest"]["dead"] == d["latest"]["dead_neurons"] == rows[-1]["dead"]
    assert [r["step"] for r in jobs.metrics_rows(t.id, after_step=10)] == [15, 20]
    cks = jobs.checkpoints(t.id)
    assert [c.step for c in cks] == [20, 10]
    assert cks[0].reason == "final" and cks[1].reason == "auto"
    assert sum(c.is_best for c in cks) == 1 and all(Path(c.path).is_file() for c in cks)
    assert any("Finished at step 20" in line["message"] for line in jobs.log_lines(t.id))
    zpath = jobs.export_zip(t.id)
    with zipfile.ZipFile(zpath) as zf:
        assert "saelens/cfg.json" in zf.namelist()
    assert jobs.export_zip(t.id) == zpath
    # finished training: any checkpoint may go; 409s for controls
    jobs.delete_checkpoint(cks[1].id)
    assert not Path(cks[1].path).exists() and len(jobs.checkpoints(t.id)) == 1
    for action, words in (("pause", "only a running training can be paused"),
                          ("resume", "only a paused training can be resumed"),
                          ("stop", "only a queued or running training can be stopped"),
                          ("retry", "only a stopped, failed or interrupted")):
        with pytest.raises(jobs.Conflict, match=words) as exc:
            jobs.request(t.id, action)
        assert exc.value.status == 409 and str(exc.value).startswith(
            f"Training {t.id} is completed;")
    with pytest.raises(jobs.Conflict):
        jobs.save_checkpoint_now(t.id)
    with pytest.raises(jobs.Invalid):
        jobs.request(t.id, "explode")
    jobs.delete_model(model.id)  # deletes its finished trainings and their folders
    assert not Path(t.out_dir).exists() and Metric.select().count() == 0


def test_evaluating_between_the_last_step_and_completed(
        model: LanguageModel, dataset: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real run (immediate mode): every log line records the row's status as it was written;
    the evaluation's lines are written while the row is ``evaluating``, which refuses a stop,
    a retry and a delete; a run without an evaluation never shows it."""
    seen: list[tuple[str, float | None, str]] = []
    refusals: list[str] = []
    write_log = TrainingReporter.log

    def log_and_look(reporter: TrainingReporter, message: str, level: str = "info") -> None:
        write_log(reporter, message, level)
        row = Training.get_by_id(reporter.training_id)
        seen.append((row.status, row.eval_progress, message))
        if row.status == "evaluating" and not refusals:
            for action in ("stop", "retry"):
                with pytest.raises(jobs.Conflict) as exc:
                    jobs.request(row.id, action)
                refusals.append(str(exc.value))
            with pytest.raises(jobs.Conflict, match="stop it before deleting"):
                jobs.delete_training(row.id)

    monkeypatch.setattr(TrainingReporter, "log", log_and_look)
    t = jobs.create_training(form(model, dataset))
    assert t.status == "completed" and t.result["eval"]["report"] is True, t.error
    statuses = [status for status, _, _ in seen]
    last_step = next(i for i, (_, _, m) in enumerate(seen) if m.startswith("Finished at step"))
    assert statuses[last_step] == "training"
    evaluating = [(p, m) for status, p, m in seen if status == "evaluating"]
    assert statuses.index("evaluating") > last_step and evaluating[0][1].startswith("Evaluating")
    assert evaluating[-1][1].startswith("Report ready") and evaluating[-1][0] == 1.0
    progress = [p for p, _ in evaluating]
    assert progress == sorted(progress) and progress[0] == 0.0
    assert refusals[0] == (f"Training {t.id} is evaluating: its training has ended and its "
                           "weights are saved; wait for its held-out evaluation to finish "
                           "(seconds to minutes).")
    assert refusals[1].startswith(f"Training {t.id} is evaluating; only a stopped")
    assert jobs.training_as_dict(t)["eval_progress"] == 1.0

    seen.clear()
    t = jobs.create_training(form(model, dataset, eval_tokens="0", total_steps="5"))
    assert t.status == "completed" and t.result["eval"]["report"] is False, t.error
    assert "evaluating" not in [status for status, _, _ in seen] and t.eval_progress is None
    assert seen[-1][2] == "No report: eval_tokens is 0."


def test_schema_v3_adds_eval_progress(data_dir: Path) -> None:
    """A database of schema 2 gets the trainings' ``eval_progress`` column (null)."""
    with db.connection_context():
        db.execute_sql("ALTER TABLE training DROP COLUMN eval_progress")
        db.execute_sql("PRAGMA user_version = 2")
    init_db(data_dir / "app.db")
    with db.connection_context():
        assert "eval_progress" in {c.name for c in db.get_columns("training")}
        assert db.execute_sql("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 13


def test_never_beside_another_trainer_of_the_run(model: LanguageModel, dataset: Any,
                                               enqueued: list) -> None:
    """While another trainer (an orphaned worker, the CLI) holds the run folder, the task does
    not train: the row ends interrupted, naming the holder; Retry later trains normally."""
    t = jobs.create_training(form(model, dataset))
    with folder_lock(t.out_dir):
        tasks.run_training.call_local(t.id)
        row = jobs.get_training(t.id)
        assert row.status == "interrupted" and f"pid {os.getpid()}" in row.error
        assert row.current_step == 0 and not jobs.checkpoints(t.id)
    jobs.request(t.id, "retry")
    tasks.run_training.call_local(t.id, True)
    assert jobs.get_training(t.id).status == "completed"


def test_failed_training_is_reported(model: LanguageModel, dataset: Any, enqueued: list) -> None:
    t = jobs.create_training(form(model, dataset))
    with db.atomic():
        Training.update(config=dict(t.config, dataset="/nowhere/missing.txt")) \
            .where(Training.id == t.id).execute()
    tasks.run_training.call_local(t.id)
    t = jobs.get_training(t.id)
    assert t.status == "failed" and "missing.txt" in t.error and t.finished_at


def test_concurrency_limit_requeues(model: LanguageModel, dataset: Any, enqueued: list,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    a = jobs.create_training(form(model, dataset))
    b = jobs.create_training(form(model, dataset))
    with db.atomic():  # this worker's one slot is busy (another worker's rows do not count)
        Training.update(status="training", worker=tasks.worker_name()) \
            .where(Training.id == a.id).execute()
    scheduled = []
    monkeypatch.setattr(tasks.run_training, "schedule",
                        lambda args, delay: scheduled.append((args, delay)))
    tasks.run_training.call_local(b.id)
    assert status_of(b.id) == "queued" and scheduled == [((b.id, False), 2)]
    with pytest.raises(jobs.Conflict):
        jobs.delete_model(model.id)
    assert jobs.interrupt_running() == 1
    assert jobs.get_training(a.id).requested == "interrupt"


# ---------------------------------------------------------------------------- controls
def test_state_machine_and_recovery(model: LanguageModel, dataset: Any, enqueued: list) -> None:
    t = jobs.create_training(form(model, dataset, total_steps="100000", log_every="2",
                                  auto_save_interval="0"))
    thread = start_in_thread(t.id)
    wait_for(lambda: status_of(t.id) == "training", what="training")
    with pytest.raises(jobs.Conflict, match="only a paused training can be resumed"):
        jobs.request(t.id, "resume")
    with pytest.raises(jobs.Conflict):
        jobs.request(t.id, "retry")

    jobs.request(t.id, "pause")
    wait_for(lambda: status_of(t.id) == "paused", what="paused")
    step = jobs.get_training(t.id).current_step
    wait_for(lambda: any(c.reason == "pause" for c in jobs.checkpoints(t.id)), what="pause ckpt")
    # The card's step is the pause's (its checkpoint's): test_a_pause_shows_its_own_step
    assert step == next(c.step for c in jobs.checkpoints(t.id) if c.reason == "pause")
    with pytest.raises(jobs.Conflict, match="only a running training can be paused"):
        jobs.request(t.id, "pause")
    jobs.save_checkpoint_now(t.id)  # paused: the pause checkpoint is the current one
    newest = jobs.checkpoints(t.id)[0]
    with pytest.raises(jobs.Conflict, match="newest|best"):
        jobs.delete_checkpoint(newest.id)
    jobs.request(t.id, "resume")
    wait_for(lambda: status_of(t.id) == "training", what="resumed")
    wait_for(lambda: jobs.get_training(t.id).current_step > step, what="progress after resume")

    n_before = len(jobs.checkpoints(t.id))
    jobs.save_checkpoint_now(t.id)
    wait_for(lambda: any(c.reason == "manual" for c in jobs.checkpoints(t.id)), what="manual")
    assert len(jobs.checkpoints(t.id)) == n_before + 1

    stopping = jobs.request(t.id, "stop")
    assert stopping.status == "stopping"
    with pytest.raises(jobs.Conflict, match="already"):
        jobs.request(t.id, "stop")
    thread.join(60)
    t = jobs.get_training(t.id)
    assert t.status == "stopped" and t.result["stopped"] and t.requested is None
    stopped_at = t.current_step
    assert jobs.checkpoints(t.id)[0].step == stopped_at and jobs.export_zip(t.id).is_file()
    first_start, first_elapsed = t.started_at, jobs.elapsed_seconds(t)
    assert first_elapsed == pytest.approx(t.finished_at - t.started_at)

    # retry: queued again, continues from the newest checkpoint; a shutdown interrupts it
    enqueued.clear()
    assert jobs.request(t.id, "retry").status == "queued"
    assert enqueued == [("run_training", (t.id, True))]
    thread = start_in_thread(t.id, True)
    wait_for(lambda: jobs.get_training(t.id).current_step > stopped_at, what="resumed steps")
    assert jobs.interrupt_running() == 1
    thread.join(60)
    t = jobs.get_training(t.id)
    assert t.status == "interrupted" and "Retry continues" in t.error
    interrupted_at = t.current_step
    # Retry keeps the first start; Elapsed sums both attempts (not the time between them)
    assert t.started_at == first_start and t.attempt_started_at > t.started_at
    assert jobs.elapsed_seconds(t) == pytest.approx(
        first_elapsed + t.finished_at - t.attempt_started_at)
    assert jobs.training_as_dict(t)["elapsed_s"] == jobs.elapsed_seconds(t)
    assert interrupted_at > stopped_at

    # a worker that died mid-run: the start-up hook marks the row interrupted
    with db.atomic():
        Training.update(status="training", error=None).where(Training.id == t.id).execute()
        preparing = LanguageModel.create(name="m", source="minilm-l6", status="preparing")
    enqueued.clear()
    assert tasks.recover() == 2
    t = jobs.get_training(t.id)
    assert t.status == "interrupted" and t.error == tasks.INTERRUPTED_MESSAGE
    assert jobs.get_model(preparing.id).status == "queued"  # queued again
    assert enqueued == [("prepare_model", (preparing.id,))]

    # retry to completion: steps continue from the newest checkpoint, not from 0
    with db.atomic():
        Training.update(config=dict(t.config, total_steps=interrupted_at + 4),
                        total_steps=interrupted_at + 4).where(Training.id == t.id).execute()
    jobs.request(t.id, "retry")
    tasks.run_training.call_local(t.id, True)
    t = jobs.get_training(t.id)
    assert t.status == "completed", t.error
    assert t.current_step == interrupted_at + 4 and t.result["steps"] == interrupted_at + 4
    steps = [r["step"] for r in jobs.metrics_rows(t.id)]
    assert steps == sorted(set(steps)) and steps[-1] == interrupted_at + 4
    assert Checkpoint.select().where(Checkpoint.training == t.id,
                                     Checkpoint.is_best).count() == 1


def test_a_pause_shows_its_own_step(model: LanguageModel, dataset: Any, enqueued: list) -> None:
    """The worker hears a pause at step 13 while its last metrics row is step 10 (rows come
    every log_every steps): the card's step is 13, the pause checkpoint's, not 10."""
    t = jobs.create_training(form(model, dataset, total_steps="100", log_every="10"))
    Training.update(status="training").where(Training.id == t.id).execute()
    reporter = TrainingReporter(t.id)
    reporter.on_metrics({"step": 10, "loss": 0.5})
    assert jobs.get_training(t.id).current_step == 10
    jobs.request(t.id, "pause")
    reporter.last_poll = 0.0
    assert reporter.control(13) == "pause"
    t = jobs.get_training(t.id)
    assert (t.status, t.current_step, t.latest["step"]) == ("paused", 13, 10)


def test_a_pause_before_the_first_step_resumes_to_initializing(
        model: LanguageModel, dataset: Any, enqueued: list) -> None:
    """A resumed run hears a pause while it rebuilds its buffer (``trainer.replaying``), before
    any step: the card shows paused at the checkpoint's step; the resume returns it to
    initializing (the buffer is still being rebuilt), and its first metrics row to training."""
    t = jobs.create_training(form(model, dataset, total_steps="100", log_every="10"))
    Training.update(status="initializing").where(Training.id == t.id).execute()
    reporter = TrainingReporter(t.id)
    jobs.request(t.id, "pause")
    reporter.last_poll = 0.0
    assert reporter.control(20) == "pause"
    t = jobs.get_training(t.id)
    assert (t.status, t.current_step) == ("paused", 20)
    jobs.request(t.id, "resume")
    reporter.last_poll = 0.0
    assert reporter.control(20) is None
    assert status_of(t.id) == "initializing"
    reporter.on_metrics({"step": 21, "loss": 0.5})
    assert status_of(t.id) == "training"
