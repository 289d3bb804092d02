"""Analytics over the Parquet exports with DuckDB: usage, latency, version comparison, cost, guardrails, evaluation
pass rates, anomalies, and a sandboxed ad-hoc SQL box. Prices per model live in PostgreSQL.

Every DuckDB connection here is confined to the exports directory: external access is disabled except for that
directory (`allowed_directories`), and the configuration is then locked, so no query can read or write any other
file, load an extension or change a setting. Times are UTC.

The SQL box runs each query in a child process with a memory cap, killed at its time limit (see `run_sql`); every
exported file's page checksums are checked before DuckDB first reads it (DuckDB does not check them); and error
messages name tables, never the server's paths.
"""

from __future__ import annotations

import multiprocessing
import re
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import duckdb
import pandas as pd
import pyarrow as pa
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from core import exports
from core.config import ensure_private_dir
from core.errors import Forbidden, InvalidInput, NotFound, RateLimited, TooLarge, Unavailable

BUCKETS = {"hour": "date_trunc('hour', created_at)", "day": "CAST(day AS TIMESTAMP)",
           "week": "CAST(date_trunc('week', day) AS TIMESTAMP)"}
COST_GROUPS = {"template": "coalesce(template_name, '(none)')", "user": "coalesce(user_id, '(anonymous)')",
               "day": "day", "model": "model_name"}
ANOMALY_METRICS = ("tokens per request", "mean latency (ms)")
# The cost of a row of usage `u` (tokens and compute seconds of one model) at its price `p`, else the default `d`.
_COST = ("u.prompt_tokens / 1000.0 * coalesce(p.prompt_per_1k, d.prompt_per_1k, 0) "
         "+ u.completion_tokens / 1000.0 * coalesce(p.completion_per_1k, d.completion_per_1k, 0) "
         "+ u.compute_s * coalesce(p.per_compute_second, d.per_compute_second, 0)")
DEFAULT_ROW_LIMIT = 1000
DEFAULT_TIME_LIMIT_S = 10.0
_DUCK_TYPES = {pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.float64(): "DOUBLE", pa.string(): "VARCHAR",
               pa.bool_(): "BOOLEAN", pa.timestamp("us"): "TIMESTAMP"}
_REFUSED_KINDS = {
    "COPY": "COPY reads or writes files",
    "ATTACH": "ATTACH opens another database",
    "DETACH": "the exports are read-only",
    "LOAD": "extensions cannot be installed or loaded",
    "SET": "settings are locked",
    "VARIABLE_SET": "settings are locked",
    "PRAGMA": "settings are locked",
    "EXPORT": "EXPORT writes files",
    "INSERT": "the exports are read-only",
    "UPDATE": "the exports are read-only",
    "DELETE": "the exports are read-only",
    "CREATE": "the exports are read-only",
    "DROP": "the exports are read-only",
    "ALTER": "the exports are read-only",
    "CALL": "only queries can run here",
    "MULTI": "a PIVOT must list its values here, e.g. PIVOT executions ON status IN ('ok', 'error') USING count(*)",
}
MAX_RESULT_BYTES = 64 << 20  # a result bigger than this in memory is refused rather than sent to the browser


class AnalyticsError(InvalidInput):
    """A query or setting that cannot be used; the message says why in one line."""


class QueryRefused(Forbidden, AnalyticsError):
    """The SQL box refused a query (not a read of the exports, or over one of its limits)."""


class QueryLimitExceeded(TooLarge, QueryRefused):
    """The query ran past the time limit, or its result is too large to hold or show."""


class QueryBusy(RateLimited, QueryRefused):
    """Too many earlier queries past their time limit are still being cancelled; try again in a moment."""


class ExportsUnreadable(Unavailable, AnalyticsError):
    """The Parquet exports cannot be read (`promptdev export --full` rebuilds them)."""


class SqlBoxUnavailable(Unavailable, AnalyticsError):
    """The SQL box could not start the process a query runs in (out of processes or memory, say)."""


class PriceNotFound(NotFound):
    """The model has no price set (a LookupError)."""


@dataclass(frozen=True)
class Filters:
    """What the dashboards look at: a UTC date range (inclusive) and optional equality filters."""

    start: date | None = None
    end: date | None = None
    template: str | None = None
    version: int | None = None
    model: str | None = None
    source: str | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        if self.start and self.end and self.start > self.end:
            raise AnalyticsError(f"the date range is reversed: {self.start} is after {self.end}")

    def bucket(self) -> str:
        """A sensible time bucket for the range: hours up to three days, days up to a year, then weeks."""
        if self.start and self.end:
            days = (self.end - self.start).days + 1
            return "hour" if days <= 3 else "day" if days <= 366 else "week"
        return "day"


@dataclass(frozen=True)
class Price:
    """What a model costs: per 1,000 prompt and completion tokens, and per compute-second of generation."""

    model_name: str
    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0
    per_compute_second: float = 0.0
    updated_by: str = ""
    updated_at: datetime | None = None


@dataclass(frozen=True)
class QueryResult:
    """The rows of an ad-hoc query (at most the row limit), whether more were cut, and how long it took."""

    frame: pd.DataFrame
    truncated: bool
    seconds: float
    limit: int


# ---------------------------------------------------------------------------------------------------------- prices

def list_prices(pool: ConnectionPool) -> list[Price]:
    """Every configured price, '*' (the default for other models) first."""
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Price)) as cur:
        return cur.execute("SELECT model_name, prompt_per_1k, completion_per_1k, per_compute_second, updated_by, "
                           "updated_at FROM model_prices ORDER BY model_name <> '*', model_name").fetchall()


