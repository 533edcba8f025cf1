"""Fuzz every route of the app (``app.url_map``) with random ids, query parameters and form
fields (every option of ``worker.engine.config.options()`` and the models' and datasets'
fields), with random text, numbers and huge values: no answer is a 5xx, and a JSON client gets
JSON for every error. Tasks are recorded, never run (``enqueued``). ``bench/fuzz_bench.py``
runs the same cases, more of them.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.db import Checkpoint, Dataset, LanguageModel, Training, db
from worker.engine.config import options

FIELDS = sorted({info.name for info in options()} | {
    "source", "name", "context_size", "max_tokens", "text_field", "model_id", "dataset_id",
    "layer_idx", "page", "per_page", "sort", "order", "q", "format", "highlight", "after"})
"""Every form field and query parameter the app reads, and a few it should ignore."""
ODD_VALUES = ["", "0", "1", "-1", "1e20", "1e400", "-1e20", "nan", "inf", "-inf", "9" * 400,
              "99999999999999999999", str(2**63), str(2**64), "1.5", "0x10", "true", "on",
              "kjv", "minilm-l6", "../../etc/passwd", "/etc/passwd", "~/x.txt", "a" * 1200,
              "x" * 300 + ".txt", "\x00", "<script>", "json", "csv", "topk", "residual"]
"""Values that broke, or could break, a route (overflows, paths, NaN, absurd lengths)."""

values = st.one_of(st.sampled_from(ODD_VALUES), st.integers(-2**70, 2**70).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.text(max_size=40))
ids = st.one_of(st.sampled_from(["1", "2", "0", "-1", "99999999999999999999", "9" * 400]),
                st.integers(0, 2**70).map(str))
params = st.dictionaries(st.sampled_from(FIELDS), values, max_size=8)
clients = st.sampled_from([{"Accept": "application/json"}, {"HX-Request": "true"}, {}])
_PART = re.compile(r"<(?:(\w+)(?:\(([^)]*)\))?:)?(\w+)>")


def routes(app: Flask) -> list[tuple[str, str]]:
    """(method, rule) for every route but the static files'."""
    return sorted((method, rule.rule) for rule in app.url_map.iter_rules()
                  if rule.endpoint != "static"
                  for method in rule.methods - {"HEAD", "OPTIONS"})


@st.composite
def requests(draw: Any, app: Flask) -> tuple[str, str, dict[str, str], dict[str, str],
                                               dict[str, str]]:
    """(method, path, query, form, headers) for one request to a random route."""
    method, rule = draw(st.sampled_from(routes(app)))

    def part(match: re.Match[str]) -> str:
        converter, args = match.group(1), match.group(2)
        if converter == "any":
            return draw(st.sampled_from([a.strip() for a in args.split(",")]))
        return draw(ids) if converter == "int" else draw(st.text(min_size=1, max_size=20))

    path = _PART.sub(part, rule)
    form = draw(params) if method != "GET" else {}
    return method, path, draw(params), form, draw(clients)


def ensure_rows() -> None:
    """A ready model, a ready dataset, a training and a checkpoint (ids 1 when fresh), so the
    id routes reach their services; made again when a fuzzed DELETE removed them."""
    with db.connection_context():
        model = LanguageModel.select().first() or LanguageModel.create(
            name="minilm-l6", source="minilm-l6", status="ready", n_layers=6, hidden_dim=384,
            n_params=22_700_000, dtype="float32", path="/nonexistent/minilm",
            hook_points=["residual", "mlp_out", "attn_out"])
        dataset = Dataset.select().first() or Dataset.create(
            name="kjv", source="kjv", status="ready", context_size=64, n_tokens=16384,
            samples=["In the beginning"])
        training = Training.select().first() or Training.create(
            model=model, dataset=dataset, status="completed", total_steps=10,
            config={"encoder_type": "topk", "layer": 3, "total_steps": 10})
        if not Checkpoint.select().exists():
            Checkpoint.create(training=training, step=10, path="/nonexistent/step-10.safetensors",
                              loss=0.1, size_bytes=10)


def check(client: FlaskClient, case: tuple[str, str, dict[str, str], dict[str, str],
                                            dict[str, str]]) -> None:
    """Send one fuzzed request; no 5xx, and JSON errors for a JSON client."""
    method, path, query, form, headers = case
    response = client.open(path, method=method, query_string=query, data=form or None,
                           headers=headers)
    where = f"{method} {path} query={query!r} form={form!r} headers={headers!r}"
    assert response.status_code < 500, f"{response.status_code} for {where}: " \
                                       f"{response.get_data(as_text=True)[:500]}"
    websocket = path.startswith("/ws/")  # a plain GET there is a 400 "not a WebSocket"
    fmt = query.get("format")  # ?format= wins over the Accept header
    json_client = fmt == "json" or (not fmt and headers.get("Accept") == "application/json")
    if json_client and response.status_code >= 400 and not websocket:
        assert response.is_json, f"{response.status_code} not JSON for {where}"


def test_every_route_answers_any_input_without_a_server_error(
        app: Flask, client: FlaskClient, enqueued: list[Any]) -> None:
    ensure_rows()

    @settings(max_examples=500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=requests(app))
    def run(case: tuple[str, str, dict[str, str], dict[str, str], dict[str, str]]) -> None:
        ensure_rows()
        check(client, case)

    run()
