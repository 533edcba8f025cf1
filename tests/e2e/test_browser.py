"""End to end in real headless Chromium against run.py (web server + a real Huey consumer).

Adds minilm-l6 and kjv through the forms, starts a training of a few hundred steps, watches the
progress bar, tiles and loss chart change without a reload (WebSocket fragments), pauses,
resumes, sees `evaluating` (with its progress) and then `completed`, opens the SAE report
(numbers, density histogram, latent search) and a latent's top contexts; then a second run of
the same settings, whose time estimate (calibrated by the first) must be within 30% of its
start-to-completed time. Saves screenshots to
tests/artifacts/screenshots/, or to docs/screenshots/ (the README shows them) with
`make screenshots`.
"""

from __future__ import annotations

import re
import time

import pytest

from .conftest import shot

pytestmark = pytest.mark.browser


def _wait_text(page, selector: str, pattern: str, timeout_s: float) -> str:
    deadline = time.time() + timeout_s
    text = ""
    while time.time() < deadline:
        loc = page.locator(selector)
        if loc.count():
            text = loc.first.inner_text()
            if re.search(pattern, text, re.IGNORECASE):
                return text
        time.sleep(0.25)
    raise AssertionError(f"{selector} never matched {pattern!r}; last text: {text!r}")


def _seconds(duration: str) -> int:
    """The seconds of a shown duration: "42s", "1m 05s", "2h 03m"."""
    m = re.fullmatch(r"(?:(\d+)h\s*)?(?:(\d+)m\s*)?(?:(\d+)s)?", duration.strip())
    assert m and any(m.groups()), duration
    h, mins, s = (int(g or 0) for g in m.groups())
    return 3600 * h + 60 * mins + s


def _fill_training_form(page, app_url: str) -> None:
    """The training form with both ready rows chosen and a few hundred small steps."""
    page.goto(f"{app_url}/")
    page.select_option("#input-model_id", index=1)
    page.select_option("#input-dataset_id", index=1)
    page.wait_for_selector("#start-training:not([disabled])", timeout=10_000)
    page.click("#training-advanced > summary")
    page.fill("#input-total_steps", "400")
    page.fill("#input-batch_size", "256")
    page.fill("#input-auto_save_interval", "100")
    if page.locator("#input-log_every").count():
        page.fill("#input-log_every", "5")
    page.keyboard.press("Tab")  # the last field's change event: the estimate follows it


