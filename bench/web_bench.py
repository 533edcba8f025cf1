"""Web app figures for the README: dashboard latency, metric -> WebSocket latency, and how much a
hundred WebSocket viewers slow a training, and the Training page under 20 concurrent clients
while a training runs. Every part talks to ``run.py`` (gunicorn, as users meet it).

    .venv/bin/python bench/web_bench.py [--skip-training] [--viewers 100] [--page-clients 20]

1. Dashboard: 10 jobs and 10,000 metric rows in a real SQLite file; GET / (the Training page,
   with every card and its SVG charts) 200 times through ``run.py --no-worker``; p50/p95 in ms.
2. Latency: ``run.py --no-worker``, a WebSocket client on /ws/trainings/<id>?format=json; the
   "worker" (this script, another connection, as the Huey worker would) commits a metric row;
   the time until the client has the event, over 50 rows; median and max in ms.
3. Training: the same training (minilm-l6 + kjv, layer 3, TopK 8x, batch 1024, 150 steps) run
   headless by the CLI, then by the Huey worker under run.py (one app, trainings in turn): with
   no viewer and with 100 WebSocket viewers (half HTML as browser tabs, half JSON; one
   server-side poller serves them all), alternated twice, and with 20 concurrent clients loading
   GET / (25 times each) while it trains: the training's tokens/s each time (mean per setting),
   the page's p50/p95 in ms.
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
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


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
    app = App(tmp, "--no-worker")
    times = []
    try:
        for i in range(220):
            t = time.perf_counter()
            with urllib.request.urlopen(app.base + "/") as r:
                body = r.read()
            if i >= 20:  # warm-up
                times.append((time.perf_counter() - t) * 1000)
    finally:
        app.stop()
    assert body.count(b"<svg") >= 10, "the page should show every card's charts"
    times.sort()
    out = {"jobs": len(ids), "metric_rows": 10_000, "requests": len(times),
           "p50_ms": statistics.median(times), "p95_ms": times[int(0.95 * len(times)) - 1],
           "page_kb": len(body) / 1024}
    return out


def latency(tmp: Path) -> dict:
    from worker.db import init_db

    os.environ["SAE_STUDIO_DATA"] = str(tmp)
    init_db(tmp / "app.db")
    (tid,) = _seed_jobs(1, 10)
    app = App(tmp, "--no-worker")
    try:
        return _latency(app, tid)
    finally:
        app.stop()


def _latency(app: App, tid: int) -> dict:
    import simple_websocket

    from worker.db import Metric, Training, db

    ws = simple_websocket.Client.connect(f"ws://{app.host}/ws/trainings/{tid}?format=json")
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
    return {"events": len(delays), "median_ms": statistics.median(delays),
            "max_ms": max(delays)}


TRAIN = ["--encoder-type", "topk", "--k", "32", "--expansion-factor", "8", "--batch-size",
         "1024", "--total-steps", "150", "--seed", "0"]
FORM = {"layer": 3, "encoder_type": "topk", "k": 32, "expansion_factor": 8, "batch_size": 1024,
        "total_steps": 150, "seed": 0, "auto_save_interval": 0}
"""The same training as ``TRAIN``, as the web form posts it."""
FINISHED = ("completed", "failed", "stopped", "interrupted")


def _tokens_per_s(result: dict) -> float | None:
    """The run's training tokens/s from a result dict (``tokens_per_s``, or a key that names it
    with its window)."""
    if result.get("tokens_per_s") is not None:
        return result["tokens_per_s"]
    return next((v for k, v in result.items() if "tokens_per_s" in k and v is not None), None)


class App:
    """``run.py`` (gunicorn + Huey worker; ``args`` e.g. ``--no-worker``) on a data folder,
    driven over HTTP."""

    def __init__(self, data: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "run.py", "--data-dir", str(data),
                                      "--port", "0", *args], cwd=ROOT, env=ENV,
                                     stdout=subprocess.PIPE, text=True)
        for line in self.proc.stdout:
            if found := re.search(r"SAE Studio: (http://[^ /]+)", line):
                break
        else:
            raise SystemExit("run.py stopped before it printed its URL")
        self.base = found.group(1)
        self.host = self.base.split("//", 1)[1]

    def post(self, path: str, fields: dict) -> dict:
        req = urllib.request.Request(self.base + path, data="&".join(
            f"{k}={v}" for k, v in fields.items()).encode(),
            headers={"Accept": "application/json"})
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())

    def get(self, path: str) -> dict:
        req = urllib.request.Request(self.base + path, headers={"Accept": "application/json"})
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())

    def wait_status(self, tid: int, statuses: tuple[str, ...], timeout: float = 900) -> dict:
        deadline = time.time() + timeout
        while (row := self.get(f"/trainings/{tid}"))["status"] not in statuses:
            if time.time() > deadline:
                raise SystemExit(f"training {tid} still {row['status']} after {timeout} s")
            time.sleep(0.5)
        return row

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the web server has used so far (Linux): run.py, the
        gunicorn master, and its web worker (a fork: the same command line; not the Huey
        consumer)."""
        ticks = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                ours = int(stat.parent.name) == self.proc.pid or (
                    int(fields[1]) == self.proc.pid
                    and b"run.py" in (stat.parent / "cmdline").read_bytes())
            except (OSError, IndexError):
                continue
            if ours:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(2)
        self.proc.wait(timeout=90)


