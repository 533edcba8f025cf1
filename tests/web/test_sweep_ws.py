"""The sweep's live WebSocket (/ws/sweeps/<id>) with a real client against a live server: the
card's parts on connect, then only the changed run lines and status as the worker (here: the
test) writes to the database, the whole card once every run finished; ``?format=json``: a
snapshot, then ``status`` and ``runs`` events. One poller per sweep, beside the trainings'."""

from __future__ import annotations

import json
import threading
import time

import simple_websocket

from webapp import live, sweeps
from worker.db import Training, db

from .conftest import add_metric
from .test_sweeps import sweep_form
from .test_ws import _close, _receive_until, _wait_for


def _sweep(client, ready, **lists) -> tuple[int, list[int]]:
    model, dataset = ready
    body = client.post("/sweeps", json=sweep_form(model, dataset, **lists),
                       headers={"Accept": "application/json"}).get_json()
    return body["id"], body["trainings"]


def _update(ids: list[int], **values) -> None:
    with db.connection_context():
        Training.update(updated_at=time.time(), **values).where(Training.id.in_(ids)).execute()


def _pollers(sweep_id: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"ws-poller-sweep-{sweep_id}"]


def test_html_snapshot_then_changed_run_lines(live_server, client, ready, enqueued):
    sid, (a, b) = _sweep(client, ready, k=[8, 16])
    _update([a, b], status="training", current_step=0, started_at=time.time())
    ws = simple_websocket.Client.connect(f"ws://{live_server}/ws/sweeps/{sid}")
    try:
        snapshot = ws.receive(timeout=2)
        for part in ("status", "buttons", "runs", f"run-{a}", f"run-{b}"):
            assert f'id="sweep-{sid}-{part}"' in snapshot, part
        assert "ws-connect" not in snapshot  # parts only: the card that connected stays
        assert f'id="sweep-{sid}-pause"' in snapshot
        time.sleep(0.3)
        add_metric(a, 10)  # one run steps: its line, nothing else
        msg, _ = _receive_until(ws, lambda m: f'id="sweep-{sid}-run-{a}"' in m, 2.0)
        assert f'id="sweep-{sid}-run-{b}"' not in msg and f'id="sweep-{sid}-status"' not in msg
        assert "step 10 / 20" in msg and "FVU 0.397" in msg and "(training window)" in msg
        assert msg.lstrip().startswith(f'<li id="sweep-{sid}-run-{a}"')
        _update([b], status="paused")
        msg, _ = _receive_until(ws, lambda m: f'id="sweep-{sid}-run-{b}"' in m, 2.0)
        assert "badge-paused" in msg and f'id="sweep-{sid}-buttons"' in msg
        assert f'id="sweep-{sid}-resume"' in msg  # a paused run: Resume
        _update([a, b], status="completed", current_step=20, finished_at=time.time())
        msg, _ = _receive_until(ws, lambda m: m.startswith(f'<article id="sweep-{sid}"'), 2.0)
        assert "ws-connect" not in msg and "badge-completed" in msg
        assert f'id="sweep-{sid}-delete"' in msg
        try:  # the server closes the socket after the final state
            assert ws.receive(timeout=1) is None
        except simple_websocket.ConnectionClosed:
            pass
    finally:
        _close(ws)
    _wait_for(lambda: not _pollers(sid) and live.poller(sid, sweeps.SweepPoller) is None)


def test_json_snapshot_then_events(live_server, client, ready, enqueued):
    sid, (a, b) = _sweep(client, ready, k=[8, 16])
    _update([a, b], status="training")
    ws = simple_websocket.Client.connect(f"ws://{live_server}/ws/sweeps/{sid}?format=json")
    try:
        snap = json.loads(ws.receive(timeout=2))
        assert snap["type"] == "snapshot" and snap["sweep"]["id"] == sid
        assert snap["sweep"]["status"] == "running" and snap["sweep"]["trainings"] == [a, b]
        assert [r["id"] for r in snap["runs"]] == [a, b]
        assert all(r["status"] == "training" and r["sweep_id"] == sid for r in snap["runs"])
        time.sleep(0.3)
        add_metric(b, 30)
        msg, _ = _receive_until(ws, lambda m: json.loads(m)["type"] == "runs", 2.0)
        event = json.loads(msg)
        assert [r["id"] for r in event["runs"]] == [b]
        assert event["runs"][0]["current_step"] == 30 and event["runs"][0]["latest"]["fvu"]
        _update([a], status="stopped", finished_at=time.time())
        msg, _ = _receive_until(ws, lambda m: json.loads(m)["type"] == "status", 2.0)
        assert json.loads(msg)["sweep"]["counts"] == {"stopped": 1, "training": 1}
        _update([b], status="completed", finished_at=time.time())
        msg, _ = _receive_until(ws, lambda m: json.loads(m)["type"] == "status"
                                and json.loads(m)["sweep"]["status"] == "stopped", 2.0)
    finally:
        _close(ws)


def test_a_shared_poller_beside_a_training_stream(live_server, client, ready, enqueued):
    """Two sweep viewers and the stream of one of its trainings: one poller per kind and id,
    the same fragment for both sweep viewers; the training's stream is unchanged."""
    sid, (a, b) = _sweep(client, ready, k=[8, 16])
    _update([a, b], status="training")
    viewers = [simple_websocket.Client.connect(f"ws://{live_server}/ws/sweeps/{sid}")
               for _ in range(2)]
    training = simple_websocket.Client.connect(f"ws://{live_server}/ws/trainings/{a}")
    try:
        for ws in viewers:
            assert f'id="sweep-{sid}-runs"' in ws.receive(timeout=2)
        assert f'id="training-{a}-tiles"' in training.receive(timeout=2)
        assert len(_pollers(sid)) == 1
        assert len(live.poller(sid, sweeps.SweepPoller).viewers) == 2
        assert len(live.poller(a).viewers) == 1
        time.sleep(0.3)
        add_metric(a, 40)
        got = [_receive_until(ws, lambda m: "step 40 / 20" in m)[0] for ws in viewers]
        assert got[0] == got[1]
        _receive_until(training, lambda m: "Step 40 / 20" in m)
    finally:
        for ws in [*viewers, training]:
            _close(ws)
    _wait_for(lambda: not _pollers(sid))


def test_finished_and_missing(live_server, client, ready, enqueued):
    sid, (a, b) = _sweep(client, ready, k=[8, 16])
    _update([a, b], status="stopped", finished_at=time.time())
    ws = simple_websocket.Client.connect(f"ws://{live_server}/ws/sweeps/{sid}")
    try:
        msg = ws.receive(timeout=2)
        assert msg.startswith(f'<article id="sweep-{sid}"') and "ws-connect" not in msg
    finally:
        _close(ws)
    ws = simple_websocket.Client.connect(f"ws://{live_server}/ws/sweeps/{sid}?format=json")
    try:
        snap = json.loads(ws.receive(timeout=2))
        assert snap["type"] == "snapshot" and snap["sweep"]["status"] == "stopped"
    finally:
        _close(ws)
    for url in ("/ws/sweeps/999?format=json", "/ws/sweeps/9223372036854775808?format=json"):
        ws = simple_websocket.Client.connect(f"ws://{live_server}{url}")
        try:
            event = json.loads(ws.receive(timeout=2))
            assert event["type"] == "error" and "does not exist" in event["error"]
        finally:
            _close(ws)
    ws = simple_websocket.Client.connect(f"ws://{live_server}/ws/sweeps/999")
    try:
        assert ws.receive(timeout=2) == '<p id="sweep-999">Sweep 999 does not exist.</p>'
    finally:
        _close(ws)
