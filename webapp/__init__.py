"""SAE Studio's web app: Flask + Jinja + HTMX over the job layer (``worker.jobs``).

The web imports ``worker.jobs`` and ``worker.settings`` only (never a table, SQL or torch;
tests/web/test_layering.py checks): the worker is another process that reports through the same
SQLite database and the evaluation files it writes next to a training's checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, render_template, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from worker import jobs, settings

from . import render


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, template_folder="../templates", static_folder="../static")
    app.config.from_mapping(
        DATA_DIR=None,
        BIND_HOST="127.0.0.1",
        SOCK_SERVER_OPTIONS={"ping_interval": 25},
        WS_TICK_S=0.25,
    )
    if test_config is None:
        app.config.from_prefixed_env("SAE_STUDIO")
    else:
        app.config.update(test_config)

    # The data folder: worker.settings reads $SAE_STUDIO_DATA on every call.
    if app.config.get("DATA_DIR"):
        os.environ["SAE_STUDIO_DATA"] = str(app.config["DATA_DIR"])
    app.config["DATA_DIR"] = str(settings.data_dir())
    if app.config.get("MAX_CONTENT_LENGTH") is None:
        app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes()
    jobs.open_database()

    from . import (
        compare,
        config_templates,
        datasets,
        models,
        probes,
        reports,
        security,
        sweeps,
        trainings,
        workers,
        ws,
    )

    security.init_app(app)  # first: a refused request opens no database connection

    @app.before_request
    def _connect() -> None:
        render.check_format()
        jobs.connect()

    @app.teardown_request
    def _close(_exc: BaseException | None) -> None:
        jobs.disconnect()

    for name, fn in render.FILTERS.items():
        app.jinja_env.filters[name] = fn
    app.jinja_env.globals["line_chart"] = render.line_chart

    @app.context_processor
    def _globals() -> dict[str, Any]:
        try:
            health = jobs.health()
        except Exception:  # the top bar must never break a page
            health = {"alive": False, "device": None}
        return {"health": health, "device_label": render.device_label(health)}

    @app.errorhandler(jobs.JobError)
    def _job_error(exc: jobs.JobError) -> ResponseReturnValue:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        """Every HTTP error (404, 405, 400, a 500 from a bug: logged by Flask) as a sentence:
        JSON for JSON clients and the WebSocket, else the error page."""
        if exc.code is None or exc.code < 400:
            return exc
        as_json = render.wants_json() or request.path.startswith("/ws/")
        message = ({True: "Not found.", False: "This page does not exist."}[as_json]
                   if exc.code == 404 else exc.description or exc.name)
        headers = {"Allow": ", ".join(exc.valid_methods)} \
            if isinstance(exc, MethodNotAllowed) and exc.valid_methods else {}
        if as_json:
            resp = render.json_response({"error": message}, exc.code)
            resp.headers.update(headers)
            return resp
        return render_template("error.html", message=message, status=exc.code), exc.code, headers

    app.register_blueprint(models.bp)
    app.register_blueprint(datasets.bp)
    app.register_blueprint(trainings.bp)
    app.register_blueprint(reports.bp)
    app.register_blueprint(probes.bp)
    app.register_blueprint(compare.bp)
    app.register_blueprint(config_templates.bp)
    app.register_blueprint(sweeps.bp)
    app.register_blueprint(workers.bp)
    ws.sock.init_app(app)
    app.register_blueprint(ws.bp)
    return app


def error_response(exc: jobs.JobError) -> ResponseReturnValue:
    """A JobError as JSON (``{"error"}``, plus ``{"errors"}`` for 422) or as an HTML message.

    htmx requests get the message in the page's flash area (HX-Retarget)."""
    status = exc.status
    message = str(exc)
    if render.wants_json():
        body: dict[str, Any] = {"error": message}
        if exc.errors:
            body["errors"] = exc.errors
        return render.json_response(body, status)
    if render.is_fragment_request():
        html = render_template("_flash.html", message=message, status=status)
        return html, status, {"HX-Retarget": "#flash", "HX-Reswap": "innerHTML"}
    return render_template("error.html", message=message, status=status), status
