"""Pages in a real browser: they fit a 390 px phone screen (nothing wider than the viewport, on
empty pages and with a model and a dataset row added through the forms), and the top bar says
when the server cannot be reached."""

from __future__ import annotations

import pytest

from .conftest import shot

pytestmark = pytest.mark.browser

WIDTH = 390
WIDER = f"""() => [...document.querySelectorAll('body *')]
    .filter(e => e.offsetParent !== null && e.getBoundingClientRect().right > {WIDTH + 1})
    .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : ''))"""


def _fits(page, url: str) -> None:
    page.goto(url)
    page.wait_for_timeout(300)
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTH, page.evaluate(WIDER)
    assert page.evaluate(WIDER) == []


def test_pages_fit_a_phone(app_url, browser):
    ctx = browser.new_context(viewport={"width": WIDTH, "height": 844})
    page = ctx.new_page()
    try:
        for path in ("/", "/models", "/datasets"):
            _fits(page, app_url + path)
        page.goto(f"{app_url}/models")
        page.fill("#model-form #input-source", "minilm-l6")
        page.click("#model-form button[type=submit]")
        page.wait_for_selector("#models-rows li")
        page.goto(f"{app_url}/datasets")
        page.fill("#dataset-form #input-source", "kjv")
        page.click("#dataset-form button[type=submit]")
        page.wait_for_selector("#datasets-rows li")
        for path in ("/models", "/datasets", "/models/1", "/datasets/1", "/"):
            _fits(page, app_url + path)
        shot(page, "training-phone")
    finally:
        ctx.close()


def test_top_bar_says_when_the_server_is_unreachable(app_url, page):
    page.goto(app_url + "/models")
    assert page.inner_text("#worker-alive") in ("worker alive", "worker offline")
    page.route("**/healthz", lambda route: route.abort())  # the server stops answering
    page.wait_for_function(
        "document.getElementById('worker-alive').textContent === 'server unreachable'",
        timeout=12_000)
    assert "unreachable" in page.get_attribute("#worker-status", "class")
    page.unroute("**/healthz")  # it answers again: the next poll restores the server's view
    page.wait_for_function(
        "document.getElementById('worker-alive').textContent !== 'server unreachable'",
        timeout=12_000)
