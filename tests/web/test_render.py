"""render.py: formats, page_or_fragment, the SVG charts."""

from __future__ import annotations

from webapp import render

from ..html import Element, find_all
from .conftest import HX


def _group(svg: str | Element, cls: str) -> Element:
    """The chart's one ``<g>`` of class ``cls`` (axis-x, axis-y, bars)."""
    (group,) = find_all(svg, "g", class_=cls)
    return group


def _tick_labels(svg: str | Element, axis: str) -> list[str]:
    return [t.text for t in find_all(_group(svg, f"axis-{axis}"), "text")]


def test_formats():
    assert render.fmt_num(0.123456) == "0.1235"
    assert render.fmt_sci(0.002) == "2.00e-3"
    assert render.fmt_int(12345) == "12,345"
    assert render.fmt_compact(25_000) == "25k"
    assert render.fmt_bytes(3 * 2**30) == "3.0 GiB"
    assert render.fmt_duration(3725) == "1h 02m" and render.fmt_duration(65) == "1m 05s"
    assert render.fmt_num(float("nan")) == "—" and render.fmt_num(None) == "—"
    assert render.device_label({"device": "cuda:0", "device_name": "Orin",
                                "device_memory": 6e9}) == "CUDA: Orin (5.6 GiB)"
    assert render.device_label({"device": "cpu"}) == "CPU"


def test_downsample_keeps_ends():
    pts = [(i, float(i)) for i in range(1001)]
    out = render.downsample(pts)
    assert len(out) <= 200 and out[0] == (0, 0.0) and out[-1] == (1000, 1000.0)
    assert render.downsample([(1, float("nan")), (2, 1.0)]) == [(2.0, 1.0)]


def test_line_chart_svg():
    svg = str(render.line_chart([(s, 1.0 / s) for s in range(1, 1001)], label="loss",
                                chart_id="c1"))
    assert svg.startswith('<svg id="c1"') and svg.endswith("</svg>")
    assert len(find_all(svg, "circle")) == 200
    assert sum(t.text.startswith("step ") for t in find_all(svg, "title")) == 200
    assert "<title>step 1: loss 1.0000</title>" in svg
    assert 'class="axis axis-y"' in svg and 'class="axis axis-x"' in svg
    labels = _tick_labels(svg, "y") + _tick_labels(svg, "x")
    assert "1,000" in labels or "1000" in labels, labels
    assert len(labels) >= 6
    empty = str(render.line_chart([], label="L0", chart_id="c2"))
    assert "Waiting for the first metrics" in empty and "<circle" not in empty
    flat = str(render.line_chart([(1, 2.0), (2, 2.0)], label="L0", chart_id="c3", digits=1))
    assert "<title>step 2: L0 2.0</title>" in flat


def test_page_or_fragment(app):
    with app.test_request_context("/", headers=HX):
        assert render.is_fragment_request()
        html, status = render.page_or_fragment("trainings/index.html", "_flash.html",
                                               message="hi", status=200,
                                               **_form_ctx())
        assert status == 200 and "<html" not in html and "hi" in html
    with app.test_request_context("/", headers={**HX, "HX-Boosted": "true"}):
        assert not render.is_fragment_request()
    with app.test_request_context("/"):
        assert not render.is_fragment_request()
        assert not render.wants_json()
    with app.test_request_context("/", headers={"Accept": "application/json"}):
        assert render.wants_json()
    with app.test_request_context("/?format=json"):
        assert render.wants_json()


def _form_ctx():
    return {}


def test_healthz_and_topbar(client):
    data = client.get("/healthz").get_json()
    assert data == {"web": "ok", "worker_heartbeat_age_s": None, "worker_alive": False,
                    "device": None, "device_name": None}
    from .conftest import heartbeat
    heartbeat("cuda:0", "Orin", 6 * 10**9)
    data = client.get("/healthz").get_json()
    assert data["worker_alive"] is True and data["device"] == "cuda:0"
    page = client.get("/").data.decode()
    assert "CUDA: Orin (5.6 GiB)" in page and "worker alive" in page
    frag = client.get("/healthz", headers=HX).data.decode()
    assert frag.strip().startswith('<div id="worker-status"')


def test_static_vendor(client):
    page = client.get("/").data.decode()
    assert "vendor/htmx-2.0.11.min.js" in page and "vendor/htmx-ext-ws-2.0.4.js" in page
    assert client.get("/static/vendor/htmx-2.0.11.min.js").status_code == 200
    js = client.get("/static/app.js").data.decode()
    assert "responseHandling" in js and '"422"' in js
    css = client.get("/static/app.css").data.decode()
    assert "tabular-nums" in css and "@keyframes pulse" in css


