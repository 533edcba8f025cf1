"""The Training area: the configuration form, cards, controls, metrics, checkpoints, export."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

from worker import jobs
from worker.db import Checkpoint, LanguageModel, Metric, Training

from ..html import attr, element_by_id, find_all, ids, text_of
from .conftest import CONFIG, HX, JSON, make_dataset, make_model, make_training

FAST = {"layer": "2", "expansion_factor": "2", "k": "8", "batch_size": "128",
        "total_steps": "20", "log_every": "5", "auto_save_interval": "10",
        "buffer_tokens": "2048", "eval_tokens": "256", "device": "cpu"}


def test_empty_index(client):
    page = client.get("/").data.decode()
    assert "Training Configuration" in page
    assert "No training jobs yet. Configure and start training above." in page
    assert "disabled" in element_by_id(page, "start-training").attrs
    assert element_by_id(page, "training-advanced").tag == "details"
    assert "Reset to defaults" in page
    assert "Choose a ready model to see the memory and time estimate." in page


def test_form_with_ready_rows(client, ready):
    model, dataset = ready
    make_model(status="preparing", name="not-yet")
    page = client.get("/").data.decode()
    assert f'<option value="{model.id}" selected' in page
    assert "not-yet" not in page  # only ready models are offered
    assert f'<option value="{dataset.id}" selected' in page
    assert "disabled" not in element_by_id(page, "start-training").attrs
    # the layer select comes from the model: 6 layers, the middle one chosen
    options = {o.text: o for o in find_all(page, "option")}
    assert options["Layer 3"].get("value") == "3" and "selected" in options["Layer 3"].attrs
    assert options["Layer 5"].get("value") == "5" and "selected" not in options["Layer 5"].attrs
    for name in ("encoder_type", "hook_point", "expansion_factor", "latent_dim", "k",
                 "l1_alpha", "learning_rate", "batch_size", "total_steps",
                 "auto_save_interval", "seed", "lr_schedule", "precision"):
        assert f'name="{name}"' in page, name
    assert 'hx-trigger="change from:#training-form' in page


def test_model_fields_fragment(client, ready):
    model, _ = ready
    other = make_model(name="big", n_layers=30, hook_points=["residual"])
    frag = client.get(f"/trainings/model-fields?model_id={other.id}", headers=HX)
    html = frag.data.decode()
    assert html.strip().startswith('<div id="training-model-fields"')
    layers = find_all(element_by_id(html, "input-layer"), "option")
    assert layers[-1].text == "Layer 29"
    assert [o.get("value") for o in layers if "selected" in o.attrs] == ["15"]
    hooks = find_all(element_by_id(html, "input-hook_point"), "option")
    assert [o.get("value") for o in hooks] == ["residual"]


def test_model_change_resets_layer_and_hook_point(client, ready):
    """The request still carries the previous model's layer and hook point (hx-include of the
    form); the new model's defaults win: its middle layer, its first hook point."""
    model, _ = ready
    other = make_model(name="smollm", n_layers=30, hook_points=["residual", "mlp_out"])
    frag = client.get(f"/trainings/model-fields?model_id={other.id}&layer=3"
                      "&hook_point=mlp_out", headers=HX).data.decode()
    layers = find_all(element_by_id(frag, "input-layer"), "option")
    assert [o.get("value") for o in layers if "selected" in o.attrs] == ["15"]
    hooks = find_all(element_by_id(frag, "input-hook_point"), "option")
    assert [o.get("value") for o in hooks if "selected" in o.attrs] == ["residual"]


def test_deletes_ask_first(client, ready):
    model, dataset = ready
    t = make_training(model, dataset, status="completed", steps=10, checkpoints=1)
    card = client.get(f"/trainings/{t.id}", headers=HX).data.decode()
    assert "hx-confirm" in element_by_id(card, f"training-{t.id}-delete").attrs
    models = client.get("/models").data.decode()
    delete = [b for b in find_all(models, "button") if b.get("hx-delete")]
    assert delete and all((b.get("hx-confirm") or "").startswith("Delete model") for b in delete)


