"""The new-training form with the four encoder types and their options (form, curl, JSON)."""

from __future__ import annotations

import pytest

from worker import jobs
from worker.db import Training
from worker.engine import architectures
from worker.engine.architectures import Architecture
from worker.engine.config import option

from ..html import attr, element_by_id, find_all, ids, text_of
from .conftest import HX, JSON, make_dataset, make_model, make_training

BASE = {"layer": "2", "expansion_factor": "2", "batch_size": "128", "total_steps": "20",
        "device": "cpu"}


def _form(ready, **kw) -> dict[str, str]:
    model, dataset = ready
    return dict(BASE, model_id=str(model.id), dataset_id=str(dataset.id), **kw)


def test_form_offers_the_four_types_and_new_fields(client, ready):
    page = client.get("/").data.decode()
    offered = [o.get("value") for o in find_all(element_by_id(page, "input-encoder_type"),
                                                "option")]
    for t in ("standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"):
        assert t in offered, t
    for name in ("l0_coef", "tie_weights", "jumprelu_bandwidth", "jumprelu_init_threshold"):
        assert f'name="{name}"' in page, name
    assert attr(page, "field-k", "data-applies-to") == "topk batchtopk matryoshka_batchtopk"
    assert attr(page, "field-matryoshka_widths", "data-applies-to") == "matryoshka_batchtopk"
    assert attr(page, "field-l0_coef", "data-applies-to") == "jumprelu"
    assert attr(page, "field-tie_weights", "data-applies-to") == "standard"
    # The checkbox precedes its hidden "false", so form.get() reads the checked value.
    tie = find_all(page, "input", name="tie_weights")
    assert [e.get("type") for e in tie] == ["checkbox", "hidden"]
    assert tie[0].get("id") == "input-tie_weights"


def test_create_jumprelu_from_the_form(client, ready, enqueued):
    r = client.post("/trainings", data=_form(ready, encoder_type="jumprelu", l0_coef="2.5",
                                             jumprelu_bandwidth="0.01"), headers=JSON)
    assert r.status_code == 201, r.get_json()
    cfg = Training.get_by_id(r.get_json()["id"]).config
    assert cfg["encoder_type"] == "jumprelu" and cfg["l0_coef"] == 2.5
    assert cfg["jumprelu_bandwidth"] == 0.01 and cfg["jumprelu_init_threshold"] is None
    assert cfg["tie_weights"] is False
    assert enqueued and enqueued[-1][0] == "run_training"


def test_create_batchtopk_from_curl_style_post(client, ready, enqueued):
    r = client.post("/trainings", data=_form(ready, encoder_type="batchtopk", k="16"))
    assert r.status_code in (302, 303)
    cfg = Training.select().order_by(Training.id.desc()).first().config
    assert cfg["encoder_type"] == "batchtopk" and cfg["k"] == 16


def test_create_matryoshka_from_the_form_and_json(client, ready, enqueued):
    r = client.post("/trainings", data=_form(ready, encoder_type="matryoshka_batchtopk", k="8",
                                             matryoshka_widths="16, 32,64",
                                             latent_dim="64"), headers=JSON)
    assert r.status_code == 201, r.get_json()
    cfg = Training.get_by_id(r.get_json()["id"]).config
    assert cfg["encoder_type"] == "matryoshka_batchtopk" and cfg["k"] == 8
    assert cfg["matryoshka_widths"] == "16, 32,64"
    model, dataset = ready
    body = {"model_id": model.id, "dataset_id": dataset.id, "layer": 2, "latent_dim": 64,
            "encoder_type": "matryoshka_batchtopk", "matryoshka_widths": [16, 64]}
    r = client.post("/trainings", json=body, headers=JSON)
    assert r.status_code == 201, r.get_json()
    cfg = Training.get_by_id(r.get_json()["id"]).config
    assert cfg["matryoshka_widths"] == "[16, 64]"  # read as 16,64 (config.matryoshka_widths)
    blank = client.post("/trainings", data=_form(ready, encoder_type="matryoshka_batchtopk",
                                                 matryoshka_widths=""), headers=JSON)
    assert blank.status_code == 201, blank.get_json()
    assert Training.get_by_id(blank.get_json()["id"]).config["matryoshka_widths"] is None
    assert len(enqueued) == 3


