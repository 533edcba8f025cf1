"""The interactive probes through the job layer and the worker's tasks (Huey immediate: the task
runs inline), on real trainings of tiny models: the answers equal the engine's on the same
checkpoint, input checks, 409 without a checkpoint, 503 without a worker, the warm cache, the
tasks' priority."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.engine.tiny_models import make_tiny_model
from worker import interactive, jobs, tasks
from worker.db import Checkpoint, WorkerHeartbeat, db
from worker.jobs import probes
from worker.queue import huey

from .conftest import FAST

TEXT = "In the beginning God created the heaven and the earth."


def _train(family: str, data_dir: Path, **overrides: str) -> Any:
    folder = make_tiny_model(family, data_dir / "models" / f"tiny-{family}")  # an allowed root
    m = jobs.add_model(str(folder))
    assert m.status == "ready", m.error
    d = jobs.add_dataset("kjv", context_size="32", max_tokens="8192")
    assert d.status == "ready", d.error
    t = jobs.create_training({"model_id": str(m.id), "dataset_id": str(d.id), **FAST,
                              "layer": "1", "eval_tokens": "0", **overrides})
    assert t.status == "completed", t.error
    return t


@pytest.fixture
def llama(data_dir: Path) -> Any:
    interactive.CACHE.clear()
    yield _train("llama", data_dir)
    interactive.CACHE.clear()


# ---------------------------------------------------------------------------- answers
def test_activations_equal_the_engine_on_the_newest_checkpoint(llama: Any) -> None:
    from worker.engine.models import load_model
    from worker.engine.probe import Probe, load_probe_sae

    path = probes.newest_checkpoint(llama)
    assert path.name == "step_00000020.safetensors"
    first = probes.activations(llama.id, {"text": TEXT, "latent": "3"})
    assert first.warm is False and first.seconds > 0
    assert set(first.result) == {"tokens", "latent", "latent_acts"}
    assert first.result["latent"] == 3
    again = probes.activations(llama.id, {"text": TEXT, "latent": 3})
    assert again.warm is True
    assert again.result == first.result

    want = Probe(load_model(llama.model.source), load_probe_sae(path)).activations(TEXT, 3)
    assert first.result == want
    assert first.result["tokens"][0]["acts"] is None
    assert any(tok["acts"] for tok in first.result["tokens"][1:])
    whole = probes.activations(llama.id, {"text": TEXT})  # no latent: the whole SAE
    assert whole.result["latent"] is None and whole.result["latent_acts"] is None


def test_a_new_checkpoint_loads_afresh(llama: Any) -> None:
    probes.activations(llama.id, {"text": TEXT})
    path = probes.newest_checkpoint(llama)
    stamp = path.stat().st_mtime_ns + 10**9
    import os

    os.utime(path, ns=(stamp, stamp))
    assert probes.activations(llama.id, {"text": TEXT}).warm is False
    assert len(interactive.CACHE.keys()) == 2


def test_steer_zero_is_the_baseline(llama: Any) -> None:
    zero = probes.steer(llama.id, {"prompt": "In the beginning", "latent": "5",
                                   "coefficient": "0", "max_new_tokens": "8"})
    assert set(zero.result) == {"baseline", "steered"}
    assert zero.result["baseline"] == zero.result["steered"] != ""
    strong = probes.steer(llama.id, {"prompt": "In the beginning", "latent": 5,
                                     "coefficient": 500.0, "max_new_tokens": 8})
    assert strong.result["steered"] != strong.result["baseline"]
    assert strong.warm is True


# ---------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("values,fields", [
    ({}, {"text"}),
    ({"text": "   "}, {"text"}),
    ({"text": "x" * (probes.TEXT_MAX + 1)}, {"text"}),
    ({"text": 7}, {"text"}),
    ({"text": "ok", "latent": "64"}, {"latent"}),
    ({"text": "ok", "latent": "-1"}, {"latent"}),
    ({"text": "ok", "latent": "1.5"}, {"latent"}),
    ({"text": "ok", "latent": True}, {"latent"}),
    ({"text": "ok", "latent": "--3"}, {"latent"}),
])
def test_activation_input_errors(llama: Any, values: dict[str, Any], fields: set[str]) -> None:
    with pytest.raises(jobs.Invalid) as exc:
        probes.activations(llama.id, values)
    assert set(exc.value.errors) == fields
    assert exc.value.status == 422


def test_steer_input_errors_all_at_once(llama: Any) -> None:
    with pytest.raises(jobs.Invalid) as exc:
        probes.steer(llama.id, {"prompt": "", "latent": "", "coefficient": "inf",
                                "max_new_tokens": "129", "seed": "-1"})
    assert set(exc.value.errors) == {"prompt", "latent", "coefficient", "max_new_tokens",
                                     "seed"}
    for coefficient in ("nan", "abc", "1e9", None, True):
        with pytest.raises(jobs.Invalid) as exc:
            probes.steer(llama.id, {"prompt": "In", "latent": 1, "coefficient": coefficient})
        assert set(exc.value.errors) == {"coefficient"}
    for n in ("0", 0, "x", 128.5):
        with pytest.raises(jobs.Invalid) as exc:
            probes.steer(llama.id, {"prompt": "In", "latent": 1, "coefficient": 1,
                                    "max_new_tokens": n})
        assert set(exc.value.errors) == {"max_new_tokens"}


def test_no_checkpoint_is_a_conflict(llama: Any, enqueued: list[Any]) -> None:
    t = jobs.create_training({"model_id": str(llama.model.id),
                              "dataset_id": str(llama.dataset.id), **FAST})
    assert t.status == "queued"  # recorded, not run
    with pytest.raises(jobs.Conflict, match="no saved SAE yet"):
        probes.activations(t.id, {"text": TEXT})
    with pytest.raises(jobs.NotFound):
        probes.activations(10**6, {"text": TEXT})


def test_an_unreadable_checkpoint_is_a_conflict(llama: Any) -> None:
    path = probes.newest_checkpoint(llama)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(jobs.Conflict, match="cannot be read"):
        probes.activations(llama.id, {"text": TEXT})
    for other in path.parent.glob("step_*.safetensors"):  # the rows stay, the files go
        other.unlink()
    with pytest.raises(jobs.Conflict, match="no saved SAE"):
        probes.activations(llama.id, {"text": TEXT})


def test_the_worker_finds_a_corrupt_checkpoint(llama: Any) -> None:
    """A header that reads but weights that do not: the task answers 409, not a traceback."""
    path = probes.newest_checkpoint(llama)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(jobs.Conflict, match="corrupt"):
        probes.activations(llama.id, {"text": TEXT})


def test_steering_an_encoder_is_422(data_dir: Path) -> None:
    t = _train("bert", data_dir)
    with pytest.raises(jobs.Invalid, match="not a causal LM"):
        probes.steer(t.id, {"prompt": "In the beginning", "latent": 1, "coefficient": 2})
    out = probes.activations(t.id, {"text": TEXT, "latent": 1})  # activations work for it
    assert out.result["tokens"][0]["acts"] is None


# ---------------------------------------------------------------------------- no worker
def test_without_a_worker_503(llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huey, "immediate", False)
    with pytest.raises(probes.Unavailable, match="No worker is running") as exc:
        probes.activations(llama.id, {"text": TEXT})
    assert exc.value.status == 503


def test_a_worker_that_does_not_answer_503(llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huey, "immediate", False)
    monkeypatch.setenv("SAE_STUDIO_PROBE_TIMEOUT_S", "0.3")
    with db.connection_context():
        WorkerHeartbeat.create(name="w1", pid=1, updated_at=time.time(), device="cpu")
    t0 = time.monotonic()
    with pytest.raises(probes.Unavailable, match="did not answer within 0.3 s"):
        probes.activations(llama.id, {"text": TEXT})
    assert time.monotonic() - t0 < 5
    task = huey.dequeue()  # revoked on the timeout: a worker would skip it
    assert task is not None and huey.is_revoked(task)


def test_probes_are_taken_before_queued_trainings(llama: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huey, "immediate", False)
    tasks.run_training(llama.id)
    tasks.prepare_model(llama.model.id)
    tasks.probe_steer(llama.id, "x", "In", 1, 1.0, 4, None)
    tasks.probe_activations(llama.id, "x", "In", None)
    names = [huey.dequeue().name for _ in range(4)]
    assert names[:2] == ["probe_steer", "probe_activations"]
    assert sorted(names[2:]) == ["prepare_model", "run_training"]


def test_only_the_probes_store_results(llama: Any) -> None:
    assert huey.results
    assert tasks.prepare_model.call_local(llama.model.id) is None
    assert tasks.probe_activations.call_local(llama.id, str(probes.newest_checkpoint(llama)),
                                              "In", None)["result"]["tokens"]
    gone = tasks.probe_activations.call_local(llama.id, "/nonexistent.safetensors", "In", None)
    assert gone["status"] == 409 and "is gone" in gone["error"]


# ---------------------------------------------------------------------------- the warm cache
def test_warm_cache_reuses_expires_and_bounds() -> None:
    keep = [60.0]
    cache = interactive.WarmCache(max_entries=2, keep=lambda: keep[0])
    loads: list[str] = []

    def loader(name: str) -> Any:
        return lambda: loads.append(name) or {"name": name}

    a, warm = cache.get(("a",), loader("a"))
    assert warm is False and a.value == {"name": "a"}
    assert cache.get(("a",), loader("a"))[1] is True
    cache.get(("b",), loader("b"))
    cache.get(("a",), loader("a"))  # a is now the most recently used
    cache.get(("c",), loader("c"))  # b goes
    assert sorted(cache.keys()) == [("a",), ("c",)] and loads == ["a", "b", "c"]
    keep[0] = 0.05
    time.sleep(0.1)
    assert cache.release_expired() == 2 and cache.keys() == []
    assert a.value is None  # released: the probe is dropped


def test_warm_cache_releases_idle_entries_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_STUDIO_PROBE_KEEP_S", "0.1")
    assert interactive.keep_s() == 0.1
    cache = interactive.WarmCache()
    cache.get(("x",), lambda: object())
    deadline = time.monotonic() + 5
    while cache.keys() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.keys() == []
    monkeypatch.setenv("SAE_STUDIO_PROBE_KEEP_S", "soon")
    assert interactive.keep_s() == interactive.KEEP_S


def test_warm_cache_loads_once_for_concurrent_requests() -> None:
    cache = interactive.WarmCache()
    loads: list[int] = []

    def slow() -> int:
        loads.append(1)
        time.sleep(0.2)
        return 42

    got: list[tuple[int, bool]] = []
    threads = [threading.Thread(target=lambda: got.append(
        (lambda e: (e[0].value, e[1]))(cache.get(("k",), slow)))) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(5)
    assert loads == [1]
    assert sorted(got) == [(42, False), (42, True), (42, True), (42, True)]


def test_an_entry_in_use_is_not_released() -> None:
    cache = interactive.WarmCache(keep=lambda: 0.0)
    entry, _ = cache.get(("k",), lambda: "probe")
    with entry.lock:
        time.sleep(0.01)
        assert cache.release_expired() == 0
        assert entry.value == "probe"
    time.sleep(0.01)
    assert cache.release_expired() == 1


def test_checkpoint_rows_newest_first(llama: Any) -> None:
    steps = [c.step for c in Checkpoint.select().where(Checkpoint.training == llama.id)]
    assert probes.newest_checkpoint(llama).name == f"step_{max(steps):08d}.safetensors"
