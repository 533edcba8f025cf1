"""The app database on a real PostgreSQL server (``tests.servers``): the schema made from empty by
the migrations, column types that keep SQLite's ranges, two processes starting together
migrating once, writers taking turns, the change poll, and the URLs ``init_db`` accepts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.processes import ROOT, wait_for
from worker.db import (
    SCHEMA_VERSION,
    TABLES,
    LanguageModel,
    Training,
    WorkerHeartbeat,
    data_version,
    db,
    init_db,
    is_bound,
    is_postgres,
    schema_version,
    url_problem,
)

from ..web.conftest import make_dataset, make_model, make_training


def test_an_empty_database_migrates_to_the_current_schema(postgres_url: str) -> None:
    init_db(postgres_url)
    assert is_bound() and is_postgres()
    with db.connection_context():
        assert schema_version() == SCHEMA_VERSION == 13
        tables = set(db.get_tables())
        assert {t._meta.table_name for t in TABLES} | {"schema_version"} <= tables
        for table in TABLES:  # every column the models declare exists
            have = {c.name for c in db.get_columns(table._meta.table_name)}
            assert {f.column_name for f in table._meta.sorted_fields} == have, table
        types = {c.name: c.data_type for c in db.get_columns("training")}
        assert types["created_at"] == types["started_at"] == "double precision"
        assert types["id"] == types["current_step"] == types["model_id"] == "bigint"
        assert types["config"] == types["latest"] == "text"  # JSON as text, as on SQLite
        assert types["status"] == types["worker"] == "character varying"
        lengths = dict(db.execute_sql(
            "SELECT column_name, character_maximum_length FROM information_schema.columns "
            "WHERE table_name = 'training' AND data_type = 'character varying'").fetchall())
        assert set(lengths.values()) == {None}  # no VARCHAR(255): SQLite had no limit
        assert {c.name: c.data_type for c in db.get_columns("checkpoint")}["is_best"] == "boolean"
    init_db(postgres_url)  # again: nothing to do
    with db.connection_context():
        assert db.execute_sql("SELECT version FROM schema_version").fetchall() == [(13,)]


def test_values_keep_their_range_and_precision(postgres_url: str) -> None:
    """Epoch seconds to the microsecond (REAL would round them to minutes), byte counts past
    2**31, names past 255 characters: what SQLite stored, PostgreSQL stores (a NUL character
    aside)."""
    init_db(postgres_url)
    stamp = 1_800_000_000.123456
    m = make_model(created_at=stamp, n_params=7_000_000_000, name="m" * 1000)
    with db.connection_context():
        WorkerHeartbeat.insert(name="host:1", pid=1, device="cuda:0",
                               device_memory=80 * 2**30, running=[3, 4]).execute()
        back = LanguageModel.get_by_id(m.id)
        assert back.created_at == stamp
        assert back.n_params == 7_000_000_000 and back.name == "m" * 1000
        hb = WorkerHeartbeat.get(WorkerHeartbeat.name == "host:1")
        assert hb.device_memory == 80 * 2**30 and hb.running == [3, 4]
        t = make_training(m, make_dataset(), steps=30, every=10)
        assert Training.get_by_id(t.id).latest["step"] == 30
        # PostgreSQL text holds no NUL: stored (and looked for) as U+FFFD, not an error
        odd = make_model(name="a\x00b")
        assert LanguageModel.get(LanguageModel.name == "a\x00b").id == odd.id
        assert LanguageModel.get_by_id(odd.id).name == "a\ufffdb"


MIGRATE = textwrap.dedent("""
    import logging, os, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    from worker.db import LanguageModel, db, init_db, schema_version
    go = Path(sys.argv[2])
    Path(f"{go}.ready{os.getpid()}").touch()
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    init_db(sys.argv[1])
    with db.connection_context():
        LanguageModel.create(name=f"from {os.getpid()}", source="x")
        print("version", schema_version())
