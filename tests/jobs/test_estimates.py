"""The time estimate: a guessed range before a calibration, a figure measured by real trainings
of the bundled MiniLM after one (setup, loop, evaluation and finishing on this device), none for
a form with a bad field; the card's ETA to completed; the calibration table's schema."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from worker import jobs, tasks
from worker.db import (
    SCHEMA_VERSION,
    Calibration,
    LanguageModel,
    Training,
    WorkerHeartbeat,
    db,
    init_db,
)
from worker.jobs.estimates import FIX_FIELDS, calibration

from ..html import element_by_id
from ..processes import wait_for
from .conftest import form, start_in_thread, status_of


@pytest.fixture
def worker_seen(data_dir: Path) -> dict[str, Any]:
    """This machine's heartbeat, as the worker writes it (its device and matmul speed)."""
    device = tasks.measure_device()
    tasks.write_heartbeat("host:1", device)
    return device


def test_calibrated_by_a_real_training(model: LanguageModel, dataset: Any,
                                       worker_seen: dict[str, Any]) -> None:
    values = form(model, dataset, total_steps="40")
    guess = jobs.estimate(model, values)
    assert not guess["calibrated"] and guess["time_s"] is None and guess["seconds"] is None
    low, high = guess["time_range_s"]
    assert 0 < low < high and "guess" in guess["time_basis"] and guess["invalid"] == {}

    t = jobs.create_training(values)  # immediate mode: the worker's task runs inline
    assert t.status == "completed", t.error
    real = t.finished_at - t.started_at
    cal = calibration(model.id, "cpu")
    assert cal is not None and cal.training_id == t.id and cal.train_tokens == 40 * 128
    assert cal.token_build_s == 0  # the dataset's preparation built the token store
    assert cal.total_s == pytest.approx(real)
    assert cal.setup_s + cal.train_s + cal.eval_s + cal.finish_s == pytest.approx(real)
    assert min(cal.setup_s, cal.train_s, cal.eval_s, cal.finish_s) > 0
    assert cal.eval_tokens == 256

    same = jobs.estimate(model, values)
    assert same["calibrated"] and same["time_range_s"] is None
    assert same["time_s"] == same["seconds"] == pytest.approx(real, rel=0.3)
    assert f"from training #{t.id}" in same["time_basis"]
    # Twice the steps: the loop's measured seconds once more; no evaluation: less its seconds.
    double = jobs.estimate(model, dict(values, total_steps="80"))
    assert double["time_s"] - same["time_s"] == pytest.approx(cal.train_s, abs=0.11)
    no_eval = jobs.estimate(model, dict(values, eval_tokens="0"))
    assert same["time_s"] - no_eval["time_s"] == pytest.approx(cal.eval_s, abs=0.11)
    # More latents: the loop scales by the FLOPs per token (model forward + SAE step).
    wider = jobs.estimate(model, dict(values, expansion_factor="16"))
    assert wider["time_s"] > same["time_s"] + 0.3 * cal.train_s

    # Another model on this device: a range around this one's FLOP rate and set-up, until it
    # has a training of its own (a copy of MiniLM's row: the range holds MiniLM's figure).
    copy = LanguageModel.create(**{f: getattr(model, f) for f in model._meta.fields
                                   if f not in ("id", "name")}, name="minilm copy")
    other = jobs.estimate(copy, values)
    low, high = other["time_range_s"]
    assert other["time_s"] is None and low < same["time_s"] < high
    assert f"training #{t.id} of another model" in other["time_basis"]

    # A second completed run replaces the row; a Retry's (resumed) attempt is no clean sample.
    again = jobs.create_training(values)
    assert calibration(model.id, "cpu").training_id == again.id
    assert Calibration.select().count() == 1
    # The model's deletion takes its calibration along.
    jobs.delete_model(model.id)
    assert Calibration.select().count() == 0


def test_token_build_and_pause_are_left_out(model: LanguageModel, dataset: Any,
                                            data_dir: Path, worker_seen: dict[str, Any],
                                            enqueued: list) -> None:
    shutil.rmtree(data_dir / "tokens")  # the training builds the token store again
    t = jobs.create_training(form(model, dataset, total_steps="400", log_every="2"))
    thread = start_in_thread(t.id)
    wait_for(lambda: status_of(t.id) == "training", what="training")
    jobs.request(t.id, "pause")
    wait_for(lambda: status_of(t.id) == "paused", what="paused")
    time.sleep(1.5)
    jobs.request(t.id, "resume")
    thread.join(120)
    t = jobs.get_training(t.id)
    assert t.status == "completed", t.error
    cal = calibration(model.id, "cpu")
    assert cal is not None and cal.token_build_s > 0
    # start to completed, less the pause (>= 1.5 s) and the build
    assert cal.total_s <= t.finished_at - t.started_at - cal.token_build_s - 1.5
    assert cal.setup_s + cal.train_s + cal.eval_s + cal.finish_s == pytest.approx(cal.total_s)


