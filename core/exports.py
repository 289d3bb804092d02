"""Export of the ledger and its neighbours from PostgreSQL to Parquet, partitioned by day, for the analytics.

Layout: ``<exports_dir>/<table>/day=YYYY-MM-DD/part-<run>.parquet`` (hive partitioning; ``day`` is the UTC day of
the table's time column, and timestamps are stored as UTC ``timestamp`` without time zone: time-zone conversion
would otherwise dominate every query). Rows stream from ``COPY (SELECT …) TO STDOUT`` through Arrow's CSV reader
into Parquet writers: no Python loop over rows.

The rows of each row group are sorted by the table's ``cluster`` columns, then id, for the dashboards' scans.
Executions are sorted by status, template, version, model and total latency: failed runs (no latencies) lie together,
so missing values come in runs and the `status = 'ok'` filter keeps contiguous rows; grouping keys repeat in long runs;
and the latencies of each group arrive in sorted runs, which exact percentiles select from faster. Measured on 1M
executions: most dashboard queries 10-35 % faster than with rows in id order; latency percentiles a further 5-15 %.

Incremental and safe while the app writes: each table has a watermark (``last_id``) per exports directory. Ids are
handed out by a sequence when a row is inserted, but rows become visible when their transaction commits, so a
snapshot can see id 101 while id 100 is still in flight. Every export therefore reads in one REPEATABLE READ
snapshot, exports every visible row above the watermark, and remembers the ids it could not see (or that were not
final yet, e.g. a queued execution) as *pending* ranges together with the transactions (virtual xids, which exist
even before a transaction writes) that were running at that snapshot. A pending range is read again only once all
those transactions have ended: then a row is either committed — and the new snapshot sees it — or gone for good
(rolled back), so nothing committed late is skipped and nothing is exported twice.

Crash safety: files are written as ``*.tmp``, then the watermark and an ``export_runs`` row are committed in one
transaction, then the files are renamed. The next export finishes a committed run (renames its files) or deletes
files no committed run owns. Readers only ever see complete ``*.parquet`` files. An exports directory that cannot be
written (read-only, full, not a directory) stops the export with one ExportError naming it and the cause; what was
written of the failed run is deleted, and a failure while cleaning up is logged, never raised over the cause.

Damage: every page carries a CRC-32 checksum (``write_page_checksum``). DuckDB does not check them, so
`verify_files` reads each file once with pyarrow's page checksum verification and remembers the verdict by the
file's identity (device, inode, size, modification and change times): a file damaged on disk is refused with one
ExportDamaged error naming it, instead of answering with wrong figures. Compaction reads its inputs verified too, so
damage is never rewritten into a file with fresh checksums.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from core.config import Settings, create_private_file, ensure_private_dir
from core.db import LockKey, jsonb
from core.errors import Conflict, InvalidInput, NotFound, Unavailable

log = logging.getLogger(__name__)

MARKER_FILE = ".promptdev-export"  # holds the directory's target id (a UUID)
REBUILD_FLAG = ".rebuilding"  # present while a full re-export discards the old files
COMPACT_AT = 16  # a day directory with this many files is merged into one
ROW_GROUP_ROWS = 256_000
MAX_BUFFERED_ROWS = 1_000_000
MAX_OPEN_WRITERS = 64
BLOCK_BYTES = 4 << 20  # COPY output is parsed in blocks of this size
# Snappy: the files stay local and strings are dictionary-encoded anyway, so codecs save little; snappy saves the
# most for what it costs the dashboards. Measured on 500k executions (CPU time of the eight dashboard queries, which
# a loaded machine does not skew): uncompressed 26.1 MB, 382-397 ms; snappy 23.1 MB (-11 %), 387-398 ms (+1 %); lz4
# 24.0 MB, +3 %; zstd 20.8 MB (-20 %), +13 %.
PARQUET_COMPRESSION = "snappy"
PAGE_CHECKSUMS = True  # a CRC-32 per page, checked by verify_files before any query reads a file
AUTO_EXPORT_INTERVAL_S = 30.0  # stale data is exported automatically at most this often

TS = pa.timestamp("us")
I32, I64, F64, STR, BOOL = pa.int32(), pa.int64(), pa.float64(), pa.string(), pa.bool_()


class ExportError(Unavailable):
    """An export could not be completed (the exports directory is unusable, …); nothing half-written is visible.
    The message says why. An Unavailable, so a RuntimeError as before."""


class ExportBusy(Conflict, ExportError):
    """Another export of the same directory is running."""


class ExportPathInvalid(InvalidInput, ExportError):
    """The exports directory's path cannot be a directory (it, or a parent, is a file): a setting to change."""


class ExportDamaged(ExportError):
    """An exported file fails its check (a page checksum does not match, or it is not Parquet): the exports must be
    rebuilt with `promptdev export --full`. `path` is the file, `name` its path under the exports directory."""

    def __init__(self, path: Path, name: str, reason: str):
        super().__init__(f"the export file {name} is damaged ({reason}); rebuild the exports with "
                         "`promptdev export --full`")
        self.path, self.name, self.reason = path, name, reason


class TableNotFound(NotFound):
    """No exported table of that name (a LookupError)."""


