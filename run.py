"""Start SAE Studio: the web server and one Huey worker, with SQLite files in ./data.

    python run.py                       # web on http://127.0.0.1:5000 + a worker
    python run.py --data-dir /srv/sae --host 0.0.0.0 --port 8000
    python run.py --no-worker           # web only (the worker runs elsewhere)
    python run.py --worker-only         # worker only (e.g. on the GPU box, same data dir)

Ctrl-C stops both cleanly: the worker finishes its current step, a running training is marked
interrupted and can be retried from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _consumer_cmd(workers: int) -> list[str]:
    return [sys.executable, "-m", "huey.bin.huey_consumer", "worker.tasks.huey",
            "-w", str(workers), "-k", "thread", "-q"]


def _start_worker(workers: int, env: dict[str, str]) -> subprocess.Popen:
    # Its own session: a terminal's Ctrl-C reaches run.py only, which then stops it in order.
    return subprocess.Popen(_consumer_cmd(workers), cwd=HERE, env=env, start_new_session=True)


def _stop_worker(worker: subprocess.Popen) -> None:
    """Ask running trainings to checkpoint and stop as `interrupted`, then stop the consumer."""
    if worker.poll() is not None:
        return
    from worker.db import init_db
    from worker.jobs import interrupt_running
    from worker.settings import app_db_path

    init_db(app_db_path())
    n = interrupt_running()
    if n:
        print(f"Checkpointing {n} running training(s); Retry continues them.", flush=True)
    worker.send_signal(signal.SIGINT)  # huey: finish the current task, then exit
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the SAE Studio web app and worker.")
    p.add_argument("--data-dir", default="data", help="SQLite files, models, runs (default ./data)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2,
                   help="worker threads (one training per device at a time; the others "
                        "prepare models and datasets)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-worker", action="store_true", help="start only the web server")
    mode.add_argument("--worker-only", action="store_true", help="start only the worker")
    args = p.parse_args(argv)

    data_dir = Path(args.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["SAE_STUDIO_DATA"] = str(data_dir)  # read by worker.settings in both processes
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started with SIGINT ignored (a shell's `&`)
    if args.worker_only:
        worker = _start_worker(args.workers, env)
        print(f"SAE Studio worker: pid {worker.pid}, data in {data_dir}; Ctrl-C to stop",
              flush=True)
        try:
            return worker.wait()
        except KeyboardInterrupt:
            print("\nStopping...", flush=True)
            _stop_worker(worker)
            return 0

    from werkzeug.serving import make_server

    from webapp import create_app

    app = create_app({"DATA_DIR": str(data_dir)})
    server = make_server(args.host, args.port, app, threaded=True)
    worker = None
    if not args.no_worker:
        worker = _start_worker(args.workers, env)
    url = f"http://{args.host}:{server.server_port}/"
    print(f"SAE Studio: {url}  (data in {data_dir}; "
          f"{'no worker' if worker is None else f'worker pid {worker.pid}'}; Ctrl-C to stop)",
          flush=True)

    try:
        server.serve_forever()  # werkzeug returns quietly on KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    finally:
        print("\nStopping...", flush=True)
        server.server_close()
        if worker is not None:
            _stop_worker(worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