def test_estimate(client, ready):
    model, _ = ready
    frag = client.get(f"/trainings/estimate?model_id={model.id}&batch_size=4096", headers=HX)
    assert frag.data.decode().strip().startswith('<div id="training-estimate"')
    assert b"estimate-memory" in frag.data and b"estimate-warning" not in frag.data
    over = client.get(f"/trainings/estimate?model_id={model.id}&latent_dim=4000000&"
                      "batch_size=65536", headers=HX).data.decode()
    assert "estimate-warning" in ids(over) and "budget" in over
    data = client.get(f"/trainings/estimate?model_id={model.id}", headers=JSON).get_json()
    assert data["fits"] is True and data["memory_bytes"] > 0 and data["budget_bytes"] == 6e9
    # a layer the model lacks: the form shows the middle one, a program learns it is invalid
    # (as POST /trainings says), whatever its size
    for layer in ("6", "99999999999999999999"):
        data = client.get(f"/trainings/estimate?model_id={model.id}&layer={layer}",
                          headers=JSON).get_json()
        assert data["memory_bytes"] is None and "layer" in data["invalid"], data
    assert client.get(f"/trainings/estimate?model_id={model.id}&layer=6&hook_point=nope",
                      headers=JSON).get_json()["invalid"].keys() >= {"layer", "hook_point"}
    frag = client.get(f"/trainings/estimate?model_id={model.id}&layer=6", headers=HX)
    assert b"estimate-memory" in frag.data  # the form's own: for the layer it shows


def test_choosing_no_model_clears_its_details(client, ready):
    """The form opens on the first ready model; choosing "Choose a ready model" (a blank
    model_id) shows no model's layers, facts or estimate."""
    model, _ = ready
    fields = client.get("/trainings/model-fields?model_id=&layer=3", headers=HX)
    body = fields.data.decode()
    assert "Choose a model to see its layers." in body and "6 layers" not in body
    assert "Layer 3" not in body
    data = client.get("/trainings/estimate?model_id=", headers=JSON).get_json()
    assert data["memory_bytes"] is None and data["time_range_s"] is None
    assert data["warning"] == "Choose a ready model to see the memory and time estimate."
    frag = client.get("/trainings/estimate?model_id=", headers=HX).data.decode()
    assert "Choose a ready model" in frag and "estimate-memory" not in ids(frag)
    opened = client.get("/trainings/model-fields", headers=HX).data.decode()  # afresh
    assert f"{model.name}: 6 layers" in opened


def test_a_dataset_longer_than_the_model_reads_is_a_form_error(client, ready, enqueued):
    """A dataset whose contexts are longer than the model's positions (MiniLM: 512) is refused
    by the form under the dataset, not queued to fail in the worker."""
    model, _ = ready
    LanguageModel.update(max_positions=512).where(LanguageModel.id == model.id).execute()
    long = make_dataset(name="kjv-1k", context_size=1024)
    r = client.post("/trainings", data={"model_id": str(model.id), "dataset_id": str(long.id)},
                    headers=JSON)
    assert r.status_code == 422 and enqueued == []
    assert r.json["errors"]["dataset_id"] == (
        "kjv-1k's contexts are 1,024 tokens long, but minilm-l6 reads at most 512 positions; "
        "choose a dataset with a context size of at most 512 (add the corpus again with a "
        "shorter one).")
    html = client.post("/trainings", data={"model_id": str(model.id),
                                           "dataset_id": str(long.id)}, headers=HX)
    assert "error-dataset_id" in ids(html.data.decode())
    fits = make_dataset(name="kjv-512", context_size=512)
    r = client.post("/trainings", data={"model_id": str(model.id), "dataset_id": str(fits.id),
                                        **FAST}, headers=JSON)
    assert r.status_code == 201, r.json