@dataclass(frozen=True)
class Column:
    """One exported column: its name in Parquet, Arrow type and SQL expression (default: the main table's column)."""

    name: str
    type: pa.DataType
    sql: str | None = None

    @property
    def expression(self) -> str:
        """The SQL that produces it (timestamps converted to UTC without time zone)."""
        if self.sql:
            return self.sql
        if self.type == TS:
            return f"(t.{self.name} AT TIME ZONE 'UTC')"
        return f"t.{self.name}"

    @property
    def select(self) -> str:
        """The expression as selected for COPY: text loses line breaks (one CSV line per row parses fastest)."""
        if self.type == STR:
            return f"translate({self.expression}, E'\\r\\n', '  ')"
        return self.expression


@dataclass(frozen=True)
class TableSpec:
    """A table to export: its PostgreSQL table (aliased `t`, joined to others if needed), id column (ascending, from
    a sequence, assigned when the row is inserted), time column and columns."""

    name: str  # directory and DuckDB view name
    table: str  # the main PostgreSQL table, aliased t
    columns: tuple[Column, ...]
    id_column: str = "id"
    time_column: str = "created_at"  # a timestamp column in `columns`, partitioned by its UTC day
    joins: str = ""  # e.g. "JOIN conversations AS c ON c.id = t.conversation_id"
    requires: tuple[str, ...] = ()  # other tables the joins need
    ready: str | None = None  # SQL predicate of rows in their final state; others are exported once they are
    keep: str | None = None  # SQL predicate of final rows worth exporting; other final rows are passed over
    cluster: tuple[str, ...] = ()  # columns the rows of each row group are sorted by (then by id)

    @property
    def schema(self) -> pa.Schema:
        """The Parquet schema."""
        return pa.schema([pa.field(c.name, c.type) for c in self.columns])

    @property
    def tables(self) -> tuple[str, ...]:
        """Every PostgreSQL table the export reads."""
        return (self.table, *self.requires)

    @property
    def sort_keys(self) -> list[tuple[str, str]]:
        """The order of rows within a row group: the cluster columns, then id (Arrow sort keys)."""
        return [(c, "ascending") for c in (*self.cluster, self.id_column)]


def _error_line(column: str) -> str:
    return f"left(split_part({column}, E'\\n', 1), 500)"


EXECUTIONS = TableSpec(
    name="executions", table="executions",
    columns=(
        Column("id", I64), Column("created_at", TS), Column("finished_at", TS),
        Column("status", STR), Column("source", STR), Column("user_id", STR),
        Column("template_version_id", I64), Column("template_name", STR), Column("template_version", I32),
        Column("label", STR), Column("model_id", I64), Column("model_name", STR), Column("backend", STR),
        Column("finish_reason", STR), Column("prompt_tokens", I32), Column("completion_tokens", I32),
        Column("ttft_ms", F64), Column("total_ms", F64), Column("seed", I64),
        Column("error", STR, _error_line("t.error")), Column("rerun_of", I64),
    ),
    ready="t.status NOT IN ('queued', 'running')",  # a submitted execution is exported once it has finished
    cluster=("status", "template_name", "template_version", "model_name", "total_ms"),
)

# Message metadata only (the text stays in PostgreSQL, where retention can delete it): its length in characters.
CONVERSATION_MESSAGES = TableSpec(
    name="conversation_messages", table="conversation_messages", requires=("conversations",),
    joins="JOIN conversations AS c ON c.id = t.conversation_id",
    columns=(
        Column("id", I64), Column("created_at", TS), Column("conversation_id", I64),
        Column("user_id", STR, "c.user_id"), Column("seq", I32), Column("role", STR), Column("kind", STR),
        Column("status", STR), Column("in_context", BOOL), Column("flagged", BOOL), Column("operator", STR),
        Column("execution_id", I64), Column("reply_to", I64), Column("content_chars", I32, "length(t.content)"),
    ),
)

INTERVENTIONS = TableSpec(
    name="interventions", table="conversation_interventions", requires=("conversations",),
    joins="JOIN conversations AS c ON c.id = t.conversation_id",
    columns=(
        Column("id", I64), Column("created_at", TS), Column("conversation_id", I64),
        Column("user_id", STR, "c.user_id"), Column("action", STR), Column("operator", STR),
        Column("reason", STR, _error_line("t.reason")), Column("message_id", I64),
    ),
)

# An input hit is linked to its execution when the reply is stored: wait for that (or give up after a while).
GUARDRAIL_EVENTS = TableSpec(
    name="guardrail_events", table="guardrail_events", requires=("executions", "conversation_messages"),
    joins="LEFT JOIN executions AS e ON e.id = t.execution_id",
    columns=(
        Column("id", I64), Column("created_at", TS), Column("rule_name", STR), Column("kind", STR),
        Column("direction", STR), Column("action", STR), Column("matches", I32), Column("user_id", STR),
        Column("conversation_id", I64), Column("message_id", I64), Column("execution_id", I64),
        Column("template_name", STR, "e.template_name"), Column("template_version", I32, "e.template_version"),
        Column("model_name", STR, "e.model_name"),
    ),
    ready=("t.execution_id IS NOT NULL OR t.direction = 'output' OR t.message_id IS NULL "
           "OR t.created_at < now() - interval '10 minutes' "
           "OR EXISTS (SELECT 1 FROM conversation_messages AS m WHERE m.reply_to = t.message_id)"),
)

