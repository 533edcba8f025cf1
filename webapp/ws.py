"""Live card updates over a WebSocket (flask-sock).

``/ws/trainings/<id>`` sends a full snapshot of the card's parts on connect, then the parts
that changed, as the training's one shared poller (``live.Poller``) renders them for all its
viewers (one message per tick at most). It returns after sending the final state once the job
is finished, or when the client leaves.

``?format=json`` streams the same updates as JSON events for programs: ``status`` (the training
dict), ``metrics`` (new rows), ``log`` (new lines) and ``checkpoints`` (all items). The poller
builds each event once; metrics and log events carry only the items newer than this viewer's
snapshot (``live.Event.text_after``).

``/ws/sweeps/<id>`` does the same for a sweep's card (``sweeps.html_stream`` and
``sweeps.json_stream``: a ``snapshot`` event, then ``status`` and ``runs``).
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, request
from flask_sock import Sock

from worker import jobs
from worker.jobs import FINISHED

from . import live, sweeps
from .trainings import card_view, checkpoint_dict, render_card, render_parts, training_json

sock = Sock()
bp = Blueprint("ws", __name__)


def _html_stream(ws: Any, training_id: int) -> None:
    missing = f'<p id="training-{training_id}">Training {training_id} does not exist.</p>'
    sig = jobs.signatures(training_id)
    if sig is None:
        ws.send(missing)
        return
    if sig["row"].status in FINISHED:
        ws.send(render_card(card_view(sig["row"])))
        return
    with live.watch(training_id, sig, as_json=False) as viewer:
        try:  # the snapshot, read after subscribing: no update is older than it
            view = card_view(jobs.get_training(training_id))
        except jobs.NotFound:
            ws.send(missing)
            return
        if view["finished"]:
            ws.send(render_card(view))
            return
        ws.send(render_parts(view))
        for update in viewer.updates(ws):
            if update.html is not None:
                ws.send(update.html)


def _json_stream(ws: Any, training_id: int) -> None:
    sig = jobs.signatures(training_id)
    if sig is None or sig["row"].status in FINISHED:
        _json_snapshot(ws, training_id)
        return
    with live.watch(training_id, sig, as_json=True) as viewer:
        cursors = _json_snapshot(ws, training_id)
        if cursors is None:
            return
        for update in viewer.updates(ws):
            for event in update.events:
                text = event.text_after(cursors)
                if text is not None:
                    ws.send(text)


def _json_snapshot(ws: Any, training_id: int) -> dict[str, int] | None:
    """Send the four snapshot events; the viewer's cursors (newest metrics step and log line
    id), or None when the training is finished or missing (the stream ends)."""
    try:
        t = jobs.get_training(training_id)
    except jobs.NotFound as exc:
        ws.send(json.dumps({"type": "error", "error": str(exc)}))
        return None
    rows = jobs.metrics_rows(training_id)
    lines = jobs.log_lines(training_id)
    ws.send(json.dumps({"type": "status", **training_json(t)}))
    ws.send(json.dumps({"type": "metrics", "rows": rows}))
    ws.send(json.dumps({"type": "log", "lines": lines}))
    ws.send(json.dumps({"type": "checkpoints",
                        "items": [checkpoint_dict(c) for c in jobs.checkpoints(training_id)]}))
    if t.status in FINISHED:
        return None
    return {"metrics": rows[-1]["step"] if rows else -1, "log": lines[-1]["id"] if lines else 0}


@sock.route("/ws/sweeps/<int:sweep_id>", bp=bp)
def sweep_updates(ws: Any, sweep_id: int) -> None:
    """A sweep card's parts (``sweeps.html_stream``) or its JSON events (``?format=json``:
    ``snapshot``, then ``status`` and ``runs``; ``sweeps.json_stream``), through the same
    poller machinery as a training's."""
    if request.args.get("format") == "json":
        sweeps.json_stream(ws, sweep_id)
    else:
        sweeps.html_stream(ws, sweep_id)


@sock.route("/ws/trainings/<int:training_id>", bp=bp)
def training_updates(ws: Any, training_id: int) -> None:
    if request.args.get("format") == "json":
        _json_stream(ws, training_id)
    else:
        _html_stream(ws, training_id)