def _watchers(app: App, tid: int, n: int) -> tuple[list, list[int]]:
    """``n`` WebSocket viewers of training ``tid`` (half HTML as a browser tab, half JSON),
    each read by a thread until the server closes it; their message counts."""
    import simple_websocket

    clients = [simple_websocket.Client.connect(
        f"ws://{app.host}/ws/trainings/{tid}" + ("?format=json" if i % 2 else ""))
        for i in range(n)]
    received = [0] * n

    def read(i: int) -> None:
        try:
            while clients[i].receive(timeout=None) is not None:
                received[i] += 1
        except Exception:  # the server closes the socket after the final state
            return

    for i in range(n):
        threading.Thread(target=read, args=(i,), daemon=True).start()
    return clients, received


def _page_load(app: App, tid: int, clients: int, per_client: int) -> dict:
    """``clients`` threads each GET / (the Training page) up to ``per_client`` times while
    training ``tid`` runs; latency p50/p95 in ms."""
    app.wait_status(tid, ("training", *FINISHED))
    times: list[float] = []
    lock = threading.Lock()

    def hit() -> None:
        for _ in range(per_client):
            t0 = time.perf_counter()
            with urllib.request.urlopen(app.base + "/") as r:
                r.read()
            with lock:
                times.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=hit) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = app.get(f"/trainings/{tid}")["status"]
    times.sort()
    return {"clients": clients, "requests": len(times), "p50_ms": statistics.median(times),
            "p95_ms": times[int(0.95 * len(times)) - 1], "max_ms": times[-1],
            "training_status_after": status}


def training(tmp: Path, viewers: int, page_clients: int, pairs: int) -> dict:
    """The same training (minilm-l6 + kjv) headless by the CLI, then by the worker under
    run.py with 0 and with ``viewers`` WebSocket viewers (``pairs`` times each, alternated;
    mean tokens/s), then with ``page_clients``
    concurrent clients loading GET / while it trains; tokens/s of each."""
    cli = subprocess.run([sys.executable, "-m", "worker", "--data-dir", str(tmp / "cli"),
                          "train", "--model", "minilm-l6", "--dataset", "kjv", "--layer", "3",
                          "--max-tokens", "400000", *TRAIN, "--out", str(tmp / "cli-run")],
                         capture_output=True, text=True, env=ENV, check=True)
    out: dict = {"cli_tokens_per_s": _tokens_per_s(json.loads(cli.stdout.strip()
                                                              .splitlines()[-1]))}
    app = App(tmp / "web")
    try:
        m = app.post("/models", {"source": "minilm-l6"})
        d = app.post("/datasets", {"source": "kjv", "max_tokens": "400000"})
        while app.get(f"/models/{m['id']}")["status"] != "ready" or \
                app.get(f"/datasets/{d['id']}")["status"] != "ready":
            time.sleep(0.5)
        form = dict(FORM, model_id=m["id"], dataset_id=d["id"])
        runs: dict[int, list[dict]] = {0: [], viewers: []}
        for n in (0, viewers) * pairs:  # alternated: the machine's drift hits both alike
            cpu, start = app.cpu_s(), time.time()
            t = app.post("/trainings", form)
            clients, received = _watchers(app, t["id"], n)
            row = app.wait_status(t["id"], FINISHED)
            runs[n].append({"status": row["status"],
                            "tokens_per_s": _tokens_per_s(row.get("result") or {}),
                            "seconds": time.time() - start, "web_cpu_s": app.cpu_s() - cpu,
                            "messages_min": min(received, default=0),
                            "messages_max": max(received, default=0)})
            for c in clients:
                if c.connected:  # the server closed the others after the final state
                    c.close()
        for n, done in runs.items():
            out[f"viewers_{n}"] = {"runs": done, "mean_tokens_per_s": statistics.mean(
                r["tokens_per_s"] for r in done if r["tokens_per_s"])}
        t = app.post("/trainings", form)
        load = _page_load(app, t["id"], page_clients, 25)
        row = app.wait_status(t["id"], FINISHED)
        out["page_load"] = dict(load, tokens_per_s=_tokens_per_s(row.get("result") or {}))
    finally:
        app.stop()
    quiet = out["viewers_0"]["mean_tokens_per_s"]
    out["viewers_slowdown_pct"] = 100 * (1 - out[f"viewers_{viewers}"]["mean_tokens_per_s"]
                                         / quiet)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-training", action="store_true",
                   help="only the dashboard and latency sections (no model, no training)")
    p.add_argument("--viewers", type=int, default=100)
    p.add_argument("--page-clients", type=int, default=20)
    p.add_argument("--pairs", type=int, default=2,
                   help="trainings with 0 and with --viewers viewers, alternated (each)")
    args = p.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        out["dashboard"] = dashboard(Path(d) / "a")
    with tempfile.TemporaryDirectory() as d:
        out["ws_latency"] = latency(Path(d) / "b")
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as d:
            out["training"] = training(Path(d), args.viewers, args.page_clients,
                                       args.pairs)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
