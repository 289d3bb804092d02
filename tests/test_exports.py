"""Parquet export of the ledger: correctness against Postgres, incrementality, idempotence, concurrent writers,
late commits, crash recovery, compaction and full rebuilds."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import psycopg
import pyarrow.parquet as pq
import pytest

from core import exports
from core.exports import Column, TableSpec

SEED_COLUMNS = ("created_at", "finished_at", "status", "source", "user_id", "template_name", "template_version",
                "label", "model_name", "backend", "prompt_tokens", "completion_tokens", "ttft_ms", "total_ms",
                "error")
UTC = timezone.utc


def seed_rows(n: int, *, start: datetime | None = None, span_hours: float = 96, rng_seed: int = 0,
              templates=("greeter", "summary", "support"), models=("gemma-3-270m", "remote-big")) -> list[tuple]:
    """Synthetic ledger rows (tuples in SEED_COLUMNS order), spread over span_hours from start."""
    rng = random.Random(rng_seed)
    start = start or datetime(2025, 3, 1, tzinfo=UTC)
    rows = []
    for _ in range(n):
        created = start + timedelta(seconds=rng.uniform(0, span_hours * 3600))
        status = rng.choices(("ok", "error", "blocked", "cancelled"), weights=(85, 8, 4, 3))[0]
        ok = status == "ok"
        total = rng.lognormvariate(6, 0.5) if ok else None
        rows.append((
            created, created + timedelta(milliseconds=total or 1), status,
            rng.choice(("chat", "api", "playground", "evaluation")),
            rng.choice(("ann", "bob", 'eve, "the" tester', None, "")),
            rng.choice(templates), rng.randint(1, 3), rng.choice(("production", "staging", None)),
            rng.choice(models), "llama_cpp",
            rng.randint(5, 400) if status != "blocked" else None, rng.randint(1, 64) if ok else None,
            total * 0.2 if ok else None, total,
            "boom,\nsecond line" if status == "error" else None,
        ))
    return rows


def insert_rows(conn: psycopg.Connection, rows: list[tuple]) -> None:
    """COPY seed rows into executions."""
    with conn.cursor().copy(f"COPY executions ({', '.join(SEED_COLUMNS)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def seed(pool, n: int, **kw) -> None:
    """Insert n synthetic executions."""
    with pool.connection() as conn:
        insert_rows(conn, seed_rows(n, **kw))


def insert_one(conn: psycopg.Connection, *, status: str = "ok", tokens: int = 7, id: int | None = None) -> int:
    """Insert one execution (on this connection, in its current transaction) and return its id."""
    cols = "status, source, model_name, backend, prompt_tokens, completion_tokens, total_ms"
    vals = [status, "api", "m", "llama_cpp", tokens, 1, 10.0]
    if id is not None:
        cols, vals = "id, " + cols, [id, *vals]
    return conn.execute(f"INSERT INTO executions ({cols}) VALUES ({', '.join(['%s'] * len(vals))}) RETURNING id",
                        vals).fetchone()[0]


def ddb(query: str):
    """Run a query on a fresh in-memory DuckDB."""
    return duckdb.connect().execute(query)


def parquet_glob(settings) -> str:
    return str(Path(settings.exports_dir) / "executions" / "*" / "*.parquet")


def exported(settings, query: str = "count(*), coalesce(sum(id), 0), coalesce(sum(prompt_tokens), 0)"):
    """Aggregates over the exported executions (DuckDB over the Parquet files)."""
    files = exports.parquet_files(settings.exports_dir, "executions")
    if not files:
        return None
    return ddb(f"SELECT {query} FROM read_parquet({[str(f) for f in files]!r}, hive_partitioning=true, "
                      "hive_types={'day': 'DATE'})").fetchone()


def in_postgres(pool, query: str = "count(*), coalesce(sum(id), 0), coalesce(sum(prompt_tokens), 0)", where: str = ""):
    with pool.connection() as conn:
        return conn.execute(f"SELECT {query} FROM executions {where}").fetchone()


def test_export_equals_postgres(pool, settings):
    seed(pool, 3000, start=datetime(2025, 3, 1, 21, tzinfo=timezone(timedelta(hours=-5))))
    report = exports.export(pool, settings)
    ex = report.tables[0]
    assert ex.table == "executions" and {t.table for t in report.tables} == {s.name for s in exports.TABLES}
    assert ex.rows == 3000 and ex.pending == 0 and report.rows == 3000
    agg = "count(*), sum(id), sum(prompt_tokens), sum(completion_tokens), count(error), count(user_id)"
    assert exported(settings, agg) == in_postgres(pool, agg)
    assert exported(settings, "sum(total_ms)")[0] == pytest.approx(in_postgres(pool, "sum(total_ms)")[0], rel=1e-12)
    # one directory per UTC day, and each file holds only its day's rows
    per_day = dict(ddb(f"SELECT day, count(*) FROM read_parquet('{parquet_glob(settings)}', "
                              "hive_partitioning=true, hive_types={'day': 'DATE'}) GROUP BY day").fetchall())
    with pool.connection() as conn:
        pg_days = dict(conn.execute("SELECT (created_at AT TIME ZONE 'UTC')::date, count(*) FROM executions "
                                    "GROUP BY 1").fetchall())
    assert per_day == pg_days and len(per_day) >= 4
    wrong_day = ddb(f"SELECT count(*) FROM read_parquet('{parquet_glob(settings)}', hive_partitioning=true, "
                           "hive_types={'day': 'DATE'}) WHERE created_at::date <> day").fetchone()[0]
    assert wrong_day == 0
    # values survive exactly: UTC timestamps without zone, NULL vs empty string, quotes, commas, newlines
    with pool.connection() as conn:
        pg = conn.execute("SELECT id, created_at AT TIME ZONE 'UTC', user_id, error, status FROM executions "
                          "ORDER BY id").fetchall()
    files = [str(f) for f in exports.parquet_files(settings.exports_dir, "executions")]
    pq_rows = ddb(f"SELECT id, created_at, user_id, error, status FROM read_parquet({files!r}) "
                         "ORDER BY id").fetchall()
    expect = [(i, ts, u, e.split("\n")[0] if e else e, s) for i, ts, u, e, s in pg]
    assert pq_rows == expect
    schema = ddb(f"DESCRIBE SELECT * FROM read_parquet({files!r})").fetchall()
    types = {name: typ for name, typ, *_ in schema}
    assert types["created_at"] == "TIMESTAMP" and types["prompt_tokens"] == "INTEGER" and types["ttft_ms"] == "DOUBLE"


def test_incremental_and_idempotent(pool, settings):
    seed(pool, 500)
    assert exports.export(pool, settings).rows == 500
    files = exports.parquet_files(settings.exports_dir, "executions")
    again = exports.export(pool, settings)
    assert again.rows == 0 and exports.parquet_files(settings.exports_dir, "executions") == files
    seed(pool, 40, start=datetime(2025, 3, 10, tzinfo=UTC), span_hours=1, rng_seed=1)
    assert exports.export(pool, settings).rows == 40
    assert exported(settings) == in_postgres(pool)
    assert exports.export(pool, settings).rows == 0
    assert exported(settings) == in_postgres(pool)
    status = {s.table: s for s in exports.status(pool, settings)}["executions"]
    assert not status.stale and status.rows_exported == 540 and status.last_id == in_postgres(pool, "max(id)")[0]


def test_a_row_committed_after_a_later_one_is_not_skipped(pool, settings, database_url):
    with psycopg.connect(database_url) as slow:  # a transaction that takes id n and commits late
        late_id = insert_one(slow, tokens=1000)
        with pool.connection() as conn:
            early_id = insert_one(conn)
        assert early_id > late_id
        first = exports.export(pool, settings).tables[0]
        assert first.rows == 1 and first.pending == 1 and first.last_id == early_id
        waiting = {s.table: s for s in exports.status(pool, settings)}["executions"]
        assert waiting.pending == 1 and waiting.stale
        assert exports.export(pool, settings).rows == 0  # still running: waits
        slow.commit()
    second = exports.export(pool, settings).tables[0]
    assert second.rows == 1 and second.pending == 0
    assert exported(settings) == in_postgres(pool) == (2, late_id + early_id, 1007)


def test_an_id_taken_before_the_transaction_writes_is_not_skipped(pool, settings, database_url):
    # A transaction with no xid yet (only a sequence value) is still seen as running through its virtual xid.
    with psycopg.connect(database_url) as slow:
        reserved = slow.execute("SELECT nextval('executions_id_seq')").fetchone()[0]
        with pool.connection() as conn:
            insert_one(conn)
        assert exports.export(pool, settings).tables[0].pending == 1
        insert_one(slow, id=reserved, tokens=50)
        assert exports.export(pool, settings).rows == 0
        slow.commit()
    assert exports.export(pool, settings).rows == 1
    assert exported(settings) == in_postgres(pool)


def test_rolled_back_ids_stop_being_pending(pool, settings, database_url):
    with psycopg.connect(database_url) as conn:
        for _ in range(5):
            insert_one(conn)
        conn.rollback()
    with pool.connection() as conn:
        insert_one(conn)
    first = exports.export(pool, settings).tables[0]
    assert first.rows == 1 and first.pending == 5  # not yet known to be gone for good
    second = exports.export(pool, settings).tables[0]
    assert second.rows == 0 and second.pending == 0


def test_queued_rows_wait_until_final(pool, settings):
    with pool.connection() as conn:
        queued = insert_one(conn, status="queued")
        insert_one(conn)
    first = exports.export(pool, settings).tables[0]
    assert first.rows == 1 and first.pending == 1
    assert exports.export(pool, settings).rows == 0
    with pool.connection() as conn:
        conn.execute("UPDATE executions SET status = 'ok' WHERE id = %s", (queued,))
    assert exports.export(pool, settings).rows == 1
    assert exported(settings) == in_postgres(pool)


def test_export_during_concurrent_writes(pool, settings, database_url):
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed_value: int) -> None:
        rng = random.Random(seed_value)
        try:
            with psycopg.connect(database_url) as conn:
                while not stop.is_set():
                    rows = seed_rows(rng.randint(1, 20), rng_seed=rng.randint(0, 10**6))
                    insert_rows(conn, rows)
                    time.sleep(rng.uniform(0, 0.02))  # keep the transaction open: commits land out of id order
                    if rng.random() < 0.15:
                        conn.rollback()
                    else:
                        conn.commit()
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    runs = 0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            exports.export(pool, settings)
            runs += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and runs >= 3
    for _ in range(5):  # the last gaps settle once the transactions running at the previous export are gone
        final = exports.export(pool, settings).tables[0]
        if final.pending == 0:
            break
    assert final.pending == 0
    assert exported(settings) == in_postgres(pool)
    assert exported(settings, "count(*) - count(DISTINCT id)")[0] == 0
    assert in_postgres(pool, "count(*)")[0] > 50


def test_an_export_interrupted_after_commit_is_finished_by_the_next(pool, settings, monkeypatch):
    seed(pool, 200)
    real_settle = exports._settle

    def crash(*args, **kw):
        raise OSError("disk pulled out")

    monkeypatch.setattr(exports, "_settle", crash)
    with pytest.raises(exports.ExportError, match=r"^cannot use the exports directory .*: disk pulled out$"):
        exports.export(pool, settings)
    assert exports.parquet_files(settings.exports_dir, "executions") == []  # only *.tmp: readers see nothing
    assert list(Path(settings.exports_dir).glob("executions/*/*.tmp"))
    stray = Path(settings.exports_dir) / "executions" / "day=2025-03-01" / "part-deadbeef-0.parquet.tmp"
    stray.write_bytes(b"half a file")  # no committed run owns it
    monkeypatch.setattr(exports, "_settle", real_settle)
    assert exports.export(pool, settings).rows == 0
    assert not list(Path(settings.exports_dir).glob("executions/*/*.tmp"))
    assert exported(settings) == in_postgres(pool)


def test_a_failed_export_leaves_no_files_and_no_watermark(pool, settings, monkeypatch):
    seed(pool, 50)
    broken = TableSpec(name="executions", table="executions", columns=(
        Column("id", exports.I64), Column("created_at", exports.TS), Column("bad", exports.I32, "(1/0)")))
    monkeypatch.setattr(exports, "TABLES", (broken,))
    with pytest.raises(psycopg.errors.DivisionByZero):
        exports.export(pool, settings)
    assert not list(Path(settings.exports_dir).rglob("*.parquet*"))
    monkeypatch.undo()
    assert exports.export(pool, settings).rows == 50


def test_small_exports_are_compacted(pool, settings, monkeypatch):
    monkeypatch.setattr(exports, "COMPACT_AT", 4)
    for i in range(6):
        seed(pool, 5, start=datetime(2025, 3, 1, 10, tzinfo=UTC), span_hours=1, rng_seed=i)
        exports.export(pool, settings)
        assert exported(settings) == in_postgres(pool)
    files = exports.parquet_files(settings.exports_dir, "executions")
    assert len(files) < 4
    assert exported(settings, "count(*) - count(DISTINCT id)")[0] == 0
    assert exported(settings) == in_postgres(pool) and in_postgres(pool, "count(*)")[0] == 30


def test_row_groups_are_clustered_for_the_dashboards(pool, settings, monkeypatch):
    monkeypatch.setattr(exports, "ROW_GROUP_ROWS", 64)
    monkeypatch.setattr(exports, "COMPACT_AT", 3)
    spec = exports.EXECUTIONS
    key = [c for c, _ in spec.sort_keys]
    assert key == ["status", "template_name", "template_version", "model_name", "total_ms", "id"]

    def nulls_last(row: dict) -> tuple:
        return tuple((row[c] is None, row[c] if row[c] is not None else 0) for c in key)

    def check(expect_files: int) -> list[int]:
        files = exports.parquet_files(settings.exports_dir, "executions")
        assert len(files) == expect_files
        first_ids = []
        for path in files:
            f = pq.ParquetFile(path)
            assert f.num_row_groups > 1
            for rows in (f.read_row_group(i).to_pylist() for i in range(f.num_row_groups)):
                keys = [nulls_last(r) for r in rows]
                assert keys == sorted(keys)  # clustered: status, template, version, model, latency, then id
                first_ids.append(min(r["id"] for r in rows))
        assert exported(settings) == in_postgres(pool)
        return first_ids

    seed(pool, 400, start=datetime(2025, 3, 1, 1, tzinfo=UTC), span_hours=20)
    exports.export(pool, settings)
    check(1)
    for i in range(2):  # a third file of the same day is compacted into one, row groups still clustered
        seed(pool, 100, start=datetime(2025, 3, 1, 1, tzinfo=UTC), span_hours=20, rng_seed=i + 1)
        exports.export(pool, settings)
    firsts = check(1)
    assert exported(settings, "count(*)")[0] == 600
    assert firsts == sorted(firsts)  # a compacted file keeps its row groups in id order


def test_full_rebuild_and_a_fresh_directory_start_over(pool, settings, tmp_path):
    seed(pool, 300)
    exports.export(pool, settings)
    old = set(exports.parquet_files(settings.exports_dir, "executions"))
    rebuilt = exports.export(pool, settings, full=True)
    assert rebuilt.rows == 300 and not old & set(exports.parquet_files(settings.exports_dir, "executions"))
    assert exported(settings) == in_postgres(pool)
    other = tmp_path / "elsewhere"
    assert exports.export(pool, other).rows == 300  # its own marker, its own watermarks
    (Path(settings.exports_dir) / exports.REBUILD_FLAG).write_text('["executions"]')  # a rebuild that crashed
    assert exports.export(pool, settings).rows == 300 and exported(settings) == in_postgres(pool)


def test_missing_tables_are_skipped_and_unknown_ones_refused(pool, settings, monkeypatch):
    ghost = TableSpec(name="ghosts", table="ghosts", columns=(Column("id", exports.I64),
                                                              Column("created_at", exports.TS)))
    monkeypatch.setattr(exports, "TABLES", exports.TABLES + (ghost,))
    report = exports.export(pool, settings)
    skipped = {t.table: t.skipped for t in report.tables}
    assert skipped["ghosts"] == "table ghosts does not exist yet" and skipped["executions"] is None
    with pytest.raises(LookupError, match="no exported table 'nope'"):
        exports.export(pool, settings, tables=["nope"])


def test_staleness(pool, settings):
    assert not exports.is_stale(pool, settings)
    seed(pool, 10)
    assert exports.is_stale(pool, settings)
    exports.export(pool, settings)
    assert not exports.is_stale(pool, settings)
    seed(pool, 1, rng_seed=3)
    assert not exports.is_stale(pool, settings)  # just exported: waits for the interval
    assert exports.is_stale(pool, settings, min_interval_s=0)
    runs = exports.recent_runs(pool, settings)
    assert runs and runs[0]["table_name"] == "executions" and runs[0]["rows"] == 10


def test_conversations_guardrails_and_evaluation_results_are_exported(pool, settings):
    from core import templates

    tv = templates.create_template(pool, "greeter", "Say hello to {{name}}.")
    with pool.connection() as conn:
        exec_id = insert_one(conn)
        conv = conn.execute("INSERT INTO conversations (user_id) VALUES ('ann') RETURNING id").fetchone()[0]
        msg = conn.execute("INSERT INTO conversation_messages (conversation_id, seq, role, kind, content) "
                           "VALUES (%s, 1, 'user', 'message', 'hello there') RETURNING id", (conv,)).fetchone()[0]
        conn.execute("INSERT INTO conversation_interventions (conversation_id, action, operator, reason) "
                     "VALUES (%s, 'halt', 'op', 'rude')", (conv,))
        # an input hit is linked to its execution when the reply is stored: it waits until then
        conn.execute("INSERT INTO guardrail_events (rule_name, kind, direction, action, matches, user_id, "
                     "conversation_id, message_id) VALUES ('no-pii', 'email', 'input', 'flag', 1, 'ann', %s, %s)",
                     (conv, msg))
        dataset = conn.execute("INSERT INTO datasets (name) VALUES ('d') RETURNING id").fetchone()[0]
        items = [conn.execute("INSERT INTO dataset_items (dataset_id) VALUES (%s) RETURNING id",
                              (dataset,)).fetchone()[0] for _ in range(3)]
        revs = [conn.execute("INSERT INTO dataset_item_revisions (item_id, revision) VALUES (%s, 1) RETURNING id",
                             (item,)).fetchone()[0] for item in items]
        item = items[0]
        run = conn.execute("INSERT INTO eval_runs (dataset_id, model, model_key, definition) VALUES "
                           "(%s, '{\"model_name\": \"gemma\"}', 'k', '{}') RETURNING id", (dataset,)).fetchone()[0]
        conn.execute("INSERT INTO eval_run_versions (run_id, position, ref, template_version_id, template_name, "
                     "version) VALUES (%s, 0, 'greeter', %s, 'greeter', %s)", (run, tv.id, tv.version))
        work = [conn.execute("INSERT INTO eval_work_items (run_id, position, seq, item_id, item_revision_id) "
                             "VALUES (%s, 0, %s, %s, %s) RETURNING id", (run, i, items[i], revs[i])).fetchone()[0]
                for i in range(3)]
        conn.execute("INSERT INTO eval_results (work_item_id, run_id, position, item_id, passed, score) "
                     "VALUES (%s, %s, 0, %s, true, 1.0)", (work[2], run, item))
    first = {t.table: t for t in exports.export(pool, settings).tables}
    assert all(t.skipped is None for t in first.values())
    assert first["conversation_messages"].rows == 1 and first["interventions"].rows == 1
    assert first["guardrail_events"].rows == 0 and first["guardrail_events"].pending == 1
    assert first["eval_results"].rows == 1 and first["eval_results"].pending == 2
    with pool.connection() as conn:
        conn.execute("INSERT INTO conversation_messages (conversation_id, seq, role, kind, content, reply_to, "
                     "execution_id, status) VALUES (%s, 2, 'assistant', 'reply', 'hi', %s, %s, 'ok')",
                     (conv, msg, exec_id))
        conn.execute("UPDATE guardrail_events SET execution_id = %s WHERE message_id = %s", (exec_id, msg))
        conn.execute("INSERT INTO eval_results (work_item_id, run_id, position, item_id, passed, score) "
                     "VALUES (%s, %s, 0, %s, false, 0.0)", (work[0], run, item))
        conn.execute("UPDATE eval_work_items SET status = 'cancelled' WHERE id = %s", (work[1],))
    second = {t.table: t for t in exports.export(pool, settings).tables}
    assert second["guardrail_events"].rows == 1 and second["guardrail_events"].pending == 0
    assert second["eval_results"].rows == 1 and second["eval_results"].pending == 0  # the cancelled item is passed over
    assert second["conversation_messages"].rows == 1

    def rows(table: str, cols: str):
        files = [str(f) for f in exports.parquet_files(settings.exports_dir, table)]
        return ddb(f"SELECT {cols} FROM read_parquet({files!r}) ORDER BY id").fetchall()

    assert rows("guardrail_events", "rule_name, user_id, execution_id, model_name") == [("no-pii", "ann", exec_id, "m")]
    assert rows("eval_results", "template_name, template_version, model_name, passed") == [
        ("greeter", tv.version, "gemma", False), ("greeter", tv.version, "gemma", True)]
    assert rows("conversation_messages", "user_id, kind, content_chars") == [("ann", "message", 11), ("ann", "reply", 2)]
    assert rows("interventions", "action, reason, user_id") == [("halt", "rude", "ann")]


def test_export_command(app_env, pool, capsys):
    from core.cli import main

    seed(pool, 120)
    assert main(["export"]) == 0
    out, err = capsys.readouterr()
    assert "executions: 120 new rows in" in out and "export [" in err
    assert main(["export", "--table", "executions"]) == 0
    assert "executions: 0 new rows in 0 files" in capsys.readouterr().out
    assert main(["export", "--table", "nope"]) == 1
    assert capsys.readouterr().err.strip() == ("promptdev: no exported table 'nope'; known: executions, "
                                               "conversation_messages, interventions, guardrail_events, eval_results")
    assert main(["export", "--full"]) == 0
    assert "executions: 120 new rows" in capsys.readouterr().out


def test_one_export_per_directory_at_a_time(pool, settings):
    seed(pool, 10)
    running = exports.export_iter(pool, settings)
    next(running)  # holds the directory's lock until it finishes
    with pytest.raises(exports.ExportBusy, match="another export of .* is running"):
        list(exports.export_iter(pool, settings, wait=False))
    list(running)
    assert exports.export(pool, settings).rows == 0 and exported(settings) == in_postgres(pool)


# ---------------------------------------------------------------------------------- unusable exports directories
# Tests run as root, where a mode of 0500 stops nothing: a directory is made read-only with the immutable attribute
# (`chattr +i`: nothing can be created, renamed or deleted in it, even by root), and full with RLIMIT_FSIZE in a
# subprocess (writes past the limit fail with EFBIG, as they would with ENOSPC on a full disk).

@contextmanager
def read_only(root: Path):
    """Every directory under root (and root) immutable while the block runs."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    dirs = [str(root), *(str(p) for p in sorted(root.rglob("*")) if p.is_dir() and not p.is_symlink())]
    done = subprocess.run(["chattr", "+i", *dirs], capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["chattr", "-i", *dirs], capture_output=True)
        pytest.skip(f"this file system has no immutable attribute: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *dirs], check=True)


def leftovers(root: Path) -> list[Path]:
    """Unfinished files an export left behind."""
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_a_read_only_exports_directory_is_one_clear_error(pool, settings):
    from core.errors import Unavailable, kind_of

    root = Path(settings.exports_dir)
    seed(pool, 300)
    exports.export(pool, settings)
    before = {s.table: s.last_id for s in exports.status(pool, settings)}
    files = exports.parquet_files(root, "executions")
    seed(pool, 300, start=datetime(2025, 4, 1, tzinfo=UTC), rng_seed=1)  # new days: new directories and files
    with read_only(root):
        with pytest.raises(exports.ExportError) as caught:
            exports.export(pool, settings)
        message = str(caught.value)
        assert message.startswith(f"cannot use the exports directory {root}: Operation not permitted")
        assert "\n" not in message and "Traceback" not in message
        assert kind_of(caught.value) is Unavailable
        with pytest.raises(exports.ExportError, match="Operation not permitted"):  # --full: nothing is discarded
            exports.export(pool, settings, full=True)
        assert exports.parquet_files(root, "executions") == files
    assert not leftovers(root)
    assert {s.table: s.last_id for s in exports.status(pool, settings)} == before  # no watermark moved
    assert exports.export(pool, settings).rows == 300  # writable again: everything arrives, once
    assert exported(settings) == in_postgres(pool)


def test_a_read_only_fresh_exports_directory_and_a_path_under_a_file(pool, settings, tmp_path):
    from core.errors import InvalidInput, Unavailable, kind_of

    fresh = tmp_path / "ro-exports"
    fresh.mkdir()
    with read_only(fresh):
        with pytest.raises(exports.ExportError, match=rf"^cannot use the exports directory {fresh}: Operation not "
                                                      "permitted"):
            exports.export(pool, fresh)
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(exports.ExportError) as caught:
        exports.export(pool, tmp_path / "a-file" / "exports")
    assert str(caught.value).startswith(f"cannot use the exports directory {tmp_path / 'a-file' / 'exports'}: "
                                        "Not a directory")
    assert kind_of(caught.value) is InvalidInput
    with pytest.raises(exports.ExportError, match="File exists|Not a directory") as caught:
        exports.export(pool, tmp_path / "a-file")  # the exports path itself a file
    assert kind_of(caught.value) in (InvalidInput, Unavailable)


def test_export_command_on_a_read_only_directory_prints_one_line(app_env, pool, capsys):
    from core.cli import main

    root = Path(app_env.exports_dir)
    seed(pool, 100)
    assert main(["export"]) == 0
    seed(pool, 100, start=datetime(2025, 4, 1, tzinfo=UTC), rng_seed=1)
    capsys.readouterr()
    with read_only(root):
        assert main(["export"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("promptdev:") == 1
        last = err.splitlines()[-1]  # after the progress bar's line
        assert re.fullmatch(rf"promptdev: cannot use the exports directory {re.escape(str(root))}: Operation not "
                            r"permitted \(executions/day=2025-04-0\d\)", last), err
        assert main(["analytics", "query", "SELECT count(*) AS n FROM executions", "--format", "csv"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1
        assert err.startswith(f"promptdev: cannot use the exports directory {root}: Operation not permitted")
        assert "--no-export" in err  # what to do: the exports as they are can still be queried
        assert main(["analytics", "query", "SELECT count(*) AS n FROM executions", "--format", "csv",
                     "--no-export"]) == 0
        assert capsys.readouterr().out.split() == ["n", "100"]
    assert not leftovers(root)


def _cli(env: dict, *args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit():  # in the child: files may not grow past fsize bytes (Python ignores SIGXFSZ: writes fail EFBIG)
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    promptdev = Path(sys.executable).with_name("promptdev")
    return subprocess.run([str(promptdev), *args], capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=limit if fsize else None)


def test_a_full_exports_directory_is_one_line_and_leaves_nothing_half_written(app_env, pool):
    root = Path(app_env.exports_dir)
    env = os.environ.copy()
    seed(pool, 20)
    assert _cli(env, "export").returncode == 0  # the directory and its marker exist
    before = {s.table: s.last_id for s in exports.status(pool, app_env)}
    seed(pool, 20000, rng_seed=2)
    done = _cli(env, "export", fsize=64 << 10)  # 64 KB: the first file outgrows it
    assert done.returncode == 1
    lines = [line.split("\r")[-1] for line in done.stderr.splitlines() if "promptdev:" in line]
    assert "Traceback" not in done.stderr, done.stderr
    assert lines == [f"promptdev: cannot use the exports directory {root}: File too large: free some space, or point "
                     "PROMPTDEV_DATA_DIR elsewhere"], done.stderr
    assert not leftovers(root)
    assert {s.table: s.last_id for s in exports.status(pool, app_env)} == before
    done = _cli(env, "analytics", "query", "SELECT count(*) AS n FROM executions", "--format", "csv",
                fsize=64 << 10)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if "promptdev:" in line][0].startswith(
        f"promptdev: cannot use the exports directory {root}: File too large")
    assert _cli(env, "export").returncode == 0
    assert exported(app_env) == in_postgres(pool)
