"""The interactive probes of a trained SAE, as the web asks for them: check the input, queue a
high-priority task for the worker (``worker.tasks.probe_activations`` / ``probe_steer``) and wait
for its answer. No torch here: the worker loads the model and the SAE (and keeps them warm,
``worker.interactive``).

- ``activations(training, values)``: ``text`` (1 to ``TEXT_MAX`` characters) and an optional
  ``latent``; answers ``{"tokens": [{"id", "text", "acts"}], "latent", "latent_acts"}``
  (``engine.probe``).
- ``steer(training, values)``: ``prompt``, ``latent``, ``coefficient`` (finite, at most
  ``COEFFICIENT_MAX`` in size), ``max_new_tokens`` (1-128, default 32), ``seed`` (optional; none:
  greedy decoding); causal LMs only; answers ``{"baseline", "steered"}``.

``values`` are form fields (strings) or a JSON object's values. Both return a ``ProbeAnswer``.
Errors: ``Invalid`` (422, per field), ``Conflict`` (409: the training has no checkpoint, or it
cannot be read), ``NotFound`` (404), ``Unavailable`` (503: no worker runs, or none answered
within ``timeout_s()``), ``ProbeFailed`` (500: the worker hit a bug; its log has the traceback).
The SAE probed is the training's newest checkpoint whose file exists (for a finished training:
the weights it ended with).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..db import Checkpoint, Training
from .errors import Conflict, Invalid, JobError, NotFound
from .health import health
from .trainings import get_training

TEXT_MAX = 4000
"""The longest text or prompt (characters); the model reads at most the context size anyway."""
COEFFICIENT_MAX = 10_000.0
"""The largest steering coefficient in size (raw activation units times the decoder row)."""
MAX_NEW_TOKENS = 128
DEFAULT_NEW_TOKENS = 32
SEED_MAX = 2**32 - 1
TIMEOUT_S = 120.0
"""Default seconds the web waits for the worker's answer (a cold start loads the model)."""
_HEADER_MAX = 100 * 2**20
_WHOLE = re.compile(r"-?[0-9]{1,20}")


class Unavailable(JobError):
    """No worker runs, or none answered in time."""

    status = 503


class ProbeFailed(JobError):
    """The worker failed on a probe for a reason that is not the user's (a bug)."""

    status = 500


@dataclass
class ProbeAnswer:
    """The worker's answer: ``result`` (the issue's JSON), whether the probe was already
    loaded (``warm``) and the seconds the task took in the worker."""

    result: dict[str, Any]
    warm: bool
    seconds: float


def timeout_s() -> float:
    """``$SAE_STUDIO_PROBE_TIMEOUT_S`` (seconds, > 0) or ``TIMEOUT_S``; read on every call."""
    try:
        value = float(os.environ.get("SAE_STUDIO_PROBE_TIMEOUT_S", ""))
    except ValueError:
        return TIMEOUT_S
    return value if value > 0 and math.isfinite(value) else TIMEOUT_S


# ---------------------------------------------------------------------------- the checkpoint
def newest_checkpoint(t: Training) -> Path:
    """The path of the training's newest checkpoint whose file exists; ``Conflict`` when it
    has none."""
    for ckpt in (Checkpoint.select().where(Checkpoint.training == t.id)
                 .order_by(Checkpoint.step.desc())):
        if ckpt.path and Path(ckpt.path).is_file():
            return Path(ckpt.path)
    raise Conflict(f"Training {t.id} has no saved SAE yet: try its latents once it has saved "
                   "a checkpoint (the first one comes with the first auto-save).")