""")


def test_two_processes_starting_together_migrate_once(postgres_url: str, tmp_path: Path
                                                      ) -> None:
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, postgres_url, str(go)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    wait_for(lambda: len(list(tmp_path.glob("go.ready*"))) == 2, 120,
             "both processes to start")  # both imported the models and wait for the file
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(f"version {SCHEMA_VERSION}" in out for out in outs), outs
    assert sum(out.count("Migrated the database from schema 0 to 13") for out in outs) == 1, outs
    init_db(postgres_url)
    with db.connection_context():
        assert db.execute_sql("SELECT version FROM schema_version").fetchall() == [(13,)]
        assert LanguageModel.select().count() == 2


def test_writers_take_turns_and_readers_never_wait(postgres_url: str) -> None:
    """Like SQLite's BEGIN IMMEDIATE: a transaction waits for the one that holds the write
    lock (``lock_type`` accepted and ignored); a read outside a transaction does not."""
    init_db(postgres_url)
    m = make_model()
    holding, events = threading.Event(), []

    def writer() -> None:
        with db.connection_context(), db.atomic(lock_type="IMMEDIATE"):
            LanguageModel.update(name="first").where(LanguageModel.id == m.id).execute()
            holding.set()
            time.sleep(0.6)
            events.append(("first commits", time.monotonic()))

    def second() -> None:
        holding.wait(10)
        with db.connection_context():
            t0 = time.monotonic()
            assert LanguageModel.get_by_id(m.id).name == "minilm-l6"  # the old row, at once
            events.append(("read", time.monotonic() - t0))
            with db.atomic():
                events.append(("second begins", time.monotonic()))
                assert LanguageModel.get_by_id(m.id).name == "first"

    threads = [threading.Thread(target=writer), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    got = dict(events)
    assert got["read"] < 0.3
    assert got["second begins"] >= got["first commits"]


def test_data_version_changes_with_each_commit_only(postgres_url: str) -> None:
    init_db(postgres_url)
    m = make_model()
    with db.connection_context():
        before = data_version()
        LanguageModel.select().count()
        assert data_version() == before  # reads change nothing

    def write() -> None:
        with db.connection_context(), db.atomic():
            LanguageModel.update(progress=0.5).where(LanguageModel.id == m.id).execute()

    thread = threading.Thread(target=write)
    thread.start()
    thread.join(30)
    with db.connection_context():
        after = data_version()
        assert after != before
        assert data_version() == after


def test_sqlite_urls_and_plain_paths_are_sqlite_files(tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path}/a/app.db", tmp_path / "b" / "app.db"):
        init_db(url)
        assert not is_postgres()
        with db.connection_context():
            assert schema_version() == SCHEMA_VERSION
            assert isinstance(data_version(), int)
    assert (tmp_path / "a" / "app.db").is_file() and (tmp_path / "b" / "app.db").is_file()


@pytest.mark.parametrize("url, words", [
    ("mysql://sae:secret@db/sae", "Unsupported database URL 'mysql://...'"),
    ("postgresql://sae:secret@127.0.0.1:5432/", "names no database"),
    ("redis://127.0.0.1:6379/0", "Unsupported database URL 'redis://...'"),
    ("postgresql://sae:secret@db:54x2/sae", "has a port that is not a number"),
])
def test_other_urls_are_refused_without_echoing_a_password(url: str, words: str) -> None:
    assert words in (url_problem(url) or "")  # what run.py can say before starting
    with pytest.raises(ValueError) as caught:
        init_db(url)
    assert words in str(caught.value) and "secret" not in str(caught.value)


def test_good_urls_have_no_problem(tmp_path: Path) -> None:
    for url in ("sqlite:///data/app.db", "sqlite:////srv/app.db", str(tmp_path / "app.db"),
                "postgresql://sae:p%40ss@db.lab:5432/sae?sslmode=require", "postgres://h/sae"):
        assert url_problem(url) is None, url


def test_schema_13_replaces_lone_surrogates_on_postgresql(postgres_url: str) -> None:
    """A lone surrogate stored escaped in a JSON column before schema 13 (PostgreSQL's JSON
    functions refuse it: a list filtered or sorted on it failed) becomes U+FFFD; an emoji
    (an escaped pair) stays."""
    from worker import jobs

    init_db(postgres_url)
    m, d = make_model(), make_dataset()
    t = make_training(m, d, status="completed")
    with db.connection_context():
        db.execute_sql("UPDATE training SET tags = %s, config = %s WHERE id = %s",
                       ('["a\\ud800b", "\\ud83d\\ude00"]',
                        '{"encoder_type": "topk", "name": "\\udc00"}', t.id))
        with pytest.raises(Exception, match="(?i)surrogate|unicode"):
            with db.atomic():
                jobs.list_trainings(encoder_type="topk")
        db.execute_sql("UPDATE schema_version SET version = 12")
    init_db(postgres_url)
    with db.connection_context():
        assert schema_version() == SCHEMA_VERSION == 13
        row = Training.get_by_id(t.id)
        assert row.tags == ["a\ufffdb", "\U0001f600"] and row.config["name"] == "\ufffd"
        assert [x.id for x in jobs.list_trainings(encoder_type="topk")] == [t.id]
