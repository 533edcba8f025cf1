"""Models and Datasets areas: pages, fragments, JSON API, validation, 404/409."""

from __future__ import annotations

import io
from pathlib import Path

from worker import settings

from ..html import element_by_id, find_all, ids, text_of
from .conftest import HX, JSON, make_dataset, make_model, make_training


def test_models_page_and_json(client, app):
    page = client.get("/models")
    assert page.status_code == 200
    assert b"No models yet" in page.data and "model-form" in ids(page.data.decode())
    model = make_model()
    make_model(status="preparing", name="slow", progress=0.4, message="Loading the model...",
               worker="gpu-box:5")
    page = client.get("/models").data.decode()
    assert f"model-{model.id}" in ids(page) and "384" in page
    assert 'hx-trigger="every 1s"' in page  # the preparing row polls itself
    assert "Loading the model... (on gpu-box:5)" in page  # which worker prepares it
    listing = client.get("/models", headers=JSON).get_json()
    assert [m["name"] for m in listing["items"]] == ["slow", "minilm-l6"]
    assert [m["worker"] for m in listing["items"]] == ["gpu-box:5", None]


def test_model_detail_html_fragment_json(client, app):
    model = make_model()
    page = client.get(f"/models/{model.id}").data.decode()
    assert "<html" in page and "Hook points" in page and "BertModel" in page
    assert "86.6 MiB" in page  # 22.7M float32 parameters
    frag = client.get(f"/models/{model.id}", headers=HX).data.decode()
    assert "<html" not in frag and frag.strip().startswith(f'<li id="model-{model.id}"')
    data = client.get(f"/models/{model.id}", headers=JSON).get_json()
    for key in ("id", "name", "source", "status", "error", "n_layers", "hidden_dim",
                "hook_points"):
        assert key in data
    assert data["n_layers"] == 6


def test_add_model_validation_and_queue(client, enqueued):
    bad = client.post("/models", data={"source": " "}, headers=JSON)
    assert bad.status_code == 422 and "source" in bad.get_json()["errors"]
    html = client.post("/models", data={"source": ""}, headers=HX)
    assert html.status_code == 422 and "error-source" in ids(html.data.decode())
    assert "model-form" in ids(html.data.decode())
    assert enqueued == []
    ok = client.post("/models", data={"source": "minilm-l6", "name": "mini"}, headers=JSON)
    assert ok.status_code == 201 and ok.get_json()["name"] == "mini"
    assert enqueued == [("prepare_model", (ok.get_json()["id"],))]
    frag = client.post("/models", data={"source": "minilm-l6"}, headers=HX).data.decode()
    assert 'hx-swap-oob="afterbegin:#models-rows"' in frag and "model-form" in ids(frag)
    plain = client.post("/models", data={"source": "minilm-l6"})
    assert plain.status_code == 302


def test_delete_model(client, app):
    model, dataset = make_model(), make_dataset()
    t = make_training(model, dataset, status="training")
    busy = client.delete(f"/models/{model.id}", headers=JSON)
    assert busy.status_code == 409 and "stop it first" in busy.get_json()["error"]
    flash = client.delete(f"/models/{model.id}", headers=HX)
    assert flash.status_code == 409 and flash.headers["HX-Retarget"] == "#flash"
    from worker.db import Training
    Training.update(status="completed").where(Training.id == t.id).execute()
    assert client.delete(f"/models/{model.id}", headers=HX).data == b""
    assert client.delete(f"/models/{model.id}", headers=JSON).status_code == 404
    assert client.get(f"/models/{model.id}", headers=JSON).get_json()["error"] == \
        f"Model {model.id} does not exist."
    assert client.get("/models/999").status_code == 404


def test_datasets_page_detail_json(client, app):
    assert b"No datasets yet" in client.get("/datasets").data
    d = make_dataset()
    page = client.get(f"/datasets/{d.id}").data.decode()
    assert "In the beginning God created" in page and "31,102" in page
    data = client.get(f"/datasets/{d.id}", headers=JSON).get_json()
    for key in ("id", "name", "status", "progress", "n_documents", "n_tokens", "error"):
        assert key in data
    assert client.get("/datasets", headers=JSON).get_json()["items"][0]["id"] == d.id
    assert client.get(f"/datasets/{d.id}", headers=HX).data.decode().strip() \
        .startswith(f'<li id="dataset-{d.id}"')


