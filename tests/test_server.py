"""The server run.py starts: gunicorn's threaded worker (werkzeug's development server only with
``--debug``). Real run.py processes (``--no-worker``: no Huey consumer is needed for what the
web side serves) on rows written as the worker writes them, real sockets.

A WebSocket ends with one close frame and nothing after it (the development server writes an
HTTP response after it, which browsers log as "Invalid frame header"); a hundred viewers at
once are all answered; Ctrl-C and SIGTERM stop at once with the viewers told (1001), and a web
worker whose run.py was SIGKILLed exits by itself.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import simple_websocket

from tests.web.conftest import make_dataset, make_model, make_training

from .processes import RunPy, alive, children, wait_for


@pytest.fixture
def rows(data_dir: Path) -> dict[str, int]:
    """A finished and a running training (ids), and one that does not exist."""
    model, dataset = make_model(), make_dataset()
    done = make_training(model, dataset, status="completed", steps=1000, checkpoints=1,
                         out_dir=data_dir)
    running = make_training(model, dataset, status="training", steps=100)
    return {"completed": done.id, "training": running.id, "missing": running.id + 100}


@pytest.fixture
def server(data_dir: Path, rows: dict[str, int]) -> Iterator[RunPy]:
    run = RunPy(data_dir, "--no-worker")
    yield run
    if run.proc.poll() is None:
        run.stop()


def address(run: RunPy) -> str:
    return run.url.removeprefix("http://")


def server_header(run: RunPy) -> str:
    with urllib.request.urlopen(run.url + "/healthz", timeout=10) as r:
        return r.headers["Server"]


# ---------------------------------------------------------------------------- a raw WebSocket
def _read_exactly(s: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"the server closed the connection inside a frame: {buf!r}")
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _frame(s: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """The next frame from the server: (opcode, payload). Servers do not mask."""
    b0, b1 = _read_exactly(s, buf, 2)
    assert b0 & 0x80 and not b0 & 0x70, f"not a final, plain frame: {b0:#x}"
    assert not b1 & 0x80, "a server frame must not be masked"
    size = b1 & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", _read_exactly(s, buf, 2))
    elif size == 127:
        (size,) = struct.unpack("!Q", _read_exactly(s, buf, 8))
    return b0 & 0x0F, _read_exactly(s, buf, size)


def upgrade(address: str, path: str, **headers: str) -> socket.socket:
    """A socket that has sent a browser's WebSocket upgrade request for ``path`` (Host and
    Origin its own unless given)."""
    host, port = address.split(":")
    lines = {"Host": address, "Origin": f"http://{address}", **headers}
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall((f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in lines.items())
               + "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    return s


def raw_websocket(address: str, path: str) -> tuple[list[tuple[int, bytes]], bytes]:
    """Open ``path`` as a browser does, read the frames up to the server's close frame, then
    read until the server ends the connection: the frames (opcode, payload) and every byte that
    came after the close frame."""
    with upgrade(address, path) as s:
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"no handshake answer: {buf!r}"
            buf += chunk
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        buf = bytearray(rest)
        frames = [_frame(s, buf)]
        while frames[-1][0] != 0x8:
            frames.append(_frame(s, buf))
        after = bytes(buf)
        while chunk := s.recv(65536):
            after += chunk
    return frames, after


# ---------------------------------------------------------------------------- the tests
def test_run_py_serves_with_gunicorn_and_debug_with_werkzeug(data_dir: Path) -> None:
    fresh = data_dir / "made-by-run-py"
    old = os.umask(0o022)  # a umask that leaves new files readable by everyone
    try:
        run = RunPy(fresh, "--no-worker")
    finally:
        os.umask(old)
    try:
        assert server_header(run) == "gunicorn"
        assert "no worker" in run.find(r"(SAE Studio: http.*)")
        with urllib.request.urlopen(run.url + "/", timeout=10) as r:  # gunicorn's answer
            assert r.headers["X-Frame-Options"] == "DENY"
        # the folder it made is its owner's alone, the database and queue in it with it
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
        assert (fresh / "app.db").is_file()
    finally:
        assert run.stop() == 0
    debug = RunPy(data_dir, "--no-worker", "--debug")
    try:
        assert server_header(debug).startswith("Werkzeug/")
    finally:
        assert debug.stop() == 0


@pytest.mark.parametrize("which", ["completed", "missing"])
@pytest.mark.parametrize("query", ["", "?format=json"])
def test_a_websocket_ends_with_one_close_frame_and_nothing_after(
        server: RunPy, rows: dict[str, int], which: str, query: str) -> None:
    frames, after = raw_websocket(address(server), f"/ws/trainings/{rows[which]}{query}")
    *messages, (_, close) = frames
    assert messages and all(opcode == 0x1 for opcode, _ in messages)  # text: the final state
    text = b"".join(payload for _, payload in messages).decode()
    assert ("does not exist" in text) == (which == "missing")
    assert struct.unpack("!H", close[:2]) == (1000,)
    assert after == b"", f"bytes after the close frame: {after[:200]!r}"


def test_a_hundred_websockets_at_once_are_all_answered(server: RunPy,
                                                       rows: dict[str, int]) -> None:
    """Each open WebSocket holds one of the worker's threads (default 128): a hundred viewers
    of a running training all get their snapshot, and pages are still served beside them."""
    url = f"ws://{address(server)}/ws/trainings/{rows['training']}"
    clients: list[simple_websocket.Client] = []
    snapshots: list[str] = []
    lock = threading.Lock()

    def view(i: int) -> None:
        ws = simple_websocket.Client.connect(url + ("?format=json" if i % 2 else ""))
        first = ws.receive(timeout=60)
        with lock:
            clients.append(ws)
            snapshots.append(first or "")

    threads = [threading.Thread(target=view, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    try:
        assert len(snapshots) == 100 and all(
            f"training-{rows['training']}" in s or '"type": "status"' in s for s in snapshots)
        start = time.monotonic()
        with urllib.request.urlopen(server.url + "/", timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read()
        assert time.monotonic() - start < 10
        assert all(ws.connected for ws in clients)
    finally:
        for ws in clients:
            try:
                ws.close()
            except (simple_websocket.ConnectionClosed, OSError):
                pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_once_and_closes_the_viewers(server: RunPy, rows: dict[str, int],
                                                       sig: signal.Signals) -> None:
    """Open WebSockets do not hold the shutdown: each viewer gets 1001 (going away) and run.py
    exits 0 well before the worker's grace period (5 s) runs out."""
    url = f"ws://{address(server)}/ws/trainings/{rows['training']}"
    viewers = [simple_websocket.Client.connect(url + q) for q in ("", "?format=json")]
    for ws in viewers:
        assert ws.receive(timeout=10)
    start = time.monotonic()
    assert server.stop(sig, 30) == 0
    assert time.monotonic() - start < 4
    for ws in viewers:
        with pytest.raises(simple_websocket.ConnectionClosed):
            while ws.receive(timeout=5) is not None:
                pass
        assert ws.close_reason == 1001


