"""The SAE report page and the latent browser (``worker.jobs.reports`` reads the
docs/eval-format.md files)."""

from __future__ import annotations

import json
import re
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
    assert text_of(html, "report-tile-ce-sub") == "KL 0.2512 (nats / token)"  # with its unit
    assert "report-run-rate" not in html  # no result stored: no rate to show
    Training.update(result={"tokens_per_s": 2709.6, "tokens": 12800}).where(
        Training.id == done.id).execute()
    html = client.get(f"/trainings/{done.id}/report").data.decode()
    assert element_by_id(html, "report-run-rate").text == "2.71k tokens/s (whole run)"
    assert "trained on 12.8k tokens at" in html
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
    # the tile says why it is empty (it showed "—" over "KL —")
    assert text_of(html, "report-tile-ce-sub") == "not measured: see Downstream loss"
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


def test_report_bad_table_arguments_are_named(client, done):
    """?page=abc / ?per_page=0 say which argument is wrong, above the table (not as the search
    box's error, which it looked like); the table shows its default instead."""
    url = f"/trainings/{done.id}/report"
    for query, sentence in (("page=abc", "page must be a whole number, not “abc”."),
                            ("per_page=0", "per_page must be from 1 to 500 (got 0).")):
        for headers in ({}, HX):
            r = client.get(f"{url}?{query}", headers=headers)
            assert r.status_code == 422
            html = r.data.decode()
            box = element_by_id(html, "latents-args-errors")
            assert sentence in box.text, box.text
            assert attr(html, "latent-q", "aria-invalid") is None
            assert not find_all(html, "p", class_="field-error")  # nothing beside the search
            assert len(ids(html, "latent-row-")) == 50  # the default page, still usable
    both = client.get(f"{url}?page=abc&per_page=0").data.decode()
    text = element_by_id(both, "latents-args-errors").text
    assert "page must be a whole number" in text and "per_page must be from 1 to 500" in text
    # a bad search is still the search box's own error
    bad_q = client.get(f"{url}?q=abc").data.decode()
    assert attr(bad_q, "latent-q", "aria-invalid") == "true"
    assert "is not a latent id" in text_of(bad_q, "latent-q-error")
    assert "latents-args-errors" not in ids(bad_q)


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


README = Path(__file__).resolve().parents[2] / "README.md"
ADDED_BY_THE_WEB = {"format_version", "training_id", "training_name", "status", "latents"}
TOKEN_SEARCH_ONLY = {"fires", "promotes"}


def readme_keys(marker: str) -> set[str]:
    """The keys README.md documents after ``<!-- keys: <marker> -->``, up to the next blank
    line: the code spans of a table's first column, or the names of a ``{a, b, ...}`` list."""
    lines = README.read_text(encoding="utf-8").splitlines()
    block = []
    for line in lines[lines.index(f"<!-- keys: {marker} -->") + 1:]:
        if not line.strip():
            break
        block.append(line)
    if block[0].startswith("|"):
        assert re.fullmatch(r"\|( *-+ *\|)+", block[1]), block[1]  # the header's rule
        return {key for line in block[2:] for key in re.findall(r"`(\w+)`", line.split("|")[1])}
    names = re.search(r"`\{([^}`]*)\}`", " ".join(block))
    assert names, block[0]
    return {name.strip() for name in names.group(1).split(",")}


