"""Sweeps on the web: POST /sweeps (JSON lists or a form's comma strings), the list and the
sweep page (HTML, fragment, JSON), the controls, delete, the form's sweep mode and its estimate,
and a finished tiny sweep trained for real (immediate Huey) shown with its FVU and L0."""

from __future__ import annotations

import time
from typing import Any

import pytest

from worker import jobs
from worker.db import Training, WorkerHeartbeat, db

from ..html import attr, element_by_id, find_all, ids, text_of
from .conftest import HX, JSON, heartbeat

FAST = {"layer": "2", "expansion_factor": "2", "k": "8", "batch_size": "128",
        "total_steps": "20", "log_every": "5", "auto_save_interval": "10",
        "buffer_tokens": "2048", "eval_tokens": "256", "device": "cpu"}


def sweep_form(model: Any, dataset: Any, **overrides: Any) -> dict[str, Any]:
    return {"model_id": str(model.id), "dataset_id": str(dataset.id), **FAST, **overrides}


def _configs(sweep_id: int) -> list[dict[str, Any]]:
    with db.connection_context():
        rows = Training.select().where(Training.sweep == sweep_id).order_by(Training.id)
        return [{k: v for k, v in t.config.items() if k != "out_dir"} for t in rows]


def _set_status(ids_: list[int], status: str, **kw: Any) -> None:
    with db.connection_context():
        Training.update(status=status, updated_at=time.time(), **kw) \
            .where(Training.id.in_(ids_)).execute()


# ---------------------------------------------------------------------------- create
def test_json_lists_and_form_commas_give_the_same_runs(client, ready, enqueued):
    model, dataset = ready
    js = client.post("/sweeps", json=sweep_form(model, dataset, k=[8, 16], layer=[1, 2]),
                     headers=JSON)
    assert js.status_code == 201, js.get_json()
    body = js.get_json()
    assert {"id", "status", "trainings"} <= set(body)
    assert body["status"] == "queued" and len(body["trainings"]) == 4
    assert body["config"]["lists"] == {"layer": [1, 2], "k": [8, 16]}
    assert enqueued == [("run_group", (body["trainings"],))]

    form = client.post("/sweeps", data=sweep_form(model, dataset, k="8, 16", layer="1,2"),
                       headers=JSON)
    assert form.status_code == 201
    other = form.get_json()
    assert other["trainings"] != body["trainings"]
    assert _configs(body["id"]) == _configs(other["id"])
    assert [(c["layer"], c["k"]) for c in _configs(other["id"])] == \
        [(1, 8), (1, 16), (2, 8), (2, 16)]


def test_create_htmx_gives_the_card_and_the_form_in_sweep_mode(client, ready, enqueued):
    model, dataset = ready
    resp = client.post("/sweeps", data=sweep_form(model, dataset, k="8,16", mode="sweep"),
                       headers=HX)
    assert resp.status_code == 201
    html = resp.data.decode()
    sweep_id = jobs.list_sweeps()[0].id
    assert html.startswith(f'<article id="sweep-{sweep_id}"')
    card = element_by_id(html, f"sweep-{sweep_id}")
    assert card.get("ws-connect") == f"/ws/sweeps/{sweep_id}"
    runs = [i for i in ids(card, f"sweep-{sweep_id}-run-") if i.count("-") == 3]
    assert len(runs) == 2
    form = element_by_id(html, "training-form")
    assert form.get("hx-swap-oob") == "true" and form.get("hx-post") == "/sweeps"
    assert form.get("hx-target") == "#sweeps"
    assert attr(html, "input-k", "value") == "8,16"  # the sweep's values stay in the form
    # without htmx: to the sweep's page
    plain = client.post("/sweeps", data=sweep_form(model, dataset, k="8,16"))
    assert plain.status_code == 302 and plain.headers["Location"].startswith("/sweeps/")


