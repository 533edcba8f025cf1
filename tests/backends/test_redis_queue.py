"""The task queue on a real Redis server: a real ``huey_consumer worker.tasks.huey`` process with
``SAE_STUDIO_QUEUE_URL=redis://...`` and the app database on PostgreSQL prepares a model and a
dataset, trains and answers a probe, all queued from this process (the probe's answer comes
back through Redis's result store); no SQLite queue file is made."""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from huey.storage import PriorityRedisStorage

from tests.engine.tiny_models import make_tiny_model
from tests.jobs.conftest import FAST
from tests.processes import ROOT, wait_for
from worker import interactive, jobs
from worker.jobs import common, probes
from worker.queue import huey, open_storage, url_problem
from worker.supervisor import consumer_command

TEXT = "In the beginning God created the heaven and the earth."


@pytest.fixture
def on_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str,
             redis_url: str) -> Any:
    """This process on the servers (its queue a new lazy storage, so on Redis) and a consumer
    process on the same ones; the consumer is stopped afterwards."""
    data = tmp_path / "data"
    env = {"SAE_STUDIO_DATA": str(data), "SAE_STUDIO_DATABASE_URL": postgres_url,
           "SAE_STUDIO_QUEUE_URL": redis_url, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "SAE_STUDIO_PARENT_PID": str(os.getpid())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    common.open_database()
    huey.immediate = True
    huey.immediate = False  # a fresh storage, opened at its first use: Redis
    log = (tmp_path / "consumer.log").open("w")
    consumer = subprocess.Popen(consumer_command(2), cwd=ROOT, env=dict(os.environ, **env),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield data, consumer
    finally:
        consumer.terminate()
        try:
            consumer.wait(60)
        except subprocess.TimeoutExpired:
            consumer.kill()
            consumer.wait(30)
        log.close()
        huey.immediate = True
        common.disconnect()
        interactive.CACHE.clear()


def test_a_consumer_on_redis_runs_the_tasks_queued_here(on_redis: Any, tmp_path: Path) -> None:
    data, consumer = on_redis
    folder = make_tiny_model("llama", data / "models" / "tiny-llama")  # an allowed root
    m = jobs.add_model(str(folder))
    d = jobs.add_dataset("kjv", context_size="32", max_tokens="8192")
    assert isinstance(huey.storage.backend(), PriorityRedisStorage)
    log = tmp_path / "consumer.log"

    def ready(get: Any, row_id: int) -> bool:
        assert consumer.poll() is None, log.read_text()
        row = get(row_id)
        assert row.status != "failed", row.error
        return row.status == "ready"

    wait_for(lambda: ready(jobs.get_model, m.id), 180, "the model prepared by the consumer")
    wait_for(lambda: ready(jobs.get_dataset, d.id), 180, "the dataset prepared by the consumer")
    t = jobs.create_training({"model_id": str(m.id), "dataset_id": str(d.id), **FAST,
                              "layer": "1", "eval_tokens": "0"})

    def finished() -> bool:
        assert consumer.poll() is None, log.read_text()
        row = jobs.get_training(t.id)
        assert row.status not in ("failed", "interrupted", "stopped"), row.error
        return row.status == "completed"

    wait_for(finished, 300, "the training run by the consumer")
    row = jobs.get_training(t.id)
    assert row.worker and row.worker.endswith(f":{consumer.pid}")  # this consumer claimed it
    answer = probes.activations(t.id, {"text": TEXT, "latent": "3"})  # a result via Redis
    assert answer.result["latent"] == 3 and len(answer.result["tokens"]) > 3

    from worker.engine.models import load_model
    from worker.engine.probe import Probe, load_probe_sae

    want = Probe(load_model(str(folder)), load_probe_sae(probes.newest_checkpoint(row))
                 ).activations(TEXT, 3)
    assert answer.result == want
    assert huey.result_count() == 0  # read once, then deleted
    assert not (data / "queue.db").exists()


def test_queue_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sqlite = open_storage("q", f"sqlite:///{tmp_path}/made/queue.db")
    sqlite.enqueue(b"x", 0)
    assert sqlite.queue_size() == 1 and (tmp_path / "made" / "queue.db").is_file()
    redis = open_storage("q", "redis://127.0.0.1:1/0")  # not contacted yet
    assert isinstance(redis, PriorityRedisStorage)
    with pytest.raises(ValueError, match=r"Unsupported queue URL 'amqp://\.\.\.'") as caught:
        open_storage("q", "amqp://guest:secret@127.0.0.1/")
    assert "secret" not in str(caught.value)
    assert "port that is not a number" in url_problem("redis://:secret@127.0.0.1:99999/0")
    assert url_problem("redis://:secret@10.0.0.5:6379/1") is None
    # Huey hands the schedule naive UTC times: they mean the same instant in any time zone
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        when = datetime.datetime(2026, 12, 1, 16, 30, 0, 250000)
        assert redis.convert_ts(when) == when.replace(tzinfo=datetime.timezone.utc).timestamp()
    finally:
        monkeypatch.undo()
        time.tzset()


def test_the_waiting_preparations_are_read_from_redis(redis_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The live workers' check reads which preparations wait in the queue (a model or dataset
    queued for long whose task is not there has lost it): on Redis, priorities and all."""
    from worker import tasks

    monkeypatch.setenv("SAE_STUDIO_QUEUE_URL", redis_url)
    huey.immediate = True
    huey.immediate = False  # a fresh storage, opened at its first use: Redis
    try:
        tasks.prepare_model(5)
        tasks.prepare_dataset(5)
        tasks.probe_activations(1, "step_1.safetensors", TEXT, None)  # not a preparation
        assert isinstance(huey.storage.backend(), PriorityRedisStorage)
        assert huey.pending_count() == 3
        assert tasks._queued_preparations() == {("prepare_model", 5), ("prepare_dataset", 5)}
    finally:
        huey.flush()
        huey.immediate = True
