"""The job layer on a real PostgreSQL database (``data_dir`` here binds a new one; Huey
immediate): a real training of the bundled model as tests/jobs runs it, its JSON, metrics,
checkpoints and charts; the list filters (the encoder type read from the JSON config); upserts
of re-reported steps; and the chart downsampling SQL giving the same rows as on SQLite."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.jobs.conftest import dataset, form, model
from worker import jobs
from worker.db import Checkpoint, Metric, Training, db, init_db, is_postgres, spread_metrics
from worker.jobs import compare
from worker.jobs.trainings import chart_rows
from worker.progress import TrainingReporter

from ..web.conftest import make_dataset, make_model, make_training

__all__ = ["dataset", "model"]  # the fixtures, used by name


def test_a_training_runs_on_postgres(model: Any, dataset: Any) -> None:
    assert is_postgres()
    t = jobs.create_training(form(model, dataset))
    assert t.status == "completed", t.error
    out = jobs.training_as_dict(t)
    assert out["status"] == "completed" and out["current_step"] == 20
    assert out["config"]["k"] == 8 and out["config"]["encoder_type"] == "topk"
    assert out["latest"]["step"] == 20 and math.isfinite(out["latest"]["loss"])
    assert isinstance(out["result"], dict) and out["finished_at"] >= out["started_at"]
    rows = jobs.metrics_rows(t.id)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(r["lr"] == r["learning_rate"] for r in rows)  # the API's older names
    assert sorted(c.step for c in jobs.checkpoints(t.id)) == [10, 20]
    with db.connection_context():
        card = jobs.card_data(Training.get_by_id(t.id), log_limit=5, chart_limit=100)
        assert [r[0] for r in card["chart"]] == [5, 10, 15, 20]
        assert card["chart"][-1][1] == pytest.approx(rows[-1]["loss"])
        assert compare.curves(Training.get_by_id(t.id))["step"] == [5, 10, 15, 20]
    assert [x.id for x in jobs.list_trainings(encoder_type="topk")] == [t.id]
    assert jobs.list_trainings(encoder_type="standard") == []
    assert [x.id for x in jobs.list_trainings(status="completed", model=model.id)] == [t.id]


def test_the_list_filters_by_the_encoder_type_in_the_json_config(data_dir: Path) -> None:
    m, d = make_model(), make_dataset()
    kinds = ["standard", "jumprelu", None, "topk", "standard"]  # None: no key (topk)
    ids = []
    for kind in kinds:
        t = make_training(m, d, "completed", log=0)
        with db.connection_context():
            config = {k: v for k, v in t.config.items() if k != "encoder_type"}
            if kind:
                config["encoder_type"] = kind
            Training.update(config=config).where(Training.id == t.id).execute()
        ids.append(t.id)
    for kind in ("standard", "jumprelu", "topk", "batchtopk"):
        want = [i for i, k in zip(ids, kinds) if (k or "topk") == kind][::-1]  # newest first
        assert [t.id for t in jobs.list_trainings(encoder_type=kind)] == want, kind


def test_re_reported_steps_and_checkpoints_replace_their_rows(data_dir: Path) -> None:
    t = make_training(make_model(), make_dataset(), "training", log=0)
    reporter = TrainingReporter(t.id)
    with db.connection_context():
        for loss in (1.0, 0.5):  # a retried run reports steps 1-3 again
            for step in (1, 2, 3, 3):  # and a step twice in one flush
                reporter.pending.append({"step": step, "loss": loss * step})
            reporter.flush()
            reporter.on_checkpoint({"step": 3, "path": f"/x/{loss}.safetensors",
                                    "best_step": 3, "size_bytes": 3 * 2**31})
        rows = list(Metric.select().where(Metric.training == t.id).order_by(Metric.step))
        assert [(r.step, r.data["loss"]) for r in rows] == [(1, 0.5), (2, 1.0), (3, 1.5)]
        (ck,) = Checkpoint.select().where(Checkpoint.training == t.id)
        assert ck.path == "/x/0.5.safetensors" and ck.is_best and ck.size_bytes == 3 * 2**31
        assert Training.get_by_id(t.id).current_step == 3


def _metric(step: int) -> dict[str, Any]:
    """A metrics row with the awkward cases: a missing key, NaN (stored as null), the older
    ``dead_neurons`` name, integers and floats."""
    row: dict[str, Any] = {"step": step, "tokens": step * 128, "l0": 32 - step % 7,
                           "sparsity_coef": 1e-3 * (1 + step % 3),
                           "loss": float("nan") if step % 11 == 0 else 1.0 / step}
    if step % 5:
        row["dead"] = step % 13
    else:
        row["dead_neurons"] = step % 17
    if step % 3:
        row["fvu"] = 0.5 / (1 + step)
    row["dead_frac"] = row.get("dead", 0) / 512
    return row


def _charts(url: str | Path, steps: list[int]) -> tuple[list[Any], ...]:
    init_db(url)
    t = make_training(make_model(), make_dataset(), "training", log=0)
    with db.connection_context():
        with db.atomic():
            Metric.insert_many([{"training": t.id, "step": s, "data": _metric(s)}
                                for s in steps]).execute()
        row = Training.get_by_id(t.id)
        return (chart_rows(t.id, 37), chart_rows(t.id, 5000), list(compare.curves(row).items()),
                spread_metrics(t.id, 40, "tokens", ("dead", "dead_neurons")))


def _plain(value: Any) -> Any:
    """Numbers as floats to 12 digits (SQLite gives integers where PostgreSQL gives doubles,
    and each prints a double its own way)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return float(f"{value:.12g}") if isinstance(value, (int, float)) else value


def test_chart_downsampling_gives_the_same_rows_on_postgres_and_sqlite(
        postgres_url: str, tmp_path: Path) -> None:
    steps = sorted({(s * 7) % 1000 + 1 for s in range(1000)} - {500})  # 999 steps, one gap
    on_pg = _charts(postgres_url, steps)
    on_sqlite = _charts(tmp_path / "app.db", steps)
    assert _plain(on_pg) == _plain(on_sqlite)
    coarse, whole, curves, spread = on_pg
    stride = -(-len(steps) // 37)  # every stride-th row by step, and the last
    want = [s for i, s in enumerate(steps) if i % stride == 0 or i == len(steps) - 1]
    assert [r[0] for r in coarse] == want and len(coarse) <= 38
    assert [r[0] for r in whole] == steps  # under the limit: every row
    by_step = {r[0]: r for r in whole}
    for step in (1, 11, 15, 999):
        m = _metric(step)
        loss = None if math.isnan(m["loss"]) else m["loss"]
        assert _plain(list(by_step[step][1:])) == _plain([loss, m["l0"], m["sparsity_coef"]])
    assert [r[2] for r in spread] == [_metric(r[0]).get("dead", _metric(r[0]).get(
        "dead_neurons")) for r in spread]  # the first key present
    stride = -(-len(steps) // compare.CURVE_POINTS)
    assert dict(curves)["step"] == [s for i, s in enumerate(steps)
                                    if i % stride == 0 or i == len(steps) - 1]