def _check_price(row: Mapping[str, Any]) -> tuple[str, float, float, float]:
    raw_name = row.get("model_name")
    name = raw_name.strip() if isinstance(raw_name, str) else ""
    if not name:
        raise AnalyticsError("a price needs a model name ('*' for every other model)")
    values = []
    for key in ("prompt_per_1k", "completion_per_1k", "per_compute_second"):
        raw = row.get(key)
        try:
            value = 0.0 if raw is None or raw == "" or (isinstance(raw, float) and raw != raw) else float(raw)
        except (TypeError, ValueError):
            raise AnalyticsError(f"price of {name}: {key} must be a number, got {raw!r}") from None
        if not 0 <= value < float("inf"):
            raise AnalyticsError(f"price of {name}: {key} must be zero or more, got {raw!r}")
        values.append(value)
    return (name, *values)


def set_price(pool: ConnectionPool, model_name: str, *, prompt_per_1k: float = 0.0, completion_per_1k: float = 0.0,
              per_compute_second: float = 0.0, updated_by: str = "") -> Price:
    """Set (or replace) the price of one model; '*' prices every model without its own."""
    name, p, c, s = _check_price({"model_name": model_name, "prompt_per_1k": prompt_per_1k,
                                  "completion_per_1k": completion_per_1k, "per_compute_second": per_compute_second})
    with pool.connection() as conn, conn.cursor(row_factory=class_row(Price)) as cur:
        return cur.execute(
            """INSERT INTO model_prices (model_name, prompt_per_1k, completion_per_1k, per_compute_second, updated_by)
               VALUES (%s, %s, %s, %s, %s)
               ON CONFLICT (model_name) DO UPDATE SET prompt_per_1k = EXCLUDED.prompt_per_1k,
                   completion_per_1k = EXCLUDED.completion_per_1k, per_compute_second = EXCLUDED.per_compute_second,
                   updated_by = EXCLUDED.updated_by, updated_at = now()
               RETURNING model_name, prompt_per_1k, completion_per_1k, per_compute_second, updated_by, updated_at""",
            (name, p, c, s, updated_by)).fetchone()


def delete_price(pool: ConnectionPool, model_name: str) -> None:
    """Remove a model's price; PriceNotFound (a LookupError) when it has none."""
    with pool.connection() as conn:
        if conn.execute("DELETE FROM model_prices WHERE model_name = %s", (model_name,)).rowcount == 0:
            raise PriceNotFound(f"no price set for model {model_name!r}")


def replace_prices(pool: ConnectionPool, rows: Iterable[Mapping[str, Any]], *, updated_by: str = "") -> list[Price]:
    """Make the price table exactly these rows (as edited in a grid), in one transaction: all or nothing."""
    checked = [_check_price(r) for r in rows]
    names = [r[0] for r in checked]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AnalyticsError(f"model {duplicates[0]!r} has more than one price")
    with pool.connection() as conn, conn.transaction():
        conn.execute("DELETE FROM model_prices WHERE NOT (model_name = ANY(%s))", (names,))
        for name, p, c, s in checked:
            conn.execute(
                """INSERT INTO model_prices (model_name, prompt_per_1k, completion_per_1k, per_compute_second,
                                            updated_by)
                   VALUES (%s, %s, %s, %s, %s)
                   ON CONFLICT (model_name) DO UPDATE SET prompt_per_1k = EXCLUDED.prompt_per_1k,
                       completion_per_1k = EXCLUDED.completion_per_1k, per_compute_second = EXCLUDED.per_compute_second,
                       updated_by = EXCLUDED.updated_by, updated_at = now()
                   WHERE (model_prices.prompt_per_1k, model_prices.completion_per_1k, model_prices.per_compute_second)
                         IS DISTINCT FROM (EXCLUDED.prompt_per_1k, EXCLUDED.completion_per_1k,
                                           EXCLUDED.per_compute_second)""",
                (name, p, c, s, updated_by))
    return list_prices(pool)


# ----------------------------------------------------------------------------------------------------- the sandbox

