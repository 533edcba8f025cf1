"""The live WebSocket, with a real client against a live server: a snapshot on connect, then
only the changed parts when the worker (here: the test) writes to the database."""

from __future__ import annotations

import json
import time

import simple_websocket

from worker.db import LogLine, Training, db

from .conftest import add_metric, make_training


def _close(ws) -> None:
    try:
        ws.close()
    except (simple_websocket.ConnectionClosed, OSError):
        pass  # the server closed it first (the client's socket may already be gone: EBADF)


def _receive_until(ws, predicate, timeout: float = 1.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        msg = ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        if msg is None:
            continue
        seen.append(msg)
        if predicate(msg):
            return msg, seen
    raise AssertionError(f"no matching message within {timeout} s; got {seen!r}"[:2000])


def test_ws_html_snapshot_then_changed_parts(live_server, ready):
    model, dataset = ready
    t = make_training(model, dataset, status="training", steps=100)
    ws = simple_websocket.Client.connect(f"ws://{live_server}/ws/trainings/{t.id}")
    try:
        snapshot = ws.receive(timeout=2)
        for part in ("status", "progress", "tiles", "charts", "buttons", "log", "checkpoints"):
            assert f'id="training-{t.id}-{part}"' in snapshot, part
        assert "Step 100 / 1,000" in snapshot
        time.sleep(0.3)
        start = time.monotonic()
        add_metric(t.id, 110)
        msg, _ = _receive_until(ws, lambda m: f'id="training-{t.id}-tiles"' in m, 1.0)
        assert time.monotonic() - start < 1.0
        assert f'id="training-{t.id}-charts"' in msg and "Step 110 / 1,000" in msg
        assert f'id="training-{t.id}-log"' not in msg  # only the changed parts
        with db.connection_context():
            LogLine.create(training=t.id, message="checkpoint saved at step 110")
        msg, _ = _receive_until(ws, lambda m: f'id="training-{t.id}-log"' in m, 1.0)
        assert "checkpoint saved at step 110" in msg and "-tiles" not in msg
        with db.connection_context():
            Training.update(status="completed", finished_at=time.time(), current_step=1000) \
                .where(Training.id == t.id).execute()
        msg, _ = _receive_until(ws, lambda m: m.startswith(f'<article id="training-{t.id}"'),
                                2.0)
        assert "ws-connect" not in msg and "badge-completed" in msg
        # the server closes the socket after the final state
        try:
            assert ws.receive(timeout=1) is None
        except simple_websocket.ConnectionClosed:
            pass
    finally:
        _close(ws)


def test_ws_json_events(live_server, ready):
    model, dataset = ready
    t = make_training(model, dataset, status="training", steps=50)
    ws = simple_websocket.Client.connect(f"ws://{live_server}/ws/trainings/{t.id}?format=json")
    try:
        events = [json.loads(ws.receive(timeout=2)) for _ in range(4)]
        assert [e["type"] for e in events] == ["status", "metrics", "log", "checkpoints"]
        assert events[0]["id"] == t.id and events[0]["status"] == "training"
        assert [r["step"] for r in events[1]["rows"]] == [10, 20, 30, 40, 50]
        add_metric(t.id, 60)
        msg, _ = _receive_until(ws, lambda m: json.loads(m)["type"] == "metrics", 1.0)
        assert [r["step"] for r in json.loads(msg)["rows"]] == [60]
    finally:
        _close(ws)


def test_ws_finished_and_missing(live_server, ready):
    model, dataset = ready
    t = make_training(model, dataset, status="completed", steps=20)
    ws = simple_websocket.Client.connect(f"ws://{live_server}/ws/trainings/{t.id}")
    try:
        msg = ws.receive(timeout=2)
        assert msg.startswith(f'<article id="training-{t.id}"') and "ws-connect" not in msg
    finally:
        _close(ws)
    ws = simple_websocket.Client.connect(f"ws://{live_server}/ws/trainings/999?format=json")
    try:
        assert json.loads(ws.receive(timeout=2)) == {"type": "error",
                                                     "error": "Training 999 does not exist."}
    finally:
        _close(ws)
