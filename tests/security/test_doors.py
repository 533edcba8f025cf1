"""The doors (webapp/security.py): a foreign Host, a cross-origin or token-less browser request,
a foreign WebSocket Origin and a request without the access token (off the loopback) are
refused before any route runs; curl on the loopback keeps working; oversize uploads get 413.

Each refused request is checked to have changed nothing in the database; the WebSocket checks
use a real threaded server and simple-websocket's client, as tests/web/test_ws.py does.
"""

from __future__ import annotations

import io
import re
import socket
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import simple_websocket
from flask import Flask
from flask.testing import FlaskClient

from tests.web.conftest import CONFIG, make_dataset, make_model, make_training
from tests.web.evals import install_evaluation
from webapp import create_app
from webapp.security import SECRET_FILE
from worker.db import (
    Checkpoint,
    Dataset,
    LanguageModel,
    LatentLabel,
    Sweep,
    Template,
    Training,
    db,
)

EVIL = "http://evil.example"
JSON = {"Accept": "application/json"}
CROSS_SITE = [{"Origin": EVIL}, {"Referer": f"{EVIL}/page.html"}, {"Sec-Fetch-Site": "cross-site"}]
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


# ---------------------------------------------------------------------------- helpers
@pytest.fixture
def rows(app: Flask, tmp_path: Path) -> dict[str, int]:
    """A ready model and dataset and a training in progress with one checkpoint and an
    evaluation (a real one of a tiny GPT-2: its latents can be labelled)."""
    model, dataset = make_model(), make_dataset()
    t = make_training(model, dataset, status="training", steps=100, checkpoints=1,
                      out_dir=tmp_path)
    install_evaluation(t, "gpt2")
    with db.connection_context():
        checkpoint = Checkpoint.get(Checkpoint.training == t.id)
        sweep = Sweep.create(name="s", model=model.id, dataset=dataset.id, config={}, groups=[])
        template = Template.create(name="t", kind="training", fields={"k": 8})
    return {"model": model.id, "dataset": dataset.id, "training": t.id,
            "checkpoint": checkpoint.id, "sweep": sweep.id, "template": template.id}


def requests_for(ids: dict[str, int]) -> list[tuple[str, str, str, dict[str, Any] | None]]:
    """One request per state-changing route (and per training action):
    ``(endpoint, method, path, form)``."""
    t = ids["training"]
    return [
        ("sweeps.create", "POST", "/sweeps",
         {**CONFIG, "model_id": ids["model"], "dataset_id": ids["dataset"], "k": "8,16"}),
        ("sweeps.control", "POST", f"/sweeps/{ids['sweep']}/stop", None),
        ("sweeps.delete", "DELETE", f"/sweeps/{ids['sweep']}", None),
        ("trainings.update", "PATCH", f"/trainings/{t}", {"name": "renamed", "tags": "a"}),
        *[("reports.label", method, f"/trainings/{t}/latents/3/label",
           {"label": "a label", "notes": "notes"}) for method in ("PUT", "POST")],
        ("probes.activations", "POST", f"/trainings/{t}/activations",
         {"text": "In the beginning", "latent": "3"}),
        ("probes.steer", "POST", f"/trainings/{t}/steer",
         {"prompt": "In the beginning", "latent": "3", "coefficient": "4"}),
        ("config_templates.create", "POST", "/templates", {"name": "t2", "k": "8"}),
        ("config_templates.delete", "DELETE", f"/templates/{ids['template']}", None),
        ("models.create", "POST", "/models", {"source": "minilm-l6", "name": "m2"}),
        ("models.delete", "DELETE", f"/models/{ids['model']}", None),
        ("datasets.create", "POST", "/datasets", {"source": "kjv", "name": "d2"}),
        ("datasets.delete", "DELETE", f"/datasets/{ids['dataset']}", None),
        ("trainings.create", "POST", "/trainings",
         {**CONFIG, "model_id": ids["model"], "dataset_id": ids["dataset"]}),
        *[("trainings.control", "POST", f"/trainings/{t}/{action}", None)
          for action in ("pause", "resume", "stop", "retry")],
        ("trainings.delete", "DELETE", f"/trainings/{t}", None),
        ("trainings.save_checkpoint", "POST", f"/trainings/{t}/checkpoints", None),
        ("trainings.delete_checkpoint", "DELETE", f"/checkpoints/{ids['checkpoint']}", None),
    ]