def test_report_and_latent_json_keys_are_the_readme_ones(client, app, done, tmp_path):
    """README's tables of the report's JSON (``<!-- keys: ... -->``) list exactly the keys the
    answer has: the top level (report.json's keys as the engine writes them, plus the web's),
    ``latents`` and a row of it (``fires``, ``promotes`` with a token search only), and a
    latent's JSON; for a format-1 folder (new keys null) and a real format-2 evaluation."""
    from worker.engine.evaluate import REPORT_KEYS

    documented = readme_keys("report")
    assert documented == set(REPORT_KEYS) | ADDED_BY_THE_WEB
    assert {"format_version", "matryoshka_fvu", "hist_bins", "sample_n"} <= documented
    assert {"firings", "sample_n"} <= readme_keys("latent")
    real_t, ev = real(tmp_path, "gpt2")
    for t in (done, real_t):
        data = client.get(f"/trainings/{t.id}/report", headers=JSON).get_json()
        assert set(data) == documented, set(data) ^ documented
        assert set(data["latents"]) == readme_keys("latents")
        assert set(data["latents"]["rows"][0]) == readme_keys("latent-row") - TOKEN_SEARCH_ONLY
        latent = client.get(f"/trainings/{t.id}/latents/3", headers=JSON).get_json()
        assert set(latent) == readme_keys("latent"), set(latent) ^ readme_keys("latent")
    assert data["format_version"] == 2 and data["hist_bins"] == ev.report["hist_bins"]
    text = ev.vocab[str(int(ev.latents["top_tokens"][busiest(ev), 0, window_center(ev)]))]
    search = client.get(f"/trainings/{real_t.id}/report", query_string={"by": "token", "q": text},
                        headers=JSON).get_json()["latents"]
    assert set(search["rows"][0]) == readme_keys("latent-row")


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
    # prev / next follow the table's order (max act ascending here), not the ids
    maxa = max_acts().astype(np.float64)
    maxa[3] = 4.0
    order = expected_order(maxa, desc=False)
    at = order.index(3)
    prev_id, next_id = order[at - 1], order[at + 1]
    assert attr(html, "latent-prev", "href") == \
        f"/trainings/{done.id}/latents/{prev_id}?sort=max_act&order=asc"
    assert attr(html, "latent-next", "href") == \
        f"/trainings/{done.id}/latents/{next_id}?sort=max_act&order=asc"
    assert f"{at + 1} of {D_SAE} in the table" in text_of(html, "latent-nav-pos")
    assert f'href="/trainings/{done.id}/report?sort=max_act&amp;order=asc&amp;q=3"' in html
    assert '<script src="/static/latents.js"></script>' in html  # the j / k keys
    by_id = client.get(f"/trainings/{done.id}/latents/0?sort=id&order=asc").data.decode()
    assert "latent-prev" not in ids(by_id) and "latent-next" in ids(by_id)
    last = client.get(f"/trainings/{done.id}/latents/{D_SAE - 1}?sort=id").data.decode()
    assert "latent-next" not in ids(last)
    # the default order (frequency, highest first): its first latent has no previous one
    top = expected_order(frequencies().astype(np.float64))[0]
    assert "latent-prev" not in ids(client.get(f"/trainings/{done.id}/latents/{top}").data
                                    .decode())
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
    top_html = element_by_id(html, "latent-contexts")
    assert len(find_all(top_html, "span", class_="tok-center")) == len(entries)


# ---------------------------------------------------------------------------- format 2 (real)
SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "data" /
                     "saebench_core_schema.json").read_text())


def real(tmp_path: Path, family: str = "gpt2", **options: Any) -> tuple[Training, Any]:
    """A completed training holding a real evaluation of a tiny ``family`` model."""
    from .evals import install_evaluation

    t = make_training(make_model(), make_dataset(), "completed", out_dir=tmp_path)
    return t, install_evaluation(t, family, **options)


def busiest(ev: Any) -> int:
    """The latent with the most firings (ties: the lowest id)."""
    return int(np.argmax(ev.latents["frequency"].numpy()))


def window_center(ev: Any) -> int:
    return int(ev.report["window_before"])


NEW_KEYS = ("histogram", "quantiles", "top_logits", "bottom_logits", "neighbours", "label",
            "auto_label", "notes", "contexts_fired", "max_decoder_cosine", "max_encoder_cosine",
            "encoder_decoder_cosine", "encoder_norm", "encoder_bias", "details", "firings")


