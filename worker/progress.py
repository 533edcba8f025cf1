"""From the engine's training callbacks to the database, in short writes.

``TrainingReporter(training_id).callbacks()`` gives the engine's ``Callbacks``:

- ``on_metrics`` buffers the engine's rows as they are (the job layer adds the API's older
  names when it reads them) and flushes them at most every 0.5 s (always the first row, and
  at ``close()``) in one ``db.atomic()``: Metric rows (upserted: a retried run re-reports
  steps), ``Training.current_step``, ``latest`` and status ``training``;
- ``on_log`` writes LogLine rows; ``on_checkpoint`` keeps the Checkpoint rows in step with the
  files (retention deletions included, ``is_best`` on the best step only);
- ``control(step)`` reads ``Training.requested`` at most every 0.25 s and answers the engine:
  ``pause`` (kept until ``resume``; status ``paused``, then back to ``training``, or to
  ``initializing`` when paused before any step was reported), ``stop``, ``save`` or None.
  ``interrupt`` (worker shutdown) answers ``stop`` and sets ``interrupted`` so the task marks
  the run interrupted.

After the last step, ``start_evaluation()`` sets status ``evaluating`` and
``evaluation_progress(fraction, message)`` writes ``Training.eval_progress`` (at most every
0.5 s) and a log line (at most every 2 s) while the held-out evaluation runs.

``GroupReporter(ids)`` does the same for a sweep's sub-group trained in one task: each member's
rows through its own reporter, the group's control (a request on any member applies to all)
and status through this one.

``timings`` (``AttemptTimings``) notes when the attempt's phases began, from these callbacks
and ``preparing(fraction, message)`` (the token store build's progress): the worker stores them
as the time estimate's calibration when the attempt completes.

No write transaction is held while the engine runs a step: each callback opens and commits its
own. Imports no torch at module level (the engine's Callbacks is imported in ``callbacks()``).

``Throttled(write, every_s)`` is the one throttle for the engine's ``(fraction, message)``
progress callbacks: a model's or dataset's progress column, a training's preparation and
evaluation log lines.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .db import REQUESTS, Checkpoint, LogLine, Metric, Training, db, upsert

log = logging.getLogger(__name__)

FLUSH_S = 0.5
POLL_S = 0.25
EVAL_ROW_S = 0.5
"""Seconds between writes of ``Training.eval_progress``."""
EVAL_LOG_S = 2.0
"""Seconds between the evaluation's progress log lines."""
PREPARE_LOG_S = 2.0
"""Seconds between the preparation's (token store build's) progress log lines."""
_SAVED = re.compile(r"^Checkpoint saved at step \d+ \((\w+)")


