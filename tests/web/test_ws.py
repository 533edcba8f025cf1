"""The live WebSocket, with a real client against a live server: a snapshot on connect, then
only the changed parts when the worker (here: the test) writes to the database."""

from __future__ import annotations

import json
import threading
import time

import simple_websocket

from webapp import live
from worker import jobs
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
    for missing in ("999", "9223372036854775808"):  # past the database's integers too
        ws = simple_websocket.Client.connect(
            f"ws://{live_server}/ws/trainings/{missing}?format=json")
        try:
            assert json.loads(ws.receive(timeout=2)) == {
                "type": "error", "error": f"Training {missing} does not exist."}
        finally:
            _close(ws)


# ------------------------------------------------------------------ one poller per training
def _pollers(training_id: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"ws-poller-{training_id}"]


def _wait_for(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_many_viewers_share_one_poller(live_server, ready):
    """Six HTML and two JSON viewers: one poller thread, identical fragments for all; a viewer
    that leaves does not stop the others; the poller ends with the training."""
    model, dataset = ready
    t = make_training(model, dataset, status="training", steps=100)
    html = [simple_websocket.Client.connect(f"ws://{live_server}/ws/trainings/{t.id}")
            for _ in range(6)]
    js = [simple_websocket.Client.connect(f"ws://{live_server}/ws/trainings/{t.id}?format=json")
          for _ in range(2)]
    try:
        for ws in html:
            assert f'id="training-{t.id}-tiles"' in ws.receive(timeout=2)
        for ws in js:
            assert [json.loads(ws.receive(timeout=2))["type"] for _ in range(4)] == \
                ["status", "metrics", "log", "checkpoints"]
        assert len(_pollers(t.id)) == 1
        assert len(live.poller(t.id).viewers) == 8
        time.sleep(0.3)

        add_metric(t.id, 110)
        got = [_receive_until(ws, lambda m: f'id="training-{t.id}-tiles"' in m)[0] for ws in html]
        assert "Step 110 / 1,000" in got[0] and all(m == got[0] for m in got)  # rendered once
        for ws in js:
            msg, _ = _receive_until(ws, lambda m: json.loads(m)["type"] == "metrics")
            assert [r["step"] for r in json.loads(msg)["rows"]] == [110]

        _close(html.pop())
        _close(js.pop())
        _wait_for(lambda: len(live.poller(t.id).viewers) == 6)
        add_metric(t.id, 120)
        got = [_receive_until(ws, lambda m: "Step 120 / 1,000" in m)[0] for ws in html]
        assert all(m == got[0] for m in got)
        msg, _ = _receive_until(js[0], lambda m: json.loads(m)["type"] == "metrics")
        assert [r["step"] for r in json.loads(msg)["rows"]] == [120]
        assert len(_pollers(t.id)) == 1

        with db.connection_context():
            Training.update(status="completed", finished_at=time.time(), current_step=1000) \
                .where(Training.id == t.id).execute()
        for ws in html:
            msg, _ = _receive_until(ws, lambda m: m.startswith(f'<article id="training-{t.id}"'),
                                    2.0)
            assert "badge-completed" in msg and "ws-connect" not in msg
        _receive_until(js[0], lambda m: json.loads(m).get("status") == "completed", 2.0)
        _wait_for(lambda: not _pollers(t.id) and live.poller(t.id) is None)
    finally:
        for ws in html + js:
            _close(ws)


def test_poller_stops_when_the_last_viewer_leaves(live_server, ready):
    model, dataset = ready
    t = make_training(model, dataset, status="training", steps=10)
    ws = simple_websocket.Client.connect(f"ws://{live_server}/ws/trainings/{t.id}")
    ws.receive(timeout=2)
    assert len(_pollers(t.id)) == 1
    _close(ws)
    _wait_for(lambda: not _pollers(t.id) and live.poller(t.id) is None)
    # a new viewer starts a new poller
    ws = simple_websocket.Client.connect(f"ws://{live_server}/ws/trainings/{t.id}")
    try:
        ws.receive(timeout=2)
        assert len(_pollers(t.id)) == 1
        add_metric(t.id, 20)
        _receive_until(ws, lambda m: "Step 20 / 1,000" in m)
    finally:
        _close(ws)


def test_a_viewer_that_does_not_read_is_dropped(app, ready):
    """A viewer whose queue is full is dropped (closed with 1013), the others keep getting
    updates; here the viewers are subscribed directly, the poller is the real one."""
    app.config.update(WS_QUEUE_UPDATES=2, WS_TICK_S=0.05)
    model, dataset = ready
    t = make_training(model, dataset, status="training", steps=10)
    with app.test_request_context("/"), db.connection_context():
        sig = jobs.signatures(t.id)
        with live.watch(t.id, sig, as_json=False) as slow, \
                live.watch(t.id, sig, as_json=False) as reader:
            for step in range(20, 80, 10):
                add_metric(t.id, step)
                update = reader.queue.get(timeout=2)
                assert f"Step {step} / 1,000" in update.html
            assert slow.closed_by == live.CLOSE_TOO_SLOW and slow.queue.qsize() == 2
            assert live.poller(t.id).viewers == {reader}


def test_json_event_after_a_snapshot_that_overlaps():
    """A JSON viewer gets the shared text when all items are new to it, only the newer items
    when its snapshot holds some, nothing when it holds all."""
    rows = ({"step": 10}, {"step": 20})
    event = live.Event("metrics", json.dumps({"type": "metrics", "rows": list(rows)}), rows)
    cursors = {"metrics": 5, "log": 0}
    assert event.text_after(cursors) == event.text and cursors["metrics"] == 20
    cursors["metrics"] = 10
    assert json.loads(event.text_after(cursors)) == {"type": "metrics", "rows": [{"step": 20}]}
    assert event.text_after(cursors) is None
    status = live.Event("status", '{"type": "status"}')
    assert status.text_after(cursors) == status.text