def test_create_invalid_422(client, ready, enqueued):
    model, dataset = ready
    form = {"model_id": str(model.id), "dataset_id": str(dataset.id), "layer": "99",
            "batch_size": "lots", "learning_rate": "fast", "encoder_type": "nope"}
    r = client.post("/trainings", data=form, headers=JSON)
    assert r.status_code == 422
    errors = r.get_json()["errors"]
    assert set(errors) == {"layer", "batch_size", "learning_rate", "encoder_type"}
    assert errors["layer"] == "Layer 99 is out of range: the model has 6 layers (0-5)."
    # the older name is still accepted, and its errors come back under the current one
    old = client.post("/trainings", data=dict(form, layer_idx="-1", layer=None), headers=JSON)
    assert old.get_json()["errors"]["layer"] == "Layer must be between 0 and 4,095 (got -1)."
    html = client.post("/trainings", data=form, headers=HX)
    assert html.status_code == 422 and html.headers["HX-Retarget"] == "#training-form"
    body = html.data.decode()
    assert body.strip().startswith('<form id="training-form"')
    assert "error-batch_size" in ids(body) and attr(body, "input-batch_size", "value") == "lots"
    assert "open" in element_by_id(body, "training-advanced").attrs
    page = client.post("/trainings", data={})
    assert page.status_code == 422 and "error-model_id" in ids(page.data.decode())
    assert b"<html" in page.data
    assert enqueued == [] and Training.select().count() == 0


def test_create_queues_and_renders(client, ready, enqueued):
    model, dataset = ready
    form = {"model_id": str(model.id), "dataset_id": str(dataset.id), **FAST}
    r = client.post("/trainings", data=form, headers=JSON)
    assert r.status_code == 201
    tid = r.get_json()["id"]
    assert enqueued == [("run_training", (tid, False))]
    card = client.post("/trainings", data=form, headers=HX)
    assert card.status_code == 201
    html = card.data.decode()
    tid2 = tid + 1
    assert html.startswith(f'<article id="training-{tid2}"')
    assert f'hx-ext="ws" ws-connect="/ws/trainings/{tid2}"' in html
    assert '<form id="training-form"' in html and 'hx-swap-oob="true"' in html
    assert "jobs-empty" not in ids(html)  # no out-of-band removal: CSS hides the empty state
    plain = client.post("/trainings", data=form)
    assert plain.status_code == 302 and plain.headers["Location"].startswith("/#training-")
    page = client.get("/").data.decode()
    cards = [int(e.get("id").removeprefix("training-")) for e in find_all(page, "article")]
    assert cards == sorted(cards, reverse=True) and len(cards) == 3  # newest first
    assert "minilm-l6 + kjv" in page and "queued" in page


def test_card_parts_running(client, ready):
    model, dataset = ready
    t = make_training(model, dataset, status="training", steps=400, checkpoints=2)
    html = client.get(f"/trainings/{t.id}", headers=HX).data.decode()
    for part in ("status", "progress", "tiles", "charts", "buttons", "log", "checkpoints"):
        assert f"training-{t.id}-{part}" in ids(html), part
    assert html.startswith(f'<article id="training-{t.id}"') and "ws-connect" in html
    assert "40.0%" in html and "Step 400 / 1,000" in html and "ETA" in html
    assert "Elapsed 2m" in html
    assert "badge-training" in html
    assert "0.2300" in html  # loss, 4 decimals
    assert "1.40e-3" in html and "25k tokens/s" in html
    assert "Checkpoints (2)" in html and "★ best" in html and "Save now" in html
    # the retention rule names its N (it said "every Nth"; keep_every is 5000 by default)
    assert element_by_id(html, f"training-{t.id}-retention").text == (
        "Auto-save every 100 steps; keeps the first, newest and best, those saved with Save "
        "now and those at multiples of 5,000 steps.")
    assert ">Pause</button>" in html and ">Stop</button>" in html
    assert ">Retry</button>" not in html and ">Delete</button>" in html  # checkpoint delete
    assert f"training-{t.id}-delete" not in ids(html)
    assert html.count("<circle") == 80  # 40 loss + 40 L0 points
    assert "log line 2" in html
    page = client.get(f"/trainings/{t.id}").data.decode()
    assert "<html" in page and f"training-{t.id}-tiles" in ids(page)