# One row per evaluated work item, exported once its result exists. Work item ids come from a sequence when a run
# is created; results arrive in any order, so readiness (not the id) says when a row can go.
EVAL_RESULTS = TableSpec(
    name="eval_results", table="eval_work_items", requires=("eval_results", "eval_run_versions", "eval_runs"),
    joins=("LEFT JOIN eval_results AS r ON r.work_item_id = t.id "
           "JOIN eval_run_versions AS v ON v.run_id = t.run_id AND v.position = t.position "
           "JOIN eval_runs AS er ON er.id = t.run_id"),
    columns=(
        Column("id", I64), Column("created_at", TS, "(r.created_at AT TIME ZONE 'UTC')"),
        Column("run_id", I64), Column("dataset_id", I64, "er.dataset_id"), Column("item_id", I64),
        Column("template_name", STR, "v.template_name"), Column("template_version", I32, "v.version"),
        Column("label", STR, "v.label"), Column("model_name", STR, "er.model->>'model_name'"),
        Column("passed", BOOL, "r.passed"), Column("score", F64, "r.score"),
        Column("error", STR, _error_line("r.error")), Column("prompt_tokens", I32, "r.prompt_tokens"),
        Column("completion_tokens", I32, "r.completion_tokens"), Column("latency_ms", F64, "r.latency_ms"),
        Column("execution_id", I64, "r.execution_id"),
    ),
    ready="r.work_item_id IS NOT NULL OR t.status = 'cancelled'",
    keep="r.work_item_id IS NOT NULL",
)

TABLES: tuple[TableSpec, ...] = (EXECUTIONS, CONVERSATION_MESSAGES, INTERVENTIONS, GUARDRAIL_EVENTS, EVAL_RESULTS)


def spec(name: str) -> TableSpec:
    """The export spec of a table; TableNotFound (a LookupError) naming the known ones otherwise."""
    for s in TABLES:
        if s.name == name:
            return s
    raise TableNotFound(f"no exported table {name!r}; known: {', '.join(s.name for s in TABLES)}")


@dataclass(frozen=True)
class TableExport:
    """What one export did to one table."""

    table: str
    rows: int = 0  # rows written
    files: int = 0  # files written
    pending: int = 0  # ids waiting for a transaction to end or a row to become final
    last_id: int = 0
    seconds: float = 0.0
    skipped: str | None = None  # why the table was not exported (it does not exist yet)


@dataclass(frozen=True)
class ExportReport:
    """What an export did, table by table."""

    tables: tuple[TableExport, ...]
    seconds: float

    @property
    def rows(self) -> int:
        """Rows written over all tables."""
        return sum(t.rows for t in self.tables)


@dataclass(frozen=True)
class TableStatus:
    """How far a table's export is behind PostgreSQL."""

    table: str
    exists: bool
    last_id: int
    max_id: int
    pending: int  # ids waiting (in flight or not final) below last_id
    rows_exported: int
    checked_at: datetime | None
    exported_at: datetime | None

    @property
    def stale(self) -> bool:
        """True when PostgreSQL holds rows the export may not have yet."""
        return self.exists and (self.max_id > self.last_id or self.pending > 0)


# ---------------------------------------------------------------------------------------------------------- paths

def table_dir(exports_dir: Path, table: str) -> Path:
    """The directory of one table's Parquet files."""
    return Path(exports_dir) / table


def parquet_files(exports_dir: Path, table: str, start: date | None = None, end: date | None = None) -> list[Path]:
    """The complete Parquet files of a table, optionally only the days start..end (inclusive)."""
    files = []
    base = table_dir(exports_dir, table)
    if not base.is_dir():
        return files
    for day_dir in sorted(base.glob("day=*")):
        try:
            day = date.fromisoformat(day_dir.name[4:])
        except ValueError:
            continue
        if (start and day < start) or (end and day > end):
            continue
        files.extend(sorted(day_dir.glob("*.parquet")))
    return files


def target_id(exports_dir: Path) -> str:
    """The identity of an exports directory (created on first use): watermarks are kept per directory."""
    exports_dir = Path(exports_dir)
    marker = exports_dir / MARKER_FILE
    try:
        ensure_private_dir(exports_dir, levels=2)  # exports and the data directory: 0700 when created
        if not marker.exists():
            tmp = exports_dir / f"{MARKER_FILE}.{uuid.uuid4().hex}"
            tmp.write_text(uuid.uuid4().hex + "\n", encoding="utf-8")
            try:
                os.link(tmp, marker)  # atomic create-if-absent: a concurrent first export agrees on one id
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        text = marker.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise _dir_error(exports_dir, exc) from exc
    if not text:
        raise ExportError(f"{marker} is empty: delete it to start the exports directory afresh")
    return text


def _exports_dir(settings: Settings | Path) -> Path:
    return Path(settings.exports_dir if isinstance(settings, Settings) else settings)


def _first_line(exc: BaseException | str) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else (type(exc).__name__ if isinstance(exc, BaseException) else "")


_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)


