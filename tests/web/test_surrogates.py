"""Lone UTF-16 surrogates ("\\ud800"): JSON bodies with one are refused (tests/security), but a
database written before that kept them (escaped inside JSON columns), and every page showing
one failed with a 500. Schema 13 rewrites them as U+FFFD; JSON columns never store one again;
form posts cannot carry one (Werkzeug decodes them to text without surrogates)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient

from worker.db import (
    SCHEMA_VERSION,
    LanguageModel,
    Sweep,
    Template,
    Training,
    db,
    init_db,
    without_surrogates,
)

from .conftest import CONFIG, make_dataset, make_model, make_training

BAD = "a\\ud800b"
"""A lone surrogate as ``json.dumps`` wrote it into a JSON column before schema 13."""


def _raw(table: str, column: str, text: str, row_id: int) -> None:
    """Store ``text`` as is (the JSON column's ``db_value`` would clean it now)."""
    db.execute_sql(f'UPDATE "{table}" SET "{column}" = ? WHERE id = ?', (text, row_id))


def _pages(t: int, t2: int, sweep: int, tpl: int, model: int, dataset: int) -> list[str]:
    return ["/", "/trainings", f"/trainings/{t}", f"/trainings/{t2}", "/trainings/form",
            f"/trainings/form?template={tpl}", f"/trainings?from_training={t}", "/templates",
            f"/templates/{tpl}", "/sweeps", f"/sweeps/{sweep}", "/sweeps/form",
            f"/models/{model}", f"/datasets/{dataset}", f"/compare?ids={t},{t2}",
            "/trainings?tag=x", "/trainings/list"]


def test_schema_13_replaces_stored_lone_surrogates(client: FlaskClient, data_dir: Path) -> None:
    """A schema-12 SQLite file with lone surrogates in JSON columns (tags, a template's and a
    sweep's fields, a dataset's samples, hook points) and, as raw bytes another program wrote,
    in plain text columns (a training's name, a log line) is migrated: each becomes U+FFFD,
    an emoji (an escaped surrogate pair) stays, and every page renders (HTML and JSON)."""
    m = make_model()
    d = make_dataset()
    t = make_training(m, d, status="completed", steps=20)
    t2 = make_training(m, d, status="queued")
    with db.connection_context():
        sweep = Sweep.create(name="sw", model=m, dataset=d, config={"form": {}, "lists": {}})
        tpl = Template.create(name="tpl", kind="training",
                              fields={"model_id": m.id, "dataset_id": d.id})
        _raw("training", "tags", f'["{BAD}", "x", "\\ud83d\\ude00"]', t.id)
        _raw("training", "tags", '["\\udc00"]', t2.id)
        _raw("training", "config", json.dumps(dict(CONFIG, total_steps=1000))[:-1]
             + f', "{BAD}": "{BAD}"}}', t2.id)
        _raw("template", "fields", json.dumps({"model_id": m.id, "dataset_id": d.id})[:-1]
             + f', "layer": "{BAD}", "name": "{BAD}"}}', tpl.id)
        _raw("sweep", "config", f'{{"form": {{"name": "{BAD}"}}, "lists": {{"k": ["{BAD}"]}}}}',
             sweep.id)
        _raw("dataset", "samples", f'["{BAD}", "ok"]', d.id)
        _raw("language_model", "hook_points", f'["residual", "{BAD}"]', m.id)
        db.execute_sql("UPDATE training SET name = CAST(X'61EDA08062' AS TEXT) WHERE id = ?",
                       (t.id,))
        db.execute_sql("UPDATE log_line SET message = CAST(X'EDB080' AS TEXT) "
                       "WHERE training_id = ?", (t.id,))
        db.execute_sql("PRAGMA user_version = 12")
    init_db(data_dir / "app.db")
    with db.connection_context():
        assert db.execute_sql("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 13
        assert Training.get_by_id(t.id).tags == ["a\ufffdb", "x", "\U0001f600"]
        assert Training.get_by_id(t2.id).tags == ["\ufffd"]
        assert Training.get_by_id(t2.id).config["a\ufffdb"] == "a\ufffdb"
        assert Training.get_by_id(t.id).name == "a\ufffdb"
        assert Template.get_by_id(tpl.id).fields["name"] == "a\ufffdb"
        assert Sweep.get_by_id(sweep.id).config["lists"] == {"k": ["a\ufffdb"]}
        assert LanguageModel.get_by_id(m.id).hook_points == ["residual", "a\ufffdb"]
        assert "\ufffd" in t.log_lines[0].message
    for path in _pages(t.id, t2.id, sweep.id, tpl.id, m.id, d.id):
        for accept in ("text/html", "application/json"):
            r = client.get(path, headers={"Accept": accept})
            assert r.status_code == 200, (path, accept, r.status_code)
    assert "a\ufffdb" in client.get(f"/trainings/{t.id}").get_data(as_text=True)


def test_json_columns_store_no_lone_surrogate(data_dir: Path) -> None:
    """Whatever writes a JSON column (the web, the worker), a lone surrogate is stored as
    U+FFFD, keys too; emoji stay."""
    assert without_surrogates({"\udc00": ["a\ud800", ("\udfff",)], "n": 1.5}) == \
        {"\ufffd": ["a\ufffd", ["\ufffd"]], "n": 1.5}
    m, d = make_model(), make_dataset()
    t = make_training(m, d, tags=["a\ud800", "\U0001f600"])
    with db.connection_context():
        stored = db.execute_sql("SELECT tags FROM training WHERE id = ?", (t.id,)).fetchone()[0]
    assert json.loads(stored) == ["a\ufffd", "\U0001f600"]


def _stored_strings(t: Any) -> str:
    with db.connection_context():
        row = Training.get_by_id(t.id)
    return json.dumps([row.name, row.tags], ensure_ascii=False)


def test_form_posts_cannot_store_a_lone_surrogate(client: FlaskClient) -> None:
    """A form (urlencoded or multipart) or a query string carrying a surrogate's UTF-8 bytes
    (ED A0 80) decodes to text without one: stored and shown, never a 500."""
    m, d = make_model(), make_dataset()
    t = make_training(m, d, status="completed")
    r = client.post(f"/trainings/{t.id}", data="name=a%ED%A0%80b&tags=x%ED%B0%80",
                    content_type="application/x-www-form-urlencoded",
                    headers={"Accept": "application/json"})
    assert r.status_code == 200, r.get_data(as_text=True)
    _stored_strings(t).encode()  # raises on a surrogate
    body = (b"--B\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\na\xed\xa0\x80b\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"tags\"\r\n\r\n\xed\xb0\x80\r\n"
            b"--B--\r\n")
    r = client.post(f"/trainings/{t.id}", data=body, content_type="multipart/form-data; boundary=B",
                    headers={"Accept": "application/json"})
    assert r.status_code == 200, r.get_data(as_text=True)
    _stored_strings(t).encode()
    for path in (f"/trainings/{t.id}", "/trainings?tag=%ED%A0%80&q=%ED%A0%80", "/"):
        assert client.get(path).status_code == 200, path
