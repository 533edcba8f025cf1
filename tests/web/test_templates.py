"""The Templates area over HTTP: every route as HTML and JSON (201 / 404 / 409 / 422), the TOML
download, and the training form started from a template or a training ("Use this config")."""

from __future__ import annotations

import sys

from worker.db import Template

from ..html import attr, element_by_id, find_all, text_of
from .conftest import HX, JSON, make_model, make_training

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEYS = {"id", "name", "kind", "fields", "builtin", "created_at", "description"}
PRESET_IDS = ["preset:cpu-quick-look", "preset:jetson-orin-nano-6gb", "preset:l0-sweep-20-200"]


def selected(html: str, element_id: str) -> list[str]:
    return [o.get("value") for o in find_all(element_by_id(html, element_id), "option")
            if "selected" in o.attrs]


def value_of(html: str, name: str) -> str | None:
    """The shown value of the form's field ``name`` (a select's chosen option or an input)."""
    el = element_by_id(html, f"input-{name}")
    if el.tag == "select":
        chosen = [o.get("value") for o in find_all(el, "option") if "selected" in o.attrs]
        return chosen[0] if chosen else None
    return el.get("value")


# ---------------------------------------------------------------------------- create
def test_create_from_fields_json_and_form(client):
    r = client.post("/templates", json={"name": "wide", "encoder_type": "topk", "k": "64",
                                        "expansion_factor": 16, "model_id": 3}, headers=JSON)
    assert r.status_code == 201
    body = r.get_json()
    assert set(body) == KEYS
    assert body["fields"] == {"encoder_type": "topk", "k": 64, "expansion_factor": 16,
                              "model_id": 3}
    assert body["kind"] == "training" and body["builtin"] is False
    assert isinstance(body["id"], int) and body["created_at"] > 0
    # a plain form post answers with the page it redirects to
    r = client.post("/templates", data={"name": "form one", "k": "8"})
    assert r.status_code == 302 and r.headers["Location"].startswith("/templates")
    # htmx: the list fragment and a fresh form
    r = client.post("/templates", data={"name": "htmx one", "k": "8"}, headers=HX)
    assert r.status_code == 201
    html = r.data.decode()
    assert element_by_id(html, "templates-list")
    assert attr(html, "template-form", "hx-swap-oob") == "true"
    assert Template.select().count() == 3


def test_create_sweep_template(client):
    r = client.post("/templates", data={"name": "k sweep", "kind": "sweep", "k": "16,32, 64",
                                        "seed": "0,1", "batch_size": "2048"}, headers=JSON)
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["fields"] == {"k": [16, 32, 64], "seed": [0, 1], "batch_size": 2048}
    r = client.post("/templates", json={"name": "json sweep", "kind": "sweep",
                                        "k": [20, 40], "layer": [1, 2]}, headers=JSON)
    assert r.status_code == 201 and r.get_json()["fields"] == {"k": [20, 40], "layer": [1, 2]}


def test_create_rejects_bad_fields_with_422(client):
    r = client.post("/templates", json={"name": "bad", "k": "lots", "batch_size": 0,
                                        "model_id": "abc"}, headers=JSON)
    assert r.status_code == 422
    body = r.get_json()
    assert set(body) == {"error", "errors"} and set(body["errors"]) == {"k", "batch_size",
                                                                         "model_id"}
    r = client.post("/templates", json={"k": "8"}, headers=JSON)  # missing name
    assert r.status_code == 422 and set(r.get_json()["errors"]) == {"name"}
    r = client.post("/templates", json={"name": "n" * 201}, headers=JSON)
    assert r.status_code == 422 and "at most 200" in r.get_json()["errors"]["name"]
    r = client.post("/templates", json={"name": "CPU quick look"}, headers=JSON)
    assert r.status_code == 422 and "already exists" in r.get_json()["errors"]["name"]
    r = client.post("/templates", json={"name": "s", "kind": "sweep",
                                        "total_steps": "10,20"}, headers=JSON)
    assert r.status_code == 422 and "total_steps" in r.get_json()["errors"]
    r = client.post("/templates", data="[1, 2]", content_type="application/json",
                    headers=JSON)  # not an object: no name
    assert r.status_code == 422
    # HTML: the page again with the message beside the field; htmx: the form, retargeted
    r = client.post("/templates", data={"name": ""})
    assert r.status_code == 422 and text_of(r.data.decode(), "error-name")
    r = client.post("/templates", data={"name": ""}, headers=HX)
    assert r.status_code == 422 and r.headers["HX-Retarget"] == "#template-form"
    assert "Give the template a name." in text_of(r.data.decode(), "error-name")
    assert Template.select().count() == 0