def test_add_model_dataset_train_pause_resume_complete(app_url, page):
    # Models: add the bundled MiniLM and wait until the worker has it ready.
    page.goto(f"{app_url}/models")
    page.fill("#model-form #input-source", "minilm-l6")
    page.click("#model-form button[type=submit]")
    page.wait_for_selector("li[id^=model-]", timeout=20_000)
    _wait_text(page, "li[id^=model-] .row-status .badge", r"^ready$", 120)
    shot(page, "models")

    # Datasets: the bundled KJV, capped so tokenisation is quick.
    page.goto(f"{app_url}/datasets")
    page.fill("#dataset-form #input-source", "kjv")
    page.fill("#dataset-form #input-context_size", "64")
    page.fill("#dataset-form #input-max_tokens", "200000")
    page.click("#dataset-form button[type=submit]")
    page.wait_for_selector("li[id^=dataset-]", timeout=20_000)
    _wait_text(page, "li[id^=dataset-] .row-status .badge", r"^ready$", 120)
    shot(page, "datasets")

    # Training: choose both, a few hundred small steps; before any training the time is a guess.
    _fill_training_form(page, app_url)
    _wait_text(page, "#estimate-time", r"\(a guess\)", 10)
    page.evaluate("window.__no_reload_marker = 42")  # gone if the page reloads
    page.click("#start-training")

    card = "article[id^=training-]"
    page.wait_for_selector(card, timeout=20_000)
    tid = page.locator(card).first.get_attribute("id").split("-")[1]
    percent = f"#training-{tid}-percent"
    tiles = f"#training-{tid}-tiles"
    chart = f"#training-{tid}-loss-chart"

    # Live: the percentage, the tiles and the chart change while we watch, with no reload.
    first = _wait_text(page, percent, r"[1-9]", 120)
    first_tiles = page.inner_text(tiles)
    first_chart = page.locator(chart).inner_html() if page.locator(chart).count() else ""
    _wait_text(page, percent, r"^(?!" + re.escape(first) + r"$)", 60)
    deadline = time.time() + 60
    while time.time() < deadline and page.inner_text(tiles) == first_tiles:
        time.sleep(0.25)
    assert page.inner_text(tiles) != first_tiles, "metric tiles never changed"
    deadline = time.time() + 60
    while time.time() < deadline and (
            not page.locator(chart).count() or page.locator(chart).inner_html() == first_chart):
        time.sleep(0.25)
    assert page.locator(chart).inner_html() != first_chart, "loss chart never changed"
    assert page.evaluate("window.__no_reload_marker") == 42, "the page reloaded"
    shot(page, "training-live")

    # Pause, see it paused (and the step stand still), resume, run to completion.
    page.click(f"#training-{tid}-pause")
    _wait_text(page, f"#training-{tid}-status", r"paused", 30)
    step_a = page.inner_text(f"#training-{tid}-steps")
    time.sleep(1.5)
    assert page.inner_text(f"#training-{tid}-steps") == step_a, "a paused job kept stepping"
    shot(page, "training-paused")
    page.click(f"#training-{tid}-resume")
    _wait_text(page, f"#training-{tid}-status", r"training|evaluating|completed", 30)
    # After the last step: `evaluating` (with its progress) on the card, then `completed`.
    evaluating = _wait_text(page, f"#training-{tid}-status", r"evaluating|completed", 240)
    assert re.search(r"evaluating\s+Evaluating on held-out text \d+%", evaluating, re.I), \
        evaluating
    _wait_text(page, f"#training-{tid}-status", r"completed", 240)
    _wait_text(page, f"#training-{tid}-steps", r"Step 400 / 400", 10)
    assert page.evaluate("window.__no_reload_marker") == 42, "the page reloaded"
    page.wait_for_selector(f"#training-{tid}-export", timeout=10_000)
    shot(page, "training-completed")

    # The report: reached from the card once the worker has evaluated the SAE.
    page.click(f"#training-{tid}-report")
    page.wait_for_selector(f"#report-{tid}", timeout=20_000)
    assert re.search(r"FVU\s+0\.\d{4}", page.inner_text("#report-tile-fvu")), \
        page.inner_text("#report-tile-fvu")
    # minilm-l6 is an encoder: no next-token CE, and the page says why.
    assert "not a causal LM" in page.inner_text("#downstream-note")
    assert page.locator("#report-density svg rect").count() > 3, "no density histogram bars"
    assert page.locator("#latents-table tbody tr").count() == 50
    shot(page, "report")
    # Search a latent id: htmx swaps only the table, the page stays.
    page.evaluate("window.__report_marker = 7")
    page.fill("#latent-q", "5")
    page.press("#latent-q", "Enter")
    page.wait_for_selector("#latent-row-5.hit", timeout=10_000)
    assert page.evaluate("window.__report_marker") == 7, "the report page reloaded"
    # The most frequent latent's page (the first row by default): top contexts, shaded tokens.
    page.goto(f"{app_url}/trainings/{tid}/report")
    first = page.locator("#latents-table tbody tr a").first
    latent_id = first.inner_text().lstrip("#")
    first.click()
    page.wait_for_selector(f"#latent-{latent_id}", timeout=10_000)
    page.wait_for_selector("#latent-contexts", timeout=10_000)
    assert page.locator("#latent-contexts li.context").count() == 10
    assert page.locator("#latent-contexts .tok-center").count() == 10
    alpha = page.locator("#latent-contexts .tok-center").first.get_attribute("style")
    assert re.search(r"rgba\(91, 156, 255, (0\.[1-9]|1)", alpha), alpha
    shot(page, "latent")

    # A second run of the same settings: the estimate is now measured (from the first run) and
    # within 30% of the time from start to completed.
    _fill_training_form(page, app_url)
    _wait_text(page, "#estimate-basis", rf"from training #{tid}\b", 10)
    time.sleep(1.0)  # any refresh still on its way lands
    shown = page.inner_text("#estimate-time")
    estimate_s = _seconds(shown)
    page.click("#start-training")
    second = f"article[id^=training-]:not(#training-{tid})"
    page.wait_for_selector(second, timeout=20_000)
    tid2 = page.locator(second).first.get_attribute("id").split("-")[1]
    _wait_text(page, f"#training-{tid2}-status", r"completed", 300)
    row = page.request.get(f"{app_url}/trainings/{tid2}",
                           headers={"Accept": "application/json"}).json()
    real_s = row["finished_at"] - row["started_at"]
    print(f"time estimate {shown} ({estimate_s} s), start to completed {real_s:.1f} s")
    assert abs(estimate_s - real_s) <= 0.3 * real_s, \
        f"estimate {shown} ({estimate_s} s) vs {real_s:.1f} s from start to completed"
