"""The Workers page (GET /workers): every worker's heartbeat as JSON, as the page (a Workers tab)
and as the htmx fragment that refreshes itself; rows older than a day are counted, not listed."""

from __future__ import annotations

import time
from typing import Any

from flask.testing import FlaskClient

from worker import jobs
from worker.db import WorkerHeartbeat, db

from ..html import attr, element_by_id, find_all, text_of
from .conftest import HX, JSON, make_dataset, make_model, make_training


def beat(name: str, age: float, **kw: Any) -> None:
    """A heartbeat row as a worker writes it, its newest beat ``age`` seconds ago."""
    now = time.time()
    values = dict(name=name, pid=int(name.rsplit(":", 1)[1]), host=name.split(":")[0],
                  data_dir=f"/srv/{name.split(':')[0]}/sae", device="cpu", device_name=None,
                  device_memory=None, gflops=None, running=[], slots=1,
                  created_at=now - age - 600, updated_at=now - age)
    values.update(kw)
    with db.connection_context(), db.atomic():
        WorkerHeartbeat.insert(**values).execute()


def cluster(app: Any) -> int:
    """A GPU box training one run, a laptop that went silent, a dead worker and one not heard
    from for two days. Returns the running training's id."""
    t = make_training(make_model(), make_dataset(), "training", worker="gpu-box:11")
    beat("gpu-box:11", 0.5, device="cuda", device_name="NVIDIA H200",
         device_memory=141 * 2**30, gflops=51234.5, running=[t.id], slots=2)
    beat("laptop:12", 8.0, gflops=80.25)
    beat("old:13", 60.0, running=[99])
    beat("ancient:14", 2 * 86400.0)
    return t.id


def test_workers_json(client: FlaskClient, app: Any) -> None:
    tid = cluster(app)
    r = client.get("/workers", headers=JSON)
    assert r.status_code == 200 and r.is_json
    data = r.get_json()
    names = [w["name"] for w in client.get("/workers?format=json").get_json()["items"]]
    assert names == [w["name"] for w in data["items"]]
    assert set(data) == {"items", "hidden", "alive", "dead_after_s"}
    assert (data["hidden"], data["alive"], data["dead_after_s"]) == (1, 1, 15.0)
    assert [w["name"] for w in data["items"]] == ["gpu-box:11", "laptop:12", "old:13"]
    gpu, laptop, old = data["items"]
    assert set(gpu) == set(jobs.WORKER_FIELDS)
    assert {k: gpu[k] for k in ("host", "pid", "data_dir", "device", "device_name",
                                "device_memory", "gflops", "slots", "running", "alive",
                                "state")} == {
        "host": "gpu-box", "pid": 11, "data_dir": "/srv/gpu-box/sae", "device": "cuda",
        "device_name": "NVIDIA H200", "device_memory": 141 * 2**30, "gflops": 51234.5,
        "slots": 2, "running": [tid], "alive": True, "state": "alive"}
    assert 0 <= gpu["age_s"] < 5 and gpu["started_at"] < gpu["updated_at"]
    assert (laptop["alive"], laptop["state"]) == (False, "silent")
    assert (old["alive"], old["state"], old["running"]) == (False, "dead", [99])
    assert 59 <= old["age_s"] < 70
    assert client.get(f"/trainings/{tid}", headers=JSON).get_json()["worker"] == "gpu-box:11"


def test_workers_page_and_its_fragment(client: FlaskClient, app: Any) -> None:
    tid = cluster(app)
    page = client.get("/workers").get_data(as_text=True)
    assert "active" in element_by_id(page, "tab-workers").classes
    assert attr(page, "tab-workers", "href") == "/workers"
    rows = find_all(element_by_id(page, "workers-table"), "tr", class_="worker-alive")
    assert [r.get("data-name") for r in rows] == ["gpu-box:11"]
    cells = {c.classes[0]: c for c in find_all(rows[0], "td")}
    assert cells["worker-state"].text.startswith("alive")
    assert cells["worker-device"].text == "cuda · NVIDIA H200 (141.0 GiB)"
    assert cells["worker-speed"].text == "51234.5 GFLOP/s"
    assert cells["worker-slots"].text == "1 / 2"
    assert [a.get("href") for a in find_all(cells["worker-running"], "a")] == [
        f"/trainings/{tid}"]
    silent = find_all(page, "tr", class_="worker-silent")[0]
    assert silent.get("data-name") == "laptop:12"
    assert find_all(silent, "td", class_="worker-running")[0].text == "idle"
    dead = find_all(page, "tr", class_="worker-dead")[0]
    assert find_all(dead, "td", class_="worker-running")[0].text == "—"
    assert text_of(page, "workers-hidden").startswith("1 worker not heard from in the last 24")
    assert "3 workers, 1 alive" in page

    fragment = client.get("/workers", headers=HX).get_data(as_text=True)
    assert fragment.lstrip().startswith('<section id="workers-list"') and "<html" not in fragment
    assert attr(fragment, "workers-list", "hx-get") == "/workers"
    assert attr(fragment, "workers-list", "hx-trigger") == "every 3s"
    assert attr(fragment, "workers-list", "hx-swap") == "outerHTML"
    assert len(find_all(fragment, "tr")) == 4  # the header and three workers


def test_no_worker_yet_and_the_tab_elsewhere(client: FlaskClient) -> None:
    page = client.get("/workers").get_data(as_text=True)
    assert "No worker has reported yet" in text_of(page, "workers-empty")
    assert client.get("/workers", headers=JSON).get_json() == {
        "items": [], "hidden": 0, "alive": 0, "dead_after_s": 15.0}
    models = client.get("/models").get_data(as_text=True)
    assert "active" not in element_by_id(models, "tab-workers").classes
