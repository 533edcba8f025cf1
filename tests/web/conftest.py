"""Helpers for the web tests (``app`` and ``client`` are in tests/conftest.py): rows inserted the
way the worker writes them (fast: no engine), for trainings in any state, and a live server."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.db import (
    Checkpoint,
    Dataset,
    LanguageModel,
    LogLine,
    Metric,
    Training,
    WorkerHeartbeat,
    db,
)

HX = {"HX-Request": "true"}
JSON = {"Accept": "application/json"}


# ---------------------------------------------------------------------------- row helpers
def make_model(status: str = "ready", **kw: Any) -> LanguageModel:
    values = dict(name="minilm-l6", source="minilm-l6", status=status, n_layers=6,
                  hidden_dim=384, n_params=22_700_000, vocab_size=30522, dtype="float32",
                  architecture="BertModel", model_type="bert", path="/tmp/sae-web-minilm",
                  hook_points=["residual", "mlp_out", "attn_out", "mlp_in"], progress=1.0)
    values.update(kw)
    with db.connection_context():
        return LanguageModel.create(**values)


def make_dataset(status: str = "ready", **kw: Any) -> Dataset:
    values = dict(name="kjv", source="kjv", status=status, context_size=64, n_documents=31102,
                  n_tokens=16384, samples=["In the beginning God created the heaven.",
                                           "And the earth was without form."], progress=1.0)
    values.update(kw)
    with db.connection_context():
        return Dataset.create(**values)


CONFIG = {"encoder_type": "topk", "layer": 3, "hook_point": "residual", "batch_size": 128,
          "total_steps": 1000, "auto_save_interval": 100, "lr_schedule": "constant",
          "expansion_factor": 8, "k": 32}


def metric(step: int, total: int = 1000) -> dict[str, Any]:
    frac = step / max(1, total)
    return {"step": step, "tokens": step * 128, "loss": 0.5 * (1 - frac) ** 2 + 0.05,
            "mse": 0.4 * (1 - frac) ** 2 + 0.04, "l0": 32.0 - 4 * frac, "l0_frac": 0.0104,
            "fvu": 0.3 * (1 - frac) + 0.1, "dead": int(20 * frac), "dead_frac": 0.0065 * frac,
            "lr": 1.4e-3, "tokens_per_s": 25_000.0}


def make_training(model: Any, dataset: Any, status: str = "training", *, steps: int = 0,
                  every: int = 10, total: int = 1000, checkpoints: int = 0, log: int = 3,
                  export: bool = False, out_dir: Path | None = None, **kw: Any) -> Training:
    """A training row with ``steps`` worth of metrics rows (every ``every`` steps)."""
    now = time.time()
    with db.connection_context():
        t = Training.create(model=model, dataset=dataset, status=status,
                            config=dict(CONFIG, total_steps=total), total_steps=total,
                            current_step=steps, started_at=now - 120,
                            finished_at=now if status in ("completed", "stopped", "failed",
                                                          "interrupted") else None,
                            estimate={"d_sae": 3072, "d_in": 384}, **kw)
        if out_dir is not None:
            t.out_dir = str(out_dir / "trainings" / str(t.id))
            t.save()
        rows = [metric(s, total) for s in range(every, steps + 1, every)]
        if rows:
            with db.atomic():
                Metric.insert_many([{"training": t.id, "step": r["step"], "data": r}
                                    for r in rows]).execute()
            t.latest = rows[-1]
            t.save()
        for i in range(log):
            LogLine.create(training=t, message=f"log line {i}")
        for i in range(checkpoints):
            step = (i + 1) * 100
            folder = Path(t.out_dir or tempfile.mkdtemp()) / "checkpoints"
            path = folder / f"step-{step}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * (100 + i))
            Checkpoint.create(training=t, step=step, path=str(path), loss=0.1 - i * 0.01,
                              size_bytes=100 + i, is_best=(i == checkpoints - 1))
        if export:
            folder = Path(t.out_dir) / "saelens"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "cfg.json").write_text('{"d_in": 384}')
            (folder / "sae_weights.safetensors").write_bytes(b"weights")
        return Training.get_by_id(t.id)


def add_metric(training_id: int, step: int) -> None:
    """What the worker's reporter does: one Metric row, Training.latest/current_step."""
    row = metric(step)
    with db.connection_context():
        with db.atomic():
            Metric.insert(training=training_id, step=step, data=row).execute()
            Training.update(current_step=step, latest=row, updated_at=time.time()) \
                .where(Training.id == training_id).execute()


def heartbeat(device: str = "cpu", name: str | None = None, memory: int | None = None) -> None:
    with db.connection_context():
        WorkerHeartbeat.create(name="w1", pid=1, device=device, device_name=name,
                               device_memory=memory, gflops=50.0)


@pytest.fixture
def ready(app: Any) -> tuple[Any, Any]:
    return make_model(), make_dataset()


@pytest.fixture
def live_server(app: Any) -> Iterator[str]:
    """The app on a real threaded werkzeug server (WebSockets need one)."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)