def test_stopped_or_resumed_attempts_are_not_samples(model: LanguageModel, dataset: Any,
                                                     worker_seen: dict[str, Any],
                                                     enqueued: list) -> None:
    t = jobs.create_training(form(model, dataset, total_steps="100000", log_every="2",
                                  auto_save_interval="5"))
    thread = start_in_thread(t.id)
    wait_for(lambda: jobs.checkpoints(t.id), what="a checkpoint")
    jobs.request(t.id, "stop")
    thread.join(60)
    assert status_of(t.id) == "stopped" and Calibration.select().count() == 0
    with db.atomic():  # a shorter run, so the Retry completes from the checkpoint
        Training.update(total_steps=t.current_step + 10,
                        config=dict(t.config, total_steps=t.current_step + 10)) \
            .where(Training.id == t.id).execute()
    jobs.request(t.id, "retry")
    tasks.run_training.call_local(t.id)
    assert status_of(t.id) == "completed" and Calibration.select().count() == 0


def test_invalid_fields_show_no_estimate(model: LanguageModel, worker_seen: dict[str, Any],
                                         client: Any) -> None:
    for bad, field in (({"k": "x"}, "k"), ({"total_steps": "1e20"}, "total_steps"),
                       ({"latent_dim": "16", "k": "32"}, "k"),
                       ({"batch_size": "9" * 400}, "batch_size")):
        e = jobs.estimate(model, {"model_id": str(model.id), **bad})
        assert field in e["invalid"] and e["warning"] == FIX_FIELDS, (bad, e)
        assert e["time_s"] is e["time_range_s"] is e["memory_bytes"] is e["d_sae"] is None
    data = client.get(f"/trainings/estimate?model_id={model.id}&k=x",
                      headers={"Accept": "application/json"}).get_json()
    assert data["invalid"].keys() == {"k"} and data["time_s"] is None
    assert data["memory_bytes"] is None and data["calibrated"] is False
    html = client.get(f"/trainings/estimate?model_id={model.id}&k=x&batch_size=0",
                      headers={"HX-Request": "true"}).data.decode()
    assert FIX_FIELDS in html and "estimate-time" not in html and "estimate-memory" not in html
    assert "Batch size" in element_by_id(html, "estimate-invalid").text


def test_uncalibrated_range_and_no_worker(model: LanguageModel, client: Any) -> None:
    e = jobs.estimate(model, {"total_steps": "1000", "batch_size": "4096"})
    assert e["time_s"] is e["time_range_s"] is None and not e["calibrated"]
    assert e["time_basis"] == "No worker has reported its speed yet."
    assert e["precision"] == "fp32" and e["budget_bytes"] == 6 * 10**9
    assert e["memory_bytes"] == sum(e["parts"].values()) and e["d_sae"] == 8 * 384
    with db.atomic():
        WorkerHeartbeat.create(name="gpu:1", pid=1, device="cuda", device_name="Test GPU",
                               device_memory=80 * 2**30, gflops=1000.0)
    e = jobs.estimate(model, {"total_steps": "1000", "batch_size": "4096"})
    assert e["precision"] == "bf16" and e["budget_bytes"] == 80 * 2**30
    low, high = e["time_range_s"]
    assert e["time_s"] is None and 0 < low < high and "1,000 GFLOP/s" in e["time_basis"]
    shorter = jobs.estimate(model, {"total_steps": "100", "batch_size": "4096"})
    assert shorter["time_range_s"][1] < high
    html = client.get(f"/trainings/estimate?model_id={model.id}",
                      headers={"HX-Request": "true"}).data.decode()
    assert "(a guess)" in element_by_id(html, "estimate-time").text


def test_card_eta_to_completed(model: LanguageModel, dataset: Any, client: Any,
                               worker_seen: dict[str, Any]) -> None:
    done = jobs.create_training(form(model, dataset))
    assert done.status == "completed", done.error
    cal = calibration(model.id, "cpu")
    with db.atomic():
        running = Training.create(model=model, dataset=dataset, status="training",
                                  config=done.config, total_steps=20, current_step=10,
                                  device="cpu", started_at=time.time(),
                                  latest={"step": 10, "tokens_per_s": 128.0})
    html = client.get(f"/trainings/{running.id}", headers={"HX-Request": "true"}).data.decode()
    facts = element_by_id(html, f"training-{running.id}-progress").text
    after = cal.eval_s + cal.finish_s
    assert "ETA (to completed)" in facts
    assert jobs.after_training_s(model.id, "cpu", 256) == pytest.approx(after)
    with db.atomic():
        Training.update(status="evaluating", eval_progress=1.0).where(Training.id == running.id) \
            .execute()
    html = client.get(f"/trainings/{running.id}", headers={"HX-Request": "true"}).data.decode()
    assert "ETA (to completed) 0s" in element_by_id(html, f"training-{running.id}-progress").text
    with db.atomic():  # no calibration on this device: the steps' ETA alone, labelled so
        Training.update(status="training", device="mps").where(Training.id == running.id) \
            .execute()
    html = client.get(f"/trainings/{running.id}", headers={"HX-Request": "true"}).data.decode()
    assert "ETA (to last step) 10s" in element_by_id(html, f"training-{running.id}-progress") \
        .text


def test_schema_v5_adds_the_calibration_table(data_dir: Path) -> None:
    with db.connection_context():
        db.execute_sql("DROP TABLE calibration")
        db.execute_sql("PRAGMA user_version = 4")
    init_db(data_dir / "app.db")
    with db.connection_context():
        assert "calibration" in db.get_tables()
        assert db.execute_sql("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 13
