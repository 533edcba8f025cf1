"""Live card updates over a WebSocket (flask-sock).

``/ws/trainings/<id>`` sends a full snapshot of the card's parts on connect, then loops on
``ws.receive(timeout=tick)`` as its tick: when the database changed (``PRAGMA data_version``,
so the worker may be another process) it compares each part's signature with the last one sent
and sends only the parts that changed (one message per tick at most). It returns after sending
the final state once the job is finished, or when the client leaves.

``?format=json`` streams the same updates as JSON events for programs: ``status`` (the training
dict), ``metrics`` (new rows), ``log`` (new lines) and ``checkpoints`` (all items).
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, current_app, request
from flask_sock import Sock

from worker import jobs
from worker.db import FINISHED, Checkpoint, LogLine, Metric, data_version
from worker.db import Training as TrainingRow

from .trainings import card_view, checkpoint_dict, render_card, render_parts, training_json

sock = Sock()
bp = Blueprint("ws", __name__)


def _signatures(training_id: int) -> dict[str, Any] | None:
    """Cheap per-part fingerprints, straight from the database."""
    t = TrainingRow.get_or_none(TrainingRow.id == training_id)
    if t is None:
        return None
    newest = (Metric.select(Metric.step).where(Metric.training == training_id)
              .order_by(Metric.step.desc()).first())
    n_metrics = Metric.select().where(Metric.training == training_id).count()
    last_log = (LogLine.select(LogLine.id).where(LogLine.training == training_id)
                .order_by(LogLine.id.desc()).first())
    ckpts = tuple((c.id, c.is_best) for c in
                  Checkpoint.select(Checkpoint.id, Checkpoint.is_best)
                  .where(Checkpoint.training == training_id).order_by(Checkpoint.id))
    status = (t.status, t.error, t.requested)
    latest = json.dumps(t.latest, sort_keys=True, default=str)
    return {
        "row": t,
        "status": status,
        "progress": (status, t.current_step, t.total_steps, t.started_at, t.finished_at),
        "tiles": latest,
        "charts": (newest.step if newest else None, n_metrics),
        "buttons": status,
        "log": last_log.id if last_log else 0,
        "checkpoints_count": len(ckpts),
        "checkpoints": ckpts,
    }


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in new if k != "row" and old.get(k) != new[k]]


def _html_stream(ws: Any, training_id: int, tick: float) -> None:
    # Read the version before the snapshot: a write that lands while it is being built or sent
    # then shows up as a change (at worst a part is sent twice), never as lost.
    version = data_version()
    sig = _signatures(training_id)
    if sig is None:
        ws.send(f'<p id="training-{training_id}">Training {training_id} does not exist.</p>')
        return
    view = card_view(sig["row"])
    if view["finished"]:
        ws.send(render_card(view))
        return
    ws.send(render_parts(view))
    while True:
        ws.receive(timeout=tick)  # the tick; raises ConnectionClosed when the client leaves
        now_version = data_version()
        if now_version == version:
            continue
        version = now_version
        new = _signatures(training_id)
        if new is None:
            ws.send(f'<article id="training-{training_id}" class="card gone">'
                    f'Training {training_id} was deleted.</article>')
            return
        changed = _changed(sig, new)
        sig = new
        if new["row"].status in FINISHED:
            # Final state: the whole card, without ws-connect (the socket is done).
            ws.send(render_card(card_view(new["row"])))
            return
        if changed:
            view = card_view(new["row"], with_metrics="charts" in changed)
            ws.send(render_parts(view, changed))


def _json_stream(ws: Any, training_id: int, tick: float) -> None:
    version = data_version()  # before the snapshot (see _html_stream)
    sig = _signatures(training_id) or {}
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
    while True:
        ws.receive(timeout=tick)
        now_version = data_version()
        if now_version == version:
            continue
        version = now_version
        new = _signatures(training_id)
        if new is None:
            ws.send(json.dumps({"type": "error", "error":
                                f"Training {training_id} was deleted."}))
            return
        changed = set(_changed(sig, new))
        sig = new
        t = new["row"]
        if changed & {"status", "progress", "tiles"}:
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


@sock.route("/ws/trainings/<int:training_id>", bp=bp)
def training_updates(ws: Any, training_id: int) -> None:
    tick = float(current_app.config.get("WS_TICK_S", 0.25))
    if request.args.get("format") == "json":
        _json_stream(ws, training_id, tick)
    else:
        _html_stream(ws, training_id, tick)
