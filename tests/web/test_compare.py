"""The comparison page (``GET /compare``, ``worker.jobs.compare``): curves overlaid per run, the
table of final figures, the Pareto fronts, JSON, and the 404 / 422 answers."""

from __future__ import annotations

from typing import Any

import pytest

from worker import jobs
from worker.db import Training, db

from ..html import element_by_id, find_all, text_of
from .conftest import HX, JSON, make_dataset, make_model, make_training

TRAINING_KEYS = {"id", "name", "status", "final", "curves", "encoder_type", "layer",
                 "hook_point", "k", "l1_alpha", "l0_coef", "expansion_factor", "latent_dim",
                 "learning_rate", "seed", "batch_size", "total_steps"}
FINAL_KEYS = {"fvu", "l0", "dead", "dead_frac", "ce_loss_recovered", "kl_div", "window",
              "window_tokens", "step", "tokens"}
CURVE_KEYS = {"step", "tokens", "loss", "fvu", "l0", "dead", "dead_frac"}


def finished(model: Any, dataset: Any, *, fvu: float, l0: float, ce: float | None,
             config: dict[str, Any] | None = None, **kw: Any) -> Training:
    """A completed training with 100 steps of metrics and a held-out text evaluation."""
    t = make_training(model, dataset, "completed", steps=100, total=100, **kw)
    ev = {"measured_on": "heldout_text", "tokens": 2048, "scored_tokens": 1984, "fvu": fvu,
          "l0": l0, "dead": 30, "alive": 3042, "dead_frac": 30 / 3072,
          "ce_loss_recovered": ce, "kl_div": 0.2 if ce is not None else None, "report": False}
    with db.connection_context():
        t.result = {"steps": 100, "fvu": fvu + 0.01, "l0": l0, "eval": ev}
        if config:
            t.config = {**t.config, **config}
        t.save()
    return t


@pytest.fixture
def four(app: Any) -> list[Training]:
    """Four finished runs: C is dominated by B for FVU (higher L0 and FVU) but not for CE
    loss recovered (the best of all), which D then loses to C."""
    model, dataset = make_model(), make_dataset()
    a = finished(model, dataset, fvu=0.30, l0=20, ce=0.80, config={"k": 16})
    b = finished(model, dataset, fvu=0.20, l0=40, ce=0.90, config={"k": 32})
    c = finished(model, dataset, fvu=0.25, l0=80, ce=0.97, config={"k": 64})
    d = finished(model, dataset, fvu=0.10, l0=160, ce=0.95, config={"k": 128})
    return [a, b, c, d]


def get_json(client: Any, url: str) -> tuple[int, dict[str, Any]]:
    resp = client.get(url, headers=JSON)
    return resp.status_code, resp.get_json()


# ---------------------------------------------------------------------------- the front
def test_pareto_front_function():
    pts = [(1, 20, 0.3), (2, 40, 0.2), (3, 80, 0.25), (4, 160, 0.1), (5, None, 0.01),
           (6, 0, 0.01), (7, 40, 0.2), (8, 40, float("nan"))]
    assert jobs.pareto_front(pts) == [1, 2, 7, 4]  # equal points both stay; 3 is dominated
    assert jobs.pareto_front([(1, 10, 0.5), (2, 10, 0.4)]) == [2]  # same L0, better FVU
    ce = [(1, 20, 0.8), (2, 40, 0.9), (3, 80, 0.97), (4, 160, 0.95)]
    assert jobs.pareto_front(ce, higher_is_better=True) == [1, 2, 3]
    assert jobs.pareto_front([]) == []


def test_compare_json_pareto_and_keys(client, four):
    a, b, c, d = (t.id for t in four)
    status, data = get_json(client, f"/compare?ids={a},{b},{c},{d}")
    assert status == 200
    assert set(data) == {"trainings", "pareto"}
    assert set(data["pareto"]) == {"fvu", "ce_loss_recovered"}
    assert data["pareto"]["fvu"] == [a, b, d]
    assert data["pareto"]["ce_loss_recovered"] == [a, b, c]
    assert [t["id"] for t in data["trainings"]] == [a, b, c, d]  # the given order
    first = data["trainings"][0]
    assert TRAINING_KEYS <= set(first)
    assert set(first["final"]) == FINAL_KEYS and set(first["curves"]) == CURVE_KEYS
    assert first["name"] == "L3 topk k=16" and first["k"] == 16
    assert first["l1_alpha"] is None and first["l0_coef"] is None  # not a topk option
    assert first["latent_dim"] == 3072
    f = first["final"]
    assert (f["fvu"], f["l0"], f["ce_loss_recovered"], f["kl_div"]) == (0.3, 20, 0.8, 0.2)
    assert f["window"] == "heldout_text" and f["window_tokens"] == 1984
    assert f["dead_frac"] == pytest.approx(30 / 3072)
    curves = first["curves"]
    assert curves["step"] == list(range(10, 101, 10))
    assert curves["tokens"] == [s * 128 for s in curves["step"]]  # step x batch size
    assert len({len(v) for v in curves.values()}) == 1
    assert curves["fvu"][-1] == pytest.approx(0.1)
    assert first["report_url"] == f"/trainings/{a}/report"