def test_latent_json_format2_causal(client, app, tmp_path):
    """Every new key of a latent, checked against the engine's own tensors."""
    t, ev = real(tmp_path, "gpt2")
    lat, rep = ev.latents, ev.report
    n = busiest(ev)
    data = client.get(f"/trainings/{t.id}/latents/{n}", headers=JSON).get_json()
    assert set(NEW_KEYS) <= set(data)
    firings = round(float(lat["frequency"][n]) * rep["scored_tokens"])
    assert data["firings"] == firings > 0
    # histogram: 64 equal bins from 0 to hist_max, every firing counted once
    hist = data["histogram"]
    bins = rep["hist_bins"]
    assert len(hist["counts"]) == bins and len(hist["edges"]) == bins + 1
    assert hist["edges"][0] == 0 and hist["edges"][-1] == pytest.approx(float(lat["hist_max"][n]))
    assert sum(hist["counts"]) == firings
    assert hist["counts"] == lat["hist_counts"][n].tolist()
    # quantiles: the sample (min(sample_n, firings) entries) in 5 equal-width intervals
    groups = data["quantiles"]
    assert len(groups) == reports.QUANTILE_INTERVALS
    top = float(lat["max_act"][n])
    assert groups[0]["range"][1] == pytest.approx(top) and groups[-1]["range"][0] == 0
    sampled = int((lat["sample_context"][n] >= 0).sum())
    assert sum(g["count"] for g in groups) == sampled == min(rep["sample_n"], firings)
    assert data["sample_n"] == sampled
    for g in groups:
        lo, hi = g["range"]
        assert len(g["contexts"]) == g["count"]
        for c in g["contexts"]:
            assert lo - 1e-6 <= c["activation"] <= hi + 1e-6
            assert c["tokens"][c["center"]]["act"] == pytest.approx(c["activation"])
    acts = sorted((c["activation"] for g in groups for c in g["contexts"]), reverse=True)
    assert acts == pytest.approx(lat["sample_acts"][n][:sampled].tolist())
    # logit lens: 10 top (descending) and 10 bottom (ascending), with the vocabulary's text
    vocab = ev.vocab
    for key, which in (("top_logits", "top"), ("bottom_logits", "bottom")):
        items = data[key]
        assert len(items) == rep["logits_n"] == 10
        assert [x["id"] for x in items] == lat[f"logit_{which}_ids"][n].tolist()
        assert [x["value"] for x in items] == pytest.approx(
            lat[f"logit_{which}_values"][n].tolist())
        assert [x["token"] for x in items] == [vocab[str(x["id"])] for x in items]
    values = [x["value"] for x in data["top_logits"]]
    assert values == sorted(values, reverse=True)
    assert data["bottom_logits"][0]["value"] <= data["bottom_logits"][-1]["value"]
    # neighbours: by decoder cosine, itself excluded
    nb = data["neighbours"]
    assert [x["id"] for x in nb] == lat["neighbour_ids"][n].tolist() and n not in \
        [x["id"] for x in nb]
    assert [x["cosine"] for x in nb] == pytest.approx(lat["neighbour_cosines"][n].tolist())
    assert data["max_decoder_cosine"] == pytest.approx(nb[0]["cosine"])
    for key, tensor in (("contexts_fired", "contexts_fired"), ("encoder_norm", "encoder_norm"),
                        ("encoder_bias", "encoder_bias"),
                        ("encoder_decoder_cosine", "encoder_decoder_cosine"),
                        ("max_encoder_cosine", "max_encoder_cosine_per_latent")):
        assert data[key] == pytest.approx(float(lat[tensor][n])), key
    # label state and the automatic hint: its most frequent top token, then its top logit
    assert data["label"] is None and data["notes"] is None and data["details"] is True
    centers = [c["tokens"][c["center"]]["text"] for c in data["contexts"]]
    most = max(centers, key=lambda x: (centers.count(x), -centers.index(x)))
    assert data["auto_label"].startswith(f"'{reports_display(most)}'")
    assert f" → '{reports_display(data['top_logits'][0]['token'])}'" in data["auto_label"]


def reports_display(text: str) -> str:
    return "".join({"\n": "↵", "\r": "␍", "\t": "⇥"}.get(ch, ch) for ch in text)


def test_latent_page_format2(client, app, tmp_path):
    t, ev = real(tmp_path, "gpt2")
    n = busiest(ev)
    html = client.get(f"/trainings/{t.id}/latents/{n}").data.decode()
    svg = element_by_id(html, f"latent-{n}-histogram")
    assert svg.tag == "svg" and len(find_all(svg, "rect")) == ev.report["hist_bins"]
    assert "activation" in svg.text and "firings" in svg.text
    assert "equal-width intervals" in text_of(html, "latent-quantiles")
    assert len(ids(html, "quantile-")) >= reports.QUANTILE_INTERVALS
    chips = find_all(element_by_id(html, "latent-top-logits"), "li", class_="chip")
    assert len(chips) == 10 and "logit lens value" in chips[0].get("title")
    nb = ev.latents["neighbour_ids"][n].tolist()
    link = element_by_id(html, f"neighbour-{nb[0]}")
    assert link.get("href").startswith(f"/trainings/{t.id}/latents/{nb[0]}")
    assert "automatic hint" in text_of(html, "latent-auto-label")
    assert attr(html, "label-form", "hx-put") == f"/trainings/{t.id}/latents/{n}/label"
    # helper P's boxes: try it (this latent) and steer (a causal LM)
    assert attr(html, "try-form", "action") == f"/trainings/{t.id}/activations"
    form = element_by_id(html, "try-form")
    assert [e.get("value") for e in form.iter() if e.get("name") == "latent"] == [str(n)]
    steer = element_by_id(html, "steer-form")
    assert [e.get("value") for e in steer.iter() if e.get("name") == "latent"] == [str(n)]
    assert "latent-no-details" not in ids(html)