def snapshot() -> tuple[Any, ...]:
    """Everything a state-changing route could change."""
    with db.connection_context():
        return (LanguageModel.select().count(), Dataset.select().count(),
                Checkpoint.select().count(), Sweep.select().count(), Template.select().count(),
                [(r.latent, r.label, r.notes) for r in LatentLabel.select()],
                [(t.id, t.status, t.requested, t.name, t.tags)
                 for t in Training.select().order_by(Training.id)])


def send(client: FlaskClient, method: str, path: str, form: dict[str, Any] | None,
         headers: dict[str, str]) -> Any:
    return client.open(path, method=method, data=form, headers=headers)


def csrf_of(client: FlaskClient) -> str:
    """The CSRF token a page carries (its meta tag, which htmx's hx-headers repeats)."""
    page = client.get("/").get_data(as_text=True)
    token = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page).group(1)
    assert f'hx-headers=\'{{"X-CSRF-Token": "{token}"}}\'' in page
    return token


@contextmanager
def serve(app: Flask) -> Iterator[str]:
    """``app`` on a real threaded werkzeug server: yields ``host:port``."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


def ws_refusal(address: str, path: str, headers: dict[str, str]) -> int:
    """The HTTP status a WebSocket upgrade gets (simple-websocket raises on anything but 101)."""
    with pytest.raises(simple_websocket.ConnectionError) as refused:
        simple_websocket.Client.connect(f"ws://{address}{path}", headers=headers)
    return refused.value.status_code


def ws_snapshot(address: str, path: str, headers: dict[str, str]) -> str:
    ws = simple_websocket.Client.connect(f"ws://{address}{path}", headers=headers)
    try:
        return ws.receive(timeout=5)
    finally:
        try:
            ws.close()
        except (simple_websocket.ConnectionClosed, OSError):
            pass  # the server closed it first


def raw_status(address: str, request: str) -> int:
    """Send ``request`` as bytes and return the answer's status (for a forged Host header)."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(request.encode())
        head = s.recv(4096).decode("latin-1")
    return int(head.split()[1])


# ---------------------------------------------------------------------------- same origin, CSRF
def test_every_state_changing_route_is_covered(app: Flask, rows: dict[str, int]) -> None:
    routes = {rule.endpoint for rule in app.url_map.iter_rules()
              if rule.methods & STATE_CHANGING}
    assert routes == {endpoint for endpoint, *_ in requests_for(rows)}


@pytest.mark.parametrize("cross", CROSS_SITE, ids=["origin", "referer", "sec-fetch-site"])
def test_cross_origin_requests_are_refused_and_change_nothing(
        client: FlaskClient, rows: dict[str, int], enqueued: list, cross: dict[str, str]
) -> None:
    before = snapshot()
    for _, method, path, form in requests_for(rows):
        for extra in ({}, {"HX-Request": "true"}, JSON):
            # even with a valid CSRF token: the token proves nothing about the origin
            r = send(client, method, path, form,
                     {**cross, **extra, "X-CSRF-Token": csrf_of(client)})
            assert r.status_code == 403, (method, path, extra, r.status_code)
            if extra is JSON:
                assert "another site" in r.get_json()["error"]
            else:
                assert "another site" in r.get_data(as_text=True)
    assert snapshot() == before
    assert enqueued == []


def test_same_origin_browser_request_needs_the_csrf_token(
        client: FlaskClient, rows: dict[str, int], enqueued: list) -> None:
    own = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin", "HX-Request": "true"}
    token = csrf_of(client)
    before = snapshot()
    for _, method, path, form in requests_for(rows):
        for bad in ({}, {"X-CSRF-Token": "0" * 64}):
            r = send(client, method, path, form, {**own, **bad})
            assert r.status_code == 403, (method, path, r.status_code)
            assert "security token" in r.get_data(as_text=True)
    assert snapshot() == before and enqueued == []

    r = send(client, "POST", f"/trainings/{rows['training']}/pause", None,
             {**own, "X-CSRF-Token": token})
    assert r.status_code == 200
    r = send(client, "POST", "/models", {"source": "minilm-l6", "name": "m2",
                                          "csrf_token": token},  # a plain form's hidden field
             {"Origin": "http://localhost", "Referer": "http://localhost/models"})
    assert r.status_code in (302, 303)
    for _, method, path, form in requests_for(rows):
        r = send(client, method, path, form, {**own, "X-CSRF-Token": token})
        assert r.status_code not in (401, 403) and r.status_code < 500, (method, path)
    assert snapshot() != before
    assert ("prepare_model", ) == enqueued[0][:1]