def test_dataset_form_labels_help_and_errors_come_from_the_options(client, enqueued):
    """The form's labels and help say what the validation checks: the options' labels and
    bounds (Context size 2-131,072 tokens, Corpus tokens), and an error names its field as the
    label above it does."""
    def label_and_help(page: str, name: str) -> tuple[str, str]:
        field = element_by_id(page, f"field-{name}")
        return find_all(field, "label")[0].text, find_all(field, "p")[0].text

    page = client.get("/datasets").data.decode()
    assert label_and_help(page, "context_size") == (
        "Context size",
        "Tokens per context when the corpus is tokenised. Between 2 and 131,072 tokens.")
    assert label_and_help(page, "max_tokens") == (
        "Corpus tokens",
        "Tokens of the corpus to tokenise. Blank = all of it. At least the context size.")
    assert "4096" not in page
    bad = client.post("/datasets", data={"source": "kjv", "context_size": "1",
                                         "max_tokens": "abc"}, headers=HX)
    assert bad.status_code == 422
    form = bad.data.decode()
    assert label_and_help(form, "context_size") == (
        "Context size", "Context size must be between 2 and 131,072 (got 1).")
    assert label_and_help(form, "max_tokens") == (
        "Corpus tokens", "Corpus tokens must be a whole number (got 'abc').")
    ok = client.post("/datasets", data={"source": "kjv", "context_size": "8192"}, headers=JSON)
    assert ok.status_code == 201 and ok.get_json()["context_size"] == 8192  # within the help
    assert [name for name, _ in enqueued] == ["prepare_dataset"]


def test_dataset_list_and_detail_tell_corpus_and_tokenised_documents_apart(client, app):
    """The corpus's documents and the token store's are both shown, each named; a row prepared
    before the store's count existed (or not tokenised yet) shows the corpus's alone."""
    d = make_dataset(n_documents=31102, n_documents_tokenised=5718, n_tokens=200_000,
                     context_size=128)
    old = make_dataset(name="old", n_documents=31102, n_tokens=16384)
    page = client.get("/datasets").data.decode()
    assert element_by_id(page, f"dataset-{d.id}").text.endswith(
        "31,102 docs (5,718 tokenised) · 200k tokens · ctx 128 Delete")
    assert "31,102 docs · 16.4k tokens · ctx 64" in element_by_id(page, f"dataset-{old.id}").text
    detail = client.get(f"/datasets/{d.id}").data.decode()
    facts = {dt.text: dd.text for dt, dd in zip(find_all(detail, "dt"), find_all(detail, "dd"),
                                                strict=True)}
    assert facts["Documents in the corpus"] == "31,102"
    assert facts["Documents tokenised"] == "5,718" == text_of(detail,
                                                               "dataset-documents-tokenised")
    assert facts["Corpus tokens"] == "whole corpus" and facts["Context size"] == "128 tokens"
    assert "dataset-documents-tokenised" not in ids(client.get(f"/datasets/{old.id}").data
                                                    .decode())
    data = client.get(f"/datasets/{d.id}", headers=JSON).get_json()
    assert (data["n_documents"], data["n_documents_tokenised"]) == (31102, 5718)
    assert client.get(f"/datasets/{old.id}", headers=JSON).get_json()[
        "n_documents_tokenised"] is None


def _token_store(dataset: str, tokenizer: str, context_size: int, n_tokens: int,
                 n_documents: int, created_at: str) -> None:
    """A token store's meta.json in the data folder, as ``build_token_store`` writes it (the
    tokens themselves are not read by the pages)."""
    import json

    from worker.engine.pipeline import token_store_dir

    folder = token_store_dir(settings.data_dir(), dataset, tokenizer, context_size, None, "text")
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({
        "n_contexts": n_tokens // context_size, "context_size": context_size,
        "n_tokens": n_tokens, "n_documents": n_documents, "max_tokens": None,
        "tokenizer": tokenizer, "source": dataset, "text_field": "text",
        "created_at": created_at}))


def test_dataset_page_names_every_model_it_was_tokenised_with(client, app):
    """Two models tokenised one dataset (its preparation with one, a training with the other):
    the page and the JSON name both, each with its store's tokens and documents, not only the
    model its preparation's message names; a store of another context size is another
    dataset's. With no store in the data folder the note stays and the list is empty."""
    mini = make_model()
    smol = make_model(name="smollm2-135m", source="smollm2-135m", path="/tmp/sae-web-smollm")
    d = make_dataset(n_documents_tokenised=300, message="Tokenised with minilm-l6 (256 contexts).")
    _token_store("kjv", mini.path, 64, 16384, 300, "2025-01-01T10:00:00+00:00")
    _token_store("kjv", smol.path, 64, 15360, 310, "2025-01-02T10:00:00+00:00")
    _token_store("kjv", smol.path, 128, 16384, 290, "2025-01-03T10:00:00+00:00")
    page = client.get(f"/datasets/{d.id}").data.decode()
    facts = {dt.text: dd.text for dt, dd in zip(find_all(page, "dt"), find_all(page, "dd"),
                                                strict=True)}
    assert facts["Tokenised with"] == text_of(page, "dataset-tokenised-with") == (
        "minilm-l6 (16,384 tokens, 300 documents); smollm2-135m (15,360 tokens, 310 documents)")
    assert "Note" not in facts  # the preparation's message names the first model alone
    links = find_all(element_by_id(page, "dataset-tokenised-with"), "a")
    assert [a.get("href") for a in links] == [f"/models/{mini.id}", f"/models/{smol.id}"]
    data = client.get(f"/datasets/{d.id}?format=json").get_json()
    assert data["tokenised_with"] == [
        {"model_id": mini.id, "model": "minilm-l6", "n_tokens": 16384, "n_documents": 300},
        {"model_id": smol.id, "model": "smollm2-135m", "n_tokens": 15360, "n_documents": 310}]
    assert client.get("/datasets", headers=JSON).get_json()["items"][0]["tokenised_with"] \
        == data["tokenised_with"]
    other = make_dataset(name="other", source="/nowhere/other.txt", message="tokenised when a "
                         "training starts", n_tokens=None)
    page = client.get(f"/datasets/{other.id}").data.decode()
    assert "dataset-tokenised-with" not in ids(page) and "tokenised when a training starts" in page
    assert client.get(f"/datasets/{other.id}", headers=JSON).get_json()["tokenised_with"] == []


