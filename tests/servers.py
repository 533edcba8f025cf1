"""Throw-away PostgreSQL and Redis servers for the tests about them (and bench scripts).

``Postgres()`` runs ``initdb`` and ``pg_ctl start`` on a new temporary folder and a free loopback
port (trust authentication, superuser ``postgres``, fsync off); ``create_database()`` makes an
empty database and returns its ``postgresql://`` URL; ``stop()`` stops the server and deletes
the folder. As root (PostgreSQL refuses to run as root) the commands run through
``runuser -u postgres`` and the folder belongs to that user. ``Redis()`` runs ``redis-server`` on a
free loopback port with no persistence; ``url`` is its ``redis://`` URL.

Pytest fixtures (import them into a conftest): ``postgres_server`` and ``redis_server`` (one per
session), ``postgres_url`` (a new database for each test) and ``redis_url`` (the server emptied
for each test). Without the server binaries or the Python clients (psycopg2, redis) they skip
with the reason, except in CI (``CI=true``), where they fail: CI must run these tests.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port free on the loopback address now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable(what: str) -> None:
    """Skip the test saying ``what`` is missing; fail instead in CI (``CI=true``)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{what} (required in CI)")
    pytest.skip(what)


# ---------------------------------------------------------------------------- PostgreSQL
def postgres_bin() -> Path | None:
    """The folder with ``initdb`` and ``pg_ctl``: Debian's newest
    ``/usr/lib/postgresql/<version>/bin``, else the one on PATH; None when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path and shutil.which("pg_ctl") else None


class Postgres:
    """A PostgreSQL server on a temporary folder and a free loopback port, started at once."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin = bin_dir or postgres_bin()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL's initdb and pg_ctl were not found")
        self.as_postgres = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="sae-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "postgres"
        self._names = itertools.count(1)
        if self.as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        try:
            self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust",
                      "--no-sync", "-E", "UTF8", "--locale=C")
            options = (f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off "
                       "-c full_page_writes=off -c max_connections=200")
            self._run("pg_ctl", "start", "-w", "-t", str(int(START_TIMEOUT_S)), "-D",
                      str(self.data), "-l", str(self.root / "server.log"), "-o", options)
        except BaseException:
            self.stop()
            raise
        self.url = f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        out = subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT_S,
                             cwd=self.root)
        if out.returncode != 0:
            log = self.root / "server.log"
            raise RuntimeError(f"{program} failed ({out.returncode}): {out.stderr.strip()}\n"
                               + (log.read_text()[-2000:] if log.exists() else ""))

    def execute(self, sql: str) -> None:
        """Run one statement as the superuser on the ``postgres`` database (autocommit)."""
        import psycopg2

        conn = psycopg2.connect(self.url, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (``t_<n>`` unless named): its URL."""
        name = name or f"t_{next(self._names)}"
        self.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server (immediate shutdown) and delete its folder."""
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w",
                          "-t", str(int(STOP_TIMEOUT_S)))
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------- Redis
class Redis:
    """``redis-server`` on a free loopback port, no persistence, started at once."""

    def __init__(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise FileNotFoundError("redis-server was not found")
        self.root = Path(tempfile.mkdtemp(prefix="sae-redis-"))
        self.port = free_port()
        self.proc = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def ping(self) -> bool:
        """Whether the server answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def flush(self) -> None:
        """Delete every key of every database."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"FLUSHALL\r\n")
            if not s.recv(64).startswith(b"+OK"):
                raise RuntimeError("FLUSHALL failed")

    def stop(self) -> None:
        """Stop the server and delete its folder."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One PostgreSQL server for the session (skipped, or failed in CI, without one)."""
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        unavailable("psycopg2 is not installed (pip install psycopg2-binary)")
    if postgres_bin() is None:
        unavailable("PostgreSQL's initdb/pg_ctl were not found (apt-get install postgresql)")
    server = Postgres()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> str:
    """A new empty database on the session's server: its URL."""
    return postgres_server.create_database()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Redis]:
    """One Redis server for the session (skipped, or failed in CI, without one)."""
    try:
        import redis  # noqa: F401
    except ImportError:
        unavailable("the redis package is not installed (pip install redis)")
    if shutil.which("redis-server") is None:
        unavailable("redis-server was not found (apt-get install redis-server)")
    server = Redis()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: Redis) -> str:
    """The session's Redis server, emptied: its URL."""
    redis_server.flush()
    return redis_server.url
