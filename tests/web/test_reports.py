"""The SAE report page and the latent browser (``worker.jobs.reports`` reads the
docs/eval-format.md files)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from worker import jobs
from worker.db import Training, db
from worker.jobs import reports

from ..html import attr, element_by_id, find_all, ids, text_of
from .conftest import HX, JSON, make_dataset, make_model, make_training

D_SAE = 120
TOP_N = 3
BEFORE, AFTER = 2, 1
W = BEFORE + 1 + AFTER
DEAD = (5, 17)
VOCAB = {0: "<b>", 1: " the", 2: "\n", 3: "cat", 4: " sat", 5: "\t", 6: "&amp;"}


def frequencies() -> np.ndarray:
    freq = np.array([((i * 37) % D_SAE + 1) / 2000 for i in range(D_SAE)], dtype=np.float32)
    freq[list(DEAD)] = 0.0
    return freq


def max_acts() -> np.ndarray:
    acts = np.array([1 + (i * 53 % D_SAE) / 10 for i in range(D_SAE)], dtype=np.float32)
    acts[list(DEAD)] = 0.0
    return acts


def report_json(**over: Any) -> dict[str, Any]:
    counts = [0] * 28
    counts[10], counts[20], counts[27] = 40, 70, 8
    data = {
        "format": "sae-studio-eval/1", "created_at": time.time(), "step": 1000,
        "d_in": 24, "d_sae": D_SAE, "encoder_type": "topk", "model": "tiny-gpt",
        "layer": 1, "hook_point": "residual", "is_causal": True,
        "contexts": 8, "context_size": 16, "tokens": 128, "scored_tokens": 120,
        "fvu": 0.1734, "explained_variance": 0.8266, "l0": 12.5, "mse": 0.0123,
        "ce_loss_clean": 3.1, "ce_loss_spliced": 3.4, "ce_loss_zero": 7.9,
        "ce_loss_recovered": 0.9375, "kl_div": 0.2512, "downstream_note": None,
        "dead": len(DEAD), "dense": 3, "alive": D_SAE - len(DEAD), "dense_threshold": 0.1,
        "histogram": {"edges": [-7 + 0.25 * i for i in range(29)], "counts": counts,
                      "dead": len(DEAD)},
        "top_n": TOP_N, "window_before": BEFORE, "window_after": AFTER,
    }
    data.update(over)
    return data


def write_eval(out_dir: str | Path, **over: Any) -> Path:
    """The three files of docs/eval-format.md with known values.

    Latent 3's contexts: (act 4.0, ctx 2, pos 0: window clipped at the start, two pads),
    (act 2.0, ctx 5, pos 9: full window "<b> the\\n[cat] sat"), third entry empty. Dead
    latents have no entries."""
    folder = Path(out_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    freq, maxa = frequencies(), max_acts()
    top_acts = np.zeros((D_SAE, TOP_N), np.float32)
    top_ctx = np.full((D_SAE, TOP_N), -1, np.int32)
    top_pos = np.full((D_SAE, TOP_N), -1, np.int32)
    top_tok = np.full((D_SAE, TOP_N, W), -1, np.int32)
    win = np.zeros((D_SAE, TOP_N, W), np.float32)
    for n in range(D_SAE):
        if n in DEAD:
            continue
        top_acts[n, :2] = [maxa[n], maxa[n] / 2]
        top_ctx[n, :2] = [n % 8, (n + 3) % 8]
        top_pos[n, :2] = [9, 9]
        top_tok[n, 0] = [1, 2, 3, 4]
        top_tok[n, 1] = [0, 1, 2, 3]
        win[n, 0] = [0, 0, maxa[n], maxa[n] / 4]
        win[n, 1] = [0, maxa[n] / 8, maxa[n] / 2, 0]
    maxa[3] = 4.0
    top_acts[3] = [4.0, 2.0, 0.0]
    top_ctx[3, :2], top_pos[3, :2] = [2, 5], [0, 9]
    top_tok[3, 0] = [-1, -1, 3, 5]
    win[3, 0] = [0, 0, 4.0, 1.0]
    top_tok[3, 1] = [0, 1, 2, 6]
    win[3, 1] = [0.5, 0, 2.0, 0]
    mean = maxa / 3
    save_file({"frequency": freq, "max_act": maxa, "mean_act": mean, "top_acts": top_acts,
               "top_context": top_ctx, "top_position": top_pos, "top_tokens": top_tok,
               "top_window_acts": win}, str(folder / "latents.safetensors"),
              metadata={"format": "sae-studio-latents/1"})
    (folder / "vocab.json").write_text(json.dumps({str(k): v for k, v in VOCAB.items()}))
    (folder / "report.json").write_text(json.dumps(report_json(**over)))
    return folder


@pytest.fixture
def done(app: Any, tmp_path: Path) -> Training:
    """A completed training with its eval folder."""
    t = make_training(make_model(), make_dataset(), "completed", steps=100, total=100,
                      out_dir=tmp_path)
    write_eval(t.out_dir)
    return t


def expected_order(key: np.ndarray, desc: bool = True) -> list[int]:
    ids = np.arange(len(key))
    return [int(i) for i in np.lexsort((ids, -key if desc else key))]


# ---------------------------------------------------------------------------- the reader
def test_report_reader(done):
    with db.connection_context():
        data = reports.report(done)
    assert data["fvu"] == pytest.approx(0.1734) and data["d_sae"] == D_SAE
    assert data["training_id"] == done.id and data["status"] == "completed"
    assert data["training_name"] == "minilm-l6 + kjv"
    assert reports.has_report(done)


def test_report_none_without_eval(app, tmp_path):
    t = make_training(make_model(), make_dataset(), "completed", out_dir=tmp_path)
    with db.connection_context():
        assert reports.report(t) is None
        assert not reports.has_report(t)
        with pytest.raises(reports.NoReport, match="no evaluation report yet"):
            reports.latents_page(t)
    t2 = make_training(make_model(), make_dataset(), "completed")  # no out_dir at all
    assert reports.report(t2) is None


def test_latents_page_sorting_and_pagination(done):
    freq, maxa = frequencies().astype(np.float64), max_acts().astype(np.float64)
    maxa[3] = 4.0
    page = reports.latents_page(done)
    assert (page["total"], page["pages"], page["page"], page["per_page"]) == (120, 3, 1, 50)
    assert [r["id"] for r in page["rows"]] == expected_order(freq)[:50]
    first = page["rows"][0]
    assert set(first) == {"id", "frequency", "log10_frequency", "max_act", "mean_act", "dead",
                          "label"}
    assert first["log10_frequency"] == pytest.approx(np.log10(first["frequency"]))
    last = reports.latents_page(done, page=3)
    assert len(last["rows"]) == 20 and last["rows"][-1]["id"] == DEAD[1]  # dead last, by id
    assert last["rows"][-1]["dead"] and last["rows"][-1]["log10_frequency"] is None
    assert reports.latents_page(done, page=99)["page"] == 3  # past the end: the last page
    asc = reports.latents_page(done, sort="max_act", order="asc", per_page=10)
    assert [r["id"] for r in asc["rows"]] == expected_order(maxa, desc=False)[:10]
    assert asc["pages"] == 12
    by_id = reports.latents_page(done, sort="id", order=None, page=2, per_page=10)
    assert [r["id"] for r in by_id["rows"]] == list(range(10, 20))
    desc_id = reports.latents_page(done, sort="id", order="desc", per_page=5)
    assert [r["id"] for r in desc_id["rows"]] == [119, 118, 117, 116, 115]


def test_latents_page_search(done):
    freq = frequencies().astype(np.float64)
    rank = expected_order(freq).index(42)
    page = reports.latents_page(done, q=" #42 ", page=1)
    assert page["highlight"] == 42 and page["page"] == rank // 50 + 1
    assert 42 in [r["id"] for r in page["rows"]]
    by_id = reports.latents_page(done, sort="id", order="asc", per_page=10, q="117")
    assert by_id["page"] == 12 and by_id["highlight"] == 117
    with pytest.raises(jobs.Invalid) as bad:
        reports.latents_page(done, q="cat")
    assert "not a latent id" in str(bad.value) and "q" in bad.value.errors
    with pytest.raises(jobs.Invalid, match="this SAE has 120 latents"):
        reports.latents_page(done, q="120")
    with pytest.raises(jobs.Invalid, match="Unknown sort"):
        reports.latents_page(done, sort="nope")
    with pytest.raises(jobs.Invalid, match="Unknown order"):
        reports.latents_page(done, order="up")
    with pytest.raises(jobs.Invalid, match="page must be at least 1"):
        reports.latents_page(done, page="0")
    with pytest.raises(jobs.Invalid, match="per_page must be from 1 to 500"):
        reports.latents_page(done, per_page="1000")


def test_latent_reader(done):
    data = reports.latent(done, 3)
    assert data["id"] == 3 and data["max_act"] == 4.0 and data["d_sae"] == D_SAE
    assert data["mean_act"] == pytest.approx(4.0 / 3)
    assert len(data["contexts"]) == 2  # the empty third entry is dropped
    first, second = data["contexts"]
    assert (first["activation"], first["context"], first["position"]) == (4.0, 2, 0)
    assert [t["text"] for t in first["tokens"]] == ["cat", "\t"]  # two pads dropped
    assert first["center"] == 0 and first["tokens"][0] == {"id": 3, "text": "cat", "act": 4.0}
    assert [t["text"] for t in second["tokens"]] == ["<b>", " the", "\n", "&amp;"]
    assert second["center"] == 2 and second["tokens"][0]["act"] == 0.5
    dead = reports.latent(done, DEAD[0])
    assert dead["dead"] and dead["contexts"] == [] and dead["log10_frequency"] is None
    with pytest.raises(jobs.NotFound, match="Latent 120 does not exist"):
        reports.latent(done, 120)
    with pytest.raises(jobs.NotFound):
        reports.latent(done, -1)


def test_reader_sees_rewritten_files(done):
    assert reports.latents_page(done)["rows"][0]["frequency"] > 0
    time.sleep(0.01)
    folder = Path(done.out_dir) / "eval"
    save_file({"frequency": np.ones(4, np.float32), "max_act": np.ones(4, np.float32),
               "mean_act": np.ones(4, np.float32),
               "top_acts": np.zeros((4, 1), np.float32),
               "top_context": np.full((4, 1), -1, np.int32),
               "top_position": np.full((4, 1), -1, np.int32),
               "top_tokens": np.full((4, 1, 1), -1, np.int32),
               "top_window_acts": np.zeros((4, 1, 1), np.float32)},
              str(folder / "latents.safetensors"))
    assert reports.latents_page(done)["total"] == 4


def test_unreadable_files(done, client):
    (Path(done.out_dir) / "eval" / "report.json").write_text("{not json")
    r = client.get(f"/trainings/{done.id}/report", headers=JSON)
    assert r.status_code == 500 and "cannot be read" in r.get_json()["error"]
    (Path(done.out_dir) / "eval" / "report.json").write_text(
        json.dumps(report_json(format="sae-studio-eval/9")))
    assert "this version reads" in client.get(f"/trainings/{done.id}/report",
                                              headers=JSON).get_json()["error"]


# ---------------------------------------------------------------------------- report page
def test_report_page(client, done):
    r = client.get(f"/trainings/{done.id}/report")
    assert r.status_code == 200
    html = r.data.decode()
    assert "<html" in html and "SAE report · training #" in html
    for text in ("0.1734", "82.7%", "12.5", "93.8%", "0.2512", "3.1000", "3.4000", "7.9000",
                 "0.9375"):
        assert text in html, text
    tile = element_by_id(html, "report-tile-latents")
    assert "118" in [e.text for e in tile.iter()]
    assert "2 dead in 120 held-out tokens · 3 dense" in tile.text  # the window is stated
    svg = element_by_id(html, f"training-{done.id}-density")
    assert svg.tag == "svg" and len(find_all(svg, "rect")) == 28
    assert "log10 frequency" in svg.text and "latents" in [t.text for t in find_all(svg, "text")]
    assert "70 latents" in svg.text
    assert text_of(html, "density-dead") == "2" and "2 dead" in text_of(html, "density-facts")
    assert element_by_id(html, "latents-table").tag == "div"
    assert len(ids(html, "latent-row-")) == 50
    assert f'href="/trainings/{done.id}/report?sort=frequency&amp;order=desc&amp;page=2"' in html
    assert f'/trainings/{done.id}/latents/3?sort=frequency&amp;order=desc' in html


def test_report_without_ce_losses(client, app, tmp_path):
    t = make_training(make_model(), make_dataset(), "stopped", out_dir=tmp_path)
    write_eval(t.out_dir, ce_loss_clean=None, ce_loss_spliced=None, ce_loss_zero=None,
               ce_loss_recovered=None, kl_div=None,
               downstream_note="BertModel is not a causal LM.")
    html = client.get(f"/trainings/{t.id}/report").data.decode()
    assert "BertModel is not a causal LM." in html and "ce-clean" not in ids(html)
    data = client.get(f"/trainings/{t.id}/report", headers=JSON).get_json()
    assert data["ce_loss_recovered"] is None


def test_report_fragment_and_sorting(client, done):
    r = client.get(f"/trainings/{done.id}/report?sort=max_act&order=asc&page=2", headers=HX)
    html = r.data.decode()
    assert r.status_code == 200 and html.strip().startswith('<div id="latents-table"')
    assert "<html" not in html and "density" not in html
    maxa = max_acts().astype(np.float64)
    maxa[3] = 4.0
    rows = [int(i.removeprefix("latent-row-")) for i in ids(html, "latent-row-")]
    assert rows == expected_order(maxa, desc=False)[50:100]
    assert "Page 2 of 3" in html and 'aria-sort="ascending"' in html
    # clicking the active column flips the order; another column starts descending
    url = f"/trainings/{done.id}/report"
    assert attr(html, "sort-max_act", "href") == f"{url}?sort=max_act&order=desc"
    assert attr(html, "sort-frequency", "href") == f"{url}?sort=frequency&order=desc"
    # history restore wants the whole page
    full = client.get(f"/trainings/{done.id}/report?page=2",
                      headers={**HX, "HX-History-Restore-Request": "true"})
    assert "<html" in full.data.decode()


def test_report_search(client, done):
    html = client.get(f"/trainings/{done.id}/report?q=42", headers=HX).data.decode()
    assert "hit" in element_by_id(html, "latent-row-42").classes
    assert attr(html, "latent-q", "value") == "42" and "latent-open" in ids(html)
    bad = client.get(f"/trainings/{done.id}/report?q=%3Cb%3E", headers=HX)
    assert bad.status_code == 422
    body = bad.data.decode()
    assert body.strip().startswith('<div id="latents-table"')
    assert "“&lt;b&gt;” is not a latent id" in body and "<b>" not in body
    assert len(ids(body, "latent-row-")) == 50  # the first page, still usable
    page = client.get(f"/trainings/{done.id}/report?q=500&sort=id")
    assert page.status_code == 422 and "There is no latent 500" in page.data.decode()
    assert 'aria-sort="ascending"' in page.data.decode()  # the valid sort is kept
    junk = client.get(f"/trainings/{done.id}/report?sort=bogus&page=x")
    assert junk.status_code == 422 and len(ids(junk.data.decode(), "latent-row-")) == 50


def test_report_json(client, done):
    r = client.get(f"/trainings/{done.id}/report?per_page=10&page=2&sort=id&order=asc",
                   headers=JSON)
    data = r.get_json()
    assert r.status_code == 200
    for key in ("format", "fvu", "explained_variance", "l0", "mse", "ce_loss_clean",
                "ce_loss_spliced", "ce_loss_zero", "ce_loss_recovered", "kl_div", "dead",
                "dense", "alive", "histogram", "d_sae", "training_id", "training_name",
                "status", "latents"):
        assert key in data, key
    assert data["histogram"]["counts"][20] == 70 and len(data["histogram"]["edges"]) == 29
    lat = data["latents"]
    assert {k: lat[k] for k in ("total", "page", "pages", "per_page", "sort", "order", "q",
                                "highlight")} == {
        "total": 120, "page": 2, "pages": 12, "per_page": 10, "sort": "id", "order": "asc",
        "q": None, "highlight": None}
    assert [row["id"] for row in lat["rows"]] == list(range(10, 20))
    assert client.get(f"/trainings/{done.id}/report?format=json&q=7").get_json()[
        "latents"]["highlight"] == 7
    bad = client.get(f"/trainings/{done.id}/report?q=abc", headers=JSON)
    assert bad.status_code == 422 and "q" in bad.get_json()["errors"]


# ---------------------------------------------------------------------------- latent page
def test_latent_page(client, done):
    r = client.get(f"/trainings/{done.id}/latents/3?sort=max_act&order=asc")
    assert r.status_code == 200
    html = r.data.decode()
    assert "Latent 3" in html and "4.000" in html and "1.333" in html
    contexts = element_by_id(html, "latent-contexts")
    toks = find_all(contexts, "span", class_="tok")
    rgba = "background-color: rgba(91, 156, 255, {})".format
    assert [(t.classes, t.get("style"), t.raw_text) for t in toks] == [
        (["tok", "tok-center"], rgba("1.0"), "cat"), (["tok"], rgba("0.25"), "⇥"),
        (["tok"], rgba("0.125"), "<b>"), (["tok"], rgba("0.0"), " the"),
        (["tok", "tok-center"], rgba("0.5"), "↵"), (["tok"], rgba("0.0"), "&amp;")]
    assert "activation 4.000" in toks[0].get("title") and "(id 0)" in toks[2].get("title")
    assert find_all(contexts, "b") == []  # "<b>" is a token's text, not a tag
    assert f'href="/trainings/{done.id}/latents/2?sort=max_act&amp;order=asc"' in html
    assert f'href="/trainings/{done.id}/latents/4?sort=max_act&amp;order=asc"' in html
    assert f'href="/trainings/{done.id}/report?q=3&amp;sort=max_act&amp;order=asc"' in html
    first = client.get(f"/trainings/{done.id}/latents/0").data.decode()
    assert "latent-prev" not in ids(first) and "latent-next" in ids(first)
    last = client.get(f"/trainings/{done.id}/latents/{D_SAE - 1}").data.decode()
    assert "latent-next" not in ids(last)
    dead = client.get(f"/trainings/{done.id}/latents/{DEAD[0]}").data.decode()
    assert "never fired on the held-out text" in dead


def test_latent_json(client, done):
    data = client.get(f"/trainings/{done.id}/latents/3", headers=JSON).get_json()
    assert {"id", "frequency", "max_act", "mean_act", "contexts"} <= set(data)
    ctx = data["contexts"][1]
    assert set(ctx) == {"activation", "context", "position", "tokens", "center"}
    assert ctx["tokens"][0] == {"id": 0, "text": "<b>", "act": 0.5} and ctx["center"] == 2
    missing = client.get(f"/trainings/{done.id}/latents/120", headers=JSON)
    assert missing.status_code == 404 and "does not exist" in missing.get_json()["error"]
    html = client.get(f"/trainings/{done.id}/latents/120")
    assert html.status_code == 404 and "this SAE has 120 latents" in html.data.decode()


# ---------------------------------------------------------------------------- 404s
def test_report_404s(client, app, tmp_path):
    r = client.get("/trainings/999/report", headers=JSON)
    assert r.status_code == 404 and r.get_json() == {"error": "Training 999 does not exist."}
    assert client.get("/trainings/999/latents/1").status_code == 404
    model, dataset = make_model(), make_dataset()
    running = make_training(model, dataset, "training", out_dir=tmp_path)
    r = client.get(f"/trainings/{running.id}/report")
    assert r.status_code == 404
    html = r.data.decode()
    assert "appears when the training ends" in html and "report-missing" in ids(html)
    assert "badge-training" in html
    r = client.get(f"/trainings/{running.id}/report", headers=JSON)
    assert r.status_code == 404 and "appears when the training ends" in r.get_json()["error"]
    queued = make_training(model, dataset, "queued")
    assert "is queued" in client.get(f"/trainings/{queued.id}/latents/0",
                                     headers=JSON).get_json()["error"]
    failed = make_training(model, dataset, "failed", out_dir=tmp_path, error="boom")
    r = client.get(f"/trainings/{failed.id}/report")
    assert r.status_code == 404 and "failed before its evaluation" in r.data.decode()
    frag = client.get(f"/trainings/{failed.id}/report", headers=HX)
    assert frag.status_code == 404 and frag.headers["HX-Retarget"] == "#flash"


# ---------------------------------------------------------------------------- the card
def test_card_report_link(client, app, tmp_path):
    model, dataset = make_model(), make_dataset()
    done = make_training(model, dataset, "completed", out_dir=tmp_path)
    running = make_training(model, dataset, "training", out_dir=tmp_path)
    write_eval(running.out_dir)  # an old eval of a retried run: no link while it runs
    page = client.get("/").data.decode()
    assert f"training-{done.id}-report" not in ids(page)
    assert f"training-{running.id}-report" not in ids(page)
    write_eval(done.out_dir)  # the eval appears after the row's last update
    page = client.get("/").data.decode()
    link = element_by_id(page, f"training-{done.id}-report")
    assert (link.tag, link.classes, link.get("href"), link.text) == (
        "a", ["button", "primary"], f"/trainings/{done.id}/report", "Report")
    assert f"training-{running.id}-report" not in ids(page)
    buttons = client.get(f"/trainings/{done.id}", headers=HX).data.decode()
    assert f"training-{done.id}-buttons" in ids(buttons)
    assert f"training-{done.id}-report" in ids(buttons)
    detail = client.get(f"/trainings/{done.id}").data.decode()
    assert f"training-{done.id}-report-link" in ids(detail)
    stale = client.get(f"/trainings/{running.id}/report").data.decode()
    assert "report-stale" in ids(stale)


def test_report_does_not_import_torch(tmp_path):
    """The report pages read the files with safetensors' numpy backend, never torch."""
    root = Path(__file__).resolve().parents[2]
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        from tests.web.test_reports import write_eval
        import webapp
        from tests.web.conftest import make_dataset, make_model, make_training
        from pathlib import Path
        app = webapp.create_app({{"TESTING": True, "DATA_DIR": {str(tmp_path)!r}}})
        t = make_training(make_model(), make_dataset(), "completed",
                          out_dir=Path({str(tmp_path)!r}))
        write_eval(t.out_dir)
        c = app.test_client()
        for url in (f"/trainings/{{t.id}}/report", f"/trainings/{{t.id}}/report?q=3",
                    f"/trainings/{{t.id}}/latents/3", "/"):
            assert c.get(url).status_code == 200, url
        assert "torch" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------- the real writer
