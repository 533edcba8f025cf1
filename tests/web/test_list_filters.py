"""The jobs list's filters and sorting (``GET /trainings/list``, the page), the name and tags
route (``PATCH /trainings/<id>``) and the card's title, tags and compare checkbox."""

from __future__ import annotations

from typing import Any

import pytest

from worker.db import Sweep, Training, db

from ..html import attr, element_by_id, find_all, text_of
from .conftest import HX, JSON, make_dataset, make_model, make_training


def setup_row(t: Training, *, config: dict[str, Any] | None = None,
              eval_fvu: float | None = None, **fields: Any) -> Training:
    with db.connection_context():
        if config:
            t.config = {**t.config, **config}
        if eval_fvu is not None:
            t.result = {"eval": {"measured_on": "heldout_text", "fvu": eval_fvu, "l0": 30.0,
                                 "scored_tokens": 1000}}
        for k, v in fields.items():
            setattr(t, k, v)
        t.save()
        return Training.get_by_id(t.id)


@pytest.fixture
def runs(app: Any) -> dict[str, Training]:
    """Five trainings: two models, three encoder types, tags, a sweep, mixed statuses."""
    m1, m2, ds = make_model(), make_model(name="smollm2"), make_dataset()
    with db.connection_context():
        sweep = Sweep.create(name="s", model=m1, dataset=ds, config={})
    out = {
        "a": setup_row(make_training(m1, ds, "completed", steps=100, total=100),
                       eval_fvu=0.30, tags=["keep", "baseline"]),
        "b": setup_row(make_training(m1, ds, "completed", steps=100, total=100),
                       eval_fvu=0.10, config={"encoder_type": "standard", "l1_alpha": 5.0},
                       sweep=sweep),
        "c": setup_row(make_training(m2, ds, "training", steps=50),  # latest fvu 0.385
                       config={"encoder_type": "jumprelu"}, tags=["Keep"], sweep=sweep),
        "d": setup_row(make_training(m2, ds, "failed", steps=0), name="zz broken"),
        "e": setup_row(make_training(m1, ds, "completed", steps=100, total=100),
                       eval_fvu=0.20, name="Alpha"),
    }
    return out


def listed(client: Any, query: str) -> list[int]:
    resp = client.get(f"/trainings/list?{query}", headers=JSON)
    assert resp.status_code == 200, resp.get_json()
    return [item["id"] for item in resp.get_json()["items"]]


def test_each_filter_narrows(client, runs):
    a, b, c, d, e = (runs[k].id for k in "abcde")
    assert listed(client, "") == [e, d, c, b, a]  # newest first
    assert listed(client, "status=completed") == [e, b, a]
    assert listed(client, "status=failed") == [d]
    assert listed(client, f"model={runs['c'].model_id}") == [d, c]
    assert listed(client, "encoder_type=standard") == [b]
    assert listed(client, "encoder_type=topk") == [e, d, a]
    assert listed(client, "tag=keep") == [c, a]  # ignoring case
    assert listed(client, "tag=baseline") == [a]
    assert listed(client, f"sweep={runs['b'].sweep_id}") == [c, b]
    assert listed(client, f"status=completed&model={runs['a'].model_id}&tag=keep") == [a]
    assert listed(client, "tag=nothing") == []
    item = client.get(f"/trainings/{b}", headers=JSON).get_json()
    assert item["name"] == "L3 standard a=5" and item["sweep_id"] == runs["b"].sweep_id
    assert client.get(f"/trainings/{a}", headers=JSON).get_json()["tags"] == ["keep",
                                                                               "baseline"]


def test_sorting(client, runs):
    a, b, c, d, e = (runs[k].id for k in "abcde")
    # held-out FVU of finished runs, the live run's newest window; none last
    assert listed(client, "sort=fvu") == [b, e, a, c, d]
    assert listed(client, "sort=fvu&order=desc") == [c, a, e, b, d]
    assert listed(client, "sort=name") == [e, c, b, a, d]
    names = [i["name"] for i in client.get("/trainings/list?sort=name",
                                            headers=JSON).get_json()["items"]]
    assert names == sorted(names, key=str.casefold) and names[0] == "Alpha"
    assert names[-1] == "zz broken"
    assert listed(client, "sort=created&order=asc") == [a, b, c, d, e]
    assert listed(client, "sort=step") == [e, b, a, c, d]  # ties: newest first
    assert listed(client, "sort=step&order=asc") == [d, c, e, b, a]
    statuses = [i["status"] for i in client.get("/trainings/list?sort=status",
                                                headers=JSON).get_json()["items"]]
    assert statuses == ["training", "completed", "completed", "completed", "failed"]