def test_create_from_training(client, ready):
    model, dataset = ready
    t = make_training(model, dataset, status="completed", steps=10)
    r = client.post("/templates", data={"from_training": str(t.id)}, headers=JSON)
    assert r.status_code == 201
    body = r.get_json()
    assert body["kind"] == "training" and body["name"]
    assert body["fields"]["model_id"] == model.id and body["fields"]["dataset_id"] == dataset.id
    assert body["fields"]["k"] == 32 and body["fields"]["batch_size"] == 128
    r = client.post("/templates", json={"from_training": 9999, "name": "x"}, headers=JSON)
    assert r.status_code == 404 and "9999" in r.get_json()["error"]
    r = client.post("/templates", data={"from_training": "junk"}, headers=JSON)
    assert r.status_code == 404


# ---------------------------------------------------------------------------- list / get
def test_list_json_and_html_presets_first(client, ready):
    client.post("/templates", json={"name": "mine", "k": "8"}, headers=JSON)
    items = client.get("/templates", headers=JSON).get_json()["items"]
    assert [i["id"] for i in items[:3]] == PRESET_IDS
    assert [i["builtin"] for i in items] == [True, True, True, False]
    assert all(set(i) == KEYS for i in items)
    assert items[3]["name"] == "mine"
    assert client.get("/templates?format=json").get_json()["items"] == items
    page = client.get("/templates").data.decode()
    rows = [e.get("id") for e in find_all(page, "li", class_="template-row")]
    assert rows[:3] == ["template-preset-cpu-quick-look", "template-preset-jetson-orin-nano-6gb",
                        "template-preset-l0-sweep-20-200"]
    assert "built-in" in text_of(page, "template-preset-cpu-quick-look")
    assert "built-in" not in text_of(page, rows[3])
    delete = element_by_id(page, f"{rows[3]}-delete")
    assert delete.get("hx-delete") == f"/templates/{items[3]['id']}"
    assert not any(e.get("id") == "template-preset-cpu-quick-look-delete"
                   for e in find_all(page, "button"))
    assert "active" in element_by_id(page, "tab-templates").classes
    frag = client.get("/templates", headers=HX).data.decode()
    assert frag.strip().startswith('<section class="panel" id="templates-list"')


def test_get_json_html_and_toml(client, ready):
    model, dataset = ready
    tid = client.post("/templates", json={"name": "Live one", "model_id": model.id,
                                          "dataset_id": dataset.id, "k": 16},
                      headers=JSON).get_json()["id"]
    body = client.get(f"/templates/{tid}", headers=JSON).get_json()
    assert set(body) == KEYS and body["fields"]["k"] == 16
    r = client.get(f"/templates/{tid}?format=toml")
    assert r.status_code == 200 and r.mimetype == "application/toml"
    assert "live-one.toml" in r.headers["Content-Disposition"]
    data = tomllib.loads(r.data.decode())
    assert data["model"] == "minilm-l6" and data["dataset"] == "kjv" and data["k"] == 16
    assert data["context_size"] == 64
    page = client.get(f"/templates/{tid}").data.decode()
    assert tomllib.loads(text_of(page, "template-toml-text").replace(" # ", "\n#")) is not None
    assert attr(page, "template-use", "href") == f"/trainings?template={tid}#training-config"
    preset = client.get("/templates/preset:l0-sweep-20-200", headers=JSON).get_json()
    assert preset["builtin"] is True and preset["kind"] == "sweep"
    assert preset["fields"]["k"] == [20, 40, 80, 120, 200]
    toml = tomllib.loads(client.get("/templates/preset:l0-sweep-20-200?format=toml")
                         .data.decode())
    assert toml["k"] == [20, 40, 80, 120, 200] and "model" not in toml
    page = client.get("/templates/preset:jetson-orin-nano-6gb").data.decode()
    assert "GiB" in text_of(page, "template-description")


def test_unknown_ids_are_404_never_500(client):
    for bad in ("0", "999", "abc", str(2**63), str(2**64 + 1), "-1", "1.5", "preset:nope",
                "%00"):
        r = client.get(f"/templates/{bad}", headers=JSON)
        assert r.status_code == 404, bad
        assert "error" in r.get_json()
        assert client.get(f"/templates/{bad}?format=toml").status_code == 404
        assert client.delete(f"/templates/{bad}", headers=JSON).status_code == 404
    assert client.get("/templates/abc").status_code == 404  # HTML too


# ---------------------------------------------------------------------------- delete
def test_delete(client):
    tid = client.post("/templates", json={"name": "gone", "k": "8"},
                      headers=JSON).get_json()["id"]
    r = client.delete(f"/templates/{tid}", headers=JSON)
    assert r.status_code == 200 and r.get_json() == {"deleted": tid}
    assert client.get(f"/templates/{tid}", headers=JSON).status_code == 404
    tid = client.post("/templates", json={"name": "gone too"}, headers=JSON).get_json()["id"]
    r = client.delete(f"/templates/{tid}", headers=HX)
    assert r.status_code == 200 and r.data == b""
    for preset in PRESET_IDS:
        r = client.delete(f"/templates/{preset}", headers=JSON)
        assert r.status_code == 409 and "read-only" in r.get_json()["error"]
    assert len(client.get("/templates", headers=JSON).get_json()["items"]) == 3


