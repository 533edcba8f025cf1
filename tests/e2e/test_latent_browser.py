"""End to end in headless Chromium against run.py (web server + a real Huey worker): the latent
page of an SAE trained on the bundled SmolLM2-135M (a causal LM, so it can be steered).

Adds smollm2-135m and kjv over the API, trains a small TopK SAE through the API, opens its
report, then the most frequent latent's page: its activation histogram and examples across
activation levels; types a text into "Try" and sees the tokens shaded; steers with the latent
and sees the baseline and steered texts side by side (different); sets a label and notes; back
on the report, finds the latent by searching its label; and on the whole-SAE "Try" box clicks a
token to see its latents. Screenshots: latent-try.png, latent-steer.png, latent-search.png,
report-try.png (docs/screenshots/ with `make screenshots`).
"""

from __future__ import annotations

import re
import time

import pytest

from tests.processes import wait_for

from .conftest import shot
from .test_browser import _wait_text
from .test_sweep_browser import _call

pytestmark = pytest.mark.browser

TEXT = "In the beginning God created the heaven and the earth. And the earth was without form."
PROMPT = "And God said,"
LABEL = "e2e label: bible prose"


def _alphas(page, selector: str) -> list[float]:
    styles = page.eval_on_selector_all(selector, "els => els.map(e => e.getAttribute('style'))")
    out = []
    for style in styles:
        m = re.search(r"rgba\([^)]*,\s*([0-9.]+)\)", style or "")
        out.append(float(m.group(1)) if m else 0.0)
    return out


def test_latent_page_try_steer_label_search(app_url, page):
    model_id = _ready_id(app_url, "models", "smollm2-135m")
    dataset_id = _ready_id(app_url, "datasets", "kjv", context_size="64", max_tokens="60000")
    row = _call(f"{app_url}/trainings", {
        "model_id": str(model_id), "dataset_id": str(dataset_id), "encoder_type": "topk",
        "k": "16", "expansion_factor": "2", "total_steps": "40", "batch_size": "256",
        "buffer_tokens": "4096", "eval_tokens": "2048", "log_every": "5",
        "auto_save_interval": "20"})
    tid = row["id"]
    wait_for(lambda: _call(f"{app_url}/trainings/{tid}")["status"] in
             ("completed", "failed", "interrupted"), 420, f"training {tid} ends")
    assert _call(f"{app_url}/trainings/{tid}")["status"] == "completed"
    wait_for(lambda: _report_ready(app_url, tid), 60, "its report")

    # The report: SAEBench's core metrics beside ours; the first row is the most frequent latent.
    page.goto(f"{app_url}/trainings/{tid}/report")
    page.wait_for_selector(f"#report-{tid}", timeout=20_000)
    assert re.search(r"L2 ratio", page.inner_text("body"), re.I)
    first = page.locator("#latents-table tbody tr a").first
    n = int(first.inner_text().lstrip("#"))
    first.click()
    page.wait_for_selector(f"#latent-{n}", timeout=10_000)
    assert page.locator("#latent-histogram svg rect").count() > 1, "no activation histogram"
    assert page.locator("#latent-quantiles .quantile").count() >= 2, "no examples by level"
    assert page.locator("#latent-logits").count() >= 1
    assert page.locator("#latent-neighbours a[id^=neighbour-]").count() == 10

    # Try: the text's tokens come back shaded by this latent.
    page.evaluate("window.__latent_marker = 1")
    page.fill("#try-text", TEXT)
    page.click("#try-form button[type=submit]")
    page.wait_for_selector("#try-tokens .probe-tok", timeout=120_000)
    alphas = _alphas(page, "#try-tokens .probe-tok:not(.probe-skip)")
    assert len(alphas) >= 10 and max(alphas) > 0, alphas
    assert page.locator("#try-tokens .probe-skip").count() >= 1  # BOS / position 0
    shot(page, "latent-try")

    # Steer: baseline and steered side by side, different at a large coefficient.
    page.fill("#steer-prompt", PROMPT)
    page.fill("#steer-coefficient", "200")
    page.fill("#steer-max-new-tokens", "12")
    page.click("#steer-form button[type=submit]")
    page.wait_for_selector("#steer-steered", timeout=180_000)
    baseline, steered = page.inner_text("#steer-baseline"), page.inner_text("#steer-steered")
    assert baseline.strip() and steered.strip() and baseline != steered, (baseline, steered)
    shot(page, "latent-steer")

    # Label: saved in place (no reload), the heading shows it, the JSON has it.
    page.fill("#label-text", LABEL)
    page.fill("#label-notes", "set by the browser test")
    page.click("#label-save")
    page.wait_for_selector("#label-saved", timeout=10_000)
    assert page.evaluate("window.__latent_marker") == 1, "the latent page reloaded"
    _wait_text(page, f"#latent-{n}", re.escape(LABEL), 10)
    data = _call(f"{app_url}/trainings/{tid}/latents/{n}")
    assert data["label"] == LABEL and data["notes"] == "set by the browser test"
    for key in ("histogram", "quantiles", "top_logits", "bottom_logits", "neighbours",
                "auto_label"):
        assert data[key], key

    # Search the table by label: the latent is found, its row shows the label.
    page.goto(f"{app_url}/trainings/{tid}/report")
    page.select_option("#latent-by", "label")
    page.fill("#latent-q", "bible")
    page.press("#latent-q", "Enter")
    page.wait_for_selector(f"#latent-row-{n}", timeout=10_000)
    assert page.locator("#latents-table tbody tr").count() == 1
    assert LABEL in page.inner_text(f"#latent-row-{n}")
    shot(page, "latent-search")

    # The whole SAE on a text: click a token, see its strongest latents (links to their pages).
    page.fill("#try-text", TEXT)
    page.click("#try-form button[type=submit]")
    page.wait_for_selector("#try-tokens details.probe-pop", timeout=60_000)
    start = time.time()
    pops = page.locator("#try-tokens details.probe-pop")
    pops.nth(3).locator("summary").click()
    page.wait_for_selector("#try-tokens details[open] .probe-latents a", timeout=5_000)
    assert time.time() - start < 5
    shot(page, "report-try")


def _report_ready(app_url: str, tid: int) -> bool:
    try:
        _call(f"{app_url}/trainings/{tid}/report")
    except Exception:  # 404 until the evaluation is written
        return False
    return True


def _ready_id(app_url: str, kind: str, source: str, **fields: str) -> int:
    """Add the bundled model or dataset over the API, wait until the worker has it: its id."""
    row = _call(f"{app_url}/{kind}", {"source": source, **fields})
    wait_for(lambda: _call(f"{app_url}/{kind}/{row['id']}")["status"] == "ready", 300,
             f"{kind} {source} ready")
    return int(row["id"])