def test_compare_live_run_uses_latest_and_refreshes(client, four):
    a = four[0].id
    live = make_training(four[0].model, four[0].dataset, "training", steps=50, total=1000)
    status, data = get_json(client, f"/compare?ids={live.id},{a}")
    assert status == 200
    entry = data["trainings"][0]
    assert entry["status"] == "training" and entry["live"] is True
    assert entry["final"]["window"] == "training" and entry["final"]["step"] == 50
    assert entry["final"]["fvu"] == pytest.approx(0.3 * (1 - 0.05) + 0.1)
    assert entry["final"]["ce_loss_recovered"] is None
    assert entry["final"]["dead_frac"] == pytest.approx(0.0065 * 0.05)
    assert len(entry["curves"]["step"]) == 5
    frag = client.get(f"/compare?ids={live.id},{a}", headers=HX).data.decode()
    root = element_by_id(frag, "compare-body")
    assert root.get("hx-trigger") == "every 5s"
    assert root.get("hx-get") == f"/compare?ids={live.id},{a}"
    assert "training window" in text_of(frag, f"compare-row-{live.id}")
    # all finished: no polling
    done = client.get(f"/compare?ids={a}", headers=HX).data.decode()
    assert element_by_id(done, "compare-body").get("hx-trigger") is None


def test_compare_html_series_legend_and_pareto_links(client, four):
    a, b, c, d = four
    with db.connection_context():
        jobs.rename(b.id, "My <favourite> run")
    page = client.get(f"/compare?ids={a.id},{b.id},{c.id},{d.id}").data.decode()
    legend = element_by_id(page, "compare-legend")
    assert [li.get("id") for li in find_all(legend, "li")] == \
        [f"legend-{t.id}" for t in four]
    assert "My <favourite> run" in legend.text and "L3 topk k=128" in legend.text
    for key in ("loss", "fvu", "l0", "dead_frac"):
        chart = element_by_id(page, f"compare-{key}-chart")
        series = find_all(chart, "g", class_="series")
        assert [g.get("data-series") for g in series] == [str(t.id) for t in four], key
        names = [find_all(g, "title")[0].text for g in series]
        assert names[1] == "My <favourite> run"
    assert "(log scale)" in element_by_id(page, "compare-loss-chart").text
    assert "(log scale)" in element_by_id(page, "compare-fvu-chart").text
    assert "(log scale)" not in element_by_id(page, "compare-l0-chart").text
    fvu = element_by_id(page, "pareto-fvu-chart")
    assert fvu.get("data-points") == "4"
    assert find_all(fvu, "path", class_="frontier")[0].get("data-keys") == \
        f"{a.id},{b.id},{d.id}"
    links = [e.get("href") for e in find_all(fvu, "a")]
    assert links == [f"/trainings/{t.id}/report" for t in four]
    assert [e.get("data-series") for e in find_all(fvu, "circle", class_="on-frontier")
            ] == [str(a.id), str(b.id), str(d.id)]
    assert "(log scale)" in fvu.text  # L0 axis
    ce = element_by_id(page, "pareto-ce_loss_recovered-chart")
    assert find_all(ce, "path", class_="frontier")[0].get("data-keys") == \
        f"{a.id},{b.id},{c.id}"
    row = text_of(page, f"compare-row-{a.id}")
    assert "0.3000" in row and "80.0%" in row and "held-out text (1,984 tokens)" in row


def test_compare_table_sort(client, four):
    ids = ",".join(str(t.id) for t in four)
    _, by_fvu = get_json(client, f"/compare?ids={ids}&sort=fvu")
    assert [t["final"]["fvu"] for t in by_fvu["trainings"]] == [0.1, 0.2, 0.25, 0.3]
    _, desc = get_json(client, f"/compare?ids={ids}&sort=fvu&order=desc")
    assert [t["final"]["fvu"] for t in desc["trainings"]] == [0.3, 0.25, 0.2, 0.1]
    _, ce = get_json(client, f"/compare?ids={ids}&sort=ce_loss_recovered")  # best first
    assert [t["final"]["ce_loss_recovered"] for t in ce["trainings"]] == [0.97, 0.95, 0.9, 0.8]
    page = client.get(f"/compare?ids={ids}&sort=l0").data.decode()
    table = element_by_id(page, "compare-table")
    order = [r.get("id") for r in find_all(table, "tr") if r.get("id")]
    assert order == [f"compare-row-{t.id}" for t in four]  # l0 20, 40, 80, 160
    head = element_by_id(page, "col-l0")
    assert head.get("aria-sort") == "ascending"
    assert "order=desc" in find_all(head, "a")[0].get("href")  # click again: descending
    status, body = get_json(client, f"/compare?ids={ids}&sort=nope")
    assert status == 422 and "sort" in body["errors"]
    status, body = get_json(client, f"/compare?ids={ids}&order=up")
    assert status == 422 and "order" in body["errors"]