def test_bad_values_give_422_with_field_errors(client, ready, enqueued):
    model, dataset = ready
    resp = client.post("/sweeps", json=sweep_form(model, dataset, k=[8, "lots"]), headers=JSON)
    assert resp.status_code == 422
    body = resp.get_json()
    assert set(body) == {"error", "errors"} and "'lots'" in body["errors"]["k"]
    resp = client.post("/sweeps", json=sweep_form(model, dataset, layer=[1, 40]), headers=JSON)
    assert resp.status_code == 422 and "'40'" in resp.get_json()["errors"]["layer"]
    resp = client.post("/sweeps", json={"k": [8, 16]}, headers=JSON)
    assert resp.status_code == 422 and "model_id" in resp.get_json()["errors"]
    resp = client.post("/sweeps", json=sweep_form(model, dataset, name="x" * 300, k=[8, 16]),
                       headers=JSON)
    assert resp.status_code == 422 and "name" in resp.get_json()["errors"]
    assert enqueued == [] and jobs.list_sweeps() == []
    # htmx: the form again, in sweep mode, the error beside its field
    resp = client.post("/sweeps", data=sweep_form(model, dataset, k="8, lots", mode="sweep"),
                       headers=HX)
    assert resp.status_code == 422 and resp.headers["HX-Retarget"] == "#training-form"
    html = resp.data.decode()
    assert "'lots'" in text_of(html, "error-k")
    assert attr(html, "input-k", "value") == "8, lots"
    assert text_of(html, "start-training") == "Start sweep"
    # a plain form post: the whole page with the error
    page = client.post("/sweeps", data=sweep_form(model, dataset, k="8, lots"))
    assert page.status_code == 422 and "'lots'" in text_of(page.data.decode(), "error-k")


def test_too_many_runs_is_a_form_error(client, ready, enqueued):
    model, dataset = ready
    many = ",".join(str(k) for k in range(1, 70))
    resp = client.post("/sweeps", data=sweep_form(model, dataset, k=many), headers=JSON)
    assert resp.status_code == 422 and "at most 64" in resp.get_json()["errors"]["form"]
    html = client.post("/sweeps", data=sweep_form(model, dataset, k=many, mode="sweep"),
                       headers=HX).data.decode()
    assert "at most 64" in text_of(html, "error-form")


# ---------------------------------------------------------------------------- read
def test_list_and_page_html_fragment_json(client, ready, enqueued):
    model, dataset = ready
    sid = client.post("/sweeps", json=sweep_form(model, dataset, k=[8, 16], seed=[0, 1]),
                      headers=JSON).get_json()["id"]
    listing = client.get("/sweeps", headers=JSON).get_json()
    assert [s["id"] for s in listing["items"]] == [sid]
    assert listing["items"][0]["model_name"] == "minilm-l6"
    page = client.get("/sweeps").data.decode()
    assert f"sweep-{sid}" in ids(page)
    frag = client.get("/sweeps", headers=HX).data.decode()
    assert frag.startswith('<div id="sweeps"') and "<html" not in frag

    data = client.get(f"/sweeps/{sid}", headers=JSON).get_json()
    assert data["status"] == "queued" and len(data["runs"]) == 4
    assert [r["id"] for r in data["runs"]] == data["trainings"]
    assert all(r["sweep_id"] == sid and r["status"] == "queued" for r in data["runs"])
    assert data["config"]["lists"] == {"k": [8, 16], "seed": [0, 1]}
    assert client.get(f"/sweeps/{sid}?format=json").get_json()["id"] == sid

    page = client.get(f"/sweeps/{sid}").data.decode()
    lines = find_all(element_by_id(page, f"sweep-{sid}-runs"), "li")
    assert len(lines) == 4
    first = data["runs"][0]
    line = element_by_id(page, f"sweep-{sid}-run-{first['id']}")
    assert find_all(line, "a")[0].get("href") == f"/trainings/{first['id']}"
    assert text_of(line, f"sweep-{sid}-run-{first['id']}-steps") == "step 0 / 20"
    assert text_of(page, "sweep-list-k").startswith("8, 16")
    assert text_of(page, "sweep-list-seed").startswith("0, 1")
    assert "1 sub-group" in text_of(page, f"sweep-{sid}-split")
    compare = attr(page, f"sweep-{sid}-compare", "href")
    assert compare == "/compare?ids=" + ",".join(map(str, data["trainings"]))
    assert attr(page, "sweep-compare-link", "href") == compare
    frag = client.get(f"/sweeps/{sid}", headers=HX).data.decode()
    assert frag.startswith(f'<article id="sweep-{sid}"')
    # the Training page shows the sweep's card above the jobs
    home = client.get("/").data.decode()
    assert f"sweep-{sid}" in ids(element_by_id(home, "training-sweeps"))


