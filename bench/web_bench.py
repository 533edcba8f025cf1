"""Web app figures for the README: dashboard latency, metric -> WebSocket latency, and how much a
watching browser/WebSocket client slows a training.

    .venv/bin/python bench/web_bench.py [--skip-slowdown]

1. Dashboard: 10 jobs and 10,000 metric rows in a real SQLite file; GET / (the Training page,
   with every card and its SVG charts) 200 times through a live server; p50/p95 in ms.
2. Latency: a live server, a WebSocket client on /ws/trainings/<id>?format=json; the "worker"
   (this script, another connection, as the Huey worker would) commits a metric row; the time
   until the client has the event, over 50 rows; median and max in ms.
3. Slowdown: the same training (minilm-l6 + kjv, layer 3, TopK 8x, batch 1024, 150 steps) run
   headless by the CLI, and by the Huey worker (run.py) with a JSON WebSocket client and an HTML
   WebSocket client (as a browser tab) watching it; tokens/s of both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _live_server(data_dir: Path):
    from werkzeug.serving import make_server

    from webapp import create_app

    app = create_app({"DATA_DIR": str(data_dir)})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_port}"


def _seed_jobs(n_jobs: int, rows_per_job: int) -> list[int]:
    from worker.db import Dataset, LanguageModel, Metric, Training, db

    with db.atomic():
        m = LanguageModel.create(name="smollm2-135m", source="smollm2-135m", status="ready",
                                 n_layers=30, hidden_dim=576, n_params=134_515_008,
                                 hook_points=["residual", "mlp_out", "attn_out"], path="/x")
        d = Dataset.create(name="kjv", source="kjv", status="ready", n_documents=31102,
                           n_tokens=1_000_000)
    ids = []
    for j in range(n_jobs):
        status = "training" if j == 0 else "completed"
        t = Training.create(model=m, dataset=d, status=status, total_steps=rows_per_job * 10,
                            current_step=rows_per_job * 10,
                            config={"encoder_type": "topk", "layer": 15, "hook_point": "residual",
                                    "k": 32, "expansion_factor": 8, "batch_size": 4096},
                            started_at=time.time() - 600)
        rows = []
        for i in range(rows_per_job):
            step = (i + 1) * 10
            rows.append({"training": t.id, "step": step, "data": {
                "step": step, "tokens": step * 4096, "loss": 1 / (1 + i), "mse": 1 / (1 + i),
                "l0": 32.0, "l0_frac": 32 / 4608, "fvu": 0.2 + 1 / (1 + i), "dead": 10,
                "dead_neurons": 10, "dense": 0, "lr": 1e-3, "learning_rate": 1e-3,
                "tokens_per_s": 8000.0, "grad_norm": 0.5, "aux_loss": 0.0}})
        with db.atomic():
            for chunk in range(0, len(rows), 500):
                Metric.insert_many(rows[chunk:chunk + 500]).execute()
        last = rows[-1]["data"]
        Training.update(latest=last).where(Training.id == t.id).execute()
        ids.append(t.id)
    return ids


def dashboard(tmp: Path) -> dict:
    from worker.db import init_db

    os.environ["SAE_STUDIO_DATA"] = str(tmp)
    init_db(tmp / "app.db")
    ids = _seed_jobs(10, 1000)
    server, host = _live_server(tmp)
    times = []
    for i in range(220):
        t = time.perf_counter()
        with urllib.request.urlopen(f"http://{host}/") as r:
            body = r.read()
        if i >= 20:  # warm-up
            times.append((time.perf_counter() - t) * 1000)
    assert body.count(b"<svg") >= 10, "the page should show every card's charts"
    times.sort()
    out = {"jobs": len(ids), "metric_rows": 10_000, "requests": len(times),
           "p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * len(times)) - 1],
           "page_kb": len(body) / 1024}
    server.shutdown()
    return out


def latency(tmp: Path) -> dict:
    import simple_websocket

    from worker.db import Metric, Training, db, init_db

    os.environ["SAE_STUDIO_DATA"] = str(tmp)
    init_db(tmp / "app.db")
    (tid,) = _seed_jobs(1, 10)
    server, host = _live_server(tmp)
    ws = simple_websocket.Client.connect(f"ws://{host}/ws/trainings/{tid}?format=json")
    deadline = time.time() + 5
    while time.time() < deadline:  # drain the snapshot
        if ws.receive(timeout=0.5) is None:
            break
    delays = []
    for i in range(50):
        step = 1000 + i
        data = {"step": step, "loss": 0.1, "mse": 0.1, "l0": 32.0, "fvu": 0.2, "dead": 0,
                "dead_neurons": 0, "lr": 1e-3, "learning_rate": 1e-3, "tokens_per_s": 1.0}
        t0 = time.perf_counter()
        with db.atomic():  # as the worker writes: the row, then the training's latest
            Metric.create(training=tid, step=step, data=data)
            Training.update(current_step=step, latest=data).where(Training.id == tid).execute()
        got = False
        while not got:
            msg = ws.receive(timeout=5)
            if msg is None:
                raise SystemExit(f"no WebSocket event within 5 s for step {step}")
            got = f'"step": {step}' in msg or f'"step":{step}' in msg
        delays.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.3)
    ws.close()
    server.shutdown()
    return {"events": len(delays), "median_ms": statistics.median(delays),
            "max_ms": max(delays)}


TRAIN = ["--encoder-type", "topk", "--k", "32", "--expansion-factor", "8", "--batch-size",
         "1024", "--total-steps", "150", "--seed", "0"]


def slowdown(tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    py = sys.executable
    # Prime the token store and the model cache so both runs start warm.
    cli = subprocess.run([py, "-m", "worker", "--data-dir", str(tmp / "cli"), "train",
                          "--model", "minilm-l6", "--dataset", "kjv", "--layer", "3",
                          "--max-tokens", "400000", *TRAIN, "--out", str(tmp / "cli-run")],
                         capture_output=True, text=True, env=env, check=True)
    headless = json.loads(cli.stdout.strip().splitlines()[-1])["tokens_per_s"]

    data = tmp / "web"
    proc = subprocess.Popen([py, "run.py", "--data-dir", str(data), "--port", "0"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        base = re.search(r"http://[^ ]+/", line).group(0).rstrip("/")

        def post(path: str, fields: dict) -> dict:
            req = urllib.request.Request(base + path, data="&".join(
                f"{k}={v}" for k, v in fields.items()).encode(),
                headers={"Accept": "application/json"})
            with urllib.request.urlopen(req) as r:
                return json.loads(r.read())

        def get(path: str) -> dict:
            req = urllib.request.Request(base + path, headers={"Accept": "application/json"})
            with urllib.request.urlopen(req) as r:
                return json.loads(r.read())

        m = post("/models", {"source": "minilm-l6"})
        d = post("/datasets", {"source": "kjv", "max_tokens": "400000"})
        while get(f"/models/{m['id']}")["status"] != "ready" or \
                get(f"/datasets/{d['id']}")["status"] != "ready":
            time.sleep(0.5)
        t = post("/trainings", {"model_id": m["id"], "dataset_id": d["id"], "layer": 3,
                                "encoder_type": "topk", "k": 32, "expansion_factor": 8,
                                "batch_size": 1024, "total_steps": 150, "seed": 0,
                                "auto_save_interval": 0})
        import simple_websocket

        host = base.split("//", 1)[1]
        watchers = [simple_websocket.Client.connect(f"ws://{host}/ws/trainings/{t['id']}"),
                    simple_websocket.Client.connect(
                        f"ws://{host}/ws/trainings/{t['id']}?format=json")]
        received = [0, 0]

        def watch(i: int) -> None:
            try:
                while watchers[i].receive(timeout=None) is not None:
                    received[i] += 1
            except Exception:  # the server closes the socket at the end
                return

        for i in range(2):
            threading.Thread(target=watch, args=(i,), daemon=True).start()
        while (row := get(f"/trainings/{t['id']}"))["status"] not in (
                "completed", "failed", "stopped"):
            time.sleep(1)
        watched = row["result"]["tokens_per_s"] if row.get("result") else None
    finally:
        proc.send_signal(2)
        proc.wait(timeout=90)
    return {"cli_tokens_per_s": headless, "worker_watched_tokens_per_s": watched,
            "slowdown_pct": 100 * (1 - watched / headless) if watched else None,
            "messages_html": received[0], "messages_json": received[1]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-slowdown", action="store_true")
    args = p.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        out["dashboard"] = dashboard(Path(d) / "a")
    with tempfile.TemporaryDirectory() as d:
        out["ws_latency"] = latency(Path(d) / "b")
    if not args.skip_slowdown:
        with tempfile.TemporaryDirectory() as d:
            out["slowdown"] = slowdown(Path(d))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