@pytest.mark.parametrize(("widths", "says"), [
    ("32,16,64", "must increase from one to the next (got 32 then 16)"),
    ("16,32", "The last of the Matryoshka widths (32) must equal the number of latents (64)"),
    ("16,lots,64", "must be whole numbers separated by commas"),
    ("-16,64", "must be positive"),
])
def test_bad_matryoshka_widths_are_a_form_error(client, ready, enqueued, widths, says):
    form = _form(ready, encoder_type="matryoshka_batchtopk", latent_dim="64",
                 matryoshka_widths=widths)
    r = client.post("/trainings", data=form, headers=JSON)
    assert r.status_code == 422
    errors = r.get_json()["errors"]
    assert set(errors) == {"matryoshka_widths"} and says in errors["matryoshka_widths"]
    html = client.post("/trainings", data=form, headers=HX)
    assert html.status_code == 422 and "error-matryoshka_widths" in ids(html.data.decode())
    # The same text is ignored by a type that has no prefixes (its field is hidden).
    ok = client.post("/trainings", data=dict(form, encoder_type="batchtopk"), headers=JSON)
    assert ok.status_code == 201, ok.get_json()
    assert len(enqueued) == 1


def test_tie_weights_checkbox_with_standard(client, ready, enqueued):
    data = _form(ready, encoder_type="standard")
    data["tie_weights"] = ["true", "false"]  # checked box + its hidden field, browser order
    r = client.post("/trainings", data=data, headers=JSON)
    assert r.status_code == 201, r.get_json()
    assert Training.get_by_id(r.get_json()["id"]).config["tie_weights"] is True
    r = client.post("/trainings", data=dict(_form(ready, encoder_type="standard"),
                                            tie_weights="false"), headers=JSON)
    assert Training.get_by_id(r.get_json()["id"]).config["tie_weights"] is False


def test_tie_weights_with_topk_is_a_form_error(client, ready, enqueued):
    form = _form(ready, encoder_type="topk", tie_weights="true")
    r = client.post("/trainings", data=form, headers=JSON)
    assert r.status_code == 422
    errors = r.get_json()["errors"]
    assert set(errors) == {"tie_weights"} and "standard" in errors["tie_weights"]
    html = client.post("/trainings", data=form, headers=HX)
    assert html.status_code == 422
    assert "error-tie_weights" in ids(html.data.decode())
    bad = client.post("/trainings", data=_form(ready, encoder_type="jumprelu",
                                               jumprelu_bandwidth="0"), headers=JSON)
    assert bad.status_code == 422 and "jumprelu_bandwidth" in bad.get_json()["errors"]
    assert not enqueued


@pytest.fixture
def tiny_type():
    """An encoder type registered by this test module alone (never trained here: the job is
    recorded by ``enqueued``, so its implementation is never imported)."""
    architectures.register(Architecture("tiny-web", "a type only the web test knows.",
                                        impl="tests.nowhere:TinySAE", options=("k", "l1_alpha")))
    yield "tiny-web"
    architectures.unregister("tiny-web")