@pytest.mark.parametrize("path", ["/sweeps/999", "/sweeps/9223372036854775808",
                                  "/sweeps/99999999999999999999999", "/sweeps/junk",
                                  "/sweeps/-1"])
def test_unknown_ids_are_404_json(client, ready, path):
    for resp in (client.get(path, headers=JSON), client.post(path + "/stop", headers=JSON),
                 client.delete(path, headers=JSON)):
        assert resp.status_code == 404, (path, resp.status_code)
        assert "error" in resp.get_json()


# ---------------------------------------------------------------------------- controls
def test_controls_and_delete(client, ready, enqueued):
    model, dataset = ready
    body = client.post("/sweeps", json=sweep_form(model, dataset, k=[8, 16]),
                       headers=JSON).get_json()
    sid, tids = body["id"], body["trainings"]
    enqueued.clear()
    conflict = client.post(f"/sweeps/{sid}/pause", headers=JSON)
    assert conflict.status_code == 409 and "none of its trainings" in conflict.get_json()["error"]
    busy = client.delete(f"/sweeps/{sid}", headers=JSON)
    assert busy.status_code == 409

    _set_status(tids, "training", current_step=5)
    frag = client.post(f"/sweeps/{sid}/pause", headers=HX).data.decode()
    assert frag.startswith(f'<article id="sweep-{sid}"') and 'hx-swap-oob="true"' in frag
    assert all(jobs.get_training(t).requested == "pause" for t in tids)
    _set_status(tids, "paused", requested=None)
    resumed = client.post(f"/sweeps/{sid}/resume", headers=JSON).get_json()
    assert resumed["status"] == "paused"  # until the worker acts on it
    assert all(jobs.get_training(t).requested == "resume" for t in tids)
    _set_status(tids, "training", requested=None)

    stopped = client.post(f"/sweeps/{sid}/stop", headers=JSON)
    assert stopped.status_code == 200
    assert all(jobs.get_training(t).status == "stopping" for t in tids)
    _set_status(tids, "stopped", requested=None, finished_at=time.time())
    page = client.get(f"/sweeps/{sid}").data.decode()
    assert f"sweep-{sid}-retry" in ids(page) and f"sweep-{sid}-delete" in ids(page)
    assert "ws-connect" not in element_by_id(page, f"sweep-{sid}").attrs  # finished

    retried = client.post(f"/sweeps/{sid}/retry", headers=JSON).get_json()
    assert retried["status"] == "queued" and enqueued == [("run_group", (tids,))]
    _set_status(tids, "stopped", finished_at=time.time())
    # plain form post: back to the page
    assert client.post(f"/sweeps/{sid}/retry").status_code == 302
    _set_status(tids, "stopped", finished_at=time.time())

    assert client.delete(f"/sweeps/{sid}", headers=HX).data == b""
    assert client.get(f"/sweeps/{sid}", headers=JSON).status_code == 404
    assert all(client.get(f"/trainings/{t}", headers=JSON).status_code == 404 for t in tids)
    body = client.post("/sweeps", json=sweep_form(model, dataset, k=[8, 16]),
                       headers=JSON).get_json()
    client.post(f"/sweeps/{body['id']}/stop", headers=JSON)
    assert client.delete(f"/sweeps/{body['id']}", headers=JSON).get_json() == \
        {"deleted": body["id"]}
    # deleted from its own page: htmx goes to the list of sweeps
    body = client.post("/sweeps", json=sweep_form(model, dataset, k=[8, 16]),
                       headers=JSON).get_json()
    client.post(f"/sweeps/{body['id']}/stop", headers=JSON)
    resp = client.delete(f"/sweeps/{body['id']}", headers={
        **HX, "HX-Current-URL": f"http://localhost/sweeps/{body['id']}"})
    assert resp.status_code == 200 and resp.headers["HX-Redirect"] == "/sweeps"


