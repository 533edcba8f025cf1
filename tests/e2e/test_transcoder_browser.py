"""End to end in headless Chromium against run.py (web server + a real Huey worker): a skip
transcoder standing in for MiniLM's layer-3 MLP (its input after the norm -> its output),
configured in the form (hook point, target hook point, skip connection), trained to
completion, then its card and report say what it maps and report its FVU on the target.
Screenshot: transcoder-report.png (docs/screenshots/ with `make screenshots`)."""

from __future__ import annotations

import re

import pytest

from .conftest import shot
from .test_browser import _wait_text
from .test_sweep_browser import _ready

pytestmark = pytest.mark.browser

STEPS = 40


def test_skip_transcoder_from_the_form_to_its_report(app_url, page):
    _ready(app_url, "models", "minilm-l6")
    _ready(app_url, "datasets", "kjv", context_size="64", max_tokens="100000")

    page.goto(f"{app_url}/")
    page.wait_for_selector("#start-training:not([disabled])", timeout=10_000)
    # The target hook point starts blank (an SAE) and lists the model's hook points.
    assert page.input_value("#input-target_hook_point") == ""
    offered = page.eval_on_selector_all("#input-target_hook_point option",
                                        "els => els.map(e => e.value)")
    assert {"mlp_in", "mlp_out"} <= set(offered), offered
    page.select_option("#input-hook_point", "mlp_in")
    page.select_option("#input-target_hook_point", "mlp_out")
    page.click("#training-advanced > summary")
    page.check("#input-skip_connection")
    for name, value in (("total_steps", str(STEPS)), ("batch_size", "256"),
                        ("buffer_tokens", "4096"), ("eval_tokens", "512"),
                        ("log_every", "5"), ("auto_save_interval", "20")):
        page.fill(f"#input-{name}", value)
    page.keyboard.press("Tab")
    page.click("#start-training")

    card = "article[id^=training-]"
    page.wait_for_selector(card, timeout=20_000)
    tid = page.locator(card).first.get_attribute("id").split("-")[1]
    meta = page.inner_text(f"#training-{tid}-meta")
    assert "MLP input → MLP output (skip transcoder)" in meta, meta
    assert "mlpin→mlpout skip" in page.inner_text(f"#training-{tid}-title"), \
        page.inner_text(f"#training-{tid}-title")
    _wait_text(page, f"#training-{tid}-status", r"completed|failed", 300)
    assert "completed" in page.inner_text(f"#training-{tid}-status").lower(), \
        page.inner_text(f"#training-{tid}")

    page.click(f"#training-{tid}-report")
    page.wait_for_selector(f"#report-{tid}", timeout=20_000)
    head = page.inner_text("#report-meta")
    assert "MLP input → MLP output (skip transcoder: FVU on the MLP output" in head, head
    fvu = page.inner_text("#report-tile-fvu")
    assert re.search(r"FVU\s+0\.\d{4}", fvu), fvu
    shot(page, "transcoder-report")