def _os_reason(exc: OSError) -> tuple[int | None, str]:
    """The errno and the cause of an OS error in a few words ("Read-only file system", "No space left on device"),
    also for Arrow's I/O errors, which carry the errno only in their text."""
    code = exc.errno
    if code is None:
        found = _ERRNO_IN_TEXT.findall(str(exc))
        code = int(found[-1]) if found else None
    if code is not None:
        return code, os.strerror(code)
    return None, exc.strerror or _first_line(exc)


def _dir_error(root: Path, exc: OSError) -> ExportError:
    """One ExportError for an OS error met while writing the exports directory: the directory, the cause, and the
    part of it concerned (a path under the directory, never a path elsewhere)."""
    code, reason = _os_reason(exc)
    where = ""
    if exc.filename:
        try:
            where = f" ({Path(exc.filename).resolve().relative_to(Path(root).resolve())})"
        except (ValueError, OSError):
            where = ""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += ": free some space, or point PROMPTDEV_DATA_DIR elsewhere"
    cls = ExportPathInvalid if code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR) else ExportError
    return cls(f"cannot use the exports directory {root}: {reason}{where}")


def _remove_quietly(path: Path) -> None:
    """Delete a file of a failed step; a failure is logged (the caller raises the error that matters)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not delete %s: %s", path, exc.strerror or exc)


# --------------------------------------------------------------------------------------------------- verification

_VERDICT_CACHE_SIZE = 100_000
_verdicts: dict[tuple, str | None] = {}  # file identity -> None (sound) or why it is damaged
_verdicts_lock = threading.Lock()


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_pages(path: Path) -> str | None:
    """Read every page of a Parquet file with its checksum verified: None when sound, else the reason."""
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        for i in range(pf.num_row_groups):
            pf.read_row_group(i, use_threads=False)
    except (OSError, pa.ArrowException, ValueError) as exc:
        text = str(exc).replace(str(path), path.name)
        if "checksum" in text.lower() or "crc" in text.lower():
            return "a page checksum does not match"
        return _first_line(text) or type(exc).__name__
    return None


def verify_file(root: Path, path: Path) -> None:
    """Check a Parquet export file's page checksums, once per file identity (a file rewritten in place is checked
    again); ExportDamaged naming it (relative to the exports directory `root`) when they do not match."""
    path = Path(path)
    try:
        key = _identity(path)
    except FileNotFoundError:  # replaced by a compaction meanwhile: its successor is checked when listed
        return
    with _verdicts_lock:
        known = key in _verdicts
        reason = _verdicts.get(key)
    if not known:
        reason = _check_pages(path)
        with _verdicts_lock:
            if len(_verdicts) >= _VERDICT_CACHE_SIZE:
                _verdicts.clear()
            _verdicts[key] = reason
    if reason is not None:
        try:
            name = str(path.relative_to(root))
        except ValueError:
            name = path.name
        raise ExportDamaged(path, name, reason)


def verify_files(exports_dir: Path, tables: Iterable[str] | None = None) -> int:
    """Check every exported file of these tables (default: all), each once per identity; ExportDamaged for the
    first damaged one. Returns the number of files."""
    root = Path(exports_dir)
    files = [f for t in (tables or [s.name for s in TABLES]) for f in parquet_files(root, t)]
    for f in files:
        verify_file(root, f)
    return len(files)


def _trust(paths: Iterable[Path]) -> None:
    """Remember files this process has just written (checksums computed from the rows in memory) as sound, so that
    the analytics need not read them again to check them; a later change to a file changes its identity."""
    for path in paths:
        try:
            key = _identity(path)
        except OSError:
            continue
        with _verdicts_lock:
            if len(_verdicts) >= _VERDICT_CACHE_SIZE:
                _verdicts.clear()
            _verdicts[key] = None


def _read_verified(root: Path, path: Path) -> pa.Table:
    """The rows of an export file, its pages' checksums verified."""
    verify_file(root, path)
    return pq.ParquetFile(path).read()


# ------------------------------------------------------------------------------------------------------- database

def existing_tables(conn: Any, specs: Sequence[TableSpec] | None = None) -> list[TableSpec]:
    """The specs whose PostgreSQL tables all exist."""
    specs = TABLES if specs is None else specs
    names = sorted({t for s in specs for t in s.tables})
    found = conn.execute("SELECT t, to_regclass(t) IS NOT NULL FROM unnest(%s::text[]) AS t", (names,)).fetchall()
    exists = dict(found)
    return [s for s in specs if all(exists.get(t) for t in s.tables)]


def _active_vxids(conn: Any) -> set[str]:
    """Virtual transaction ids of the other transactions running in this database now (a transaction has one from
    its start, before it writes; only a session of this database can insert into its tables)."""
    rows = conn.execute(
        "SELECT l.virtualxid FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid "
        "WHERE l.locktype = 'virtualxid' AND l.granted AND l.pid <> pg_backend_pid() "
        "AND a.datname = current_database() AND a.backend_type NOT LIKE 'autovacuum%%'").fetchall()
    return {r[0] for r in rows}