def test_add_dataset_validation_upload_delete(client, enqueued, tmp_path):
    bad = client.post("/datasets", data={"source": "", "context_size": "1",
                                         "max_tokens": "abc"}, headers=JSON)
    assert bad.status_code == 422
    errors = bad.get_json()["errors"]
    assert {"source", "context_size", "max_tokens"} <= set(errors)
    html = client.post("/datasets", data={"source": "/nope/x.txt"}, headers=HX)
    assert html.status_code == 422 and "error-source" in ids(html.data.decode())
    assert enqueued == []
    up = client.post("/datasets", data={"file": (io.BytesIO(b"hello world\n" * 50), "c.txt"),
                                        "context_size": "16"},
                     headers=JSON, content_type="multipart/form-data")
    assert up.status_code == 201, up.get_json()
    assert up.get_json()["name"] == "c.txt" and enqueued[-1][0] == "prepare_dataset"
    # names that lose their letters still keep their suffix: prepared as what they are
    for name, saved in (("é\u202e.txt", "upload.txt"), ("...jsonl", "upload.jsonl"),
                        ("a" * 300 + ".CSV", "a" * 76 + ".csv"),
                        ("../../etc/cron.d/x y.txt", "x_y.txt")):
        r = client.post("/datasets", data={"file": (io.BytesIO(b"words\n"), name)},
                        headers=JSON, content_type="multipart/form-data")
        assert r.status_code == 201, (name, r.get_json())
        path = Path(r.get_json()["source"])
        assert path.parent == settings.uploads_dir() and path.name[13:] == saved, path
    wrong = client.post("/datasets", data={"file": (io.BytesIO(b"x"), "c.pdf")},
                        headers=JSON, content_type="multipart/form-data")
    assert wrong.status_code == 422 and "upload" in wrong.get_json()["errors"]
    ok = client.post("/datasets", data={"source": "kjv"}, headers=HX)
    assert ok.status_code == 201 and b"datasets-rows" in ok.data
    did = up.get_json()["id"]
    assert client.delete(f"/datasets/{did}", headers=JSON).get_json() == {"deleted": did}
    assert client.delete(f"/datasets/{did}", headers=JSON).status_code == 404


def test_models_and_datasets_take_a_json_object_as_the_form(client, enqueued):
    """Like every other POST, adding a model or dataset takes a JSON object as well as form
    fields (a JSON body was ignored: 422 "Give a model" for a body that named one); numbers
    may be JSON numbers, and a bad body gets the same 422 sentence as elsewhere."""
    body = {"source": "minilm-l6", "name": "mini"}
    m = client.post("/models", json=body, headers=JSON)
    assert m.status_code == 201, m.get_json()
    assert (m.get_json()["source"], m.get_json()["name"]) == ("minilm-l6", "mini")
    d = client.post("/datasets", json={"source": "kjv", "context_size": 64, "max_tokens": 4096,
                                       "name": None}, headers=JSON)
    assert d.status_code == 201, d.get_json()
    got = d.get_json()
    assert (got["source"], got["name"], got["context_size"], got["max_tokens"]) == \
        ("kjv", "kjv", 64, 4096)
    assert [name for name, _ in enqueued] == ["prepare_model", "prepare_dataset"]
    bad = client.post("/datasets", json={"source": "kjv", "context_size": 1}, headers=JSON)
    assert bad.status_code == 422 and "context_size" in bad.get_json()["errors"]
    for path in ("/models", "/datasets"):
        r = client.post(path, data="{'source': 1", headers=JSON, content_type="application/json")
        assert r.status_code == 422 and "not valid JSON" in r.get_json()["error"], path


def test_empty_state_stays_and_hides_by_css(client, enqueued):
    """The empty message is always in the list and hidden by CSS while the list has a row, so it
    comes back when the last row is deleted and an add needs no out-of-band removal (which logged
    htmx:oobErrorNoTarget when the message was already gone)."""
    for kind in ("models", "datasets"):
        empty = client.get(f"/{kind}").data.decode()
        assert element_by_id(empty, f"{kind}-empty").text.startswith(f"No {kind} yet")
    make_model()
    page = client.get("/models").data.decode()
    assert "models-empty" in ids(page) and find_all(page, "li", class_="row")
    created = client.post("/models", data={"source": "minilm-l6"}, headers=HX).data.decode()
    assert "models-empty" not in ids(created)
    css = client.get("/static/app.css").data.decode()
    assert ".rows:has(> li) ~ .empty" in css and ".jobs:has(> article) > .empty" in css