def test_deleting_one_run_updates_the_sweeps_card(client, ready, enqueued):
    """A sweep's finished run deleted from its card: the answer carries the sweep's card (out
    of band) without that run, so the Training page does not go on listing it."""
    model, dataset = ready
    body = client.post("/sweeps", json=sweep_form(model, dataset, k=[8, 16, 32]),
                       headers=JSON).get_json()
    sid, tids = body["id"], body["trainings"]
    _set_status(tids, "completed", finished_at=time.time())
    frag = client.delete(f"/trainings/{tids[0]}", headers=HX).data.decode()
    card = element_by_id(frag, f"sweep-{sid}")
    assert card.get("hx-swap-oob") == "true"
    assert "2 runs" in element_by_id(frag, f"sweep-{sid}-meta").text
    shown = ids(frag)
    assert f"sweep-{sid}-run-{tids[1]}" in shown and f"sweep-{sid}-run-{tids[0]}" not in shown
    assert client.delete(f"/trainings/{tids[1]}", headers=JSON).get_json() == {"deleted": tids[1]}
    plain = client.delete(f"/trainings/{tids[2]}")  # no JavaScript: back to the page
    assert plain.status_code == 302
    assert client.get(f"/sweeps/{sid}", headers=JSON).get_json()["trainings"] == []


# ---------------------------------------------------------------------------- the form
def test_the_form_switches_to_sweep_mode_and_back(client, ready):
    model, dataset = ready
    page = client.get("/").data.decode()
    assert "checked" in element_by_id(page, "mode-single").attrs
    assert element_by_id(page, "training-form").get("hx-post") == "/trainings"
    assert element_by_id(page, "input-layer").tag == "select"
    q = f"model_id={model.id}&dataset_id={dataset.id}&k=16&total_steps=77"
    html = client.get(f"/sweeps/form?mode=sweep&{q}", headers=HX).data.decode()
    form = element_by_id(html, "training-form")
    assert form.get("hx-post") == "/sweeps" and form.get("data-mode") == "sweep"
    assert "checked" in element_by_id(html, "mode-sweep").attrs
    assert text_of(html, "start-training") == "Start sweep"
    for name in ("layer", "hook_point", "encoder_type", "k", "expansion_factor", "seed"):
        field = element_by_id(html, f"input-{name}")
        assert field.tag == "input", name
        assert "comma-separated" in text_of(html, f"field-{name}"), name
    assert attr(html, "input-total_steps", "value") == "77"  # the values carry over
    assert attr(html, "input-layer", "value") == "3"
    assert element_by_id(html, "input-batch_size").tag == "input"
    # the model's fields in sweep mode stay text inputs
    mf = client.get(f"/sweeps/model-fields?model_id={model.id}", headers=HX).data.decode()
    assert element_by_id(mf, "input-layer").tag == "input"
    # back to a single run; a template's hidden mode=sweep comes first, the switch wins
    back = client.get(f"/sweeps/form?mode=sweep&mode=single&{q}", headers=HX).data.decode()
    assert element_by_id(back, "training-form").get("hx-post") == "/trainings"
    assert element_by_id(back, "input-layer").tag == "select"
    assert text_of(back, "start-training") == "Start Training"


def test_sweep_estimate_json_has_every_documented_key(client, ready):
    """The README's keys of ``GET /trainings/estimate?mode=sweep`` are all there whether the
    form is fine or not: a bad list value or too many runs nulls the figures (as the single
    run's estimate does) instead of dropping ``fits``, ``split``, ``budget_bytes``..."""
    model, dataset = ready
    q = f"model_id={model.id}&dataset_id={dataset.id}&total_steps=20"
    documented = {"runs", "groups", "group_memory_bytes", "memory_bytes", "budget_bytes",
                  "budget_source", "fits", "split", "warning", "time_s", "time_range_s",
                  "time_basis", "invalid"}
    good = client.get(f"/trainings/estimate?mode=sweep&{q}&k=8,16", headers=JSON).get_json()
    assert documented <= set(good) and good["invalid"] == {}
    many = ",".join(str(k) for k in range(1, 70))
    for bad, field in (("k=lots,8", "k"), (f"k={many}", "form")):
        est = client.get(f"/trainings/estimate?mode=sweep&{q}&{bad}", headers=JSON).get_json()
        assert set(good) <= set(est), sorted(set(good) - set(est))
        assert field in est["invalid"] and est["warning"]
        assert est["fits"] is est["split"] is est["budget_bytes"] is est["runs"] is None
    html = client.get(f"/trainings/estimate?mode=sweep&{q}&k=lots,8", headers=HX).data.decode()
    assert " over" not in attr(html, "training-estimate", "class")  # no "does not fit" look