def test_card_buttons_by_state(client, ready):
    model, dataset = ready
    paused = make_training(model, dataset, status="paused", steps=50)
    failed = make_training(model, dataset, status="failed", steps=50, error="CUDA out of memory.")
    done = make_training(model, dataset, status="completed", steps=1000)
    h = client.get(f"/trainings/{paused.id}", headers=HX).data.decode()
    assert ">Resume</button>" in h and ">Stop</button>" in h and ">Pause</button>" not in h
    h = client.get(f"/trainings/{failed.id}", headers=HX).data.decode()
    assert ">Retry</button>" in h and "CUDA out of memory." in h and "ws-connect" not in h
    assert f"training-{failed.id}-delete" in ids(h)
    h = client.get(f"/trainings/{done.id}", headers=HX).data.decode()
    assert ">Retry</button>" not in h and "100.0%" in h and "ws-connect" not in h
    assert f"training-{done.id}-delete" in ids(h)
    assert "ETA" not in h  # it said "ETA (to last step) —" on every finished card
    h = client.get(f"/trainings/{failed.id}", headers=HX).data.decode()
    assert f"training-{failed.id}-eta" not in ids(h)
    h = client.get(f"/trainings/{paused.id}", headers=HX).data.decode()
    assert text_of(h, f"training-{paused.id}-eta") == "ETA (to last step) paused"


def test_training_json_and_list(client, ready):
    model, dataset = ready
    t = make_training(model, dataset, status="training", steps=100)
    data = client.get(f"/trainings/{t.id}", headers=JSON).get_json()
    assert data["id"] == t.id and data["status"] == "training" and data["current_step"] == 100
    assert data["latest"]["step"] == 100 and data["latest"]["dead_neurons"] == 2
    assert data["latest"]["learning_rate"] == 1.4e-3
    assert data["model_name"] == "minilm-l6"
    items = client.get("/trainings", headers=JSON).get_json()["items"]
    assert [i["id"] for i in items] == [t.id]
    assert client.get("/trainings/999", headers=JSON).status_code == 404
    assert client.get("/trainings/999", headers=JSON).get_json() == {
        "error": "Training 999 does not exist."}
    assert client.get("/trainings/999").status_code == 404


def test_controls_and_409(client, ready, enqueued):
    model, dataset = ready
    t = make_training(model, dataset, status="training", steps=10)
    r = client.post(f"/trainings/{t.id}/pause", headers=JSON)
    assert r.status_code == 200 and r.get_json()["requested"] == "pause"
    again = client.post(f"/trainings/{t.id}/resume", headers=JSON)
    assert again.status_code == 409 and "only a paused training" in again.get_json()["error"]
    Training.update(status="paused", requested=None).where(Training.id == t.id).execute()
    frag = client.post(f"/trainings/{t.id}/resume", headers=HX).data.decode()
    status = element_by_id(frag, f"training-{t.id}-status")
    assert (status.tag, status.classes, status.get("hx-swap-oob")) == (
        "div", ["card-status"], "true")
    assert f"training-{t.id}-buttons" in ids(frag)
    stop = client.post(f"/trainings/{t.id}/stop", headers=JSON).get_json()
    assert stop["status"] == "stopping"
    Training.update(status="stopped", requested=None).where(Training.id == t.id).execute()
    retry = client.post(f"/trainings/{t.id}/retry", headers=HX).data.decode()
    assert retry.startswith(f'<article id="training-{t.id}"') and "ws-connect" in retry
    assert enqueued == [("run_training", (t.id, True))]
    plain = client.post(f"/trainings/{t.id}/stop")
    assert plain.status_code == 302
    conflict = client.post(f"/trainings/{t.id}/pause", headers=HX)
    assert conflict.status_code == 409 and b"only a running training" in conflict.data
    assert client.post("/trainings/999/stop", headers=JSON).status_code == 404
    assert client.post(f"/trainings/{t.id}/explode").status_code in (404, 405)


def test_delete_training(client, ready, tmp_path):
    model, dataset = ready
    t = make_training(model, dataset, status="training", out_dir=tmp_path)
    assert client.delete(f"/trainings/{t.id}", headers=JSON).status_code == 409
    Training.update(status="completed").where(Training.id == t.id).execute()
    assert client.delete(f"/trainings/{t.id}", headers=HX).data == b""
    assert client.delete(f"/trainings/{t.id}", headers=JSON).status_code == 404


