"""End to end in headless Chromium against run.py (web server + a real Huey worker): a sweep
started from the built-in "L0 sweep 20–200" preset (k = 20, 40, 80, 120, 200) with its steps
shrunk, watched live on its page until every run completed (no reload), then its Compare page
with the L0 Pareto charts. Screenshots: sweep.png and sweep-compare.png (docs/screenshots/ with
`make screenshots`)."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request

import pytest

from tests.processes import wait_for

from .conftest import shot
from .test_browser import _wait_text

pytestmark = pytest.mark.browser

STEPS = 40
"""Steps per run: enough to watch the lines move, small enough for ~1 minute on 2 cores."""
PRESET = "preset:l0-sweep-20-200"


def _call(url: str, data: dict | None = None) -> dict:
    body = None if data is None else urllib.parse.urlencode(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _ready(app_url: str, kind: str, source: str, **fields: str) -> None:
    """Add the bundled model or dataset over the API and wait until the worker has it."""
    row = _call(f"{app_url}/{kind}", {"source": source, **fields})
    wait_for(lambda: _call(f"{app_url}/{kind}/{row['id']}")["status"] == "ready", 180,
             f"{kind} {source} ready")


def test_sweep_from_the_l0_preset_live_then_compare(app_url, page):
    _ready(app_url, "models", "minilm-l6")
    _ready(app_url, "datasets", "kjv", context_size="64", max_tokens="100000")

    page.goto(f"{app_url}/")
    page.wait_for_selector("#start-training:not([disabled])", timeout=10_000)
    assert page.is_checked("#mode-single")
    # The preset: the form reloads in sweep mode with its k list.
    page.select_option("#input-template", PRESET)
    page.wait_for_selector("#training-form[data-mode=sweep]", timeout=10_000)
    assert page.is_checked("#mode-sweep")
    assert page.input_value("#input-k").replace(" ", "") == "20,40,80,120,200"
    assert page.inner_text("#start-training") == "Start sweep"
    # Fewer, smaller steps for this machine; the estimate follows (5 runs, one group).
    page.click("#training-advanced > summary")
    for name, value in (("total_steps", str(STEPS)), ("batch_size", "256"),
                        ("buffer_tokens", "4096"), ("eval_tokens", "512"),
                        ("log_every", "2"), ("auto_save_interval", "20")):
        page.fill(f"#input-{name}", value)
    page.keyboard.press("Tab")
    # The estimate the form shows is the one of these values (the preset's came first).
    expected = page.evaluate("""async () => {
        const q = new URLSearchParams(new FormData(document.getElementById('training-form')));
        const r = await fetch('/trainings/estimate?' + q, {headers: {Accept: 'application/json'}});
        return await r.json(); }""")
    assert expected["runs"] == 5 and expected["split"] is False, expected
    memory = f"{expected['memory_bytes'] / 2**20:.1f} MiB"
    _wait_text(page, "#estimate-memory", rf"^{re.escape(memory)}$", 10)
    assert page.inner_text("#estimate-runs") == "5"
    assert "Group memory" in page.inner_text("#training-estimate")
    shot(page, "sweep-form")
    page.click("#start-training")

    card = "#sweeps article[id^=sweep-]"
    page.wait_for_selector(card, timeout=20_000)
    sid = page.locator(card).first.get_attribute("id").split("-")[1]
    page.click(f"#sweep-{sid}-title a")
    page.wait_for_selector(f"#sweep-{sid}-config", timeout=10_000)
    page.evaluate("window.__no_reload_marker = 42")
    lines = page.locator(f"#sweep-{sid}-runs > li")
    assert lines.count() == 5

    # Live: run lines move (a step between 0 and the end, or evaluating) without a reload,
    # until every run completed.
    seen_progress = False
    deadline = time.time() + 170
    status = ""
    while time.time() < deadline:
        texts = [lines.nth(i).inner_text() for i in range(lines.count())]
        if any(re.search(rf"step ([1-9]\d*) / {STEPS}\b", t) and f"step {STEPS} / " not in t
               or "evaluating" in t for t in texts):
            seen_progress = True
        status = page.inner_text(f"#sweep-{sid}-status")
        if "completed" in status or "failed" in status:
            break
        time.sleep(0.2)
    assert "completed" in status, (status, [lines.nth(i).inner_text() for i in range(5)])
    assert seen_progress, "no run line moved while the page was open"
    assert page.evaluate("window.__no_reload_marker") == 42, "the page reloaded"
    for i in range(5):
        text = lines.nth(i).inner_text()
        assert re.search(r"FVU 0\.\d{3}", text) and re.search(r"L0 \d+\.\d", text), text
        assert f"step {STEPS} / {STEPS}" in text and "held-out text" in text, text
    assert page.locator(f"#sweep-{sid}[ws-connect]").count() == 0  # the final card
    shot(page, "sweep")

    # Compare: its five runs, the Pareto charts with their dots and the frontier.
    page.click(f"#sweep-{sid}-compare")
    page.wait_for_selector("#compare-pareto", timeout=20_000)
    assert page.locator("#pareto-fvu-chart").count() == 1
    # MiniLM is a BERT encoder: no CE loss, and the chart's place says so
    assert "not a causal LM" in page.inner_text("#pareto-ce_loss_recovered-note")
    assert page.get_attribute("#pareto-fvu-chart", "data-points") == "5"
    assert "#" in page.inner_text("#pareto-fvu-frontier")
    ids = [int(x) for x in page.url.split("ids=")[1].split("&")[0].split(",")]
    assert len(ids) == 5
    shot(page, "sweep-compare")  # the README's comparison picture