def test_sweep_estimate_shows_runs_group_memory_and_time(client, ready):
    model, dataset = ready
    q = f"model_id={model.id}&dataset_id={dataset.id}&total_steps=20"
    est = client.get(f"/trainings/estimate?mode=sweep&{q}&k=8,16&seed=0,1",
                     headers=JSON).get_json()
    assert est["runs"] == 4 and est["split"] is False and est["invalid"] == {}
    assert est["memory_bytes"] == est["group_memory_bytes"][0] > 0
    html = client.get(f"/trainings/estimate?mode=sweep&{q}&k=8,16&seed=0,1",
                      headers=HX).data.decode()
    assert text_of(html, "estimate-runs") == "4"
    assert "trained together" in text_of(html, "training-estimate")
    assert text_of(html, "estimate-memory").endswith("MiB")
    assert "Time to completed" in text_of(html, "training-estimate")
    # a split group (a worker with less memory than the 4 together need, more than one):
    # the memory of each sub-group, and that it is split
    heartbeat(memory=2**40)  # the same device as below: its estimate
    one = client.get(f"/trainings/estimate?mode=sweep&{q}&k=8&expansion_factor=32",
                     headers=JSON).get_json()["memory_bytes"]
    four = client.get(f"/trainings/estimate?mode=sweep&{q}&k=8,16,24,32&expansion_factor=32",
                      headers=JSON).get_json()["memory_bytes"]
    assert one < four
    with db.connection_context():
        WorkerHeartbeat.update(device_memory=(one + four) // 2).execute()
    url = f"/trainings/estimate?mode=sweep&{q}&k=8,16,24,32&expansion_factor=32"
    big = client.get(url, headers=JSON).get_json()
    assert big["split"] is True and len(big["groups"]) > 1
    html = client.get(url, headers=HX).data.decode()
    assert text_of(html, "estimate-groups") == str(len(big["groups"]))
    assert text_of(html, "estimate-memory").count(",") == len(big["groups"]) - 1
    assert "one after another" in text_of(html, "training-estimate")
    assert "train as" in text_of(html, "estimate-warning")
    # a bad list value: the estimate says which field
    bad = client.get(f"/trainings/estimate?mode=sweep&{q}&k=8,x", headers=HX).data.decode()
    assert "k" in text_of(bad, "estimate-invalid")
    # single mode: a list is the usual error (whole numbers read "1,000" as a thousand, so
    # "8,16" is 816 there: unchanged behaviour)
    single = client.get(f"/trainings/estimate?{q}&learning_rate=1e-3,2e-3",
                        headers=JSON).get_json()
    assert "learning_rate" in single["invalid"] and "runs" not in single
    resp = client.post("/trainings", json={"model_id": model.id, "dataset_id": dataset.id,
                                           **FAST, "learning_rate": "1e-3, 2e-3"}, headers=JSON)
    assert resp.status_code == 422 and "learning_rate" in resp.get_json()["errors"]


# ---------------------------------------------------------------------------- for real
@pytest.fixture
def real(data_dir):
    m = jobs.add_model("minilm-l6")
    assert m.status == "ready", m.error
    d = jobs.add_dataset("kjv", context_size="64", max_tokens="16384")
    assert d.status == "ready", d.error
    return m, d


def test_a_finished_tiny_sweep_shows_its_runs_fvu_and_l0(client, real):
    model, dataset = real
    resp = client.post("/sweeps", data=sweep_form(model, dataset, k="4, 8"), headers=JSON)
    assert resp.status_code == 201, resp.get_json()
    sid, tids = resp.get_json()["id"], resp.get_json()["trainings"]
    data = client.get(f"/sweeps/{sid}", headers=JSON).get_json()  # immediate Huey: trained
    assert data["status"] == "completed", [r["error"] for r in data["runs"]]
    assert data["counts"] == {"completed": 2}
    page = client.get(f"/sweeps/{sid}").data.decode()
    for run, tid in zip(data["runs"], tids, strict=True):
        ev = run["result"]["eval"]
        line = f"sweep-{sid}-run-{tid}"
        assert text_of(page, f"{line}-fvu") == f"FVU {ev['fvu']:.3f}"
        assert text_of(page, f"{line}-l0") == f"L0 {ev['l0']:.1f}"
        assert "held-out text" in text_of(page, line)
        assert text_of(page, f"{line}-steps") == "step 20 / 20"
    assert "completed" in text_of(page, f"sweep-{sid}-status")