def test_metrics_json_csv_html(client, ready):
    model, dataset = ready
    t = make_training(model, dataset, status="training", steps=100)
    rows = client.get(f"/trainings/{t.id}/metrics", headers=JSON).get_json()["rows"]
    assert [r["step"] for r in rows] == list(range(10, 101, 10))
    r = client.get(f"/trainings/{t.id}/metrics?format=csv")
    assert r.mimetype == "text/csv"
    table = list(csv.DictReader(io.StringIO(r.data.decode())))
    assert len(table) == 10 and table[0]["step"] == "10" and "loss" in table[0]
    assert "learning_rate" in table[0]
    page = client.get(f"/trainings/{t.id}/metrics").data.decode()
    assert "metrics-table" in ids(page) and f"training-{t.id}-loss-chart" in ids(page)
    frag = client.get(f"/trainings/{t.id}/metrics", headers=HX).data.decode()
    assert frag.startswith(f'<div id="training-{t.id}-charts"')
    assert client.get("/trainings/999/metrics?format=csv").status_code == 404
    assert client.get(f"/trainings/{t.id}/metrics?format=html").mimetype == "text/html"


def test_an_unknown_format_is_refused_naming_the_choices(client, ready):
    """``?format=xml`` got the HTML page as if it were understood; now a 422 names the route's
    formats, and each route's own format still answers."""
    model, dataset = ready
    t = make_training(model, dataset, status="training", steps=100)
    r = client.get(f"/trainings/{t.id}/metrics?format=xml", headers=JSON)
    assert r.status_code == 422
    assert r.get_json()["error"] == "format must be one of json, html, csv (got 'xml')."
    r = client.get(f"/trainings/{t.id}?format=csv")
    assert r.status_code == 422 and "format must be one of json, html (got &#39;csv&#39;)" in \
        r.data.decode()
    assert client.get(f"/trainings/{t.id}?format=json").get_json()["id"] == t.id
    assert client.get("/templates/1?format=yaml", headers=JSON).get_json()["error"] == \
        "format must be one of json, html, toml (got 'yaml')."
    assert client.get("/static/app.js?format=x").status_code == 200  # files: not a route's
    long = client.get(f"/trainings/{t.id}?format={'x' * 500}", headers=JSON).get_json()
    assert long["error"] == f"format must be one of json, html (got '{'x' * 40}...')."


def test_checkpoints(client, ready, tmp_path):
    model, dataset = ready
    t = make_training(model, dataset, status="completed", steps=300, checkpoints=3,
                      out_dir=tmp_path)
    items = client.get(f"/trainings/{t.id}/checkpoints", headers=JSON).get_json()["items"]
    assert [i["step"] for i in items] == [300, 200, 100]
    for key in ("id", "step", "loss", "size_bytes", "is_best", "created_at", "download_url"):
        assert key in items[0]
    assert items[0]["is_best"] is True
    dl = client.get(items[0]["download_url"])
    assert dl.status_code == 200 and dl.data == b"x" * 102
    assert "attachment" in dl.headers["Content-Disposition"]
    assert ".safetensors" in dl.headers["Content-Disposition"]
    dl.close()
    frag = client.delete(f"/checkpoints/{items[2]['id']}", headers=HX).data.decode()
    count = element_by_id(frag, f"training-{t.id}-checkpoints-count")
    assert count.get("hx-swap-oob") == "true" and count.text.startswith("Checkpoints (2)")
    assert client.delete(f"/checkpoints/{items[1]['id']}", headers=JSON).get_json() == {
        "deleted": items[1]["id"]}
    assert Checkpoint.select().count() == 1
    assert client.delete(f"/checkpoints/{items[1]['id']}", headers=JSON).status_code == 404
    assert client.get("/checkpoints/999/download").status_code == 404
    html = client.get(f"/trainings/{t.id}/checkpoints", headers=HX).data.decode()
    assert "Checkpoints (1)" in html
    # saving needs a running training
    r = client.post(f"/trainings/{t.id}/checkpoints", headers=JSON)
    assert r.status_code == 409
    running = make_training(model, dataset, status="training", steps=10)
    r = client.post(f"/trainings/{running.id}/checkpoints", headers=JSON)
    assert r.status_code == 202 and r.get_json()["requested"] == "save"
    frag = client.post(f"/trainings/{running.id}/checkpoints", headers=HX).data.decode()
    assert f"training-{running.id}-checkpoints" in ids(frag)