def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def sandbox(exports_dir: Path, *, threads: int = 2, memory_limit: str = "1GB",
            verify: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can read only the exports directory, with views named after the exported tables;
    its configuration is locked. With `verify`, every exported file's page checksums are checked first (once per
    file: exports.verify_files), since DuckDB reads damaged pages without a word."""
    root = _usable_root(exports_dir)
    if verify:
        verify_exports(root)
    con = duckdb.connect(config={"threads": threads, "memory_limit": memory_limit})
    try:
        con.execute("SET temp_directory = ''")  # never spill to disk
        con.execute("SET enable_progress_bar = false")  # nothing on the terminal
        con.execute(f"SET allowed_directories = [{_quote(str(root) + '/')}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET parquet_metadata_cache = true")  # export files never change once written
        # The exports are local files: prefetching only adds work (1M executions: scans 5-20 % faster without it).
        con.execute("SET disable_parquet_prefetching = true")
        for s in exports.TABLES:
            if exports.parquet_files(root, s.name):
                pattern = str(exports.table_dir(root, s.name) / "day=*" / "*.parquet")
                con.execute(f"CREATE VIEW {s.name} AS SELECT * FROM read_parquet({_quote(pattern)}, "
                            "hive_partitioning = true, hive_types = {'day': 'DATE'})")
            else:  # nothing exported yet: an empty view of the same shape, so every query still runs
                cols = ", ".join(f"CAST(NULL AS {_DUCK_TYPES[c.type]}) AS {c.name}" for c in s.columns)
                con.execute(f"CREATE VIEW {s.name} AS SELECT {cols}, CAST(NULL AS DATE) AS day WHERE false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as exc:
        con.close()
        raise ExportsUnreadable(f"cannot read the exports: {_scrub(_first_line(exc), root)} "
                                "(`promptdev export --full` rebuilds them)") from None
    except BaseException:
        con.close()
        raise
    return con


def _usable_root(exports_dir: Path) -> Path:
    """The exports directory, resolved and created if missing; ExportsUnreadable naming it and the cause when it
    cannot be (a file stands in the way, the disk is read-only, …)."""
    root = Path(exports_dir).resolve()
    try:
        ensure_private_dir(root, levels=2)  # exports and the data directory: 0700 when created
    except OSError as exc:
        raise ExportsUnreadable(f"cannot use the exports directory {exports_dir}: "
                                f"{exc.strerror or _first_line(exc)}") from exc
    return root


def verify_exports(exports_dir: Path) -> int:
    """Check every exported file's page checksums (each once per file identity): ExportsUnreadable naming the
    damaged file, and how to rebuild, otherwise. Returns the number of files."""
    try:
        return exports.verify_files(exports_dir)
    except exports.ExportDamaged as exc:
        raise ExportsUnreadable(f"cannot read the exports: {exc}") from exc
    except OSError as exc:
        raise ExportsUnreadable(f"cannot read the exports in {exports_dir}: "
                                f"{exc.strerror or _first_line(exc)}") from exc


def _refusal(kind: str) -> str:
    reason = _REFUSED_KINDS.get(kind, "only SELECT queries can run here")
    if kind == "MULTI":
        return f"refused: this query would run several statements ({reason})"
    return f"refused: {kind} statements are not allowed ({reason}); only SELECT queries over the exports can run"


_PATH_TABLE = re.compile(r"Table with name (\S+) does not exist")
_QUOTED = re.compile(r"""["']([^"']+)["']""")
_ABSOLUTE = re.compile(r"""(?<![\w.])(?:file://)?/[^\s"',;()]+""")


def _scrub(message: str, root: Path, query: str = "") -> str:
    """A DuckDB message without the server's paths: a path under the exports becomes the name of its table (or
    "the exports"), and any other absolute path not typed by the user in `query` becomes "<path>"."""
    names = {s.name for s in exports.TABLES}
    prefix = str(root).rstrip("/")

    def replace(match: re.Match) -> str:
        path = match.group(0)
        if path in query:
            return path  # the user's own words
        bare = path[len("file://"):] if path.startswith("file://") else path
        if bare == prefix or bare.startswith(prefix + "/"):
            first = bare[len(prefix) + 1:].split("/", 1)[0]
            return first if first in names else "the exports"
        return "<path>"

    return _ABSOLUTE.sub(replace, message)


def _outside(message: str, query: str) -> str | None:
    """The refusal for `FROM '/some/file'` outside the exports (DuckDB reports it as a missing table)."""
    m = _PATH_TABLE.search(message)
    if m and ("/" in m.group(1) or "://" in m.group(1)):
        return f"refused: only the exports can be read ({_typed(m.group(1), query)} is not one of them)"
    return None


def _typed(text: str, query: str) -> str:
    """A name from a DuckDB message as the user typed it, else "a file outside the exports"."""
    text = text.strip("\"'")
    return repr(text) if text and text in query else "a file outside the exports"


def _permission_refusal(message: str, query: str) -> str:
    """The refusal for a read outside the exports, naming what was refused only in the user's own words."""
    quoted = [q for q in _QUOTED.findall(message) if q in query]
    what = f" ({quoted[0]!r} is not one of them)" if quoted else ""
    tables = ", ".join(s.name for s in exports.TABLES)
    return f"refused: only the exports can be read{what}; the tables are {tables}"


# ---------------------------------------------------------------------------------------------------- the SQL box
#
# A query typed into the SQL box runs in a child process, never in the caller's: DuckDB's memory_limit bounds its
# buffer-managed operators (sorts, joins, aggregates) but not the values an expression builds, and one data chunk
# (2,048 rows) of `repeat('x', 100000000 + range)` holds 200 GB. The child's data segment is capped
# (RLIMIT_DATA): past it allocations fail and DuckDB reports "out of memory". The result comes back in chunks of
# 2,048 rows, stopping at the row limit or at MAX_RESULT_BYTES, whichever comes first, and the child is killed at
# the time limit: the caller gets its answer on time and keeps its memory. Children are forked from a forkserver
# that has imported this module already (a few milliseconds each).

MAX_TIME_LIMIT_S = 120.0  # the longest time limit a user may choose
MAX_ROW_LIMIT = 100_000  # the largest row limit a user may choose
SQL_MEMORY_LIMIT = "1GB"  # DuckDB's memory_limit in the child
CHILD_MEMORY_BYTES = (1 << 30) + (256 << 20)  # what the child may allocate on top of what it starts with
MAX_CONCURRENT_QUERIES = 2  # SQL-box queries one process runs at once (each may take CHILD_MEMORY_BYTES)

_running = threading.BoundedSemaphore(MAX_CONCURRENT_QUERIES)
_forkserver_lock = threading.Lock()
_context: Any = None


def _mp_context() -> Any:
    """The forkserver multiprocessing context, its server preloading this module (see _preload)."""
    global _context
    with _forkserver_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(_preload())
            _context = ctx
        return _context


def _preload() -> list[str]:
    """What the forkserver imports once: this module, and the modules the main script's names come from. Each child
    runs the main script again (multiprocessing's rule for a script run by path: `promptdev`, `streamlit`), which
    costs nothing once what it imports is loaded (0.4 s each otherwise)."""
    names = [__name__]
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__file__", None) and getattr(main, "__spec__", None) is None:
        for value in list(vars(main).values()):
            module = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
            if isinstance(module, str) and not module.startswith("_") and module != "builtins" \
                    and module not in names:
                names.append(module)
    return names


def run_sql(exports_dir: Path, query: str, *, limit: int = DEFAULT_ROW_LIMIT,
            time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> QueryResult:
    """Run one read-only SELECT over the exports in a sandboxed child process, with a row limit, a time limit and
    a memory cap; a query that is not allowed raises QueryRefused saying why."""
    if not query or not query.strip():
        raise AnalyticsError("enter a SELECT query, e.g. SELECT count(*) FROM executions")
    if not 1 <= limit <= MAX_ROW_LIMIT:
        raise AnalyticsError(f"the row limit must be between 1 and {MAX_ROW_LIMIT:,}, not {limit:,}")
    if not 0 < time_limit_s <= MAX_TIME_LIMIT_S:
        raise AnalyticsError(f"the time limit must be more than 0 and at most {MAX_TIME_LIMIT_S:g} s, "
                             f"not {time_limit_s:g}")
    parser = duckdb.connect(config={"enable_external_access": False})
    try:
        statements = _statements(parser, query)
        if len(statements) != 1:
            raise QueryRefused(f"refused: one statement at a time, got {len(statements)}")
        kind = statements[0].type.name
        if kind != "SELECT":
            raise QueryRefused(_refusal(kind))
        inner = statements[0].query.strip().rstrip(";").strip()
        wrapped = f"SELECT * FROM (\n{inner}\n) AS q LIMIT {int(limit) + 1}"
        check = _statements(parser, wrapped)
        if len(check) != 1 or check[0].type.name != "SELECT":
            raise QueryRefused("refused: the query could not be confined to one SELECT")
    finally:
        parser.close()
    root = _usable_root(exports_dir)
    verify_exports(root)  # here, where the verdicts are remembered; the child reads the files checked
    if not _running.acquire(blocking=False):
        raise QueryBusy(f"refused: {MAX_CONCURRENT_QUERIES} queries are running already; try again in a moment",
                        retry_after=1.0)
    try:
        outcome, seconds = _in_child(root, wrapped, limit, time_limit_s)
    finally:
        _running.release()
    status, payload = outcome
    if status == "ok":
        frame = payload
        truncated = len(frame) > limit
        return QueryResult(frame.iloc[:limit], truncated, seconds, limit)
    raise _query_error(status, payload, root, query, time_limit_s)


def _in_child(root: Path, query: str, limit: int, time_limit_s: float) -> tuple[tuple[str, Any], float]:
    """Run the query in a child process: its (status, payload) and the seconds it took; ("timeout", None) when it
    ran past the time limit (it is killed), ("died", exit code) when it stopped without answering."""
    ctx = _mp_context()
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_query, args=(str(root), query, limit, MAX_RESULT_BYTES, sender),
                        name="analytics-sql", daemon=True)
    try:
        try:
            child.start()
        except OSError as exc:
            raise SqlBoxUnavailable(f"the SQL box cannot start a query: {exc.strerror or _first_line(exc)}") from exc
        started = time.perf_counter()
        sender.close()
        try:
            if not receiver.poll(time_limit_s):
                return ("timeout", None), time.perf_counter() - started
            outcome = receiver.recv()
        except (EOFError, OSError):  # it died without a word (killed for its memory, say)
            child.join(5)
            return ("died", child.exitcode), time.perf_counter() - started
        return outcome, time.perf_counter() - started
    finally:
        if child.pid is not None:  # started
            if child.is_alive():
                child.kill()
            child.join(5)
        receiver.close()
        sender.close()


def _query_error(status: str, payload: Any, root: Path, query: str, time_limit_s: float) -> AnalyticsError:
    """The one-line error for a query that gave no rows."""
    if status == "timeout":
        return QueryLimitExceeded(f"stopped: the query ran longer than the {time_limit_s:g} s time limit")
    if status == "too_large":
        return QueryLimitExceeded(f"refused: the result is too large to show ({payload / 2**20:,.0f} MB or more, at "
                                  f"most {MAX_RESULT_BYTES >> 20} MB); select fewer columns or rows, or aggregate")
    if status in ("memory", "died"):
        return QueryLimitExceeded(f"refused: the query needs more memory than the SQL box allows (about "
                                  f"{CHILD_MEMORY_BYTES >> 20:,} MB); select fewer or smaller values, or aggregate")
    if status == "unreadable":
        return ExportsUnreadable(f"cannot read the exports: {_scrub(payload, root, query)} "
                                 "(`promptdev export --full` rebuilds them)")
    if status == "permission":
        return QueryRefused(_permission_refusal(payload, query))
    if status == "catalog":
        return QueryRefused(refusal) if (refusal := _outside(payload, query)) else \
            AnalyticsError(_scrub(payload, root, query))
    if status == "result":
        return AnalyticsError(f"the result cannot be shown: {_scrub(payload, root, query)}")
    return AnalyticsError(_scrub(payload, root, query))


def _child_query(root: str, query: str, limit: int, max_bytes: int, sender: Any) -> None:
    """In the child: cap the memory, run the query, send back ("ok", DataFrame) or (status, detail)."""
    try:
        import resource

        data = _data_segment()
        if data is not None:
            cap = data + CHILD_MEMORY_BYTES
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        outcome = _fetch(Path(root), query, limit, max_bytes)
    except BaseException as exc:  # everything is reported; nothing is printed
        outcome = ("other", _first_line(exc))
    try:
        sender.send(outcome)
    except BaseException as exc:  # e.g. no memory left to pickle the rows
        sender.send(("memory" if isinstance(exc, MemoryError) else "other", _first_line(exc)))
    finally:
        sender.close()


def _data_segment() -> int | None:
    """This process's data segment in bytes (what RLIMIT_DATA limits), None where /proc cannot tell."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _fetch(root: Path, query: str, limit: int, max_bytes: int) -> tuple[str, Any]:
    """Run the query on a sandbox over root and collect its rows chunk by chunk, up to limit + 1 rows and
    max_bytes."""
    try:
        con = sandbox(root, memory_limit=SQL_MEMORY_LIMIT, verify=False)
    except ExportsUnreadable as exc:
        return "unreadable", str(exc)
    try:
        try:
            con.execute(query)
            frames, rows, size = [], 0, 0
            while rows <= limit:
                chunk = con.fetch_df_chunk(1)
                if frames and len(chunk) == 0:
                    break
                frames.append(chunk)
                rows += len(chunk)
                size += int(chunk.memory_usage(deep=True, index=False).sum())
                if size > max_bytes:
                    return "too_large", size
                if len(chunk) == 0:
                    break
        except (duckdb.OutOfMemoryException, MemoryError):
            return "memory", ""
        except duckdb.PermissionException as exc:
            return "permission", _first_line(exc)
        except duckdb.CatalogException as exc:
            return "catalog", _first_line(exc)
        except duckdb.Error as exc:
            return "duckdb", _first_line(exc)
        except Exception as exc:  # e.g. a value pandas cannot hold
            return "result", _first_line(exc)
        frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        return "ok", frame
    finally:
        con.close()


def _statements(con: duckdb.DuckDBPyConnection, query: str) -> list[Any]:
    try:
        return con.extract_statements(query)
    except duckdb.Error as exc:
        raise AnalyticsError(_first_line(exc)) from None


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else (type(exc).__name__ if isinstance(exc, BaseException) else "")


# ------------------------------------------------------------------------------------------------------ dashboards

_FILTER_COLUMNS = {
    "template": "template_name", "version": "template_version", "model": "model_name", "source": "source",
    "user": "user_id",
}
_VIEW_FILTERS = {  # which filters each view can honour
    "executions": ("template", "version", "model", "source", "user"),
    "guardrail_events": ("template", "version", "model", "user"),
    "interventions": ("user",),
    "eval_results": ("template", "version", "model"),
    "conversation_messages": ("user",),
}


@dataclass
class Analytics:
    """Dashboard queries over one exports directory (one sandboxed DuckDB connection; use from one thread)."""

    exports_dir: Path
    con: duckdb.DuckDBPyConnection = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.exports_dir = Path(self.exports_dir)
        self.con = sandbox(self.exports_dir)

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.con.close()

    def __enter__(self) -> "Analytics":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _df(self, query: str, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        try:
            try:
                return self.con.execute(query, dict(params or {})).df()
            except duckdb.IOException:  # a compaction replaced files while the query listed them: once more
                return self.con.execute(query, dict(params or {})).df()
        except duckdb.Error as exc:
            raise AnalyticsError(f"analytics query failed: {self._scrub(exc)}") from None

    def _rows(self, query: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        try:
            try:
                return self.con.execute(query, dict(params or {})).fetchall()
            except duckdb.IOException:  # as in _df
                return self.con.execute(query, dict(params or {})).fetchall()
        except duckdb.Error as exc:
            raise AnalyticsError(f"analytics query failed: {self._scrub(exc)}") from None

    def _scrub(self, exc: BaseException) -> str:
        return _scrub(_first_line(exc), self.exports_dir.resolve())

    @staticmethod
    def _prices(prices: Sequence[Price], params: dict[str, Any]) -> str:
        """The prices as a parameterised VALUES list (adding its parameters); no prices: everything costs 0."""
        rows = [(p.model_name, float(p.prompt_per_1k), float(p.completion_per_1k), float(p.per_compute_second))
                for p in prices] or [("*", 0.0, 0.0, 0.0)]
        for i, (m, pp, pcx, ps) in enumerate(rows):
            params.update({f"pm{i}": m, f"pp{i}": pp, f"pc{i}": pcx, f"ps{i}": ps})
        return ", ".join(f"($pm{i}, $pp{i}, $pc{i}, $ps{i})" for i in range(len(rows)))

    def _where(self, view: str, f: Filters, *, skip: Sequence[str] = (), start: date | None = None) -> tuple[str, dict]:
        conds, params = [], {}
        start = start or f.start
        if start:
            conds.append("day >= $start")
            params["start"] = start
        if f.end:
            conds.append("day <= $end")
            params["end"] = f.end
        for key in _VIEW_FILTERS[view]:
            value = getattr(f, key)
            if value is not None and value != "" and key not in skip:
                conds.append(f"{_FILTER_COLUMNS[key]} = ${key}")
                params[key] = value
        return (" WHERE " + " AND ".join(conds)) if conds else "", params

    # -- what there is
    def counts(self) -> dict[str, int]:
        """Rows exported per table."""
        return {s.name: self.con.execute(f"SELECT count(*) FROM {s.name}").fetchone()[0] for s in exports.TABLES}

    def filter_options(self) -> dict[str, Any]:
        """Values the filters can take (from the exported executions) and the range of days covered."""
        keys = ("template", "model", "source", "user")
        lists = ", ".join(f"list(DISTINCT {_FILTER_COLUMNS[k]} ORDER BY {_FILTER_COLUMNS[k]}) "
                          f"FILTER (WHERE {_FILTER_COLUMNS[k]} <> '')" for k in keys)
        row = self.con.execute(
            f"""SELECT {lists},
                       list(DISTINCT {{'t': template_name, 'v': template_version}})
                           FILTER (WHERE template_version IS NOT NULL),
                       min(day), max(day)
                FROM executions""").fetchone()
        out: dict[str, Any] = {k: [v for v in (row[i] or []) if v is not None] for i, k in enumerate(keys)}
        out["versions"] = {}
        for pair in sorted(row[4] or [], key=lambda p: (p["t"] or "", p["v"])):
            if pair["t"] is not None:
                out["versions"].setdefault(pair["t"], []).append(pair["v"])
        out["first_day"], out["last_day"] = row[5], row[6]
        return out

    # -- dashboards
    def summary(self, f: Filters, prices: Sequence[Price] = ()) -> dict[str, Any]:
        """Headline figures: requests, tokens, error rate, p95 latency and cost (the cost tab's total), in one query."""
        where, params = self._where("executions", f)
        values = self._prices(prices, params)
        rows = self._rows(
            f"""WITH prices(model_name, prompt_per_1k, completion_per_1k, per_compute_second) AS (VALUES {values}),
                overall AS (
                    SELECT coalesce(avg(CASE WHEN status = 'error' THEN 1.0 ELSE 0.0 END), 0) AS error_rate,
                           quantile_cont(total_ms, 0.95) FILTER (WHERE status = 'ok') AS latency_p95_ms,
                           quantile_cont(ttft_ms, 0.95) FILTER (WHERE status = 'ok') AS ttft_p95_ms
                    FROM executions{where}),
                usage AS (
                    SELECT model_name, count(*) AS requests, coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                           coalesce(sum(completion_tokens), 0) AS completion_tokens,
                           coalesce(sum(total_ms), 0) / 1000.0 AS compute_s
                    FROM executions{where} GROUP BY model_name),
                costs AS (
                    SELECT u.*, {_COST} AS cost
                    FROM usage AS u
                    LEFT JOIN prices AS p ON p.model_name = u.model_name
                    LEFT JOIN (SELECT * FROM prices WHERE model_name = '*') AS d ON true)
                SELECT o.error_rate, o.latency_p95_ms, o.ttft_p95_ms, c.requests, c.prompt_tokens,
                       c.completion_tokens, c.cost
                FROM overall AS o LEFT JOIN costs AS c ON true
                ORDER BY c.cost DESC, c.model_name""", params)
        error_rate, latency, ttft = rows[0][:3]
        per_model = [r[3:] for r in rows if r[3] is not None]
        return {"requests": sum(r[0] for r in per_model), "prompt_tokens": int(sum(r[1] for r in per_model)),
                "completion_tokens": int(sum(r[2] for r in per_model)), "error_rate": float(error_rate),
                "latency_p95_ms": _nan(latency), "ttft_p95_ms": _nan(ttft),
                "cost": float(pd.Series([r[3] for r in per_model], dtype="float64").sum())}  # as the cost tab sums

    def usage_over_time(self, f: Filters, bucket: str | None = None) -> pd.DataFrame:
        """Per time bucket: requests, prompt and completion tokens, errors, blocked and cancelled generations."""
        b = _bucket(bucket or f.bucket())
        where, params = self._where("executions", f)
        return self._df(
            f"""SELECT {b} AS bucket, count(*) AS requests,
                       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                       coalesce(sum(completion_tokens), 0) AS completion_tokens,
                       count(*) FILTER (WHERE status = 'error') AS errors,
                       count(*) FILTER (WHERE status = 'blocked') AS blocked,
                       count(*) FILTER (WHERE status = 'cancelled') AS cancelled
                FROM executions{where} GROUP BY 1 ORDER BY 1""", params)

    def latency_over_time(self, f: Filters, bucket: str | None = None) -> pd.DataFrame:
        """Per time bucket: p50/p95/p99 of total latency and of time to first token (ms), successful runs only."""
        b = _bucket(bucket or f.bucket())
        where, params = self._where("executions", f)
        where = (where + " AND " if where else " WHERE ") + "status = 'ok'"
        return self._df(
            f"""WITH q AS (
                    SELECT {b} AS bucket, count(*) AS requests,
                           quantile_cont(total_ms, [0.5, 0.95, 0.99]) AS lat,
                           quantile_cont(ttft_ms, [0.5, 0.95, 0.99]) AS ttft
                    FROM executions{where} GROUP BY 1)
                SELECT bucket, requests, lat[1] AS latency_p50_ms, lat[2] AS latency_p95_ms, lat[3] AS latency_p99_ms,
                       ttft[1] AS ttft_p50_ms, ttft[2] AS ttft_p95_ms, ttft[3] AS ttft_p99_ms
                FROM q ORDER BY bucket""", params)

    def latency_by_version(self, f: Filters) -> pd.DataFrame:
        """Per template version and model: requests, tokens and latency / TTFT percentiles (ms)."""
        where, params = self._where("executions", f)
        where = (where + " AND " if where else " WHERE ") + "status = 'ok'"
        return self._df(
            f"""WITH q AS (  -- grouped on the stored name (hashing an expression costs); a slug has no '('
                    SELECT template_name, template_version, model_name, count(*) AS requests,
                           avg(prompt_tokens) AS avg_prompt_tokens, avg(completion_tokens) AS avg_completion_tokens,
                           quantile_cont(total_ms, [0.5, 0.95, 0.99]) AS lat,
                           quantile_cont(ttft_ms, [0.5, 0.95, 0.99]) AS ttft
                    FROM executions{where} GROUP BY ALL)
                SELECT coalesce(template_name, '(no template)') AS template_name, template_version, model_name,
                       requests, avg_prompt_tokens, avg_completion_tokens,
                       lat[1] AS latency_p50_ms, lat[2] AS latency_p95_ms, lat[3] AS latency_p99_ms,
                       ttft[1] AS ttft_p50_ms, ttft[2] AS ttft_p95_ms, ttft[3] AS ttft_p99_ms
                FROM q ORDER BY template_name, template_version NULLS FIRST, model_name""", params)

    def version_comparison(self, f: Filters, label: str = "production") -> pd.DataFrame:
        """Consecutive versions of each template that served under `label` (in the order they first did): tokens,
        latency and errors of each, and the change from the version before it."""
        where, params = self._where("executions", f, skip=("version",))
        conds = "label = $label AND template_name IS NOT NULL AND template_version IS NOT NULL"
        where = (where + " AND " if where else " WHERE ") + conds
        params["label"] = label
        return self._df(
            f"""WITH v AS (
                    SELECT template_name, template_version, count(*) AS requests,
                           min(created_at) AS first_seen, max(created_at) AS last_seen,
                           avg(prompt_tokens) AS avg_prompt_tokens, avg(completion_tokens) AS avg_completion_tokens,
                           quantile_cont(total_ms, [0.5, 0.95]) FILTER (WHERE status = 'ok') AS lat,
                           quantile_cont(ttft_ms, 0.5) FILTER (WHERE status = 'ok') AS ttft_p50_ms,
                           avg(CASE WHEN status = 'error' THEN 1.0 ELSE 0.0 END) AS error_rate
                    FROM executions{where} GROUP BY ALL),
                v2 AS (SELECT * EXCLUDE (lat), lat[1] AS latency_p50_ms, lat[2] AS latency_p95_ms FROM v)
                SELECT template_name, template_version,
                       lag(template_version) OVER w AS previous_version, requests, first_seen, last_seen,
                       avg_prompt_tokens, avg_completion_tokens, latency_p50_ms, latency_p95_ms, ttft_p50_ms,
                       error_rate,
                       avg_prompt_tokens / nullif(lag(avg_prompt_tokens) OVER w, 0) - 1 AS prompt_tokens_change,
                       avg_completion_tokens / nullif(lag(avg_completion_tokens) OVER w, 0) - 1
                           AS completion_tokens_change,
                       latency_p50_ms / nullif(lag(latency_p50_ms) OVER w, 0) - 1 AS latency_p50_change,
                       latency_p95_ms / nullif(lag(latency_p95_ms) OVER w, 0) - 1 AS latency_p95_change
                FROM v2 WINDOW w AS (PARTITION BY template_name ORDER BY first_seen, template_version)
                ORDER BY template_name, first_seen, template_version""", params)

    def cost(self, f: Filters, prices: Sequence[Price], by: str = "template") -> pd.DataFrame:
        """Cost totals grouped by template, user, day or model: tokens at the model's price per 1,000, plus
        generation time at its price per compute-second ('*' prices models without their own)."""
        if by not in COST_GROUPS:
            raise AnalyticsError(f"cost can be grouped by {', '.join(COST_GROUPS)}, not {by!r}")
        where, params = self._where("executions", f)
        values = self._prices(prices, params)
        return self._df(
            f"""WITH prices(model_name, prompt_per_1k, completion_per_1k, per_compute_second) AS (VALUES {values}),
                usage AS (
                    SELECT {COST_GROUPS[by]} AS key, model_name, count(*) AS requests,
                           coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
                           coalesce(sum(completion_tokens), 0) AS completion_tokens,
                           coalesce(sum(total_ms), 0) / 1000.0 AS compute_s
                    FROM executions{where} GROUP BY ALL)
                SELECT u.key AS {by}, sum(u.requests) AS requests, sum(u.prompt_tokens) AS prompt_tokens,
                       sum(u.completion_tokens) AS completion_tokens, sum(u.compute_s) AS compute_s,
                       sum({_COST}) AS cost
                FROM usage AS u
                LEFT JOIN prices AS p ON p.model_name = u.model_name
                LEFT JOIN (SELECT * FROM prices WHERE model_name = '*') AS d ON true
                GROUP BY 1 ORDER BY {'1' if by == 'day' else 'cost DESC, 1'}""", params)

    def guardrails_over_time(self, f: Filters, bucket: str | None = None) -> pd.DataFrame:
        """Per time bucket, in long form (bucket, event, count): guardrail hits by action, and conversations halted
        (by an operator or a guardrail; filtered by date and user only)."""
        b = _bucket(bucket or f.bucket())
        gwhere, gparams = self._where("guardrail_events", f)
        iwhere, iparams = self._where("interventions", f)
        iwhere = (iwhere + " AND " if iwhere else " WHERE ") + "action = 'halt'"
        return self._df(
            f"""SELECT {b} AS bucket, 'hit: ' || action AS event, count(*) AS count
                FROM guardrail_events{gwhere} GROUP BY ALL
                UNION ALL
                SELECT {b} AS bucket, 'conversation halted' AS event, count(*) AS count
                FROM interventions{iwhere} GROUP BY ALL
                ORDER BY bucket, event""", gparams | iparams)

    def guardrail_rules(self, f: Filters) -> pd.DataFrame:
        """Hits per guardrail rule and action."""
        where, params = self._where("guardrail_events", f)
        return self._df(f"""SELECT rule_name, action, direction, count(*) AS hits, count(DISTINCT user_id) AS users
                            FROM guardrail_events{where} GROUP BY ALL ORDER BY hits DESC, rule_name""", params)

    def eval_pass_rates(self, f: Filters, bucket: str | None = None) -> pd.DataFrame:
        """Per time bucket and template (version): evaluated items, passed, and the pass rate."""
        b = _bucket(bucket or f.bucket())
        where, params = self._where("eval_results", f)
        return self._df(
            f"""SELECT {b} AS bucket, template_name, template_version, count(*) AS results,
                       count(*) FILTER (WHERE passed) AS passed,
                       avg(CASE WHEN passed THEN 1.0 ELSE 0.0 END) AS pass_rate,
                       avg(score) AS mean_score
                FROM eval_results{where} GROUP BY ALL ORDER BY 1, 2, 3""", params)

    def anomalies(self, f: Filters, *, window_hours: int = 24, threshold: float = 5.0, min_requests: int = 3,
                  min_history: int = 6, min_jump: float = 0.25) -> pd.DataFrame:
        """Token spikes and latency regressions per template and hour, listed with the hour and the jump.

        Each hour's value (mean tokens per request; mean latency of successful runs) is compared with the median of
        the same template's preceding `window_hours` hourly values (hours with at least `min_requests` requests). It
        is flagged when it exceeds that baseline by at least `min_jump` (relative) and by more than `threshold`
        times the larger of: the baseline's robust spread (1.4826 × MAD of those hourly values), the hour's own
        sampling noise (its standard error: a lone slow request among many moves the mean but not the score, and an
        hour with few requests needs a bigger jump), and 5 % of the baseline."""
        if window_hours < 2 or threshold <= 0 or min_requests < 1 or min_history < 1:
            raise AnalyticsError("anomaly settings must be positive (window of at least 2 hours)")
        history_start = f.start - timedelta(days=(window_hours + 23) // 24) if f.start else None
        where, params = self._where("executions", f, start=history_start)
        where = (where + " AND " if where else " WHERE ") + "template_name IS NOT NULL"
        params |= {"min_requests": min_requests, "threshold": threshold, "min_history": min_history,
                   "min_jump": min_jump, "window": window_hours, "from": datetime.combine(f.start, datetime.min.time())
                   if f.start else datetime(1970, 1, 1)}
        tokens, latency = ANOMALY_METRICS
        return self._df(
            f"""WITH hourly AS (
                    SELECT template_name, date_trunc('hour', created_at) AS hour, count(*) AS requests,
                           avg(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)) AS tokens,
                           stddev_samp(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))
                               / sqrt(count(*)) AS tokens_se,
                           avg(total_ms) FILTER (WHERE status = 'ok') AS latency,
                           stddev_samp(total_ms) FILTER (WHERE status = 'ok')
                               / sqrt(count(total_ms) FILTER (WHERE status = 'ok')) AS latency_se
                    FROM executions{where} GROUP BY ALL HAVING count(*) >= $min_requests),
                long AS (UNPIVOT hourly ON (tokens, tokens_se) AS "{tokens}", (latency, latency_se) AS "{latency}"
                         INTO NAME metric VALUE value, se),
                scored AS (
                    SELECT *, median(value) OVER w AS baseline, mad(value) OVER w AS mad, count(value) OVER w AS history
                    FROM long
                    WHERE value IS NOT NULL
                    WINDOW w AS (PARTITION BY template_name, metric ORDER BY hour
                                 ROWS BETWEEN $window PRECEDING AND 1 PRECEDING)),
                judged AS (
                    SELECT *, (value - baseline)
                              / greatest(1.4826 * mad, coalesce(se, 0), 0.05 * abs(baseline), 1e-9) AS score
                    FROM scored WHERE history >= $min_history AND hour >= $from AND value > baseline)
                SELECT template_name, hour, metric, value, baseline, value - baseline AS jump,
                       (value - baseline) / nullif(baseline, 0) AS jump_pct, score, requests, history
                FROM judged
                WHERE score >= $threshold AND (baseline = 0 OR (value - baseline) / abs(baseline) >= $min_jump)
                ORDER BY hour DESC, score DESC""", params)

    def query(self, sql_text: str, *, limit: int = DEFAULT_ROW_LIMIT,
              time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> QueryResult:
        """The SQL box: one read-only SELECT over the exports (see run_sql)."""
        return run_sql(self.exports_dir, sql_text, limit=limit, time_limit_s=time_limit_s)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _bucket(name: str) -> str:
    try:
        return BUCKETS[name]
    except KeyError:
        raise AnalyticsError(f"time bucket must be one of {', '.join(BUCKETS)}, not {name!r}") from None


def default_filters(today: date | None = None, days: int = 30) -> Filters:
    """The last `days` days up to today (UTC)."""
    today = today or datetime.now(timezone.utc).date()
    return Filters(start=today - timedelta(days=days - 1), end=today)