def test_a_registered_type_appears_in_the_form_and_queues(client, ready, enqueued, tiny_type):
    page = client.get("/").data.decode()
    offered = [o.get("value") for o in find_all(element_by_id(page, "input-encoder_type"),
                                                "option")]
    assert offered[-1] == tiny_type
    assert attr(page, "field-k", "data-applies-to") == \
        f"topk batchtopk matryoshka_batchtopk {tiny_type}"
    assert attr(page, "field-l1_alpha", "data-applies-to") == f"standard {tiny_type}"
    help_text = find_all(element_by_id(page, "field-encoder_type"), "p", class_="help")[0].text
    assert help_text == option("encoder_type").help and "only the web test knows" in help_text
    r = client.post("/trainings", data=_form(ready, encoder_type=tiny_type, k="4"), headers=JSON)
    assert r.status_code == 201, r.get_json()
    cfg = Training.get_by_id(r.get_json()["id"]).config
    assert (cfg["encoder_type"], cfg["k"]) == (tiny_type, 4)
    assert enqueued == [("run_training", (r.get_json()["id"], False))]


def test_form_help_is_the_options_help(client, ready):
    page = client.get("/").data.decode()
    advanced = ids(element_by_id(page, "training-more-fields"), "field-")
    for info in jobs.form_options():
        field = element_by_id(page, f"field-{info.name}")
        assert find_all(field, "p", class_="help")[0].text == " ".join(info.help.split()), \
            info.name
        assert (f"field-{info.name}" in advanced) == info.advanced, info.name


def test_create_from_a_json_body(client, ready, enqueued):
    model, dataset = ready
    body = {"model_id": model.id, "dataset_id": dataset.id, "encoder_type": "standard",
            "layer": 2, "expansion_factor": 2, "l1_alpha": 1.5, "tie_weights": True,
            "learning_rate": None, "total_steps": 20}
    r = client.post("/trainings", json=body, headers=JSON)
    assert r.status_code == 201, r.get_json()
    cfg = Training.get_by_id(r.get_json()["id"]).config
    assert (cfg["layer"], cfg["l1_alpha"], cfg["tie_weights"], cfg["learning_rate"]) == \
        (2, 1.5, True, None)
    old_names = {("layer_idx" if k == "layer" else k): v for k, v in body.items()}
    bad = client.post("/trainings", json=dict(old_names, layer_idx=9, k="many",
                                              tie_weights="maybe"), headers=JSON)
    assert bad.status_code == 422
    assert set(bad.get_json()["errors"]) == {"layer", "k", "tie_weights"}
    not_object = client.post("/trainings", json=[1, 2], headers=JSON)
    assert not_object.status_code == 422 and not_object.get_json()["errors"] == {
        "form": "The body must be a JSON object of fields."}
    assert len(enqueued) == 1


def test_report_page_shows_fvu_per_matryoshka_prefix(client, app, tmp_path):
    from .test_reports import write_eval

    t = make_training(make_model(), make_dataset(), "completed", steps=100, total=100,
                      out_dir=tmp_path / "m")
    prefixes = [{"width": 16, "fvu": 0.6125}, {"width": 48, "fvu": 0.3051},
                {"width": 120, "fvu": 0.1734}]
    write_eval(t.out_dir, format="sae-studio-eval/2", encoder_type="matryoshka_batchtopk",
               matryoshka_fvu=prefixes)
    html = client.get(f"/trainings/{t.id}/report").data.decode()
    table = element_by_id(html, "report-matryoshka")
    rows = [[c.text.strip() for c in find_all(tr, "th") + find_all(tr, "td")]
            for tr in find_all(find_all(table, "tbody")[0], "tr")]
    assert rows == [["16", "0.6125"], ["48", "0.3051"], ["120", "0.1734"]]
    data = client.get(f"/trainings/{t.id}/report", headers=JSON).get_json()
    assert data["matryoshka_fvu"] == prefixes
    # another type's report (and a report written before the key existed) has no such table
    other = make_training(make_model(), make_dataset(), "completed", steps=100, total=100,
                          out_dir=tmp_path / "t")
    write_eval(other.out_dir)
    assert "report-matryoshka" not in ids(client.get(f"/trainings/{other.id}/report")
                                          .data.decode())