def test_encoder_model_has_null_logits(client, app, tmp_path):
    t, ev = real(tmp_path, "bert")
    n = busiest(ev)
    data = client.get(f"/trainings/{t.id}/latents/{n}", headers=JSON).get_json()
    assert data["top_logits"] is None and data["bottom_logits"] is None
    assert data["histogram"] is not None and data["neighbours"]
    assert data["auto_label"] and "→" not in data["auto_label"]
    rep = client.get(f"/trainings/{t.id}/report", headers=JSON).get_json()
    assert rep["has_logits"] is False and rep["kl_div_score"] is None
    html = client.get(f"/trainings/{t.id}/latents/{n}").data.decode()
    assert "no output embedding" in text_of(html, "latent-logits")
    assert "steer-form" not in ids(html) and "try-form" in ids(html)
    sb = client.get(f"/trainings/{t.id}/report?format=saebench").get_json()
    assert sb["eval_result_metrics"]["model_behavior_preservation"]["kl_div_score"] is None
    assert sb["eval_config"]["compute_kl"] is False


def test_without_latent_details_everything_answers(client, app, tmp_path):
    t, ev = real(tmp_path, "gpt2", latent_details=False)
    assert "hist_counts" not in ev.latents and ev.report["latent_details"] is False
    n = busiest(ev)
    data = client.get(f"/trainings/{t.id}/latents/{n}", headers=JSON).get_json()
    for key in ("histogram", "quantiles", "top_logits", "bottom_logits", "neighbours",
                "contexts_fired", "encoder_norm"):
        assert data[key] is None, key
    assert data["contexts"] and data["auto_label"] and data["details"] is False
    for url in (f"/trainings/{t.id}/report", f"/trainings/{t.id}/latents/{n}",
                f"/trainings/{t.id}/report?format=saebench",
                f"/trainings/{t.id}/report?by=label&q=x", f"/trainings/{t.id}/report?sort=id"):
        assert client.get(url).status_code == 200, url
    html = client.get(f"/trainings/{t.id}/latents/{n}").data.decode()
    assert "latent-no-details" in ids(html) and "latent-quantiles" not in ids(html)
    sb = client.get(f"/trainings/{t.id}/report?format=saebench").get_json()
    assert sb["eval_result_details"] == []
    assert sb["eval_config"]["compute_featurewise_density_statistics"] is False
    # the token search still counts the top contexts' firings
    token = data["contexts"][0]["tokens"][data["contexts"][0]["center"]]["text"]
    page = reports.latents_page(t, by="token", q=token)
    assert n in [r["id"] for r in page["rows"]]


def test_format1_folder_still_reads(client, done):
    rep = client.get(f"/trainings/{done.id}/report", headers=JSON).get_json()
    assert rep["format_version"] == 1 and rep["latent_details"] is False
    for key in reports.SAEBENCH_KEYS:
        assert rep[key] is None, key
    data = client.get(f"/trainings/{done.id}/latents/3", headers=JSON).get_json()
    for key in ("histogram", "quantiles", "top_logits", "bottom_logits", "neighbours",
                "contexts_fired"):
        assert data[key] is None, key
    assert data["auto_label"] == "'cat'/'↵'"  # its two top contexts' tokens, no logits
    html = client.get(f"/trainings/{done.id}/report").data.decode()
    assert "older evaluation format" in text_of(html, "saebench-missing")
    sb = client.get(f"/trainings/{done.id}/report?format=saebench")
    assert sb.status_code == 200 and sb.get_json()["eval_result_details"] == []
    assert sb.get_json()["eval_result_metrics"]["reconstruction_quality"]["mse"] == 0.0123