def status(pool: ConnectionPool, settings: Settings | Path) -> list[TableStatus]:
    """For each exported table: the export's watermark against PostgreSQL's newest id."""
    target = target_id(_exports_dir(settings))
    out = []
    with pool.connection() as conn:
        present = {s.name for s in existing_tables(conn)}
        marks = {r[0]: r[1:] for r in conn.execute(
            "SELECT table_name, last_id, (SELECT coalesce(sum((p->>1)::bigint - (p->>0)::bigint + 1), 0)::bigint "
            "FROM jsonb_array_elements(pending) AS p), rows_exported, checked_at, exported_at "
            "FROM export_watermarks WHERE target = %s", (target,)).fetchall()}
        for s in TABLES:
            last_id, pending, rows, checked, exported = marks.get(s.name, (0, 0, 0, None, None))
            max_id = 0
            if s.name in present:
                max_id = conn.execute(sql.SQL("SELECT coalesce(max({}), 0) FROM {}").format(
                    sql.Identifier(s.id_column), sql.Identifier(s.table))).fetchone()[0]
            out.append(TableStatus(s.name, s.name in present, last_id, max_id, pending, rows, checked, exported))
    return out


def is_stale(pool: ConnectionPool, settings: Settings | Path, *, min_interval_s: float = AUTO_EXPORT_INTERVAL_S,
             statuses: Sequence[TableStatus] | None = None) -> bool:
    """True when PostgreSQL holds rows not exported yet and no export was tried in the last min_interval_s."""
    now = time.time()
    for st in statuses if statuses is not None else status(pool, settings):
        if not st.stale:
            continue
        if st.checked_at is None or now - st.checked_at.timestamp() >= min_interval_s:
            return True
    return False


# ---------------------------------------------------------------------------------------------------- the reading

def _blocks(copy: Any, size: int) -> Iterator[bytes]:
    """The COPY output joined into blocks of about `size` bytes. COPY sends one message per row, so every block
    ends at a row boundary and parses on its own."""
    parts: list[Any] = []
    n = 0
    for data in copy:
        parts.append(data)
        n += len(data)
        if n >= size:
            yield b"".join(parts)
            parts, n = [], 0
    if parts:
        yield b"".join(parts)


def _select_sql(s: TableSpec, n_ranges: int) -> sql.Composed:
    """Rows above the watermark plus rows in the re-examined pending ranges, with readiness and keep flags."""
    flags = [sql.SQL(f"({s.ready or 'true'}) AS _ready"), sql.SQL(f"({s.keep or 'true'}) AS _keep")]
    cols = sql.SQL(", ").join([sql.SQL(c.select) for c in s.columns] + flags)
    source = sql.SQL("{} AS t {}").format(sql.Identifier(s.table), sql.SQL(s.joins))
    ident = sql.SQL("t.{}").format(sql.Identifier(s.id_column))
    query = sql.SQL("SELECT {} FROM {} WHERE {} > %s").format(cols, source, ident)
    if n_ranges:
        query = sql.SQL("{} UNION ALL SELECT {} FROM {} JOIN unnest(%s::bigint[], %s::bigint[]) AS _pd(_pd_lo, _pd_hi) "
                        "ON {} BETWEEN _pd._pd_lo AND _pd._pd_hi").format(query, cols, source, ident)
    return sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(query)


def _csv_options(s: TableSpec) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    names = [c.name for c in s.columns] + ["_ready", "_keep"]
    types = {c.name: c.type for c in s.columns} | {"_ready": BOOL, "_keep": BOOL}
    return (pacsv.ReadOptions(column_names=names, block_size=1 << 20),
            pacsv.ParseOptions(newlines_in_values=False),
            pacsv.ConvertOptions(column_types=types, strings_can_be_null=True, quoted_strings_can_be_null=False,
                                 null_values=[""], true_values=["t"], false_values=["f"]))


# ---------------------------------------------------------------------------------------------------- the writing

