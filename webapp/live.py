"""One poller per watched training, shared by all its WebSocket viewers.

The first viewer of training N starts a ``Poller`` thread for N. Every ``WS_TICK_S`` seconds it
asks the job layer whether the database changed (``jobs.changes_since``, on its own
connection), compares the card parts' signatures (``jobs.signatures``) with the last ones, and
builds one ``Update`` for everyone: the changed card parts rendered once as HTML (the same
macros as the page) for HTML viewers, and the JSON events once for ``?format=json`` viewers.
Each viewer has a bounded queue; a viewer whose queue is full (it reads too slowly, or its
thread is stuck) is dropped and closed with 1013 so that a browser reconnects, never blocking
the others. The poller stops after the final update of a finished or deleted training, or when
its last viewer leaves.

A sweep's page is watched the same way (``webapp.sweeps.SweepPoller``: a subclass that reads
the sweep's signatures and renders its card's parts); pollers are keyed by (kind, id).

A viewer subscribes *before* it reads its own snapshot, and the poller holds its lock from its
database reads to the fan-out, so an update a viewer receives is never older than its snapshot.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from flask import Flask, current_app, request

from worker import jobs
from worker.jobs import FINISHED

from .trainings import card_view, checkpoint_dict, render_card, render_parts, training_json

QUEUE_UPDATES = 64
"""Updates a viewer may fall behind before it is dropped (``WS_QUEUE_UPDATES`` overrides)."""
INCREMENTAL = {"metrics": ("charts", "rows", "step"), "log": ("log", "lines", "id")}
"""JSON events that carry only new items: kind -> (the card part whose change brings them, the
list field, the items' increasing key)."""
CLOSE_TOO_SLOW = (1013, "Too slow to follow the updates; reconnect.")
CLOSE_ERROR = (1011, "The live updates failed; reconnect.")
CLOSE_GOING_AWAY = (1001, "The server is stopping.")


@dataclass(frozen=True)
class Event:
    """One JSON event as sent: ``text``; for metrics and log events also the items (``rows``)
    so that a viewer whose snapshot already holds some of them gets only the newer ones."""

    kind: str
    text: str
    rows: tuple[dict[str, Any], ...] = ()

    def text_after(self, cursors: dict[str, int]) -> str | None:
        """The event for a viewer that has items up to ``cursors[kind]`` (advanced here); None
        when it has them all. The shared ``text`` unless the viewer's snapshot overlaps."""
        if self.kind not in INCREMENTAL:
            return self.text
        _, name, key = INCREMENTAL[self.kind]
        after = cursors[self.kind]
        cursors[self.kind] = max(after, self.rows[-1][key])
        if self.rows[0][key] > after:
            return self.text
        newer = [r for r in self.rows if r[key] > after]
        return json.dumps({"type": self.kind, name: newer}) if newer else None


@dataclass(frozen=True)
class Update:
    """What one tick of the poller sends: ``html`` for HTML viewers (None: nothing for them),
    ``events`` for JSON viewers; ``final``: the last update (the training finished or is gone)."""

    html: str | None
    events: tuple[Event, ...]
    final: bool = False


@dataclass(eq=False)
class Viewer:
    """One WebSocket client of a poller."""

    as_json: bool
    tick: float
    queue: queue.Queue[Update]
    closed_by: tuple[int, str] | None = None
    """Why the poller dropped this viewer (close code, reason); None while it is subscribed."""

    def updates(self, ws: Any) -> Iterator[Update]:
        """The poller's updates as they come, up to the final one. While none comes it checks
        the client every tick (``ws.receive`` raises ConnectionClosed once it has left); a
        dropped viewer's socket is closed with the poller's reason and the iteration ends."""
        while self.closed_by is None:
            try:
                update = self.queue.get(timeout=self.tick)
            except queue.Empty:
                ws.receive(timeout=0)
                continue
            if self.closed_by is not None:
                break
            yield update
            if update.final:
                return
        ws.close(*self.closed_by)


@dataclass(eq=False)
class Poller:
    """The thread that watches one training (or, subclassed, another kind of item) for all
    its viewers."""

    KIND: ClassVar[str] = "training"
    THREAD: ClassVar[str] = "ws-poller-{}"
    """The thread's name, formatted with the item's id."""

    app: Flask
    item_id: int
    tick: float
    url_root: str
    sig: dict[str, Any]
    """The card parts' signatures the viewers have (the first viewer's, then the last read)."""
    viewers: set[Viewer] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    closed: bool = False
    """Set (under ``lock``) after the final update or when the last viewer left."""
    version: int | None = None
    cursors: dict[str, int] = field(default_factory=dict)
    """The newest metrics step and log line id read (``INCREMENTAL`` kinds)."""

    def __post_init__(self) -> None:
        self.cursors = sig_cursors(self.sig)
        self.thread = threading.Thread(target=self._run, name=self.THREAD.format(self.item_id),
                                       daemon=True)

    @property
    def key(self) -> tuple[str, int]:
        return (self.KIND, self.item_id)

    def _run(self) -> None:
        # A request context for url_for in the templates and training_json; its own connection.
        with self.app.test_request_context("/", base_url=self.url_root):
            jobs.connect()
            try:
                while not self.stop.wait(self.tick):
                    with self.lock:
                        if self.closed:
                            break
                        try:
                            update = self._read()
                        except Exception:
                            self.app.logger.exception("live updates of %s %d failed",
                                                      self.KIND, self.item_id)
                            self._close_all(CLOSE_ERROR)
                            break
                        if update is not None:
                            self._fan_out(update)
            finally:
                jobs.disconnect()
                with _LOCK:
                    if _POLLERS.get(self.key) is self:
                        del _POLLERS[self.key]

    def _read(self) -> Update | None:
        """This tick's update, or None when nothing the viewers show changed."""
        newer = jobs.changes_since(self.version)
        if newer is None:
            return None
        self.version = newer
        try:
            new = self._signatures()
            if new is None:
                raise jobs.NotFound(f"{self.KIND.capitalize()} {self.item_id} does not exist.")
            changed = [k for k in new if k != "row" and self.sig.get(k) != new[k]]
            self.sig = new
            if not changed:
                return None
            row = new["row"]
            final = self._final(row)
            html = self._html(row, changed, final) if any(
                not v.as_json for v in self.viewers) else None
            events = self._events(row, changed)
        except jobs.NotFound:
            return self._gone()
        return Update(html, events, final)

    def _signatures(self) -> dict[str, Any] | None:
        """The parts' fingerprints and ``row`` (what the parts are rendered from); None: gone."""
        return jobs.signatures(self.item_id)

    def _final(self, row: Any) -> bool:
        return row.status in FINISHED

    def _gone(self) -> Update:
        """The final update once the item was deleted."""
        tid = self.item_id
        return Update(f'<article id="training-{tid}" class="card gone">'
                      f'Training {tid} was deleted.</article>',
                      (Event("error", json.dumps({"type": "error", "error":
                                                  f"Training {tid} was deleted."})),),
                      final=True)

    def _html(self, row: Any, changed: list[str], final: bool) -> str | None:
        if final:  # the whole card, without ws-connect (the socket is done)
            return render_card(card_view(row))
        return render_parts(card_view(row, with_metrics="charts" in changed), changed)

    def _events(self, row: Any, changed: list[str]) -> tuple[Event, ...]:
        """The JSON events of this tick, built once; without JSON viewers only the cursors
        move (to what this tick read, which no later viewer's snapshot precedes)."""
        if not any(v.as_json for v in self.viewers):
            self.cursors = {k: max(v, sig_cursors(self.sig)[k]) for k, v in self.cursors.items()}
            return ()
        tid = self.item_id
        events = []
        if set(changed) & {"status", "progress", "tiles"}:
            events.append(Event("status", json.dumps({"type": "status", **training_json(row)})))
        for kind, (part, name, key) in INCREMENTAL.items():
            if part not in changed:
                continue
            after = self.cursors[kind]
            items = (jobs.metrics_rows(tid, after_step=after) if kind == "metrics"
                     else jobs.log_lines(tid, after_id=after))
            if items:
                self.cursors[kind] = items[-1][key]
                events.append(Event(kind, json.dumps({"type": kind, name: items}), tuple(items)))
        if "checkpoints" in changed:
            items = [checkpoint_dict(c) for c in jobs.checkpoints(tid)]
            events.append(Event("checkpoints",
                                json.dumps({"type": "checkpoints", "items": items})))
        return tuple(events)

    def _fan_out(self, update: Update) -> None:
        """Queue the update for every viewer (under ``lock``); drop those whose queue is full."""
        for viewer in list(self.viewers):
            try:
                viewer.queue.put_nowait(update)
            except queue.Full:
                viewer.closed_by = CLOSE_TOO_SLOW
                self.viewers.discard(viewer)
        if update.final or not self.viewers:
            self.closed = True
            self.stop.set()

    def _close_all(self, reason: tuple[int, str]) -> None:
        for viewer in self.viewers:
            viewer.closed_by = reason
        self.viewers.clear()
        self.closed = True
        self.stop.set()


def sig_cursors(sig: dict[str, Any]) -> dict[str, int]:
    """The newest metrics step (-1: none) and log line id (0: none) in ``jobs.signatures``."""
    newest = (sig.get("charts") or (None,))[0]
    return {"metrics": -1 if newest is None else int(newest), "log": int(sig.get("log") or 0)}


_POLLERS: dict[tuple[str, int], Poller] = {}
"""The running poller of each watched item, by ``Poller.key`` (kind, id)."""
_LOCK = threading.Lock()
"""Guards ``_POLLERS``; taken before a poller's own lock, never after."""


def close_all(reason: tuple[int, str] = CLOSE_GOING_AWAY) -> None:
    """Drop every viewer of every poller with ``reason`` (the server is stopping): each viewer's
    socket is closed within a tick, so that no open WebSocket holds the server's shutdown."""
    with _LOCK:
        for running in list(_POLLERS.values()):
            with running.lock:
                running._close_all(reason)


def poller(item_id: int, kind: type[Poller] = Poller) -> Poller | None:
    """The running poller of a training (or of an item of another ``kind``), if one runs."""
    with _LOCK:
        return _POLLERS.get((kind.KIND, item_id))


@contextmanager
def watch(item_id: int, sig: dict[str, Any], *, as_json: bool,
          kind: type[Poller] = Poller) -> Iterator[Viewer]:
    """Subscribe to training ``item_id``'s poller (or that of an item of another ``kind``),
    starting it from ``sig``, the signatures this viewer read before its snapshot, for the
    duration of the block.

    Call inside the WebSocket's request; read the snapshot inside the block."""
    app = current_app._get_current_object()
    tick = float(app.config.get("WS_TICK_S", 0.25))
    viewer = Viewer(as_json, tick, queue.Queue(int(app.config.get("WS_QUEUE_UPDATES",
                                                                  QUEUE_UPDATES))))
    key = (kind.KIND, item_id)
    with _LOCK:
        running = _POLLERS.get(key)
        if running is not None:
            with running.lock:
                if not running.closed:
                    running.viewers.add(viewer)
                else:
                    running = None
        if running is None:
            running = kind(app, item_id, tick, request.url_root, sig, {viewer})
            _POLLERS[key] = running
            running.thread.start()
    try:
        yield viewer
    finally:
        with _LOCK, running.lock:
            running.viewers.discard(viewer)
            if not running.viewers and not running.closed:
                running.closed = True
                running.stop.set()
                if _POLLERS.get(key) is running:
                    del _POLLERS[key]