class Throttled:
    """A progress callback ``(fraction, message)`` that passes a call on to ``write`` at most
    every ``every_s`` seconds; the first call and one at fraction >= 1 always pass."""

    def __init__(self, write: Callable[[float, str], None], every_s: float) -> None:
        self.write, self.every_s = write, every_s
        self.last: float | None = None

    def __call__(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if self.last is not None and now - self.last < self.every_s and fraction < 1.0:
            return
        self.last = now
        self.write(max(0.0, min(1.0, float(fraction))), message)


@dataclass
class AttemptTimings:
    """When one attempt's phases began, in epoch seconds (``time.time()``, like the row's
    ``attempt_started_at`` and ``finished_at``); None for a phase not reached."""

    build_started: float | None = None
    """The token store build's first progress call (fraction 0)."""
    build_ended: float | None = None
    """Its last one (fraction 1)."""
    first_step: float | None = None
    """The engine asked whether to run its first step (setup is over)."""
    last_metrics: float | None = None
    """The newest metrics row arrived (after the last step: the loop is over)."""
    eval_started: float | None = None
    paused_s: float = 0.0
    """Seconds spent paused (between a pause and its resume)."""
    paused_since: float | None = None

    def build_s(self) -> float:
        """Seconds the token store build took in this attempt (0 when none ran)."""
        if self.build_started is None or self.build_ended is None:
            return 0.0
        return max(0.0, self.build_ended - self.build_started)


class TrainingReporter:
    """Writes one training's progress to the database and relays the web's requests."""

    def __init__(self, training_id: int) -> None:
        self.training_id = training_id
        self.ids = [training_id]
        """The rows its status, requests and evaluation progress are written to (a group's
        reporter: every member's)."""
        self.pending: list[dict[str, Any]] = []
        self.last_flush = 0.0
        self.flushed_any = False
        self.last_poll = 0.0
        self.paused = False
        self.interrupted = False
        self._last_reason = "auto"
        self._resumes_to = "training"
        """The status a resume from the current pause returns to."""
        self.timings = AttemptTimings()
        self._prepare_log = Throttled(lambda fraction, message: self.log(
            f"{message} ({100 * fraction:.0f}%)" if message
            else f"Preparing: {100 * fraction:.0f}%"), PREPARE_LOG_S)
        self._eval_row = Throttled(lambda fraction, message: self._set(eval_progress=fraction),
                                   EVAL_ROW_S)
        self._eval_log = Throttled(lambda fraction, message: self.log(
            f"Evaluating: {100 * fraction:.0f}%" + (f" ({message})" if message else "")),
            EVAL_LOG_S)

    # ------------------------------------------------------------------ engine callbacks
    def callbacks(self) -> Any:
        """The engine's ``Callbacks`` wired to this reporter."""
        from .engine.trainer import Callbacks

        return Callbacks(on_metrics=self.on_metrics, on_log=self.on_log,
                         on_checkpoint=self.on_checkpoint, control=self.control,
                         pause_poll_s=0.1)

    def preparing(self, fraction: float, message: str = "") -> None:
        """The token store build's progress (fraction 0-1): timed, and logged at most every
        ``PREPARE_LOG_S``."""
        now = time.time()
        if self.timings.build_started is None:
            self.timings.build_started = now
        self.timings.build_ended = now
        self._prepare_log(fraction, message)

    def on_metrics(self, metrics: dict[str, Any]) -> None:
        self.timings.last_metrics = time.time()
        self.pending.append(dict(metrics))
        if not self.flushed_any or time.monotonic() - self.last_flush >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write the buffered metrics rows (one transaction)."""
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        last = rows[-1]
        with db.atomic():
            by_step = {int(r["step"]): r for r in rows}  # one row per step (the newest)
            upsert(Metric.insert_many(
                [{"training": self.training_id, "step": step, "data": r}
                 for step, r in by_step.items()]
            ), Metric.training, Metric.step).execute()
            Training.update(current_step=int(last["step"]), latest=last, updated_at=time.time()) \
                .where(Training.id == self.training_id).execute()
            Training.update(status="training") \
                .where((Training.id == self.training_id)
                       & (Training.status == "initializing")).execute()
        self.last_flush = time.monotonic()
        self.flushed_any = True

    def on_log(self, message: str, level: str = "info") -> None:
        match = _SAVED.match(message)
        if match:
            self._last_reason = match.group(1)
        self.log(message, level)

    def log(self, message: str, level: str = "info") -> None:
        with db.atomic():
            LogLine.create(training=self.training_id, level=level, message=message)

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        step = int(info["step"])
        best = info.get("best_step")
        with db.atomic():
            upsert(Checkpoint.insert(training=self.training_id, step=step, path=str(info["path"]),
                                     loss=info.get("loss"),
                                     size_bytes=int(info.get("size_bytes") or 0),
                                     is_best=best == step, reason=self._last_reason),
                   Checkpoint.training, Checkpoint.step).execute()
            deleted = [str(p) for p in info.get("deleted") or []]
            if deleted:
                Checkpoint.delete().where((Checkpoint.training == self.training_id)
                                          & Checkpoint.path.in_(deleted)).execute()
            Checkpoint.update(is_best=Checkpoint.step == (best if best is not None else -1)) \
                .where(Checkpoint.training == self.training_id).execute()
        self._last_reason = "auto"

    def control(self, step: int) -> str | None:
        """Answer the engine between steps, and between batches of contexts while a live
        source extracts a round (``trainer.listening``) or a resume rebuilds its buffer
        (``trainer.replaying``): "pause", "stop", "save" or None."""
        if self.timings.first_step is None:
            self.timings.first_step = time.time()
        now = time.monotonic()
        if self.pending and now - self.last_flush >= FLUSH_S:
            self.flush()
        if now - self.last_poll < POLL_S:
            return "pause" if self.paused else None
        self.last_poll = now
        rows = list(Training.select(Training.requested, Training.status)
                    .where(Training.id.in_(self.ids)))
        asked = {row.requested for row in rows}
        # a deleted row stops its run; of a group's requests the strongest wins
        requested = "stop" if len(rows) < len(self.ids) else next(
            (r for r in ("interrupt", "stop", "pause", "save", "resume") if r in asked), None)
        if requested in ("stop", "interrupt"):
            self.flush()
            self.paused = False
            self._pause_ended()
            if requested == "interrupt":
                self.interrupted = True
            else:
                self._set(status="stopping")
            return "stop"
        if self.paused:
            if requested == "resume":
                self.paused = False
                self._pause_ended()
                self._clear("resume", status=self._resumes_to)
                return None
            if requested in ("save", "pause"):
                self._clear(requested)  # the engine saved a checkpoint when it paused
            return "pause"
        if requested == "pause":
            self.paused = True
            self.timings.paused_since = time.time()
            # its resume returns to ``initializing`` when no step has been reported yet (e.g.
            # a resumed run paused while it rebuilds its buffer: ``trainer.replaying``)
            self._resumes_to = "initializing" if any(
                row.status == "initializing" for row in rows) else "training"
            self.flush()  # the card must show the step it paused at, not an older one:
            # the last metrics row is up to log_every steps behind the pause checkpoint's step
            self._clear("pause", status="paused", current_step=step)
            return "pause"
        if requested == "save":
            self._clear("save")
            return "save"
        if requested == "resume":  # a resume that raced with the pause it answers
            self._clear("resume")
        return None

    def close(self) -> None:
        """Flush what is still buffered."""
        self.flush()

    # ------------------------------------------------------------------ after the last step
    def start_evaluation(self) -> None:
        """Status ``evaluating`` (progress 0). A pause, resume, save or answered stop request
        has nothing left to act on and is cleared; a shutdown's ``interrupt`` stays."""
        self.timings.eval_started = time.time()
        with db.atomic():
            Training.update(status="evaluating", eval_progress=0.0, updated_at=time.time()) \
                .where(Training.id.in_(self.ids)).execute()
            Training.update(requested=None) \
                .where(Training.id.in_(self.ids) & Training.requested.in_(REQUESTS)).execute()

    def evaluation_progress(self, fraction: float, message: str = "") -> None:
        """The held-out evaluation's progress (fraction 0-1, a short message)."""
        self._eval_row(fraction, message)
        self._eval_log(fraction, message)

    # ------------------------------------------------------------------ helpers
    def _pause_ended(self) -> None:
        if self.timings.paused_since is not None:
            self.timings.paused_s += time.time() - self.timings.paused_since
            self.timings.paused_since = None

    def _clear(self, requested: str, **values: Any) -> None:
        """Clear the request we answered and set ``values``, on each row unless the web has
        replaced the request there meanwhile (a stop)."""
        with db.atomic():
            mine = Training.id.in_(self.ids)
            if values:
                Training.update(updated_at=time.time(), **values) \
                    .where(mine & (Training.requested.is_null()
                                   | Training.requested.not_in(("stop", "interrupt")))).execute()
            Training.update(updated_at=time.time(), requested=None) \
                .where(mine & (Training.requested == requested)).execute()

    def _set(self, **values: Any) -> None:
        with db.atomic():
            Training.update(updated_at=time.time(), **values) \
                .where(Training.id.in_(self.ids)).execute()


class GroupReporter(TrainingReporter):
    """A sweep's sub-group, trained in one task: ``members[i]`` writes SAE i's metrics, log and
    checkpoints (its ``member_callbacks()``); this reporter answers the group's control between
    steps from every member's row (a request on any member applies to the group: they step
    together) and writes the group's status, log lines and evaluation progress to all of them."""

    def __init__(self, training_ids: list[int]) -> None:
        super().__init__(training_ids[0])
        self.ids = list(training_ids)
        self.members = [TrainingReporter(i) for i in self.ids]

    def member_callbacks(self) -> list[Any]:
        """Each member's ``Callbacks`` (no control: the group hears the web)."""
        cbs = [m.callbacks() for m in self.members]
        for cb in cbs:
            cb.control = lambda step: None
        return cbs

    def on_metrics(self, metrics: dict[str, Any]) -> None:  # the members report their own
        pass

    def flush(self) -> None:
        for member in self.members:
            member.flush()

    def log(self, message: str, level: str = "info") -> None:
        with db.atomic():
            LogLine.insert_many([{"training": i, "level": level, "message": message,
                                  "created_at": time.time(), "updated_at": time.time()}
                                 for i in self.ids]).execute()