def test_saebench_output_schema(client, app, tmp_path):
    t, ev = real(tmp_path, "gpt2")
    rep = ev.report
    sb = client.get(f"/trainings/{t.id}/report?format=saebench").get_json()
    assert set(sb) == set(SCHEMA["top_level"]) and sb["eval_type_id"] == SCHEMA["eval_type_id"]
    assert set(sb["eval_config"]) == set(SCHEMA["eval_config"])
    metrics = sb["eval_result_metrics"]
    assert {cat: set(v) for cat, v in metrics.items()} == {
        cat: set(v) for cat, v in SCHEMA["eval_result_metrics"].items()}
    for cat, fields in metrics.items():  # every metric measured on a causal LM
        for name, value in fields.items():
            assert isinstance(value, int | float), (cat, name, value)
    assert metrics["shrinkage"]["l2_ratio"] == pytest.approx(rep["l2_ratio"])
    assert metrics["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(
        rep["kl_div"])
    assert metrics["model_performance_preservation"]["ce_loss_score"] == pytest.approx(
        rep["ce_loss_recovered"])
    assert metrics["misc_metrics"]["frac_alive"] == pytest.approx(rep["frac_alive"])
    assert metrics["token_stats"]["total_tokens_eval_reconstruction"] == rep["scored_tokens"]
    cfg = sb["eval_config"]
    assert cfg["context_size"] == rep["context_size"] and cfg["compute_kl"] is True
    assert cfg["batch_size_prompts"] * cfg["n_eval_reconstruction_batches"] == rep["contexts"]
    details = sb["eval_result_details"]
    assert len(details) == rep["d_sae"] and set(details[0]) == set(SCHEMA["eval_result_details"])
    lat = ev.latents
    n = busiest(ev)
    row = details[n]
    assert row["index"] == n
    assert row["feature_density"] == pytest.approx(float(lat["frequency"][n]))
    assert row["consistent_activation_heuristic"] == pytest.approx(
        float(lat["frequency"][n]) * rep["scored_tokens"] / int(lat["contexts_fired"][n]))
    assert row["max_decoder_cosine_sim"] == pytest.approx(
        float(lat["max_decoder_cosine_per_latent"][n]))
    dead = [d for d in details if d["feature_density"] == 0]
    assert all(d["consistent_activation_heuristic"] is None for d in dead)
    assert sb["datetime_epoch_millis"] == int(rep["created_at"] * 1000)
    again = client.get(f"/trainings/{t.id}/report?format=saebench").get_json()
    assert again["eval_id"] == sb["eval_id"]  # stable for one report


def test_report_page_saebench_section(client, app, tmp_path):
    t, ev = real(tmp_path, "gpt2")
    html = client.get(f"/trainings/{t.id}/report").data.decode()
    section = element_by_id(html, "report-saebench")
    for key in ("l2_ratio", "cossim", "relative_reconstruction_bias", "freq_over_1_percent",
                "freq_over_10_percent", "max_decoder_cosine", "near_duplicate_share"):
        row = element_by_id(section, f"saebench-{key}")
        assert f"{ev.report[key]:.4f}" in row.text, key
        assert row.children and find_all(row, "th")[0].get("title"), key  # its definition
    assert attr(html, "saebench-json", "href") == f"/trainings/{t.id}/report?format=saebench"
    assert "label-col" in html  # the table's label column
    form = element_by_id(html, "try-form")  # the whole SAE: no latent field
    assert [e for e in form.iter() if e.get("name") == "latent"] == []


def brute_force_fires(ev: Any, token_ids: set[int]) -> dict[int, int]:
    """Firings on ``token_ids`` per latent among its top and sample entries, each firing
    (context, position) once."""
    lat, c = ev.latents, window_center(ev)
    out: dict[int, int] = {}
    for n in range(ev.report["d_sae"]):
        seen: dict[tuple[int, int], int] = {}
        for prefix in ("top", "sample"):
            for j in range(lat[f"{prefix}_context"].shape[1]):
                ctx = int(lat[f"{prefix}_context"][n, j])
                if ctx >= 0:
                    seen[(ctx, int(lat[f"{prefix}_position"][n, j]))] = \
                        int(lat[f"{prefix}_tokens"][n, j, c])
        count = sum(tok in token_ids for tok in seen.values())
        if count:
            out[n] = count
    return out