def test_forms_carry_the_csrf_field(client: FlaskClient, rows: dict[str, int]) -> None:
    token = csrf_of(client)
    field = f'<input type="hidden" name="csrf_token" value="{token}">'
    for page, form in (("/models", "model-form"), ("/datasets", "dataset-form"),
                       ("/", "training-form")):
        html = client.get(page).get_data(as_text=True)
        start = html.index(f'<form id="{form}"')
        assert field in html[start:html.index("</form>", start)], page
    # the job card's plain forms (Pause / Stop / Save now) post without JavaScript too
    card = client.get(f"/trainings/{rows['training']}").get_data(as_text=True)
    posts = [part for part in card.split("<form")[1:] if 'method="post"' in part.split(">")[0]]
    assert len(posts) >= 3 and all(field in p[:p.index("</form>")] for p in posts)


def test_programs_without_browser_headers_need_no_token(
        client: FlaskClient, rows: dict[str, int], enqueued: list) -> None:
    r = client.post("/models", data={"source": "minilm-l6", "name": "m2"}, headers=JSON)
    assert r.status_code == 201
    r = client.post("/trainings", json={**CONFIG, "model_id": rows["model"],
                                        "dataset_id": rows["dataset"]}, headers=JSON)
    assert r.status_code == 201
    r = client.post(f"/trainings/{rows['training']}/pause", headers=JSON)
    assert r.status_code == 200 and r.get_json()["requested"] == "pause"
    r = client.post(f"/trainings/{rows['training']}/checkpoints", headers=JSON)
    assert r.status_code == 202


def test_the_secret_is_made_once_and_private(app: Flask, data_dir: Path) -> None:
    path = data_dir / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = create_app({"TESTING": True, "DATA_DIR": str(data_dir)})
    assert again.config["SECRET_KEY"] == app.config["SECRET_KEY"] == path.read_text().strip()
    assert app.config["SECRET_KEY"] != "dev"
    with app.test_client() as a, again.test_client() as b:
        assert csrf_of(a) == csrf_of(b)


# ---------------------------------------------------------------------------- Host
@pytest.mark.parametrize("host", ["localhost", "localhost:5000", "127.0.0.1:8080", "[::1]:5000",
                                  "LOCALHOST"])
def test_loopback_hosts_are_served(client: FlaskClient, host: str) -> None:
    assert client.get("/healthz", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:5000", "localhost.evil.example",
                                  "10.0.0.7", "127.0.0.1.nip.io"])
def test_foreign_hosts_are_refused(client: FlaskClient, rows: dict[str, int], host: str) -> None:
    r = client.get("/", headers={"Host": host})
    assert r.status_code == 403 and "--allowed-host" in r.get_data(as_text=True)
    r = client.get("/trainings", headers={"Host": host, **JSON})
    assert r.status_code == 403 and "is not allowed" in r.get_json()["error"]
    before = snapshot()
    r = client.post(f"/trainings/{rows['training']}/stop", headers={"Host": host})
    assert r.status_code == 403 and snapshot() == before


def test_allowed_and_bound_hosts(data_dir: Path) -> None:
    app = create_app({"TESTING": True, "DATA_DIR": str(data_dir), "BIND_HOST": "10.0.0.7",
                      "ALLOWED_HOSTS": "studio.lab, gpu-box"})
    c = app.test_client()
    for host in ("10.0.0.7:5000", "studio.lab", "gpu-box:80", "localhost"):
        assert c.get("/healthz", headers={"Host": host}).status_code == 200, host
    assert c.get("/healthz", headers={"Host": "10.0.0.8"}).status_code == 403
    wildcard = create_app({"TESTING": True, "DATA_DIR": str(data_dir), "BIND_HOST": "0.0.0.0"})
    c = wildcard.test_client()
    for host in ("192.168.1.20:5000", "[fe80::1]:5000", socket.gethostname()):
        assert c.get("/healthz", headers={"Host": host}).status_code == 200, host
    assert c.get("/healthz", headers={"Host": "evil.example"}).status_code == 403