def test_the_web_worker_exits_when_run_py_is_killed(server: RunPy,
                                                    rows: dict[str, int]) -> None:
    """gunicorn's worker checks its parent: SIGKILL of run.py (the master) leaves no web worker
    behind, not even one with a viewer connected."""
    (web,) = wait_for(lambda: children(server.proc.pid), 10, "the web worker")
    ws = simple_websocket.Client.connect(
        f"ws://{address(server)}/ws/trainings/{rows['training']}")
    try:
        assert ws.receive(timeout=10)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        wait_for(lambda: not alive(web), 20, f"the web worker {web} to exit")
    finally:
        if alive(web):
            os.kill(web, signal.SIGKILL)


def test_the_doors_hold_on_the_real_server(server: RunPy, rows: dict[str, int]) -> None:
    """The app's Host and Origin checks see the headers as sent through gunicorn."""
    path = f"/ws/trainings/{rows['training']}"
    for headers, status in (({"Host": "evil.example"}, 403),
                            ({"Origin": "http://evil.example"}, 403), ({}, 101)):
        with upgrade(address(server), path, **headers) as s:
            assert int(s.recv(4096).split()[1]) == status, headers
    post = urllib.request.Request(server.url + f"/trainings/{rows['training']}/stop",
                                  data=b"", headers={"Origin": "http://evil.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=10)
    assert refused.value.code == 403


def test_an_oversize_upload_is_answered_413(data_dir: Path) -> None:
    """gunicorn answers the app's 413 to a body over --max-upload-mb (no reset connection)."""
    import requests

    run = RunPy(data_dir, "--no-worker", "--max-upload-mb", "0.0625")
    try:
        r = requests.post(run.url + "/datasets", headers={"Accept": "application/json"},
                          files={"file": ("big.txt", b"word " * 200_000)}, timeout=30)
        assert r.status_code == 413 and "too large" in r.json()["error"]
    finally:
        assert run.stop() == 0
