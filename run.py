"""Start SAE Studio: the web server and one Huey worker, with SQLite files in ./data.

    python run.py                       # web on http://127.0.0.1:5000 + a worker
    python run.py --data-dir /srv/sae --host 0.0.0.0 --port 8000
    python run.py --no-worker           # web only (the worker runs elsewhere)
    python run.py --worker-only         # worker only (e.g. on the GPU box, same data dir)
    python run.py --worker-only --database-url postgresql://sae:pw@db:5432/sae \
        --queue-url redis://db:6379/0 --artifacts /mnt/sae  # one worker of a lab's pool
    python run.py --allow-path ~/corpora --max-upload-mb 512
    python run.py --debug               # werkzeug's development server instead of gunicorn

The web app is served by gunicorn (Linux, macOS): this process is its master and one worker
process answers with ``--threads`` threads (default 128). Each open WebSocket (a browser tab
watching a training) holds one thread for as long as it is open; the others serve pages and
the API, and requests wait when all are busy. ``--debug`` serves with werkzeug's development
server instead (also where gunicorn cannot run, e.g. Windows).

Off the loopback (``--host 0.0.0.0``, an IP or a name) every request needs the access token:
``--token`` or ``$SAE_STUDIO_TOKEN``, else one is generated and the URL that carries it printed.

Ctrl-C (or SIGTERM) stops both cleanly: open WebSockets are closed, the worker finishes its
current step, a running training is marked interrupted and can be retried from its newest
checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.supervisor import Supervisor

HERE = Path(__file__).resolve().parent
THREADS = 128
"""The web worker's threads (``--threads``): ~100 WebSocket viewers plus page requests."""
GRACE_S = 5
"""Seconds a stopping web worker has to finish requests in flight before it is killed."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the SAE Studio web app and worker.")
    p.add_argument("--data-dir", default="data", help="SQLite files, models, runs (default ./data)")
    p.add_argument("--database-url", metavar="URL",
                   help="the app database (default $SAE_STUDIO_DATABASE_URL, else the SQLite "
                        "file app.db in the data dir); e.g. postgresql://user:pw@host:5432/sae")
    p.add_argument("--queue-url", metavar="URL",
                   help="the task queue (default $SAE_STUDIO_QUEUE_URL, else the SQLite file "
                        "queue.db in the data dir); e.g. redis://host:6379/0")
    p.add_argument("--artifacts", metavar="DIR",
                   help="where run folders and uploads live, a folder every machine mounts at "
                        "the same path (default $SAE_STUDIO_ARTIFACTS, else the data dir)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (off the loopback a token is required)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--token", default=os.environ.get("SAE_STUDIO_TOKEN") or None,
                   help="access token (default $SAE_STUDIO_TOKEN; generated off the loopback; "
                        "on the loopback none unless given)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another Host name the app answers to (repeatable; also "
                        "$SAE_STUDIO_ALLOWED_HOSTS, comma-separated)")
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="a folder whose files may be added as local datasets or models "
                        "(repeatable; also $SAE_STUDIO_ALLOWED_PATHS)")
    p.add_argument("--max-upload-mb", type=float, metavar="MB",
                   help="largest upload in MiB (2^20 bytes; default $SAE_STUDIO_MAX_UPLOAD_MB "
                        "or 1024)")
    p.add_argument("--workers", type=int, default=3,
                   help="worker threads (default 3: one training per device at a time, one "
                        "preparing models and datasets, one free for the interactive probes)")
    p.add_argument("--threads", type=int, default=THREADS,
                   help=f"web server threads (default {THREADS}); each open WebSocket (a "
                        "browser tab watching a training) holds one, the rest serve pages")
    p.add_argument("--debug", action="store_true",
                   help="serve with werkzeug's development server instead of gunicorn")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-worker", action="store_true", help="start only the web server")
    mode.add_argument("--worker-only", action="store_true", help="start only the worker")
    args = p.parse_args(argv)
    if args.max_upload_mb is not None and not 0 < args.max_upload_mb < 2**40:
        p.error("--max-upload-mb must be a positive number of megabytes")
    if not 1 <= args.threads <= 10_000:
        p.error("--threads must be between 1 and 10000")

    data_dir = Path(args.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # made here: its owner's alone
    # Read by worker.settings in both processes.
    os.environ["SAE_STUDIO_DATA"] = str(data_dir)
    if args.database_url:
        os.environ["SAE_STUDIO_DATABASE_URL"] = args.database_url
    if args.queue_url:
        os.environ["SAE_STUDIO_QUEUE_URL"] = args.queue_url
    if args.artifacts:
        artifacts = Path(args.artifacts).expanduser().resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        os.environ["SAE_STUDIO_ARTIFACTS"] = str(artifacts)
    if args.allow_path:
        named = [d for d in os.environ.get("SAE_STUDIO_ALLOWED_PATHS", "").split(os.pathsep) if d]
        named += [str(Path(d).expanduser().resolve()) for d in args.allow_path]
        os.environ["SAE_STUDIO_ALLOWED_PATHS"] = os.pathsep.join(named)
    if args.max_upload_mb is not None:
        os.environ["SAE_STUDIO_MAX_UPLOAD_MB"] = str(args.max_upload_mb)
    check_backends(p)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started with SIGINT ignored (a shell's `&`)
    if args.worker_only:
        supervisor = Supervisor(args.workers, env)
        print(f"SAE Studio worker: pid {supervisor.proc.pid}, data in {data_dir}; Ctrl-C to "
              "stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\nStopping...", flush=True)
            supervisor.stop()
            return 0

    from webapp.security import WILDCARDS, is_loopback

    token = args.token
    if token is None and not is_loopback(args.host):
        token = secrets.token_urlsafe(24)
    hosts = [h for h in os.environ.get("SAE_STUDIO_ALLOWED_HOSTS", "").split(",") if h.strip()]
    config = {"DATA_DIR": str(data_dir), "BIND_HOST": args.host, "TOKEN": token,
              "ALLOWED_HOSTS": hosts + args.allowed_host}
    supervisor: Supervisor | None = None

    def ready(port: int) -> None:
        """The socket is bound: start the worker, print the URL."""
        nonlocal supervisor
        supervisor = None if args.no_worker else Supervisor(args.workers, env)
        shown = socket.gethostname() if args.host in WILDCARDS else args.host
        if ":" in shown:
            shown = f"[{shown}]"  # an IPv6 address
        url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
        print(f"SAE Studio: {url}  (data in {data_dir}; "
              f"{'no worker' if supervisor is None else f'worker pid {supervisor.proc.pid}'}; "
              "Ctrl-C to stop)",
              flush=True)
        if not is_loopback(args.host):
            print(f"Warning: SAE Studio listens on {args.host}, reachable from the network: "
                  "anyone with the token above can read and change everything. Keep it secret.",
                  flush=True)

    debug = args.debug
    if not debug and importlib.util.find_spec("fcntl") is None:
        print("Warning: gunicorn needs a POSIX system; serving with werkzeug's development "
              "server instead.", flush=True)
        debug = True
    master = os.getpid()
    try:
        if debug:
            serve_development(config, args.host, args.port, ready)
        else:
            serve_production(config, args.host, args.port, args.threads, ready)
    except KeyboardInterrupt:
        pass
    finally:
        if os.getpid() == master:  # a gunicorn worker (a fork of this process) also ends here
            print("\nStopping...", flush=True)
            if supervisor is not None:
                supervisor.stop()
    return 0


def check_backends(p: argparse.ArgumentParser) -> None:
    """Refuse a bad --database-url / --queue-url, or servers that cannot be reached, in one line
    (exit 2) before anything starts; the database is created or migrated here, once."""
    from worker import db, queue, settings

    database, tasks = settings.database_url(), settings.queue_url()
    for problem in (db.url_problem(database), queue.url_problem(tasks)):
        if problem:
            p.error(problem)
    try:
        db.open_app_database()
    except Exception as exc:  # peewee's OperationalError: no server, wrong password, no database
        p.error(f"Cannot open the database ({db.url_scheme(database)}://...): "
                f"{_first_line(exc)}")
    try:
        queue.open_storage("sae-studio", tasks).enqueued_items(1)  # one round trip
    except Exception as exc:  # redis' ConnectionError
        p.error(f"Cannot reach the task queue ({tasks.split('://')[0]}://...): "
                f"{_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def serve_production(config: dict, host: str, port: int, threads: int,
                     ready: Callable[[int], None]) -> None:
    """Serve ``create_app(config)`` with gunicorn until SIGINT or SIGTERM: this process is the
    master, one forked worker process (the app, loaded after the fork: no SQLite connection
    crosses it) answers with ``threads`` threads. One process, so that each watched training
    has one poller for all its viewers (``webapp.live``); each open WebSocket holds a thread.
    ``ready(port)`` runs here once the socket is bound. Stopping closes the open WebSockets
    (1001, going away) and lets requests in flight finish, for ``GRACE_S`` seconds at most.
    A worker whose master died exits by itself. Ends with gunicorn's SystemExit (0 after a
    signal, 1 when the port cannot be bound, 3 when the app fails to load)."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    from webapp import live

    settings = {
        "bind": [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"],
        "workers": 1, "worker_class": "gthread", "threads": threads,
        "graceful_timeout": GRACE_S, "loglevel": "warning",
        "control_socket_disable": True,  # else every run.py would share ~/.gunicorn/gunicorn.ctl
        "when_ready": lambda arbiter: ready(arbiter.LISTENERS[0].sock.getsockname()[1]),
        "worker_int": lambda worker: live.close_all(),  # the worker got SIGINT or SIGQUIT
        "worker_exit": lambda arbiter, worker: live.close_all(),  # any way out (master died)
    }

    class QuickArbiter(Arbiter):
        def handle_term(self) -> None:
            """SIGTERM stops as Ctrl-C does (gunicorn's graceful stop would wait
            ``graceful_timeout`` for every open WebSocket)."""
            self.handle_int()

    class Server(BaseApplication):
        def load_config(self) -> None:
            for name, value in settings.items():
                self.cfg.set(name, value)

        def load(self) -> Any:
            from webapp import create_app

            return create_app(config)

        def run(self) -> None:
            QuickArbiter(self).run()

    Server().run()


def serve_development(config: dict, host: str, port: int,
                      ready: Callable[[int], None]) -> None:
    """Serve with werkzeug's development server (``--debug``, or where gunicorn cannot run)
    until Ctrl-C: a thread per request, no limit. It writes an HTTP response after a WebSocket
    closed (browsers log "Invalid frame header"): not for daily use."""
    from werkzeug.serving import make_server

    from webapp import create_app

    server = make_server(host, port, create_app(config), threaded=True)
    ready(server.server_port)
    try:
        server.serve_forever()  # werkzeug returns quietly on KeyboardInterrupt
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