def test_token_search(client, app, tmp_path):
    t, ev = real(tmp_path, "gpt2")
    n = busiest(ev)
    center = int(ev.latents["top_tokens"][n, 0, window_center(ev)])
    text = ev.vocab[str(center)]
    matching = {int(i) for i, s in ev.vocab.items()
                if s == text or (text.strip() and s.strip().casefold() ==
                                 text.strip().casefold())}
    page = reports.latents_page(t, by="token", q=text, per_page=500)
    assert {tok["id"] for tok in page["tokens"]} == matching
    fires = brute_force_fires(ev, matching)
    promoters = {}
    for tok in matching:
        for m, v in zip(ev.latents["token_promoter_ids"][tok].tolist(),
                        ev.latents["token_promoter_values"][tok].tolist(), strict=True):
            promoters[m] = max(promoters.get(m, -1e30), v)
    rows = page["rows"]
    assert {r["id"] for r in rows} == set(fires) | set(promoters)
    assert page["matches"] == len(rows) and page["sort"] == "match"
    for r in rows:
        assert r["fires"] == fires.get(r["id"], 0)
        if r["id"] in promoters:
            assert r["promotes"] == pytest.approx(promoters[r["id"]])
        else:
            assert r["promotes"] is None
    key = [(-r["fires"], -(r["promotes"] if r["promotes"] is not None else -1e30), r["id"])
           for r in rows]
    assert key == sorted(key)  # by match: fires, then promotes
    assert n in fires
    # through the web: the fragment shows the match columns; a bad token is a 422
    html = client.get(f"/trainings/{t.id}/report", query_string={"by": "token", "q": text},
                      headers=HX).data.decode()
    assert f"latent-row-{rows[0]['id']}" in ids(html) and "latents-token-help" in ids(html)
    bad = client.get(f"/trainings/{t.id}/report?by=token&q=zzzqqq", headers=JSON)
    assert bad.status_code == 422 and "No token of the vocabulary" in bad.get_json()["errors"][
        "q"]
    assert client.get(f"/trainings/{t.id}/report?by=nope", headers=JSON).status_code == 422
    assert client.get(f"/trainings/{t.id}/report?by=label&sort=match",
                      headers=JSON).status_code == 422
    # the search form keeps the table's sort for id searches, not for a token search
    kept = client.get(f"/trainings/{t.id}/report?by=id&q=3&keep_sort=id&keep_order=desc",
                      headers=JSON).get_json()["latents"]
    assert (kept["sort"], kept["order"]) == ("id", "desc")
    tok = client.get(f"/trainings/{t.id}/report", query_string={
        "by": "token", "q": text, "keep_sort": "id"}, headers=JSON).get_json()["latents"]
    assert tok["sort"] == "match"