# ---------------------------------------------------------------------------- WebSocket
def test_websocket_checks_origin_and_host(app: Flask, rows: dict[str, int]) -> None:
    path = f"/ws/trainings/{rows['training']}"
    with serve(app) as address:
        assert ws_refusal(address, path, {"Origin": EVIL}) == 403
        # simple-websocket's Host header has no port: its own origin is http://127.0.0.1
        html = ws_snapshot(address, path, {"Origin": "http://127.0.0.1"})
        assert f'id="training-{rows["training"]}-status"' in html
        assert "training-" in ws_snapshot(address, path, {})  # programs send no Origin
        # as a browser sends it: Host with the port, Origin the page's
        upgrade = (f"GET {path} HTTP/1.1\r\nHost: {{host}}\r\nOrigin: {{origin}}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
                   "\r\n\r\n")
        own = f"http://{address}"
        assert raw_status(address, upgrade.format(host=address, origin=own)) == 101
        assert raw_status(address, upgrade.format(host=address, origin=EVIL)) == 403
        assert raw_status(address, upgrade.format(host=address,
                                                  origin="http://127.0.0.1:1")) == 403
        assert raw_status(address, upgrade.format(host="evil.example", origin=own)) == 403


# ---------------------------------------------------------------------------- the access token
@pytest.fixture
def token_app(data_dir: Path) -> Flask:
    """As ``run.py --host 0.0.0.0 --token s3cret`` builds it."""
    return create_app({"TESTING": True, "DATA_DIR": str(data_dir), "BIND_HOST": "0.0.0.0",
                       "TOKEN": "s3cret"})


def test_token_required_off_the_loopback(token_app: Flask) -> None:
    c = token_app.test_client()
    r = c.get("/")
    assert r.status_code == 401 and "?token=" in r.get_data(as_text=True)
    r = c.get("/trainings", headers=JSON)
    assert r.status_code == 401 and "access token" in r.get_json()["error"]
    assert c.post("/models", data={"source": "minilm-l6"}, headers=JSON).status_code == 401
    assert c.get("/static/app.js").status_code == 401
    for wrong in ({"Authorization": "Bearer s3cre"}, {"Authorization": "Basic s3cret"}):
        assert c.get("/healthz", headers=wrong).status_code == 401
    assert c.get("/healthz?token=wrong").status_code == 401
    assert c.get_cookie("sae_studio_token_localhost") is None


def test_token_link_sets_a_strict_cookie_and_redirects(token_app: Flask) -> None:
    c = token_app.test_client()
    r = c.get("/datasets?token=s3cret&x=1")
    assert r.status_code == 303 and r.headers["Location"] == "/datasets?x=1"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    # its value stands for the token but is not it: a browser sends a host's cookies to every
    # port of that host, so another server there would read it
    value = cookie.split(";")[0].split("=", 1)[1]
    assert "s3cret" not in cookie and len(value) == 64
    fresh = token_app.test_client()
    assert fresh.get("/healthz", headers={"Authorization": f"Bearer {value}"}).status_code == 401
    assert fresh.get(f"/healthz?token={value}").status_code == 401
    other = create_app({"TESTING": True, "DATA_DIR": token_app.config["DATA_DIR"],
                        "BIND_HOST": "0.0.0.0", "TOKEN": "another"}).test_client()
    other.set_cookie("sae_studio_token_localhost", value)  # a cookie of another token
    assert other.get("/healthz").status_code == 401
    page = c.get("/")
    assert page.status_code == 200 and 'name="csrf-token"' in page.get_data(as_text=True)
    # the cookie makes it a browser: a state change needs the page's CSRF token as well
    own = {"Origin": "http://localhost"}
    assert c.post("/models", data={"source": "minilm-l6"}, headers=own).status_code == 403
    r = c.post("/models", data={"source": "minilm-l6"},
               headers={**own, **JSON, "X-CSRF-Token": csrf_of(c)})
    assert r.status_code == 201