def test_target_l0_from_the_form_and_json_and_its_bad_values(client, ready, enqueued):
    page = client.get("/").data.decode()
    assert attr(page, "field-target_l0", "data-applies-to") == "standard jumprelu"
    r = client.post("/trainings", data=_form(ready, encoder_type="jumprelu", target_l0="64"),
                    headers=JSON)
    assert r.status_code == 201, r.get_json()
    assert Training.get_by_id(r.get_json()["id"]).config["target_l0"] == 64.0
    model, dataset = ready
    body = {"model_id": model.id, "dataset_id": dataset.id, "layer": 2,
            "encoder_type": "standard", "target_l0": 40}
    r = client.post("/trainings", json=body, headers=JSON)
    assert r.status_code == 201, r.get_json()
    assert Training.get_by_id(r.get_json()["id"]).config["target_l0"] == 40.0
    blank = client.post("/trainings", data=_form(ready, encoder_type="standard", target_l0=""),
                        headers=JSON)
    assert Training.get_by_id(blank.get_json()["id"]).config["target_l0"] is None
    assert len(enqueued) == 3
    for bad, says in (("0", "greater than 0"), ("lots", "number"),
                      ("5000", "must be below the number of latents")):
        form = _form(ready, encoder_type="standard", target_l0=bad)
        r = client.post("/trainings", data=form, headers=JSON)
        assert r.status_code == 422, (bad, r.get_json())
        errors = r.get_json()["errors"]
        assert set(errors) == {"target_l0"} and says in errors["target_l0"], errors
        html = client.post("/trainings", data=form, headers=HX)
        assert html.status_code == 422 and "error-target_l0" in ids(html.data.decode())
    assert len(enqueued) == 3


def test_transcoder_from_the_form_json_and_its_card(client, ready, enqueued):
    """The target hook point's select starts blank (an SAE); choosing one makes a transcoder,
    whose card says what it maps; refusals come back as field errors."""
    page = client.get("/").data.decode()
    select = element_by_id(page, "input-target_hook_point")
    options = [(o.get("value"), o.get("selected")) for o in find_all(select, "option")]
    assert options[0][0] == "" and options[0][1] is not None
    assert {v for v, _ in options} == {"", "residual", "mlp_out", "attn_out", "mlp_in"}
    assert 'name="skip_connection"' in page
    r = client.post("/trainings", data=_form(ready, hook_point="mlp_in",
                                             target_hook_point="mlp_out",
                                             skip_connection="true"), headers=JSON)
    assert r.status_code == 201, r.get_json()
    t = Training.get_by_id(r.get_json()["id"])
    assert t.config["target_hook_point"] == "mlp_out" and t.config["skip_connection"] is True
    assert jobs.default_name(t) == "L2 mlpin→mlpout skip topk k=32"
    card = client.get(f"/trainings/{t.id}", headers=HX).data.decode()
    meta = " ".join(text_of(card, f"training-{t.id}-meta").split())
    assert "MLP input → MLP output (skip transcoder)" in meta
    sae = client.post("/trainings", data=_form(ready, target_hook_point=""), headers=JSON)
    assert sae.status_code == 201
    assert Training.get_by_id(sae.get_json()["id"]).config["target_hook_point"] is None
    bad = client.post("/trainings", data=_form(ready, hook_point="mlp_out",
                                               target_hook_point="mlp_in"), headers=JSON)
    assert bad.status_code == 422
    assert "must come after the hook point" in bad.get_json()["errors"]["target_hook_point"]
    lone = client.post("/trainings", data=_form(ready, skip_connection="true"), headers=JSON)
    assert "needs a target hook point" in lone.get_json()["errors"]["skip_connection"]
    model, dataset = ready
    r = client.post("/trainings", json={"model_id": model.id, "dataset_id": dataset.id,
                                        "layer": 2, "hook_point": "mlp_in",
                                        "target_hook_point": "mlp_out",
                                        "encoder_type": "jumprelu"}, headers=JSON)
    assert r.status_code == 201, r.get_json()
    assert len(enqueued) == 3