def test_label_route(client, app, tmp_path):
    t, ev = real(tmp_path, "gpt2")
    n = busiest(ev)
    url = f"/trainings/{t.id}/latents/{n}/label"
    r = client.put(url, json={"label": "Verse  of", "notes": "seen in Genesis"}, headers=JSON)
    assert r.status_code == 200
    state = r.get_json()
    assert {k: state[k] for k in ("training_id", "latent", "label", "notes")} == {
        "training_id": t.id, "latent": n, "label": "Verse of", "notes": "seen in Genesis"}
    assert state["auto_label"]
    # a JSON body without an Accept header still answers JSON
    assert client.post(url, json={"notes": "more"}).get_json()["notes"] == "more"
    data = client.get(f"/trainings/{t.id}/latents/{n}", headers=JSON).get_json()
    assert (data["label"], data["notes"]) == ("Verse of", "more")
    # the table shows and finds it
    page = client.get(f"/trainings/{t.id}/report?by=label&q=verse", headers=HX).data.decode()
    assert ids(page, "latent-row-") == [f"latent-row-{n}"]
    assert "Verse of" in element_by_id(page, f"latent-row-{n}").text
    # htmx: the editor fragment, the heading and the title swapped out of band
    r = client.put(url, data={"label": "Cats & <dogs>", "notes": ""}, headers=HX)
    html = r.data.decode()
    assert r.status_code == 200 and "<html" not in html
    assert html.strip().startswith('<section class="panel latent-label" id="latent-label">')
    heading = element_by_id(html, "latent-title-label")
    assert heading.get("hx-swap-oob") == "true" and heading.text == "Cats & <dogs>"
    assert "<title>Cats &amp; &lt;dogs&gt; · Latent" in html and "<dogs>" not in html
    assert "label-saved" in ids(html)
    page = client.get(f"/trainings/{t.id}/latents/{n}").data.decode()
    assert text_of(page, "latent-title-label") == "Cats & <dogs>"
    assert "<title>Cats &amp; &lt;dogs&gt; · Latent" in page
    # errors: JSON 422 by field; htmx 422 the fragment with the messages; nothing written
    r = client.put(url, json={"label": "x" * 201, "notes": "y" * 5001}, headers=JSON)
    assert r.status_code == 422 and set(r.get_json()["errors"]) == {"label", "notes"}
    r = client.put(url, data={"label": "x" * 201}, headers=HX)
    assert r.status_code == 422 and "at most 200" in text_of(r.data.decode(),
                                                             "label-text-error")
    assert attr(r.data.decode(), "label-text", "value") == "x" * 201  # what was typed stays
    assert client.put(url, data="[1]", content_type="application/json",
                      headers=JSON).status_code == 422
    assert client.get(f"/trainings/{t.id}/latents/{n}", headers=JSON).get_json()[
        "label"] == "Cats & <dogs>"
    # a plain form (no JavaScript) goes back to the page
    r = client.post(url, data={"label": "plain"})
    assert r.status_code == 303 and r.headers["Location"].endswith(
        f"/trainings/{t.id}/latents/{n}#latent-label")
    # both blank: the label is gone
    r = client.put(url, json={"label": "", "notes": " "}, headers=JSON)
    assert r.get_json()["label"] is None and r.get_json()["notes"] is None
    # unknown latent or training
    d_sae = ev.report["d_sae"]
    r = client.put(f"/trainings/{t.id}/latents/{d_sae}/label", json={"label": "a"},
                   headers=JSON)
    assert r.status_code == 404 and "does not exist" in r.get_json()["error"]
    assert client.put("/trainings/999/latents/0/label", json={"label": "a"},
                      headers=JSON).status_code == 404
    running = make_training(make_model(name="m2"), make_dataset(name="d2"), "training",
                            out_dir=tmp_path)
    r = client.put(f"/trainings/{running.id}/latents/0/label", json={"label": "a"},
                   headers=JSON)
    assert r.status_code == 404 and "appears when the training ends" in r.get_json()["error"]


def test_prev_next_follow_the_search(client, app, tmp_path):
    t, ev = real(tmp_path, "gpt2")
    from worker.jobs import latent_labels

    d_sae = ev.report["d_sae"]
    with db.connection_context():
        for m in (2, 40, 7):
            latent_labels.set_label(t.id, m, label=f"topic {m}")
    # by label, sorted by id: 2 -> 7 -> 40
    html = client.get(f"/trainings/{t.id}/report?by=label&q=topic&sort=id", headers=HX) \
        .data.decode()
    href = f"/trainings/{t.id}/latents/7?sort=id&order=asc&by=label&q=topic"
    assert f'href="{href.replace("&", "&amp;")}"' in html
    page = client.get(href).data.decode()
    assert attr(page, "latent-prev", "href") == href.replace("/7?", "/2?")
    assert attr(page, "latent-next", "href") == href.replace("/7?", "/40?")
    assert "2 of 3 in the table's order (search)" in text_of(page, "latent-nav-pos")
    assert attr(page, "latent-back", "href") == \
        f"/trainings/{t.id}/report?sort=id&order=asc&by=label&q=topic"
    nav = reports.latent_nav(t, 40, sort="id", order="asc", by="label", q="topic")
    assert (nav["prev"], nav["next"], nav["count"]) == (7, None, 3)
    # a latent outside the search: the whole table in that order
    nav = reports.latent_nav(t, 5, sort="id", order="asc", by="label", q="topic")
    assert (nav["prev"], nav["next"], nav["count"], nav["filtered"]) == (4, 6, d_sae, False)
    # arguments that do not parse fall back to the default order, never an error
    nav = reports.latent_nav(t, 5, sort="bogus", by="nope")
    assert nav["count"] == d_sae
    order = expected_order(ev.latents["frequency"].double().numpy())
    at = order.index(5)
    assert nav["prev"] == (order[at - 1] if at else None)
    assert client.get(f"/trainings/{t.id}/latents/5?sort=bogus&by=x&q=%3C").status_code == 200