# ---------------------------------------------------------------------------- the form
def test_form_starts_from_a_template(client, ready):
    model, dataset = ready
    tid = client.post("/templates", json={"name": "deep", "encoder_type": "standard",
                                          "layer": 4, "l1_alpha": 3.5, "batch_size": 512,
                                          "tie_weights": True}, headers=JSON).get_json()["id"]
    page = client.get("/").data.decode()
    options = [o.get("value") for o in find_all(element_by_id(page, "input-template"),
                                                  "option")]
    assert options[:4] == ["", *PRESET_IDS] and str(tid) in options
    select = element_by_id(page, "input-template")
    assert select.get("hx-get") == "/trainings/form"
    frag = client.get(f"/trainings/form?template={tid}&model_id={model.id}"
                      f"&dataset_id={dataset.id}", headers=HX).data.decode()
    assert frag.strip().startswith('<form id="training-form"')
    assert selected(frag, "input-template") == [str(tid)]
    assert value_of(frag, "encoder_type") == "standard" and value_of(frag, "layer") == "4"
    assert value_of(frag, "l1_alpha") == "3.5" and value_of(frag, "batch_size") == "512"
    assert "checked" in element_by_id(frag, "input-tie_weights").attrs
    assert value_of(frag, "model_id") == str(model.id)  # kept: the template names none
    assert value_of(frag, "dataset_id") == str(dataset.id)
    # a preset, as a full page too
    page = client.get("/trainings/form?template=preset:cpu-quick-look").data.decode()
    assert value_of(page, "batch_size") == "1024" and value_of(page, "total_steps") == "150"
    assert value_of(page, "expansion_factor") == "4"
    assert selected(page, "input-template") == ["preset:cpu-quick-look"]
    assert client.get("/trainings/form?template=12345", headers=HX).status_code == 404
    assert client.get("/trainings?template=preset:nope").status_code == 404


def test_form_from_a_sweep_template_is_in_sweep_mode(client, ready):
    frag = client.get("/trainings/form?template=preset:l0-sweep-20-200",
                      headers=HX).data.decode()
    assert value_of(frag, "k") == "20,40,80,120,200"
    assert value_of(frag, "encoder_type") == "topk"
    modes = [e for e in find_all(frag, "input") if e.get("name") == "mode"
             and (e.get("type") == "hidden" or "checked" in e.attrs)]
    assert modes and {e.get("value") for e in modes} == {"sweep"}
    assert attr(frag, "training-form", "data-mode") == "sweep"  # posts to /sweeps
    assert attr(frag, "training-form", "hx-post") == "/sweeps"
    model, _ = ready  # a listed layer stays as typed (the single form would reset it)
    tid = client.post("/templates", json={"name": "layers", "kind": "sweep", "layer": [1, 4],
                                          "k": 8}, headers=JSON).get_json()["id"]
    frag = client.get(f"/trainings/form?template={tid}&model_id={model.id}",
                      headers=HX).data.decode()
    assert value_of(frag, "layer") == "1,4" and value_of(frag, "k") == "8"
    single = client.get("/trainings/form?template=preset:cpu-quick-look", headers=HX)
    assert not any(e.get("name") == "mode" and e.get("type") == "hidden"
                   for e in find_all(single.data.decode(), "input"))


def test_template_rows_stay_out_when_not_ready(client, ready):
    """A template's model that is not a ready row leaves the current choice."""
    model, dataset = ready
    other = make_model(name="other", status="failed")
    tid = client.post("/templates", json={"name": "t", "model_id": other.id, "k": 12},
                      headers=JSON).get_json()["id"]
    frag = client.get(f"/trainings/form?template={tid}&model_id={model.id}",
                      headers=HX).data.decode()
    assert value_of(frag, "model_id") == str(model.id) and value_of(frag, "k") == "12"


def test_use_this_config_fills_the_form_from_a_training(client, ready):
    model, dataset = ready
    second = make_model(name="second")
    t = make_training(second, dataset, status="completed", steps=10)
    card = client.get(f"/trainings/{t.id}", headers=HX).data.decode()
    link = element_by_id(card, f"training-{t.id}-use-config")
    assert link.tag == "a" and "Use this config" in link.text
    assert link.get("href") == f"/trainings?from_training={t.id}#training-config"
    page = client.get(f"/trainings?from_training={t.id}").data.decode()
    assert value_of(page, "model_id") == str(second.id)  # the training's model, not the first
    assert value_of(page, "dataset_id") == str(dataset.id)
    assert value_of(page, "layer") == "3" and value_of(page, "batch_size") == "128"
    assert value_of(page, "k") == "32" and value_of(page, "total_steps") == "1000"
    assert element_by_id(page, f"training-{t.id}")  # the cards are there too
    assert client.get("/trainings?from_training=777").status_code == 404
    frag = client.get(f"/trainings/form?from_training={t.id}", headers=HX).data.decode()
    assert value_of(frag, "auto_save_interval") == "100"