def test_bad_filters(client, runs):
    for query, field in (("sort=size", "sort"), ("order=up", "order"),
                         ("status=running", "status"), ("encoder_type=gated", "encoder_type"),
                         ("model=abc", "model"), ("model=999", "model"),
                         ("sweep=999", "sweep"), ("tag=" + "x" * 41, "tag")):
        resp = client.get(f"/trainings/list?{query}", headers=JSON)
        assert resp.status_code == 422, query
        body = resp.get_json()
        assert set(body["errors"]) == {field} and body["error"], query
    both = client.get("/trainings/list?sort=size&status=nope", headers=JSON).get_json()
    assert set(both["errors"]) == {"sort", "status"}
    frag = client.get("/trainings/list?sort=size", headers=HX)
    assert frag.status_code == 422
    html = frag.data.decode()
    assert "Unknown sort 'size'" in text_of(html, "filters-error")
    assert len(find_all(html, "article")) == 5  # every job, with the message
    page = client.get("/?status=nope")
    assert page.status_code == 422
    assert attr(page.data.decode(), "filter-status", "aria-invalid") == "true"


def test_filter_bar_and_fragment(client, runs):
    page = client.get("/").data.decode()
    bar = element_by_id(page, "job-filters")
    assert bar.get("hx-get") == "/trainings/list" and bar.get("hx-push-url") == "true"
    assert bar.get("hx-target") == "#jobs"
    models = [o.text for o in find_all(element_by_id(page, "filter-model"), "option")]
    assert models == ["any", "minilm-l6", "smollm2"]
    tags = [o.get("value") for o in find_all(element_by_id(page, "filter-tag"), "option")]
    assert tags == ["", "baseline", "keep"]
    frag = client.get("/trainings/list?status=completed&sort=fvu", headers=HX).data.decode()
    assert frag.strip().startswith('<div id="jobs"')
    cards = [e.get("id") for e in find_all(frag, "article")]
    assert cards == [f"training-{runs[k].id}" for k in "bea"]
    # reloading the pushed URL gives the whole page, filtered, with the choices selected
    full = client.get("/trainings/list?status=completed&sort=fvu").data.decode()
    assert "Training Configuration" in full
    assert [e.get("id") for e in find_all(element_by_id(full, "jobs"), "article")] == cards
    chosen = [o.get("value") for o in find_all(element_by_id(full, "filter-status"), "option")
              if "selected" in o.attrs]
    assert chosen == ["completed"]
    none = client.get("/trainings/list?tag=nothing", headers=HX).data.decode()
    assert "No training matches these filters." in text_of(none, "jobs-empty")


def test_card_title_tags_and_compare_tick(client, runs):
    page = client.get("/").data.decode()
    a, e = runs["a"], runs["e"]
    assert text_of(page, f"training-{a.id}-title") == "L3 topk k=32"
    assert text_of(page, f"training-{e.id}-title") == "Alpha"
    sub = element_by_id(page, f"training-{a.id}-sub")
    assert "minilm-l6 + kjv" in sub.text
    assert [c.text for c in find_all(sub, "span", class_="chip")] == ["keep", "baseline"]
    tick = element_by_id(page, f"training-{a.id}-compare")
    assert (tick.get("type"), tick.get("name"), tick.get("value"), tick.get("form")) == \
        ("checkbox", "ids", str(a.id), "compare-form")
    assert attr(page, "compare-form", "action") == "/compare"
    assert element_by_id(page, "compare-selected").text == "Compare selected"
    edit = find_all(element_by_id(page, f"training-{e.id}-label-edit"), "form")[0]
    assert edit.get("hx-patch") == f"/trainings/{e.id}"
    assert attr(page, f"training-{e.id}-name-input", "value") == "Alpha"
    assert attr(page, f"training-{e.id}-name-input", "placeholder") == "L3 topk k=32"


