"""Start SAE Studio: the web server and one Huey worker, with SQLite files in ./data.

    python run.py                       # web on http://127.0.0.1:5000 + a worker
    python run.py --data-dir /srv/sae --host 0.0.0.0 --port 8000
    python run.py --no-worker           # web only (the worker runs elsewhere)
    python run.py --worker-only         # worker only (e.g. on the GPU box, same data dir)
    python run.py --allow-path ~/corpora --max-upload-mb 512

Off the loopback (``--host 0.0.0.0``, an IP or a name) every request needs the access token:
``--token`` or ``$SAE_STUDIO_TOKEN``, else one is generated and the URL that carries it printed.

Ctrl-C stops both cleanly: the worker finishes its current step, a running training is marked
interrupted and can be retried from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

from worker.supervisor import Supervisor

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the SAE Studio web app and worker.")
    p.add_argument("--data-dir", default="data", help="SQLite files, models, runs (default ./data)")
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
                   help="largest upload in MB (default $SAE_STUDIO_MAX_UPLOAD_MB or 1024)")
    p.add_argument("--workers", type=int, default=2,
                   help="worker threads (one training per device at a time; the others "
                        "prepare models and datasets)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-worker", action="store_true", help="start only the web server")
    mode.add_argument("--worker-only", action="store_true", help="start only the worker")
    args = p.parse_args(argv)
    if args.max_upload_mb is not None and not 0 < args.max_upload_mb < 2**40:
        p.error("--max-upload-mb must be a positive number of megabytes")

    data_dir = Path(args.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Read by worker.settings in both processes.
    os.environ["SAE_STUDIO_DATA"] = str(data_dir)
    if args.allow_path:
        named = [d for d in os.environ.get("SAE_STUDIO_ALLOWED_PATHS", "").split(os.pathsep) if d]
        named += [str(Path(d).expanduser().resolve()) for d in args.allow_path]
        os.environ["SAE_STUDIO_ALLOWED_PATHS"] = os.pathsep.join(named)
    if args.max_upload_mb is not None:
        os.environ["SAE_STUDIO_MAX_UPLOAD_MB"] = str(args.max_upload_mb)
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

    from werkzeug.serving import make_server

    from webapp import create_app
    from webapp.security import WILDCARDS, is_loopback

    token = args.token
    if token is None and not is_loopback(args.host):
        token = secrets.token_urlsafe(24)
    hosts = [h for h in os.environ.get("SAE_STUDIO_ALLOWED_HOSTS", "").split(",") if h.strip()]
    app = create_app({"DATA_DIR": str(data_dir), "BIND_HOST": args.host, "TOKEN": token,
                      "ALLOWED_HOSTS": hosts + args.allowed_host})
    server = make_server(args.host, args.port, app, threaded=True)
    supervisor = None if args.no_worker else Supervisor(args.workers, env)
    shown = socket.gethostname() if args.host in WILDCARDS else args.host
    if ":" in shown:
        shown = f"[{shown}]"  # an IPv6 address
    url = f"http://{shown}:{server.server_port}/" + (f"?token={token}" if token else "")
    print(f"SAE Studio: {url}  (data in {data_dir}; "
          f"{'no worker' if supervisor is None else f'worker pid {supervisor.proc.pid}'}; "
          "Ctrl-C to stop)",
          flush=True)
    if not is_loopback(args.host):
        print(f"Warning: SAE Studio listens on {args.host}, reachable from the network: anyone "
              "with the token above can read and change everything. Keep it secret.",
              flush=True)

    try:
        server.serve_forever()  # werkzeug returns quietly on KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    finally:
        print("\nStopping...", flush=True)
        server.server_close()
        if supervisor is not None:
            supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