def test_save_now_answers_202_with_the_request(client, ready):
    """``POST /trainings/<id>/checkpoints`` (Save now) answers 202 ``{id, requested, status}``,
    as README's table of training actions says: the request the worker picks up, or nothing
    asked of a paused training (it saved when it paused); 409 otherwise."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert "| `POST /trainings/<id>/checkpoints` (Save now) | 202 `{id, requested, status}`" \
        in readme
    model, dataset = ready
    running = make_training(model, dataset, status="training", steps=10)
    r = client.post(f"/trainings/{running.id}/checkpoints", headers=JSON)
    assert (r.status_code, r.get_json()) == (
        202, {"id": running.id, "requested": "save", "status": "training"})
    paused = make_training(model, dataset, status="paused", steps=10)
    r = client.post(f"/trainings/{paused.id}/checkpoints?format=json")
    assert (r.status_code, r.get_json()) == (
        202, {"id": paused.id, "requested": None, "status": "paused"})
    queued = make_training(model, dataset, status="queued")
    r = client.post(f"/trainings/{queued.id}/checkpoints", headers=JSON)
    assert r.status_code == 409 and "only while it is training or paused" in r.get_json()["error"]


def test_export_zip(client, ready, tmp_path):
    model, dataset = ready
    t = make_training(model, dataset, status="completed", steps=100, out_dir=tmp_path,
                      export=True)
    card = client.get(f"/trainings/{t.id}", headers=HX).data.decode()
    assert f'href="/trainings/{t.id}/export"' in card and "Download SAELens export" in card
    r = client.get(f"/trainings/{t.id}/export")
    assert r.status_code == 200 and r.mimetype == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(r.data)).namelist()
    r.close()
    assert sorted(names) == ["saelens/cfg.json", "saelens/sae_weights.safetensors"]
    running = make_training(model, dataset, status="training", out_dir=tmp_path)
    assert client.get(f"/trainings/{running.id}/export", headers=JSON).status_code == 409
    assert client.get("/trainings/999/export", headers=JSON).status_code == 404


def test_reset_form(client, ready):
    model, dataset = ready
    frag = client.get(f"/trainings/form?model_id={model.id}&dataset_id={dataset.id}",
                      headers=HX).data.decode()
    assert frag.strip().startswith('<form id="training-form"')
    assert f'<option value="{model.id}" selected' in frag
    assert client.get("/trainings/form").status_code == 200
    assert b"training-jobs" in client.get("/trainings").data
    frag = client.get("/trainings", headers=HX).data.decode()
    assert frag.strip().startswith('<div id="jobs"')


def test_field_help_whole_on_demand(client, ready):
    """The form cuts help at two lines (CSS); the whole sentence is in the page (and the title),
    not shown on focus (the form would jump on blur), and a longer help has a "more" toggle
    after it (a <details>: keyboard and touch, no hover) that shows it whole while open; the
    page and the form's htmx fragment render the same fields."""
    model, dataset = ready
    css = client.get("/static/app.css").data.decode()
    assert ":focus-within .help" not in css
    assert ".field:has(> .help-more[open]) .help" in css
    assert ".help:hover" not in css  # readable without hovering
    page = client.get("/").data.decode()
    frag = client.get(f"/trainings/form?model_id={model.id}&dataset_id={dataset.id}",
                      headers=HX).data.decode()
    for html in (page, frag):
        form = element_by_id(html, "training-form")
        helps = find_all(form, "p", class_="help")
        assert len(helps) > 40 and all(h.get("title") == h.text for h in helps)
        for info in jobs.form_options():
            field = element_by_id(form, f"field-{info.name}")
            help_p = element_by_id(field, f"help-{info.name}")
            assert help_p.text == " ".join(info.help.split()), info.name
            toggles = find_all(field, "details", class_="help-more")
            if len(info.help) > 40:
                assert len(toggles) == 1, info.name
                summary = find_all(toggles[0], "summary")[0]
                assert summary.text == "moreless" and summary.get("aria-label")
                assert field.children.index(toggles[0]) > field.children.index(help_p)
            else:
                assert toggles == [], info.name
    assert len(find_all(element_by_id(page, "field-lr_schedule"), "details")) == 1
    assert find_all(element_by_id(page, "field-model_id"), "details") == []  # a short help


