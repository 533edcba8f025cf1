"""The web app on a real PostgreSQL database (``data_dir`` here binds a new one): every page and
its JSON answer with trainings, metrics, checkpoints and a sweep in it, the list filters, the
metrics feed, a control request, and the live pages' change poll."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flask.testing import FlaskClient

from worker import jobs
from worker.db import Sweep, Training, db, is_postgres

from ..web.conftest import make_dataset, make_model, make_training

JSON = {"Accept": "application/json"}


@pytest.fixture
def rows(data_dir: Any) -> dict[str, Any]:
    assert is_postgres()
    m, d = make_model(), make_dataset()
    done = make_training(m, d, "completed", steps=200, every=10, checkpoints=2,
                         out_dir=data_dir)
    running = make_training(m, d, "training", steps=50, every=5)
    with db.connection_context():
        sweep = Sweep.create(name="widths", model=m, dataset=d, config={"form": {}, "lists": {}},
                             groups=[[running.id]])
        Training.update(sweep=sweep, tags=["Baseline", "x"]).where(
            Training.id == running.id).execute()
    return {"model": m, "dataset": d, "done": done, "running": running, "sweep": sweep}


def test_every_page_renders_on_postgres(client: FlaskClient, rows: dict[str, Any]) -> None:
    done, running = rows["done"].id, rows["running"].id
    model = rows["model"].id
    pages = ["/", "/trainings", f"/trainings?encoder_type=topk&tag=baseline&model={model}",
             "/trainings?sort=fvu&order=asc", "/trainings?sort=name", f"/trainings/{done}",
             f"/trainings/{running}", f"/compare?ids={done},{running}", "/models",
             f"/models/{model}", "/datasets", f"/datasets/{rows['dataset'].id}",
             "/sweeps", f"/sweeps/{rows['sweep'].id}", "/templates", "/workers", "/healthz",
             f"/trainings/{done}/checkpoints", "/trainings/form"]
    for page in pages:
        html = client.get(page)
        assert html.status_code == 200, (page, html.get_data(as_text=True)[:500])
        answer = client.get(page, headers=JSON)
        assert answer.status_code == 200, (page, answer.get_data(as_text=True)[:500])


def test_lists_filters_and_metrics_on_postgres(client: FlaskClient, rows: dict[str, Any]
                                               ) -> None:
    done, running = rows["done"].id, rows["running"].id
    items = client.get("/trainings?encoder_type=topk", headers=JSON).get_json()["items"]
    assert [t["id"] for t in items] == [running, done]
    assert client.get("/trainings?encoder_type=standard", headers=JSON).get_json()["items"] == []
    tagged = client.get("/trainings?tag=BASELINE", headers=JSON).get_json()["items"]
    assert [t["id"] for t in tagged] == [running]
    metrics = client.get(f"/trainings/{done}/metrics", headers=JSON).get_json()["rows"]
    assert [r["step"] for r in metrics] == list(range(10, 201, 10))
    csv = client.get(f"/trainings/{done}/metrics?format=csv").get_data(as_text=True)
    assert len(csv.strip().splitlines()) == 21
    compare = client.get(f"/compare?ids={done},{running}", headers=JSON).get_json()
    curves = {e["id"]: e["curves"] for e in compare["trainings"]}  # through the JSON SQL
    assert curves[done]["step"] == list(range(10, 201, 10))
    assert curves[running]["step"] == list(range(5, 51, 5))
    assert curves[done]["l0"][0] == pytest.approx(32.0 - 4 * 10 / 1000)


def test_a_pause_request_and_the_change_poll_on_postgres(client: FlaskClient,
                                                         rows: dict[str, Any]) -> None:
    running = rows["running"].id
    with db.connection_context():
        before = jobs.changes_since(None)
        assert jobs.changes_since(before) is None  # nothing committed since
    answer = client.post(f"/trainings/{running}/pause", headers=JSON)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_json()["requested"] == "pause"
    seen: list[Any] = []

    def poll() -> None:  # a live page's poller: its own thread and connection
        with db.connection_context():
            seen.append(jobs.changes_since(before))

    thread = threading.Thread(target=poll)
    thread.start()
    thread.join(30)
    assert seen and seen[0] is not None