class _PartitionWriter:
    """Writes Arrow batches into one Parquet file per day (as *.tmp), buffering rows into large row groups."""

    def __init__(self, root: Path, s: TableSpec, run_id: str):
        self.root, self.spec, self.run_id = root, s, run_id
        self.schema = s.schema
        self.buffers: dict[date, list[pa.Table]] = {}
        self.buffered: dict[date, int] = {}
        self.writers: OrderedDict[date, pq.ParquetWriter] = OrderedDict()
        self.files: list[Path] = []  # final paths (each written as <path>.tmp)
        self.parts: dict[date, int] = {}
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        """Partition a batch of rows by the UTC day of the time column and buffer it."""
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        days = pc.cast(table[self.spec.time_column], pa.date32())
        if days.null_count:
            raise ExportError(f"{self.spec.table}: rows without {self.spec.time_column} cannot be partitioned by day")
        day_numbers = days.combine_chunks().to_numpy(zero_copy_only=False).astype("datetime64[D]").astype(np.int64)
        if (day_numbers == day_numbers[0]).all():
            self._buffer(date.fromordinal(int(day_numbers[0]) + 719163), table)
        else:
            if (np.diff(day_numbers) < 0).any():  # rows mostly arrive in time order: sort only when they do not
                order = np.argsort(day_numbers, kind="stable")
                table, day_numbers = table.take(pa.array(order)), day_numbers[order]
            bounds = np.concatenate(([0], np.flatnonzero(np.diff(day_numbers)) + 1, [len(day_numbers)]))
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                self._buffer(date.fromordinal(int(day_numbers[lo]) + 719163), table.slice(lo, hi - lo))
        self.rows += table.num_rows
        first = date.fromordinal(int(day_numbers.min()) + 719163)
        for day in [d for d in self.buffers if d < first]:  # rows come in time order: earlier days are complete
            self._flush(day)
        while sum(self.buffered.values()) > MAX_BUFFERED_ROWS:
            self._flush(max(self.buffered, key=self.buffered.__getitem__))

    def _buffer(self, day: date, rows: pa.Table) -> None:
        self.buffers.setdefault(day, []).append(rows)
        self.buffered[day] = self.buffered.get(day, 0) + rows.num_rows
        if self.buffered[day] >= ROW_GROUP_ROWS:
            self._flush(day)

    def _flush(self, day: date) -> None:
        rows = pa.concat_tables(self.buffers.pop(day))
        self.buffered.pop(day)
        writer = self.writers.get(day)
        if writer is None:
            if len(self.writers) >= MAX_OPEN_WRITERS:
                _, oldest = self.writers.popitem(last=False)
                oldest.close()
            part = self.parts.get(day, 0)
            self.parts[day] = part + 1
            path = self.root / self.spec.name / f"day={day.isoformat()}" / f"part-{self.run_id}-{part}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.files.append(path)
            writer = _parquet_writer(_tmp(path), self.schema)
            self.writers[day] = writer
        else:
            self.writers.move_to_end(day)
        _write_clustered(writer, rows, self.spec)

    def close(self) -> list[Path]:
        """Flush everything, close and fsync the files; return their final paths (still named *.tmp)."""
        for day in list(self.buffers):
            self._flush(day)
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
        for path in self.files:
            _fsync(_tmp(path))
        return self.files

    def discard(self) -> None:
        """Close and delete everything written; a failure here is logged, never raised (the caller is already
        handling the error that made it discard)."""
        for writer in self.writers.values():
            try:
                writer.close()
            except Exception as exc:  # e.g. the disk is full: the file is deleted next anyway
                log.info("closing a discarded export file failed: %s", _first_line(exc))
        self.writers.clear()
        for path in self.files:
            try:
                _tmp(path).unlink(missing_ok=True)
            except OSError as exc:  # the next export deletes it (no committed run owns it)
                log.warning("could not delete the unfinished export file %s: %s", _tmp(path), exc.strerror or exc)


def _parquet_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    """A Parquet writer with the exports' compression and a checksum on every page, on a file only this user can
    read (0600)."""
    create_private_file(path)
    return pq.ParquetWriter(path, schema, compression=PARQUET_COMPRESSION, write_page_checksum=PAGE_CHECKSUMS)


def _write_clustered(writer: pq.ParquetWriter, rows: pa.Table, s: TableSpec) -> None:
    """Write rows as row groups of ROW_GROUP_ROWS, each sorted by the table's cluster columns, then id."""
    for lo in range(0, rows.num_rows, ROW_GROUP_ROWS):
        writer.write_table(rows.slice(lo, ROW_GROUP_ROWS).sort_by(s.sort_keys), row_group_size=ROW_GROUP_ROWS)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------------------- pending ranges