def test_compare_errors(client, four):
    a = four[0].id
    status, body = get_json(client, f"/compare?ids={a},9998,9999")
    assert status == 404 and "9998, 9999" in body["error"] and "do not exist" in body["error"]
    status, body = get_json(client, f"/compare?ids={a},x")
    assert status == 422 and "'x' is not a training id" in body["errors"]["ids"]
    status, body = get_json(client, "/compare?ids=1.5")
    assert status == 422
    status, body = get_json(client, "/compare")
    assert status == 422 and "at least one" in body["error"]
    many = ",".join(str(i) for i in range(1, 52))
    status, body = get_json(client, f"/compare?ids={many}")
    assert status == 422 and "at most 50" in body["error"]
    page = client.get("/compare?ids=9999")
    assert page.status_code == 404 and "Training 9999 does not exist." in page.data.decode()
    # repeated ids= (the training list's checkboxes) and duplicates
    status, data = get_json(client, f"/compare?ids={a}&ids={four[1].id}&ids={a}")
    assert status == 200 and [t["id"] for t in data["trainings"]] == [a, four[1].id]


def test_compare_without_metrics(client, app):
    t = make_training(make_model(), make_dataset(), "queued", steps=0)
    page = client.get(f"/compare?ids={t.id}")
    assert page.status_code == 200
    html = page.data.decode()
    assert "No metrics yet." in element_by_id(html, "compare-loss-chart").text
    assert element_by_id(html, "pareto-fvu-chart").get("data-points") == "0"
    assert "none yet" in text_of(html, "pareto-fvu-frontier")


def test_compare_without_ids_is_a_page_for_browsers(client, four):
    """"Compare selected" with nothing ticked (no JavaScript, or a typed URL): the compare page
    says what to do and links back, instead of a 422 error page; JSON keeps the 422."""
    for url in ("/compare", "/compare?", "/compare?ids=", "/compare?ids=,%20"):
        page = client.get(url)
        assert page.status_code == 200, url
        html = page.data.decode()
        assert "Choose at least one training" not in html
        assert "Nothing to compare yet" in text_of(html, "compare-empty")
        assert element_by_id(html, "compare-back").get("href").startswith("/")
    status, body = get_json(client, "/compare")
    assert status == 422 and "at least one" in body["error"]
    # the Training page's button: its hint says to tick trainings; without JS it still submits
    index = client.get("/").data.decode()
    button = element_by_id(index, "compare-selected")
    assert button.get("aria-describedby") == "compare-hint" and button.get("disabled") is None
    assert "Tick" in text_of(index, "compare-hint")


def test_compare_ce_chart_says_the_model_is_not_causal(client, app):
    """MiniLM (a BERT encoder) has no CE loss to recover: the CE chart says so rather than
    "No run has both figures yet"; a causal model's runs still get the chart."""
    bert = make_model(is_causal=False)
    dataset = make_dataset()
    runs = [finished(bert, dataset, fvu=f, l0=l0, ce=None) for f, l0 in ((0.3, 20), (0.2, 40))]
    ids = ",".join(str(t.id) for t in runs)
    html = client.get(f"/compare?ids={ids}").data.decode()
    box = element_by_id(html, "pareto-ce_loss_recovered")
    assert "not a causal LM" in box.text and "minilm-l6" in box.text
    assert "No run has both figures yet" not in box.text
    assert "pareto-ce_loss_recovered-frontier" not in [e.get("id") for e in box.iter()]
    assert element_by_id(html, "pareto-fvu-chart").get("data-points") == "2"
    # mixed: the causal run is drawn, the note names the model whose runs are left out
    gpt = finished(make_model(name="smollm2-135m", is_causal=True), dataset, fvu=0.25, l0=30,
                   ce=0.9)
    mixed = client.get(f"/compare?ids={ids},{gpt.id}").data.decode()
    chart = element_by_id(mixed, "pareto-ce_loss_recovered-chart")
    assert chart.get("data-points") == "1"
    assert "minilm-l6" in text_of(mixed, "pareto-ce_loss_recovered-note")
    # a model whose kind is unknown (an older row) keeps the generic empty chart
    plain = finished(make_model(name="old"), dataset, fvu=0.3, l0=20, ce=None)
    old = client.get(f"/compare?ids={plain.id}").data.decode()
    assert "No run has both figures yet" in text_of(old, "pareto-ce_loss_recovered-chart")