def test_reader_matches_engine_writer(client, app, tmp_path):
    """Files written by worker.engine.evaluate (tiny gpt2, random TopK SAE) read back exactly."""
    torch = pytest.importorskip("torch")
    evaluate = pytest.importorskip("worker.engine.evaluate")
    from tests.engine.tiny_models import kjv_lines, make_tiny_model
    from worker.engine import architectures
    from worker.engine.models import load_model

    loaded = load_model(str(make_tiny_model("gpt2", tmp_path / "tiny-gpt2")))
    tok = loaded.tokenizer
    ids: list[int] = []
    for line in kjv_lines(200):
        ids += [tok.bos_token_id] + tok(line)["input_ids"]
        if len(ids) >= 6 * 16:
            break
    contexts = np.array(ids[:96], dtype=np.int32).reshape(6, 16)
    torch.manual_seed(1)
    d = loaded.model.config.hidden_size
    sae = architectures.build("topk", d, 4 * d, k=4)
    opts = evaluate.EvalOptions(top_n=3, window_before=3, window_after=2, batch_contexts=4)
    ev = evaluate.evaluate_sae(sae, 1.0, loaded, contexts, 1, "residual",
                               special_ids=list(tok.all_special_ids), options=opts,
                               meta={"step": 7})
    t = make_training(make_model(), make_dataset(), "completed", out_dir=tmp_path)
    evaluate.save_evaluation(ev, Path(t.out_dir) / "eval")

    data = reports.report(t)
    assert data["d_sae"] == 4 * d and data["step"] == 7 and data["format"] in reports.FORMATS
    freq = ev.latents["frequency"].double().numpy()
    page = reports.latents_page(t, per_page=500)
    assert [r["id"] for r in page["rows"]] == expected_order(freq)[:500]
    assert page["total"] == 4 * d
    top = ev.latents
    n = int(np.argmax(top["max_act"].numpy()))
    lat = reports.latent(t, n)
    assert lat["max_act"] == pytest.approx(float(top["max_act"][n]))
    entries = [j for j in range(3) if int(top["top_context"][n, j]) >= 0]
    assert len(lat["contexts"]) == len(entries) > 0
    for c, j in zip(lat["contexts"], entries, strict=True):
        window = top["top_tokens"][n, j].tolist()
        kept = [i for i in window if i >= 0]
        assert [x["id"] for x in c["tokens"]] == kept
        assert [x["text"] for x in c["tokens"]] == [ev.vocab[str(i)] for i in kept]
        assert c["tokens"][c["center"]]["id"] == window[3]
        assert c["tokens"][c["center"]]["act"] == pytest.approx(c["activation"])
        assert c["context"] == int(top["top_context"][n, j])
    assert client.get(f"/trainings/{t.id}/report").status_code == 200
    html = client.get(f"/trainings/{t.id}/latents/{n}").data.decode()
    assert html.count("tok-center") == len(entries)