def checkpoint_meta(path: Path, training_id: int) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (the safetensors header, read without torch);
    ``Conflict`` when the file is not a readable checkpoint."""
    unreadable = Conflict(f"The checkpoint {path.name} of training {training_id} cannot be "
                          "read (not a complete safetensors file); save a new checkpoint or "
                          "retry the training.")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise unreadable
            (size,) = struct.unpack("<Q", head)
            if not 0 < size <= _HEADER_MAX:
                raise unreadable
            header = json.loads(fh.read(size).decode("utf-8"))
        raw = header.get("__metadata__") or {}
        meta = {k: json.loads(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        raise unreadable from None
    if not isinstance(meta.get("d_sae"), int) or meta["d_sae"] < 1:
        raise unreadable
    return meta


# ---------------------------------------------------------------------------- input
def _text(values: Mapping[str, Any], name: str, errors: dict[str, str]) -> str:
    raw = values.get(name)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        errors[name] = "Type some text." if name == "text" else "Type a prompt."
        return ""
    if not isinstance(raw, str):
        errors[name] = "Must be text."
        return ""
    if len(raw) > TEXT_MAX:
        errors[name] = f"At most {TEXT_MAX:,} characters (this is {len(raw):,})."
        return ""
    return raw


def _int(values: Mapping[str, Any], name: str, errors: dict[str, str], lo: int,
         hi: int | None, *, default: int | None = None, required: bool = False) -> int | None:
    raw = values.get(name)
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        if required:
            errors[name] = "Enter a whole number."
        return default
    value: int | None = None
    if isinstance(raw, bool):
        value = None
    elif isinstance(raw, int):
        value = raw
    elif isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    elif isinstance(raw, str):
        text = raw.strip().removeprefix("#")
        if _WHOLE.fullmatch(text):
            value = int(text)
    if value is None:
        errors[name] = "Enter a whole number."
        return None
    if value < lo or (hi is not None and value > hi):
        bound = f"from {lo:,} to {hi:,}" if hi is not None else f"{lo:,} or more"
        errors[name] = f"Enter a number {bound}."
        return None
    return value


def _coefficient(values: Mapping[str, Any], errors: dict[str, str]) -> float:
    raw = values.get("coefficient")
    value: float | None = None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str) and raw.strip() and len(raw) < 50:
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    if value is None or not math.isfinite(value):
        errors["coefficient"] = "Enter a finite number (e.g. 20 or -5)."
        return 0.0
    if abs(value) > COEFFICIENT_MAX:
        errors["coefficient"] = f"Enter a number from {-COEFFICIENT_MAX:,.0f} to " \
                                f"{COEFFICIENT_MAX:,.0f}."
        return 0.0
    return value


def _invalid(errors: dict[str, str]) -> Invalid:
    first = next(iter(errors.items()))
    return Invalid(f"{first[0]}: {first[1]}", errors)


def _prepare(training: Training | int | str) -> tuple[Training, Path, int]:
    """The training, its newest checkpoint and the SAE's number of latents."""
    t = training if isinstance(training, Training) else get_training(training)
    path = newest_checkpoint(t)
    return t, path, int(checkpoint_meta(path, t.id)["d_sae"])


# ---------------------------------------------------------------------------- the services
def activations(training: Training | int | str, values: Mapping[str, Any]) -> ProbeAnswer:
    """The SAE's latents on ``values["text"]``, and ``values["latent"]``'s per token."""
    t, path, d_sae = _prepare(training)
    errors: dict[str, str] = {}
    text = _text(values, "text", errors)
    latent = _int(values, "latent", errors, 0, d_sae - 1)
    if errors:
        raise _invalid(errors)
    return _ask("probe_activations", t.id, str(path), text, latent)


def steer(training: Training | int | str, values: Mapping[str, Any]) -> ProbeAnswer:
    """Baseline and steered continuations of ``values["prompt"]``."""
    t, path, d_sae = _prepare(training)
    if t.model.is_causal is False:
        raise Invalid(f"{t.model.name} is not a causal LM: it does not generate text, so it "
                      "cannot be steered.", {"form": "Steering needs a causal LM."})
    errors: dict[str, str] = {}
    prompt = _text(values, "prompt", errors)
    latent = _int(values, "latent", errors, 0, d_sae - 1, required=True)
    coefficient = _coefficient(values, errors)
    new_tokens = _int(values, "max_new_tokens", errors, 1, MAX_NEW_TOKENS,
                      default=DEFAULT_NEW_TOKENS)
    seed = _int(values, "seed", errors, 0, SEED_MAX)
    if errors:
        raise _invalid(errors)
    return _ask("probe_steer", t.id, str(path), prompt, latent, coefficient, new_tokens, seed)


def _ask(task_name: str, *args: Any) -> ProbeAnswer:
    """Queue the probe task and wait for its answer (``timeout_s()`` at most)."""
    from huey.exceptions import ResultTimeout

    from .. import tasks

    if not tasks.huey.immediate and not health()["alive"]:
        raise Unavailable("No worker is running, so the SAE cannot be probed; start SAE Studio "
                          "with its worker (run.py, or run.py --worker-only) and try again.")
    wait = timeout_s()
    result = getattr(tasks, task_name)(*args)
    try:
        out = result.get(blocking=True, timeout=wait, backoff=1.0, max_delay=0.05,
                         revoke_on_timeout=True)
    except ResultTimeout:
        raise Unavailable(f"The worker did not answer within {wait:g} s: it may be busy with "
                          "other work or stopped; try again.") from None
    if not isinstance(out, dict):
        raise ProbeFailed("The worker gave no answer to the probe; see the worker's log.")
    if "error" in out:
        status = int(out.get("status") or 500)
        cls = {404: NotFound, 409: Conflict, 422: Invalid}.get(status, ProbeFailed)
        raise cls(str(out["error"]), out.get("errors") or None)
    return ProbeAnswer(result=out["result"], warm=bool(out.get("warm")),
                       seconds=float(out.get("seconds") or 0.0))
