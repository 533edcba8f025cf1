"""In headless Chromium: a watched training that finishes closes its WebSocket without an error
in the browser's console. werkzeug's development server (``run.py --debug``) writes an HTTP
answer after the close frame, which Chromium logs as "Invalid frame header"; gunicorn does not.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.processes import RunPy
from tests.web.conftest import make_dataset, make_model, make_training
from worker.db import Training, db

pytestmark = pytest.mark.browser


def test_a_finished_training_closes_its_websocket_cleanly(browser, data_dir: Path) -> None:
    t = make_training(make_model(), make_dataset(), status="training", steps=100)
    run = RunPy(data_dir, "--no-worker")
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
        page.goto(run.url + "/")
        page.wait_for_selector(f"#training-{t.id}-status", timeout=20_000)
        time.sleep(1)  # the snapshot over the WebSocket
        with db.connection_context():  # as the worker finishes it
            Training.update(status="completed", finished_at=time.time(), current_step=1000) \
                .where(Training.id == t.id).execute()
        page.wait_for_selector(f"#training-{t.id}:not([ws-connect])", state="attached",
                               timeout=20_000)
        time.sleep(1)  # the close frame and the end of the connection
        assert "completed" in page.inner_text(f"#training-{t.id}").lower()
        assert not [m for m in console if "websocket" in m.lower()], console
    finally:
        ctx.close()
        assert run.stop() == 0