def _ranges(ids: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique ids as inclusive [lo, hi] runs."""
    if ids.size == 0:
        return []
    ids = np.unique(ids)
    breaks = np.flatnonzero(np.diff(ids) > 1)
    los = np.concatenate(([ids[0]], ids[breaks + 1]))
    his = np.concatenate((ids[breaks], [ids[-1]]))
    return [(int(a), int(b)) for a, b in zip(los, his)]


def _missing(ids: np.ndarray, lo: int, hi: int) -> list[tuple[int, int]]:
    """The inclusive runs of [lo, hi] not in ids (sorted unique ids within [lo, hi])."""
    if lo > hi:
        return []
    edges = np.concatenate(([lo - 1], ids, [hi + 1]))
    gaps = np.flatnonzero(np.diff(edges) > 1)
    return [(int(edges[i] + 1), int(edges[i + 1] - 1)) for i in gaps]


def _sorted(parts: list[np.ndarray]) -> np.ndarray:
    """The concatenated ids, sorted (usually they already are)."""
    ids = np.concatenate(parts).astype(np.int64, copy=False) if parts else np.empty(0, np.int64)
    if ids.size > 1 and (ids[1:] < ids[:-1]).any():
        ids = np.sort(ids)
    return ids


def _pending_count(pending: list) -> int:
    return sum(int(p[1]) - int(p[0]) + 1 for p in pending)


# ------------------------------------------------------------------------------------------------------- exporting

def _recover(conn: Any, root: Path, target: str) -> None:
    """Finish committed runs an earlier export left unsettled; delete files no committed run owns."""
    for run_id, files, replaces in conn.execute(
            "SELECT id, files, replaces FROM export_runs WHERE target = %s AND NOT settled ORDER BY finished_at",
            (target,)).fetchall():
        _settle(root, files, replaces)
        conn.execute("UPDATE export_runs SET settled = true WHERE id = %s", (run_id,))
    for s in TABLES:
        for tmp in table_dir(root, s.name).glob("day=*/*.tmp"):
            tmp.unlink(missing_ok=True)


def _settle(root: Path, files: Iterable[str], replaces: Iterable[str]) -> None:
    for rel in files:
        final = root / rel
        if _tmp(final).exists():
            os.replace(_tmp(final), final)
    for rel in replaces:
        (root / rel).unlink(missing_ok=True)


def _rebuild(conn: Any, root: Path, target: str, specs: Sequence[TableSpec]) -> None:
    """Discard the exports of these tables (files and watermarks); redone after a crash thanks to a flag file."""
    flag = root / REBUILD_FLAG
    names = sorted({s.name for s in specs} | set(_flag_tables(flag)))
    flag.write_text(json.dumps(names), encoding="utf-8")
    with conn.transaction():
        conn.execute("DELETE FROM export_watermarks WHERE target = %s AND table_name = ANY(%s)", (target, names))
        conn.execute("UPDATE export_runs SET settled = true WHERE target = %s AND table_name = ANY(%s)",
                      (target, names))
    for name in names:  # a failure leaves the flag: the next export discards the rest (never a half-discarded table)
        if table_dir(root, name).exists():
            shutil.rmtree(table_dir(root, name))
    flag.unlink()


def _flag_tables(flag: Path) -> list[str]:
    try:
        return list(json.loads(flag.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return []
    except ValueError:
        return [s.name for s in TABLES]


def _export_table(conn: Any, root: Path, target: str, s: TableSpec) -> TableExport:
    started = time.perf_counter()
    started_at = datetime.now().astimezone()
    row = conn.execute("SELECT last_id, pending FROM export_watermarks WHERE target = %s AND table_name = %s",
                       (target, s.name)).fetchone()
    last_id, pending = (int(row[0]), list(row[1])) if row else (0, [])
    running = _active_vxids(conn)
    recheck = [p for p in pending if not set(p[2]) & running]
    waiting = [p for p in pending if set(p[2]) & running]
    run_id = uuid.uuid4()
    writer = _PartitionWriter(root, s, run_id.hex)
    ids_seen: list[np.ndarray] = []
    not_ready: list[np.ndarray] = []
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")  # SET takes no snapshot
            # Rows in id order; the client is the bottleneck.
            conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
            # The snapshot is taken by this first query; transactions it cannot see are still running after it.
            blockers = sorted(_active_vxids(conn))
            params: list[Any] = [last_id]
            if recheck:
                params += [[int(p[0]) for p in recheck], [int(p[1]) for p in recheck]]
            read, parse, convert = _csv_options(s)

            def absorb(block: bytes) -> None:  # on the parser thread: parse, note ids, partition and buffer
                batch = pacsv.read_csv(pa.py_buffer(block), read_options=read, parse_options=parse,
                                       convert_options=convert)
                ready = pc.fill_null(batch.column("_ready"), False).combine_chunks()
                ids = batch.column(s.id_column).to_numpy()
                ids_seen.append(ids)
                if not pc.all(ready).as_py():
                    not_ready.append(ids[~ready.to_numpy(zero_copy_only=False)])
                wanted = pc.and_(ready, pc.fill_null(batch.column("_keep"), False).combine_chunks())
                writer.add(batch if pc.all(wanted).as_py() else batch.filter(wanted))

            # Receiving (Python, holds the GIL) overlaps with parsing and writing (Arrow, releases it).
            with ThreadPoolExecutor(1, thread_name_prefix="export") as parser, conn.cursor() as cur, \
                    cur.copy(_select_sql(s, len(recheck)), params) as copy:
                queued: deque[Future] = deque()
                for block in _blocks(copy, BLOCK_BYTES):
                    queued.append(parser.submit(absorb, block))
                    while len(queued) > 2:
                        queued.popleft().result()
                while queued:
                    queued.popleft().result()
        files = writer.close()
    except BaseException:
        writer.discard()
        raise
    seen = _sorted(ids_seen)  # ids are unique: the ranges read never overlap
    late = _sorted(not_ready)
    new_last = max(last_id, int(seen[-1]) if seen.size else 0)
    new_pending: list[list] = [list(p) for p in waiting]
    new_pending += [[lo, hi, []] for lo, hi in _ranges(late)]  # visible but not final: look again every time
    above = seen[seen > last_id]
    new_pending += [[lo, hi, blockers] for lo, hi in _missing(above, last_id + 1, new_last)]
    new_pending.sort(key=lambda p: p[0])
    rel = [str(f.relative_to(root)) for f in files]
    with conn.transaction():
        conn.execute(
            """INSERT INTO export_watermarks (target, table_name, last_id, pending, rows_exported, checked_at,
                                              exported_at)
               VALUES (%(t)s, %(n)s, %(last)s, %(pending)s, %(rows)s, now(), CASE WHEN %(rows)s > 0 THEN now() END)
               ON CONFLICT (target, table_name) DO UPDATE SET
                   last_id = EXCLUDED.last_id, pending = EXCLUDED.pending, checked_at = now(),
                   rows_exported = export_watermarks.rows_exported + EXCLUDED.rows_exported,
                   exported_at = coalesce(EXCLUDED.exported_at, export_watermarks.exported_at)""",
            {"t": target, "n": s.name, "last": new_last, "pending": jsonb(new_pending), "rows": writer.rows})
        if files:
            conn.execute("INSERT INTO export_runs (id, target, table_name, kind, rows, files, started_at) "
                         "VALUES (%(id)s, %(target)s, %(table)s, 'export', %(rows)s, %(files)s, %(started_at)s)",
                         {"id": run_id, "target": target, "table": s.name, "rows": writer.rows, "files": jsonb(rel),
                          "started_at": started_at})
    if files:
        _settle(root, rel, [])
        _trust(files)
        conn.execute("UPDATE export_runs SET settled = true WHERE id = %s", (run_id,))
        for day_dir in sorted({f.parent for f in files}):
            _compact(conn, root, target, s, day_dir)
    return TableExport(s.name, writer.rows, len(files), _pending_count(new_pending), new_last,
                       time.perf_counter() - started)


def _compact(conn: Any, root: Path, target: str, s: TableSpec, day_dir: Path) -> bool:
    """Merge a day's files into one when there are COMPACT_AT or more; crash-safe like an export."""
    parts = sorted(day_dir.glob("*.parquet"))
    if len(parts) < COMPACT_AT:
        return False
    started_at = datetime.now().astimezone()
    table = pa.concat_tables([_read_verified(root, p).cast(s.schema) for p in parts])  # damage is never copied
    table = table.sort_by(s.id_column)
    run_id = uuid.uuid4()
    final = day_dir / f"part-{run_id.hex}-c.parquet"
    try:
        with _parquet_writer(_tmp(final), s.schema) as writer:
            _write_clustered(writer, table, s)  # row groups in id order, each clustered
        _fsync(_tmp(final))
    except BaseException:
        _remove_quietly(_tmp(final))
        raise
    rel_new, rel_old = [str(final.relative_to(root))], [str(p.relative_to(root)) for p in parts]
    conn.execute("INSERT INTO export_runs (id, target, table_name, kind, rows, files, replaces, started_at) "
                 "VALUES (%(id)s, %(target)s, %(table)s, 'compact', %(rows)s, %(files)s, %(replaces)s, "
                 "%(started_at)s)",
                 {"id": run_id, "target": target, "table": s.name, "rows": table.num_rows, "files": jsonb(rel_new),
                  "replaces": jsonb(rel_old), "started_at": started_at})
    _settle(root, rel_new, rel_old)
    _trust([final])
    conn.execute("UPDATE export_runs SET settled = true WHERE id = %s", (run_id,))
    return True


def export_iter(pool: ConnectionPool, settings: Settings | Path, *, tables: Sequence[str] | None = None,
                full: bool = False, wait: bool = True) -> Iterator[TableExport]:
    """Export each table in turn (yielding what it did): rows new since the last export, or all with full=True.
    One export runs per exports directory at a time: the next waits for it, or with wait=False raises ExportBusy."""
    root = _exports_dir(settings)
    specs = [spec(n) for n in tables] if tables else list(TABLES)
    target = target_id(root)
    key = (int(LockKey.EXPORT), target)
    with pool.connection() as conn:
        if wait:
            conn.execute("SELECT pg_advisory_lock(%s::int, hashtext(%s))", key)
        elif not conn.execute("SELECT pg_try_advisory_lock(%s::int, hashtext(%s))", key).fetchone()[0]:
            raise ExportBusy(f"another export of {root} is running")
        try:
            try:
                _recover(conn, root, target)
                if full or (root / REBUILD_FLAG).exists():
                    _rebuild(conn, root, target, specs if full else [])
            except OSError as exc:
                raise _dir_error(root, exc) from exc
            present = {x.name for x in existing_tables(conn, specs)}
            for s in specs:
                if s.name not in present:
                    missing = [t for t in s.tables
                               if conn.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0] is None]
                    yield TableExport(s.name, skipped=f"table {', '.join(missing)} does not exist yet")
                    continue
                try:
                    done = _export_table(conn, root, target, s)
                except OSError as exc:
                    raise _dir_error(root, exc) from exc
                yield done
        finally:
            try:
                conn.execute("SELECT pg_advisory_unlock(%s::int, hashtext(%s))", key)
            except Exception as exc:  # a broken connection released the lock already; the original error matters
                log.info("releasing the export lock failed (the connection is gone, and the lock with it): %s",
                         _first_line(exc))


def export(pool: ConnectionPool, settings: Settings | Path, *, tables: Sequence[str] | None = None,
           full: bool = False, on_table: Callable[[TableExport], None] | None = None) -> ExportReport:
    """Export every table (or the named ones) incrementally; full=True re-exports everything from scratch."""
    started = time.perf_counter()
    done = []
    for result in export_iter(pool, settings, tables=tables, full=full):
        done.append(result)
        if on_table:
            on_table(result)
    return ExportReport(tuple(done), time.perf_counter() - started)


def recent_runs(pool: ConnectionPool, settings: Settings | Path, limit: int = 20) -> list[dict[str, Any]]:
    """The latest export and compaction runs of this exports directory, newest first."""
    target = target_id(_exports_dir(settings))
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT table_name, kind, rows, jsonb_array_length(files) AS files, started_at, finished_at "
            "FROM export_runs WHERE target = %s ORDER BY finished_at DESC LIMIT %s", (target, limit)).fetchall()
