"""POST /trainings/<id>/activations and /steer: JSON and form in, JSON or the htmx fragment out,
errors as JSON or in the fragment, the doors (a cross-origin POST is refused), the boxes' markup,
and once through run.py with its real worker: a warm request answers faster than the cold one.
Real trainings of a tiny Llama (Huey immediate, except the run.py test)."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, render_template
from flask.testing import FlaskClient

from tests.engine.tiny_models import make_tiny_model
from tests.processes import RunPy, wait_for
from worker import interactive, jobs

from .conftest import HX, JSON, heartbeat, make_dataset, make_model, make_training

TEXT = "In the beginning God created the heaven and the earth."
FAST = {"layer": "1", "expansion_factor": "2", "k": "8", "batch_size": "128",
        "total_steps": "20", "log_every": "5", "auto_save_interval": "10",
        "buffer_tokens": "2048", "eval_tokens": "0", "device": "cpu"}


@pytest.fixture
def trained(app: Flask, data_dir: Path) -> Any:
    """A completed training of a tiny Llama (its checkpoints on disk), through the job layer."""
    interactive.CACHE.clear()
    folder = make_tiny_model("llama", data_dir / "models" / "tiny-llama")
    m = jobs.add_model(str(folder))
    d = jobs.add_dataset("kjv", context_size="32", max_tokens="8192")
    t = jobs.create_training({"model_id": str(m.id), "dataset_id": str(d.id), **FAST})
    assert t.status == "completed", t.error
    yield t
    interactive.CACHE.clear()


def csrf_of(client: FlaskClient) -> str:
    page = client.get("/").get_data(as_text=True)
    return re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page).group(1)


# ---------------------------------------------------------------------------- JSON
def test_activations_json_and_form(client: FlaskClient, trained: Any) -> None:
    url = f"/trainings/{trained.id}/activations"
    r = client.post(url, json={"text": TEXT, "latent": 2})
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert set(body) == {"tokens", "latent", "latent_acts"}
    assert body["latent"] == 2 and len(body["latent_acts"]) == len(body["tokens"])
    tok = body["tokens"][1]
    assert set(tok) == {"id", "text", "acts"} and isinstance(tok["text"], str)
    assert all(isinstance(n, int) and v > 0 for n, v in tok["acts"])
    assert body["tokens"][0]["acts"] is None and body["latent_acts"][0] is None
    assert r.headers["X-Probe-Warm"] == "0" and r.headers["Server-Timing"].startswith("probe;")

    form = client.post(url, data={"text": TEXT, "latent": "2"})  # a form, as curl -d sends
    assert form.status_code == 200 and form.get_json() == body
    assert form.headers["X-Probe-Warm"] == "1"
    whole = client.post(url, data={"text": TEXT}, headers=JSON).get_json()
    assert whole["latent"] is None and whole["latent_acts"] is None


def test_steer_json(client: FlaskClient, trained: Any) -> None:
    url = f"/trainings/{trained.id}/steer"
    r = client.post(url, json={"prompt": "In the beginning", "latent": 3, "coefficient": 0,
                               "max_new_tokens": 6})
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert set(body) == {"baseline", "steered"} and body["baseline"] == body["steered"]
    r = client.post(url, data={"prompt": "In the beginning", "latent": "3",
                               "coefficient": "400", "max_new_tokens": "6"})  # greedy
    assert r.status_code == 200
    assert r.get_json()["steered"] != r.get_json()["baseline"]


def test_errors_as_json(client: FlaskClient, trained: Any, app: Flask) -> None:
    url = f"/trainings/{trained.id}"
    r = client.post(f"{url}/activations", json={"text": "", "latent": "x"})
    assert r.status_code == 422
    assert r.get_json()["errors"].keys() == {"text", "latent"}
    r = client.post(f"{url}/steer", json={"prompt": "In", "latent": 1, "coefficient": "inf",
                                          "max_new_tokens": 500})
    assert r.status_code == 422
    assert r.get_json()["errors"].keys() == {"coefficient", "max_new_tokens"}
    r = client.post(f"{url}/activations", data="[1, 2]", content_type="application/json")
    assert r.status_code == 422 and "JSON object" in r.get_json()["error"]
    r = client.post(f"{url}/activations", data="{not json", content_type="application/json")
    assert r.status_code == 422
    r = client.post("/trainings/999999/activations", json={"text": TEXT})
    assert r.status_code == 404 and "error" in r.get_json()
    r = client.get(f"{url}/activations")
    assert r.status_code == 405


def test_no_checkpoint_is_409(client: FlaskClient, app: Flask) -> None:
    m, d = make_model(), make_dataset()
    queued = make_training(m, d, status="queued")
    r = client.post(f"/trainings/{queued.id}/activations", json={"text": TEXT})
    assert r.status_code == 409 and "no saved SAE" in r.get_json()["error"]
    r = client.post(f"/trainings/{queued.id}/steer", data={"prompt": "x"}, headers=HX)
    assert r.status_code == 409 and "no saved SAE" in r.get_data(as_text=True)


def test_without_a_worker_503(client: FlaskClient, trained: Any,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.queue import huey

    monkeypatch.setattr(huey, "immediate", False)
    r = client.post(f"/trainings/{trained.id}/activations", json={"text": TEXT})
    assert r.status_code == 503 and "No worker is running" in r.get_json()["error"]
    heartbeat()  # a worker seems alive but never answers
    monkeypatch.setenv("SAE_STUDIO_PROBE_TIMEOUT_S", "0.2")
    r = client.post(f"/trainings/{trained.id}/steer", headers=HX,
                    data={"prompt": "In", "latent": "1", "coefficient": "1"})
    assert r.status_code == 503
    assert "did not answer within 0.2 s" in r.get_data(as_text=True)


# ---------------------------------------------------------------------------- htmx fragments
def test_activations_fragment(client: FlaskClient, trained: Any) -> None:
    url = f"/trainings/{trained.id}/activations"
    want = client.post(url, json={"text": TEXT, "latent": 2}).get_json()
    html = client.post(url, data={"text": TEXT, "latent": "2"}, headers=HX) \
        .get_data(as_text=True)
    assert "<html" not in html and 'id="try-tokens"' in html
    toks = re.findall(r'<span class="probe-tok[^"]*" data-act="([^"]*)"', html)
    assert len(toks) == len(want["tokens"])
    assert toks[0] == ""  # position 0: not scored
    acts = [float(a) for a in toks[1:]]
    assert acts == pytest.approx([a for a in want["latent_acts"][1:]], rel=1e-6)
    top = max(acts)
    alphas = [float(a) for a in re.findall(r"rgba\(91, 156, 255, ([0-9.]+)\)", html)]
    assert max(alphas) == 1.0 and alphas == pytest.approx([a / top for a in acts], abs=1e-3)
    assert "Latent 2" in html


def test_whole_sae_fragment_links_each_tokens_latents(client: FlaskClient,
                                                      trained: Any) -> None:
    url = f"/trainings/{trained.id}/activations"
    want = client.post(url, json={"text": TEXT}).get_json()
    html = client.post(url, data={"text": TEXT}, headers=HX).get_data(as_text=True)
    pops = html.count('<details class="probe-pop">')
    assert pops == sum(t["acts"] is not None for t in want["tokens"])
    first = want["tokens"][1]["acts"]
    for n, _ in first:
        assert f'href="/trainings/{trained.id}/latents/{n}"' in html


def test_error_fragment(client: FlaskClient, trained: Any) -> None:
    r = client.post(f"/trainings/{trained.id}/activations", data={"text": ""}, headers=HX)
    assert r.status_code == 422
    html = r.get_data(as_text=True)
    assert 'class="error-text probe-error"' in html and "Type some text" in html


def test_steer_fragment(client: FlaskClient, trained: Any) -> None:
    r = client.post(f"/trainings/{trained.id}/steer", headers=HX,
                    data={"prompt": "In the beginning", "latent": "3", "coefficient": "0",
                          "max_new_tokens": "5"})
    html = r.get_data(as_text=True)
    base = re.search(r'id="steer-baseline">(.*?)</p>', html, re.S).group(1)
    steered = re.search(r'id="steer-steered">(.*?)</p>', html, re.S).group(1)
    assert base == steered and base.strip()


def test_boxes_markup(app: Flask, trained: Any) -> None:
    with app.test_request_context("/"):
        t = jobs.get_training(trained.id)
        latent_box = render_template("probes/_try.html", t=t, latent={"id": 7})
        report_box = render_template("probes/_try.html", t=t, latent=None)
        steer_box = render_template("probes/_steer.html", t=t, latent=7)
    for html in (latent_box, report_box, steer_box):
        assert 'name="csrf_token"' in html and "probes.css" in html
    assert 'id="try-form"' in latent_box and 'id="try-text"' in latent_box
    assert 'id="try-result"' in latent_box
    assert f'hx-post="/trainings/{t.id}/activations"' in latent_box
    assert '<input type="hidden" name="latent" value="7">' in latent_box
    assert 'name="latent"' not in report_box
    assert 'id="steer-form"' in steer_box and 'id="steer-result"' in steer_box
    assert '<input type="hidden" name="latent" value="7">' in steer_box
    for name in ("prompt", "coefficient", "max_new_tokens", "seed"):
        assert f'name="{name}"' in steer_box


def test_steer_box_says_when_the_model_cannot_generate(app: Flask) -> None:
    t = make_training(make_model(is_causal=False), make_dataset(), status="completed")
    with app.test_request_context("/"):
        html = render_template("probes/_steer.html", t=jobs.get_training(t.id), latent=1)
    assert 'id="steer-unavailable"' in html and 'id="steer-form"' not in html


# ---------------------------------------------------------------------------- the doors
@pytest.mark.parametrize("path", ["activations", "steer"])
def test_cross_origin_post_is_refused(client: FlaskClient, trained: Any, path: str) -> None:
    token = csrf_of(client)
    evil = {"Origin": "http://evil.example", "X-CSRF-Token": token}
    r = client.post(f"/trainings/{trained.id}/{path}", data={"text": TEXT, "prompt": TEXT,
                                                              "latent": "1",
                                                              "coefficient": "1"},
                    headers=evil)
    assert r.status_code == 403
    own = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin", **HX}
    r = client.post(f"/trainings/{trained.id}/activations", data={"text": TEXT}, headers=own)
    assert r.status_code == 403  # a browser request without the CSRF token
    r = client.post(f"/trainings/{trained.id}/activations", data={"text": TEXT},
                    headers={**own, "X-CSRF-Token": token})
    assert r.status_code == 200 and 'id="try-tokens"' in r.get_data(as_text=True)


# ---------------------------------------------------------------------------- a real worker
def _post(url: str, data: dict[str, str]) -> tuple[int, dict[str, Any], float, bool, float]:
    """POST as curl does: the status, the JSON body, the round trip (s), and the worker's own
    account of the task: whether the model and SAE were loaded already (``X-Probe-Warm``) and
    the task's seconds (``Server-Timing``); False and 0 on an error answer."""
    req = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(),
                                 headers={"Accept": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            timing = re.search(r"dur=([0-9.]+)", r.headers.get("Server-Timing", ""))
            return (r.status, json.load(r), time.perf_counter() - t0,
                    r.headers.get("X-Probe-Warm") == "1",
                    float(timing.group(1)) / 1000 if timing else 0.0)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc), time.perf_counter() - t0, False, 0.0


