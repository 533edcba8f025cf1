"""Try and steer a trained SAE: the interactive probes of the latent and report pages.

- ``POST /trainings/<id>/activations`` with ``text`` and an optional ``latent``: the SAE's
  latents on the text, tokenised as a training context (``{"tokens": [{"id", "text", "acts"}],
  "latent", "latent_acts"}``);
- ``POST /trainings/<id>/steer`` with ``prompt``, ``latent``, ``coefficient``,
  ``max_new_tokens`` (1-128, default 32) and ``seed`` (optional; none: greedy): continuations
  without and with the latent's decoder direction added (``{"baseline", "steered"}``).

Both take form fields or a JSON object. The answer is JSON, or for htmx (``HX-Request``) the
result fragment (``templates/probes/_activations_result.html``, ``_steer_result.html``), the same
templates the page's boxes (``_try.html``, ``_steer.html``) swap in. Errors: 4xx/5xx
``{"error", "errors"?}`` (422 bad input, 409 no checkpoint, 404, 503 no worker or no answer in
time), for htmx the result fragment with the message. The worker computes
(``worker.jobs.probes`` queues its task); JSON answers carry ``Server-Timing: probe`` (the
worker's seconds) and ``X-Probe-Warm`` (whether the model and SAE were loaded already).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template, request, url_for
from flask.typing import ResponseReturnValue

from worker import jobs
from worker.jobs import probes

from .render import is_fragment_request, json_response, posted
from .reports import display_token

bp = Blueprint("probes", __name__)

SHADE = "91, 156, 255"
"""The shading colour (rgb), as the latent page's contexts."""


def _values() -> dict[str, Any]:
    """The request's fields: a JSON object's, or the form's (first value of each)."""
    body = posted()
    return dict(body) if request.is_json else {k: body.get(k) for k in body}


def _answer(kind: str, t_id: int, run: Any) -> ResponseReturnValue:
    """Run the probe; the answer as JSON or the ``kind`` result fragment."""
    values: dict[str, Any] = {}
    try:
        values = _values()
        answer = run(values)
    except jobs.JobError as exc:
        if is_fragment_request():
            return render_template(f"probes/_{kind}_result.html", training_id=t_id,
                                   error=str(exc), errors=exc.errors, result=None), exc.status
        body: dict[str, Any] = {"error": str(exc)}
        if exc.errors:
            body["errors"] = exc.errors
        return json_response(body, exc.status)
    if is_fragment_request():
        ctx = shaded(answer.result, t_id) if kind == "activations" else answer.result
        return render_template(f"probes/_{kind}_result.html", training_id=t_id, result=ctx,
                               error=None, errors={}, warm=answer.warm, seconds=answer.seconds)
    resp = json_response(answer.result)
    resp.headers["Server-Timing"] = f"probe;dur={answer.seconds * 1000:.1f}"
    resp.headers["X-Probe-Warm"] = "1" if answer.warm else "0"
    return resp


@bp.post("/trainings/<int:training_id>/activations")
def activations(training_id: int) -> ResponseReturnValue:
    return _answer("activations", training_id,
                   lambda values: probes.activations(training_id, values))


@bp.post("/trainings/<int:training_id>/steer")
def steer(training_id: int) -> ResponseReturnValue:
    return _answer("steer", training_id, lambda values: probes.steer(training_id, values))


def shaded(result: dict[str, Any], training_id: int) -> dict[str, Any]:
    """The activations answer for display: each token with its ``shown`` text, the ``act``
    that shades it (the chosen latent's, else the token's strongest latent's), ``alpha`` (that
    act over the highest one among these tokens, 0-1) and ``latents`` (``{id, value, url}``,
    strongest first); ``scale``: the act of full colour."""
    latent = result.get("latent")
    per = result.get("latent_acts") if latent is not None else None
    tokens = []
    for i, tok in enumerate(result["tokens"]):
        acts = tok.get("acts")
        if per is not None:
            act = per[i]
        else:
            act = (acts[0][1] if acts else 0.0) if acts is not None else None
        tokens.append({"id": tok["id"], "shown": display_token(tok["text"]), "act": act,
                       "latents": [{"id": n, "value": v,
                                    "url": url_for("reports.latent_page",
                                                   training_id=training_id, n=n)}
                                   for n, v in (acts or [])],
                       "scored": acts is not None})
    top = max((tok["act"] for tok in tokens if tok["act"]), default=0.0)
    for tok in tokens:
        a = tok["act"] or 0.0
        tok["alpha"] = round(min(1.0, max(0.0, a / top)), 3) if top > 0 else 0.0
    return {"latent": latent, "tokens": tokens, "scale": top, "shade": SHADE}
