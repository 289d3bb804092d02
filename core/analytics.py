"""Analytics over the Parquet exports with DuckDB: usage, latency, version comparison, cost, guardrails, evaluation
pass rates, anomalies, and a sandboxed ad-hoc SQL box. Prices per model live in PostgreSQL.

Every DuckDB connection here is confined to the exports directory: external access is disabled except for that
directory (`allowed_directories`), and the configuration is then locked, so no query can read or write any other
file, load an extension or change a setting. Times are UTC.
"""

from __future__ import annotations

import re
import threading
import time
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


def sandbox(exports_dir: Path, *, threads: int = 2, memory_limit: str = "1GB") -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can read only the exports directory, with views named after the exported tables;
    its configuration is locked."""
    root = Path(exports_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"threads": threads, "memory_limit": memory_limit})
    try:
        con.execute("SET temp_directory = ''")  # never spill to disk
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
        raise ExportsUnreadable(f"cannot read the exports in {root}: {_first_line(exc)} "
                                "(`promptdev export --full` rebuilds them)") from None
    except BaseException:
        con.close()
        raise
    return con


def _refusal(kind: str) -> str:
    reason = _REFUSED_KINDS.get(kind, "only SELECT queries can run here")
    if kind == "MULTI":
        return f"refused: this query would run several statements ({reason})"
    return f"refused: {kind} statements are not allowed ({reason}); only SELECT queries over the exports can run"


_PATH_TABLE = re.compile(r"Table with name (\S+) does not exist")


def _outside(exc: duckdb.Error, root: Path) -> str | None:
    """The refusal for `FROM '/some/file'` outside the exports (DuckDB reports it as a missing table)."""
    m = _PATH_TABLE.search(str(exc))
    if m and ("/" in m.group(1) or "://" in m.group(1)):
        return f"refused: only the exports can be read ({m.group(1)!r} is not a file under {root})"
    return None


def run_sql(exports_dir: Path, query: str, *, limit: int = DEFAULT_ROW_LIMIT,
            time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> QueryResult:
    """Run one read-only SELECT over the exports in a fresh sandbox, with a row limit and a time limit; a query that
    is not allowed raises QueryRefused saying why."""
    if not query or not query.strip():
        raise AnalyticsError("enter a SELECT query, e.g. SELECT count(*) FROM executions")
    if limit < 1:
        raise AnalyticsError("the row limit must be at least 1")
    lingering = _Worker.lingering()
    if lingering >= MAX_LINGERING:
        raise QueryBusy(f"refused: {lingering} earlier queries past their time limit are still being cancelled; "
                        "try again in a moment", retry_after=INTERRUPT_GRACE_S)
    con = sandbox(exports_dir)
    worker: _Worker | None = None
    try:
        statements = _statements(con, query)
        if len(statements) != 1:
            raise QueryRefused(f"refused: one statement at a time, got {len(statements)}")
        kind = statements[0].type.name
        if kind != "SELECT":
            raise QueryRefused(_refusal(kind))
        inner = statements[0].query.strip().rstrip(";").strip()
        wrapped = f"SELECT * FROM (\n{inner}\n) AS q LIMIT {int(limit) + 1}"
        check = _statements(con, wrapped)
        if len(check) != 1 or check[0].type.name != "SELECT":
            raise QueryRefused("refused: the query could not be confined to one SELECT")
        started = time.perf_counter()
        stopped = f"stopped: the query ran longer than the {time_limit_s:g} s time limit"
        # The query runs on a worker thread: some operations (one huge list_sort, say) do not check for an
        # interrupt, and the caller must get its answer at the time limit even then.
        worker = _Worker(con, wrapped)
        if not worker.done.wait(time_limit_s):
            con.interrupt()
            if not worker.done.wait(INTERRUPT_GRACE_S):
                raise QueryLimitExceeded(stopped + " (it is being cancelled)")
        try:
            if worker.error is not None:
                raise worker.error
            frame = worker.frame
        except duckdb.InterruptException:
            raise QueryLimitExceeded(stopped) from None
        except duckdb.PermissionException as exc:
            raise QueryRefused(f"refused: only the exports can be read ({_first_line(exc)})") from None
        except duckdb.CatalogException as exc:
            refusal = _outside(exc, Path(exports_dir).resolve())
            if refusal:
                raise QueryRefused(refusal) from None
            raise AnalyticsError(_first_line(exc)) from None
        except duckdb.Error as exc:
            raise AnalyticsError(_first_line(exc)) from None
        except MemoryError:
            raise QueryLimitExceeded("refused: the result does not fit in memory; select fewer columns or "
                                     "rows") from None
        except Exception as exc:  # e.g. a value pandas cannot hold
            raise AnalyticsError(f"the result cannot be shown: {_first_line(exc)}") from None
        seconds = time.perf_counter() - started
        size = int(frame.memory_usage(deep=True).sum())
        if size > MAX_RESULT_BYTES:
            raise QueryLimitExceeded(f"refused: the result is too large to show ({size / 2**20:,.0f} MB, at most "
                                     f"{MAX_RESULT_BYTES >> 20} MB); select fewer columns or rows, or aggregate")
    finally:
        if worker is None or worker.done.is_set():
            con.close()
        else:  # still running (past the time limit, or the caller was interrupted): close it once it stops
            con.interrupt()
            worker.close_when_done()
    truncated = len(frame) > limit
    return QueryResult(frame.iloc[:limit], truncated, seconds, limit)


INTERRUPT_GRACE_S = 1.0  # how long an interrupted query may take to stop before the caller stops waiting


MAX_LINGERING = 2  # queries abandoned at their time limit that may still run before new ones are refused


class _Worker:
    """One query on its own thread: its DataFrame or its error once `done` is set."""

    _abandoned: set["_Worker"] = set()
    _registry_lock = threading.Lock()

    @classmethod
    def lingering(cls) -> int:
        """How many abandoned queries are still running."""
        with cls._registry_lock:
            return len(cls._abandoned)

    def __init__(self, con: duckdb.DuckDBPyConnection, query: str) -> None:
        self.con, self.frame, self.error = con, None, None
        self.done = threading.Event()
        self._close = False
        self._lock = threading.Lock()
        threading.Thread(target=self._run, args=(query,), name="analytics-sql", daemon=True).start()

    def _run(self, query: str) -> None:
        try:
            self.frame = self.con.execute(query).df()
        except BaseException as exc:  # handed to the caller
            self.error = exc
        finally:
            with self._lock:
                self.done.set()
                if self._close:
                    self.frame = None
                    self.con.close()
                    with _Worker._registry_lock:
                        _Worker._abandoned.discard(self)

    def close_when_done(self) -> None:
        """Close the connection now if the query has stopped, else as soon as it does."""
        with self._lock:
            if self.done.is_set():
                self.con.close()
            else:
                self._close = True
                with _Worker._registry_lock:
                    _Worker._abandoned.add(self)


def _statements(con: duckdb.DuckDBPyConnection, query: str) -> list[Any]:
    try:
        return con.extract_statements(query)
    except duckdb.Error as exc:
        raise AnalyticsError(_first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
            raise AnalyticsError(f"analytics query failed: {_first_line(exc)}") from None

    def _rows(self, query: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        try:
            try:
                return self.con.execute(query, dict(params or {})).fetchall()
            except duckdb.IOException:  # as in _df
                return self.con.execute(query, dict(params or {})).fetchall()
        except duckdb.Error as exc:
            raise AnalyticsError(f"analytics query failed: {_first_line(exc)}") from None

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