def test_a_real_worker_answers_warm_faster_than_cold(tmp_path: Path) -> None:
    folder = make_tiny_model("llama", tmp_path / "models" / "tiny-llama")
    run = RunPy(tmp_path)
    try:
        wait_for(run.worker_started, 90, "the worker's start-up")
        m = run.call("/models", {"source": str(folder)})
        wait_for(lambda: run.call(f"/models/{m['id']}")["status"] == "ready", 90, "the model")
        d = run.call("/datasets", {"source": "kjv", "context_size": "32",
                                   "max_tokens": "8192"})
        wait_for(lambda: run.call(f"/datasets/{d['id']}")["status"] == "ready", 90,
                 "the dataset")
        t = run.call("/trainings", {"model_id": m["id"], "dataset_id": d["id"], **FAST})
        wait_for(lambda: run.call(f"/trainings/{t['id']}")["status"] == "completed", 180,
                 "the training")
        url = f"{run.url}/trainings/{t['id']}/activations"
        status, cold, _, was_warm, cold_s = _post(url, {"text": TEXT, "latent": "1"})
        assert status == 200 and not was_warm, cold
        warm_s, round_trips = [], []
        for _ in range(3):
            status, warm, round_trip, was_warm, seconds = _post(url, {"text": TEXT, "latent": "1"})
            assert status == 200 and warm == cold and was_warm
            warm_s.append(seconds)
            round_trips.append(round_trip)
        # the worker's own seconds: loading the model and SAE vs reusing them (the round trip
        # adds the web's polling, which is larger than that difference for a tiny model)
        assert min(warm_s) < cold_s
        assert sorted(round_trips)[1] < 2.0  # polled every 0.1 s at most; the tiny model is quick
        status, body, *_ = _post(f"{run.url}/trainings/{t['id']}/steer",
                                {"prompt": "In the beginning", "latent": "1",
                                 "coefficient": "0", "max_new_tokens": "4"})
        assert status == 200 and body["baseline"] == body["steered"]
    finally:
        assert run.stop() == 0