def test_patch_name_and_tags(client, runs):
    a = runs["a"]
    resp = client.patch(f"/trainings/{a.id}", json={"name": "  first  try ",
                                                    "tags": ["x", " y ", "X"]}, headers=JSON)
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["name"] == "first try" and body["tags"] == ["x", "y"]
    # only tags, as a comma-separated string; the name stays
    body = client.patch(f"/trainings/{a.id}", json={"tags": "p, q"}, headers=JSON).get_json()
    assert body["name"] == "first try" and body["tags"] == ["p", "q"]
    # the htmx form: the card comes back with its new title and chips
    frag = client.patch(f"/trainings/{a.id}", data={"name": "renamed", "tags": "r"},
                        headers=HX)
    assert frag.status_code == 200
    html = frag.data.decode()
    assert html.strip().startswith(f'<article id="training-{a.id}"')
    assert text_of(html, f"training-{a.id}-title") == "renamed"
    assert [c.text for c in find_all(element_by_id(html, f"training-{a.id}-sub"), "span",
                                     class_="chip")] == ["r"]
    # blank name: the default again
    body = client.patch(f"/trainings/{a.id}", json={"name": ""}, headers=JSON).get_json()
    assert body["name"] == "L3 topk k=32" and body["tags"] == ["r"]
    body = client.patch(f"/trainings/{a.id}", json={"name": None}, headers=JSON).get_json()
    assert body["name"] == "L3 topk k=32"
    # POST form without JavaScript: back to the card
    resp = client.post(f"/trainings/{a.id}", data={"name": "posted"})
    assert resp.status_code == 302 and resp.headers["Location"].endswith(f"#training-{a.id}")
    assert client.get(f"/trainings/{a.id}", headers=JSON).get_json()["name"] == "posted"


def test_new_tags_reach_the_tag_filter(client, runs):
    """The filter bar was rendered with the tags of the page's load: a tag given on a card
    could not be filtered by until a reload. The card's answer now brings the tag filter out
    of band with the tags in use, the page's choice (its URL) still selected."""
    a = runs["a"]
    page = client.get("/?tag=keep").data.decode()
    assert "fresh" not in [o.text for o in find_all(element_by_id(page, "filter-tag"), "option")]
    frag = client.patch(f"/trainings/{a.id}", data={"tags": "keep, fresh"},
                        headers={**HX, "HX-Current-URL": "http://localhost/?tag=keep"})
    html = frag.data.decode()
    select = element_by_id(html, "filter-tag")
    assert attr(html, "filter-tag", "hx-swap-oob") == "true"
    options = {o.text: o for o in find_all(select, "option")}
    assert set(options) == {"any", "fresh", "keep"}  # "baseline" was only a's: gone with it
    assert "selected" in options["keep"].attrs and "selected" not in options["fresh"].attrs
    # from the training's own page (no filter bar there): the card alone
    html = client.patch(f"/trainings/{a.id}", data={"tags": "keep"},
                        headers={**HX, "HX-Current-URL": f"http://localhost/trainings/{a.id}"}
                        ).data.decode()
    assert "filter-tag" not in html
    # a new name alone changes no tag: the card alone
    html = client.patch(f"/trainings/{a.id}", data={"name": "n"},
                        headers={**HX, "HX-Current-URL": "http://localhost/"}).data.decode()
    assert "filter-tag" not in html


def test_patch_bad_input(client, runs):
    a = runs["a"]
    for payload, fields in (({"name": "n" * 201}, {"name"}),
                            ({"tags": ["a,b"]}, {"tags"}),
                            ({"tags": [f"t{i}" for i in range(21)]}, {"tags"}),
                            ({"tags": "x" * 41}, {"tags"}),
                            ({"name": "n" * 201, "tags": 5}, {"name", "tags"})):
        resp = client.patch(f"/trainings/{a.id}", json=payload, headers=JSON)
        assert resp.status_code == 422, payload
        body = resp.get_json()
        assert set(body["errors"]) == fields and body["error"], payload
    resp = client.patch(f"/trainings/{a.id}", json=["a"], headers=JSON)
    assert resp.status_code == 422
    assert client.get(f"/trainings/{a.id}", headers=JSON).get_json()["tags"] == ["keep",
                                                                                  "baseline"]
    assert client.patch("/trainings/999", json={"name": "x"}, headers=JSON).status_code == 404
    frag = client.patch(f"/trainings/{a.id}", data={"name": "n" * 201}, headers=HX)
    assert frag.status_code == 422 and frag.headers["HX-Retarget"] == "#flash"
    assert "at most 200" in frag.data.decode()
