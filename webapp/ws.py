"""Live card updates over a WebSocket (flask-sock).

``/ws/trainings/<id>`` sends a full snapshot of the card's parts on connect, then loops on
``ws.receive(timeout=tick)`` as its tick: when the database changed (``jobs.changes_since``,
which sees the worker's commits from another process too) it compares each part's signature
(``jobs.signatures``) with the last one sent and sends only the parts that changed (one message
per tick at most). It returns after sending the final state once the job is finished, or when
the client leaves.

``?format=json`` streams the same updates as JSON events for programs: ``status`` (the training
dict), ``metrics`` (new rows), ``log`` (new lines) and ``checkpoints`` (all items).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, current_app, request
from flask_sock import Sock

from worker import jobs
from worker.jobs import FINISHED

from .trainings import card_view, checkpoint_dict, render_card, render_parts, training_json

sock = Sock()
bp = Blueprint("ws", __name__)


def _updates(ws: Any, training_id: int, tick: float, version: int | None, sig: dict[str, Any]
             ) -> Iterator[tuple[Any, list[str]]]:
    """Each tick (``tick`` seconds) on which the database changed since ``version``: the
    training's row and the names of the card parts whose signature differs from the last one
    (``sig``; maybe none). Ends when the training is deleted; raises ConnectionClosed when the
    client leaves."""
    while True:
        ws.receive(timeout=tick)  # the tick
        newer = jobs.changes_since(version)
        if newer is None:
            continue
        version = newer
        new = jobs.signatures(training_id)
        if new is None:
            return
        changed = [k for k in new if k != "row" and sig.get(k) != new[k]]
        sig = new
        yield new["row"], changed


def _html_stream(ws: Any, training_id: int, tick: float) -> None:
    # Read the version before the snapshot: a write that lands while it is being built or sent
    # then shows up as a change (at worst a part is sent twice), never as lost.
    version = jobs.changes_since(None)
    sig = jobs.signatures(training_id)
    if sig is None:
        ws.send(f'<p id="training-{training_id}">Training {training_id} does not exist.</p>')
        return
    view = card_view(sig["row"])
    if view["finished"]:
        ws.send(render_card(view))
        return
    ws.send(render_parts(view))
    for row, changed in _updates(ws, training_id, tick, version, sig):
        if row.status in FINISHED:
            # Final state: the whole card, without ws-connect (the socket is done).
            ws.send(render_card(card_view(row)))
            return
        if changed:
            ws.send(render_parts(card_view(row, with_metrics="charts" in changed), changed))
    ws.send(f'<article id="training-{training_id}" class="card gone">'
            f'Training {training_id} was deleted.</article>')


def _json_stream(ws: Any, training_id: int, tick: float) -> None:
    version = jobs.changes_since(None)  # before the snapshot (see _html_stream)
    sig = jobs.signatures(training_id) or {}
    try:
        t = jobs.get_training(training_id)
    except jobs.NotFound as exc:
        ws.send(json.dumps({"type": "error", "error": str(exc)}))
        return
    rows = jobs.metrics_rows(training_id)
    lines = jobs.log_lines(training_id)
    last_step = rows[-1]["step"] if rows else -1
    last_log = lines[-1]["id"] if lines else 0
    ws.send(json.dumps({"type": "status", **training_json(t)}))
    ws.send(json.dumps({"type": "metrics", "rows": rows}))
    ws.send(json.dumps({"type": "log", "lines": lines}))
    ws.send(json.dumps({"type": "checkpoints",
                        "items": [checkpoint_dict(c) for c in jobs.checkpoints(training_id)]}))
    if t.status in FINISHED:
        return
    for t, changed in _updates(ws, training_id, tick, version, sig):
        if set(changed) & {"status", "progress", "tiles"}:
            ws.send(json.dumps({"type": "status", **training_json(t)}))
        if "charts" in changed:
            rows = jobs.metrics_rows(training_id, after_step=last_step)
            if rows:
                last_step = rows[-1]["step"]
                ws.send(json.dumps({"type": "metrics", "rows": rows}))
        if "log" in changed:
            lines = jobs.log_lines(training_id, after_id=last_log)
            if lines:
                last_log = lines[-1]["id"]
                ws.send(json.dumps({"type": "log", "lines": lines}))
        if "checkpoints" in changed:
            ws.send(json.dumps({"type": "checkpoints", "items": [
                checkpoint_dict(c) for c in jobs.checkpoints(training_id)]}))
        if t.status in FINISHED:
            return
    ws.send(json.dumps({"type": "error", "error": f"Training {training_id} was deleted."}))


@sock.route("/ws/trainings/<int:training_id>", bp=bp)
def training_updates(ws: Any, training_id: int) -> None:
    tick = float(current_app.config.get("WS_TICK_S", 0.25))
    if request.args.get("format") == "json":
        _json_stream(ws, training_id, tick)
    else:
        _html_stream(ws, training_id, tick)
