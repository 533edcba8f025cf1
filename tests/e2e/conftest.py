"""End-to-end fixtures: the real app (run.py: web server + Huey consumer) and headless Chromium."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.processes import RunPy

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Screenshots go to tests/artifacts/screenshots/ (ignored by git); `make screenshots` points
# $SAE_STUDIO_SCREENSHOTS at docs/screenshots/ to refresh the README's pictures.
SCREENSHOTS = Path(os.environ.get("SAE_STUDIO_SCREENSHOTS")
                   or ROOT / "tests" / "artifacts" / "screenshots")


def _unavailable(reason: str) -> None:
    """Outside CI a missing browser skips (saying why); in CI it fails."""
    if os.environ.get("CI"):
        pytest.fail(f"browser test cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """run.py (gunicorn + a Huey consumer) on a fresh data folder: its URL. Its output is read
    all along (a full pipe would stall it); Ctrl-C at the end must stop it with status 0."""
    run = RunPy(tmp_path_factory.mktemp("e2e-data"))
    yield run.url
    try:
        assert run.stop() == 0, "run.py should stop cleanly on Ctrl-C:\n" + "".join(run.lines)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        _unavailable("Debian's chromium is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Python playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    yield pg
    ctx.close()


def shot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")  # keep the sticky top bar at the top of the shot
    page.screenshot(path=str(path), full_page=True)
    return path