def test_bearer_token_for_programs(token_app: Flask, rows: dict[str, int], enqueued: list
                                   ) -> None:
    c = token_app.test_client()
    bearer = {"Authorization": "Bearer s3cret", **JSON}
    assert c.get("/trainings", headers=bearer).status_code == 200
    r = c.post(f"/trainings/{rows['training']}/pause", headers=bearer)
    assert r.status_code == 200 and r.get_json()["requested"] == "pause"


def test_explicit_token_on_the_loopback_is_required(data_dir: Path) -> None:
    app = create_app({"TESTING": True, "DATA_DIR": str(data_dir), "TOKEN": "s3cret"})
    c = app.test_client()
    assert c.get("/healthz").status_code == 401
    assert c.get("/healthz", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_websocket_needs_the_token(token_app: Flask, rows: dict[str, int]) -> None:
    path = f"/ws/trainings/{rows['training']}"
    with serve(token_app) as address:
        assert ws_refusal(address, path, {}) == 401
        assert ws_refusal(address, path, {"Authorization": "Bearer nope"}) == 401
        html = ws_snapshot(address, path, {"Authorization": "Bearer s3cret"})
        assert f'id="training-{rows["training"]}-status"' in html
        # a browser's cookie (simple-websocket's Host header has no port)
        cookie = token_app.extensions["sae_studio_doors"].cookie
        html = ws_snapshot(address, path, {"Cookie": f"sae_studio_token_127_0_0_1={cookie}",
                                           "Origin": "http://127.0.0.1"})
        assert f'id="training-{rows["training"]}-status"' in html
        assert ws_refusal(address, path, {"Cookie": "sae_studio_token_127_0_0_1=s3cret",
                                          "Origin": "http://127.0.0.1"}) == 401
        assert ws_refusal(address, path, {"Authorization": "Bearer s3cret",
                                          "Origin": EVIL}) == 403


# ---------------------------------------------------------------------------- upload limit
def test_oversize_upload_is_413_with_a_sentence(data_dir: Path, enqueued: list) -> None:
    app = create_app({"TESTING": True, "DATA_DIR": str(data_dir), "MAX_CONTENT_LENGTH": 4096})
    c = app.test_client()

    def upload(headers: dict[str, str]) -> Any:
        return c.post("/datasets", headers=headers, content_type="multipart/form-data",
                      data={"source": "", "file": (io.BytesIO(b"word " * 2000), "big.txt")})

    r = upload(JSON)
    assert r.status_code == 413 and "too large" in r.get_json()["error"]
    r = upload({"HX-Request": "true"})
    assert r.status_code == 413 and r.headers["HX-Retarget"] == "#flash"
    assert "--max-upload-mb" in r.get_data(as_text=True)
    r = upload({"Origin": "http://localhost", "X-CSRF-Token": csrf_of(c)})
    assert r.status_code == 413 and "too large" in r.get_data(as_text=True)
    assert enqueued == []
    small = c.post("/datasets", headers=JSON, content_type="multipart/form-data",
                   data={"source": "", "file": (io.BytesIO(b"a few words\n"), "small.txt")})
    assert small.status_code == 201


def test_oversize_upload_on_a_real_server_is_answered(data_dir: Path) -> None:
    """The server answers 413 to a body over the limit (not a reset connection)."""
    app = create_app({"TESTING": True, "DATA_DIR": str(data_dir), "MAX_CONTENT_LENGTH": 64 * 1024})
    import requests

    with serve(app) as address:
        r = requests.post(f"http://{address}/datasets", headers=JSON, timeout=30,
                          files={"file": ("big.txt", b"word " * 200_000)})
    assert r.status_code == 413 and "too large" in r.json()["error"]


def test_upload_limit_comes_from_settings(data_dir: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setenv("SAE_STUDIO_MAX_UPLOAD_MB", "3")
    app = create_app({"TESTING": True, "DATA_DIR": str(data_dir)})
    assert app.config["MAX_CONTENT_LENGTH"] == 3 * 2**20


def test_an_overlong_form_field_is_413_with_its_own_sentence(client: FlaskClient) -> None:
    r = client.post("/datasets", data={"source": "kjv", "name": "n" * 600_000},
                    headers=JSON, content_type="multipart/form-data")
    assert r.status_code == 413 and "form field is too long" in r.get_json()["error"]


def test_no_other_site_may_frame_the_pages(client: Any, rows: dict[str, int]) -> None:
    """A framed page is our own origin with its CSRF token: a click lured onto its Pause button
    would act. Every answer forbids framing (pages, fragments, JSON, errors, static files)."""
    for path, headers in ((f"/trainings/{rows['training']}", {}),
                          (f"/trainings/{rows['training']}", {"HX-Request": "true"}),
                          ("/trainings", JSON), ("/nowhere", {}), ("/static/app.js", {})):
        r = client.get(path, headers=headers)
        assert r.headers["X-Frame-Options"] == "DENY", path
        assert r.headers["Content-Security-Policy"] == "frame-ancestors 'none'", path
        assert r.headers["X-Content-Type-Options"] == "nosniff", path
    r = client.post("/models", data={"source": "minilm-l6"},
                    headers={"Origin": EVIL, **JSON})
    assert r.status_code == 403 and r.headers["X-Frame-Options"] == "DENY"


def test_bad_json_bodies_get_a_sentence_never_a_500(client: FlaskClient, rows: dict[str, int],
                                                     data_dir: Path) -> None:
    """Every JSON endpoint reads its body the same way: not JSON, not an object, or nested past
    the parser (thousands of brackets) is a 422 with a sentence; a wrong method a JSON 405."""
    t = rows["training"]
    deep = "[" * 5000 + "]" * 5000
    endpoints = [("post", "/trainings"), ("patch", f"/trainings/{t}"), ("post", "/templates"),
                 ("post", "/sweeps"), ("put", f"/trainings/{t}/latents/0/label"),
                 ("post", f"/trainings/{t}/activations"), ("post", f"/trainings/{t}/steer")]
    for method, path in endpoints:
        for body, words in ((deep, "nests too deeply"), ("{'a': 1", "not valid JSON"),
                            ("[1, 2]", "must be a JSON object"), (b"\xff\xfe{", "not valid"),
                            ('{"name": "a\\ud800", "tags": ["\\udc00"]}', "not valid Unicode")):
            r = getattr(client, method)(path, data=body, headers=JSON,
                                        content_type="application/json")
            assert r.status_code == 422, (method, path, body[:10], r.status_code)
            assert words in r.get_json()["error"], (path, r.get_json())
    r = client.post(f"/templates/{t}", headers=JSON)
    assert r.status_code == 405 and "not allowed" in r.get_json()["error"]
    assert "GET" in r.headers["Allow"]
    page = client.post(f"/templates/{t}")
    assert page.status_code == 405 and "<h1>Cannot do that</h1>" in page.get_data(as_text=True)


def test_a_chunked_body_over_the_limit_is_413_on_a_real_server(data_dir: Path) -> None:
    """A body without Content-Length (chunked) is cut at the limit by the server's stream, not
    refused: the JSON endpoints and the upload say 413 all the same, with a sentence."""
    import requests

    app = create_app({"TESTING": True, "DATA_DIR": str(data_dir), "MAX_CONTENT_LENGTH": 64 * 1024})

    def chunks(data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    big = b'{"name": "' + b"n" * 200_000 + b'"}'
    with serve(app) as address:
        r = requests.post(f"http://{address}/templates", data=chunks(big), timeout=30,
                          headers={**JSON, "Content-Type": "application/json"})
        assert r.status_code == 413 and "too large" in r.json()["error"], r.text
        small = requests.post(f"http://{address}/templates", data=chunks(b'{"name": ""}'),
                              timeout=30, headers={**JSON, "Content-Type": "application/json"})
        assert small.status_code == 422 and "name" in small.json()["errors"], small.text
        body, ctype = requests.models.RequestEncodingMixin._encode_files(
            {"file": ("big.txt", b"word " * 200_000)}, {})
        r = requests.post(f"http://{address}/datasets", data=chunks(body), timeout=30,
                          headers={**JSON, "Content-Type": ctype})
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"], r.text