def test_histogram_svg():
    edges = [-7 + 0.25 * i for i in range(29)]
    counts = [0] * 28
    counts[4], counts[27] = 3, 12
    svg = str(render.histogram_svg(edges, counts, chart_id="h1", label="density <x>"))
    assert svg.startswith('<svg id="h1" class="chart histogram"') and svg.endswith("</svg>")
    assert 'aria-label="density &lt;x&gt;"' in svg and 'data-bins="28"' in svg
    assert svg.count("<rect x=") == 28
    assert "<title>log10 frequency -6.00 to -5.75: 3 latents</title>" in svg
    assert "<title>log10 frequency -0.25 to 0.00: 12 latents</title>" in svg
    assert _tick_labels(svg, "x") == ["-7", "-6", "-5", "-4", "-3", "-2", "-1", "0"]
    assert ">log10 frequency</text>" in svg and ">latents</text>" in svg
    y_labels = _tick_labels(svg, "y")
    assert y_labels[0] == "0" and float(y_labels[-1]) >= 12
    assert all(float(v) == int(float(v)) for v in y_labels)  # whole counts
    # the tallest bar reaches the top of the plot, an empty bin has no height
    heights = [float(r.get("height")) for r in find_all(_group(svg, "bars"), "rect")]
    assert heights[0] == 0 and heights[27] == max(heights) > heights[4] > 0
    small = str(render.histogram_svg([0, 1, 2], [1, 0], chart_id="h2"))
    assert all(float(v) == int(float(v)) for v in _tick_labels(small, "y"))
    empty = str(render.histogram_svg(edges, [0] * 28, chart_id="h3"))
    assert "No alive latents." in empty and "<rect x=" not in empty
    broken = str(render.histogram_svg([0, 1], [1, 2, 3], chart_id="h4"))
    assert "No histogram." in broken
    assert "No histogram." in str(render.histogram_svg(["a", 1], [1], chart_id="h5"))


def test_tick_labels_differ_on_a_narrow_range():
    """L0 within 0.01 of 16 (k=16): the y labels carry the decimals of the tick step, not
    "16" four times; a flat series has one labelled gridline."""
    pts = [(s, 16 + 0.004 * ((s * 7) % 5 - 2) / 2) for s in range(1, 200)]
    svg = str(render.line_chart(pts, label="L0", chart_id="c1", digits=1))
    labels = _tick_labels(svg, "y")
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels
    assert labels == ["15.9975", "16.0000", "16.0025"]  # step 0.0025: four decimals each
    near_32 = str(render.line_chart([(s, 32 - 0.003 * (s % 3)) for s in range(1, 50)],
                                    label="L0", chart_id="c2", digits=1))
    assert len(set(_tick_labels(near_32, "y"))) == len(_tick_labels(near_32, "y")) >= 3
    flat = str(render.line_chart([(1, 16.0), (2, 16.0), (3, 16.0000000001)], label="L0",
                                 chart_id="c3", digits=1))
    assert _tick_labels(flat, "y") == ["16"]
    # the decimals follow the step: 10.25 is not cut to "10.2"; wide ranges keep whole numbers
    assert render._tick_labels([10.0, 10.25, 10.5, 10.75]) == ["10.00", "10.25", "10.50",
                                                               "10.75"]
    assert render._tick_labels([0.0, 200.0, 400.0]) == ["0", "200", "400"]
    assert render._tick_labels([0.0, 10000.0, 20000.0]) == ["0", "10k", "20k"]
    assert render._tick_labels([100000.0, 100002.0, 100004.0]) == ["100000", "100002",
                                                                   "100004"]


def test_card_l0_chart_labels_on_a_k16_run(client, app):
    """The served card: a TopK k=16 run whose L0 stays within 0.01 of 16 has distinct y labels
    on its L0 chart (it read "16, 16, 16")."""
    from worker.db import Metric, db

    from .conftest import make_dataset, make_model, make_training, metric

    t = make_training(make_model(), make_dataset(), "completed", steps=0, total=100)
    rows = [dict(metric(s, 100), l0=16 - 0.008 * (s % 7) / 6) for s in range(5, 101, 5)]
    with db.connection_context():
        Metric.insert_many([{"training": t.id, "step": r["step"], "data": r}
                            for r in rows]).execute()
    html = client.get(f"/trainings/{t.id}").data.decode()
    (chart,) = find_all(html, "svg", id=f"training-{t.id}-l0-chart")
    labels = _tick_labels(chart, "y")
    assert len(labels) >= 3 and len(set(labels)) == len(labels), labels


def test_a_short_run_has_whole_step_ticks():
    """Steps are whole numbers: a run with two metrics rows (steps 1 and 2) gets ticks at 1 and
    2, none at 1.2 or 1.5."""
    svg = str(render.line_chart([(1, 0.5), (2, 0.4)], label="loss", chart_id="c"))
    assert _tick_labels(svg, "x") == ["1", "2"]
    many = str(render.line_chart([(s, 1.0 / s) for s in range(10, 1001, 10)], label="loss",
                                 chart_id="d"))
    labels = _tick_labels(many, "x")
    assert labels and all(label.replace(",", "").isdigit() for label in labels), labels