def test_card_states_windows_and_scales(client, ready):
    """Dead latents say over which tokens (the dead window, or every token so far), MSE on which
    scale, tokens/s over which window: the report's figures use other windows and scales."""
    model, dataset = ready
    t = make_training(model, dataset, status="training", steps=300)  # 300 x 128 tokens so far
    Training.update(config=dict(CONFIG, total_steps=1000, lr_decay_frac=0.2)).where(
        Training.id == t.id).execute()
    card = client.get(f"/trainings/{t.id}", headers=HX).data.decode()
    dead = element_by_id(card, f"training-{t.id}-dead-window")
    assert "no fire in last 38.4k tokens" in dead.text and "38,400" in dead.get("title")
    assert "(training scale)" in element_by_id(card, f"training-{t.id}-tile-loss").text
    assert "(last window)" in element_by_id(card, f"training-{t.id}-throughput").text
    assert f"training-{t.id}-run-rate" not in ids(card)  # running: no whole-run rate yet
    lr = element_by_id(card, f"training-{t.id}-lr-schedule").text
    assert lr == "constant, then to 0 over the last 20% of steps"
    # finished: the whole run's rate (the result's tokens_per_s) beside the last window's
    done = make_training(model, dataset, status="completed", steps=300, total=300,
                         result={"tokens_per_s": 2709.6, "tokens": 38400, "steps": 300})
    Training.update(config=dict(CONFIG, total_steps=300, lr_schedule="cosine")).where(
        Training.id == done.id).execute()
    card = client.get(f"/trainings/{done.id}", headers=HX).data.decode()
    rate = element_by_id(card, f"training-{done.id}-throughput").text
    assert "2.71k tokens/s (whole run)" in rate and "(last window)" in rate
    assert element_by_id(card, f"training-{done.id}-lr-schedule").text == "cosine decay to 0"


def test_card_charts_the_steered_coefficient_when_target_l0_is_set(client, ready):
    model, dataset = ready
    steered = make_training(model, dataset, status="training", steps=50)
    steered.config = dict(steered.config, encoder_type="jumprelu", target_l0=24.0)
    steered.save()
    coefs = [5.0, 5.0, 6.1, 7.4, 6.9]
    for m, coef in zip(Metric.select().where(Metric.training == steered.id)
                       .order_by(Metric.step), coefs, strict=True):
        m.data = dict(m.data, sparsity_coef=coef)
        m.save()
    fixed = make_training(model, dataset, status="training", steps=50)
    for page in (client.get(f"/trainings/{steered.id}").data.decode(),
                 client.get(f"/trainings/{steered.id}/metrics", headers=HX).data.decode()):
        chart = element_by_id(page, f"training-{steered.id}-coef-chart")
        assert chart is not None and attr(page, f"training-{steered.id}-coef-chart",
                                          "data-points") == "5"
        assert "L0 coefficient, steered toward L0 24" in page
        assert "step 40: coefficient 7.4" in page
    tile = element_by_id(client.get(f"/trainings/{steered.id}").data.decode(),
                         f"training-{steered.id}-tile-l0")
    assert "· target 24.0" in tile.text
    page = client.get(f"/trainings/{fixed.id}").data.decode()
    assert f"training-{fixed.id}-l0-chart" in ids(page)
    assert f"training-{fixed.id}-coef-chart" not in ids(page)
    assert "target" not in element_by_id(page, f"training-{fixed.id}-tile-l0").text
