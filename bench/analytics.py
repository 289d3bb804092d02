"""Analytics: Parquet export and DuckDB dashboards on 1,000,000 executions, against the same aggregates in Postgres.

Seeds a scratch database (on the configured PostgreSQL) with COPY, then prints: the full export time (target <= 5 s),
an incremental export of 10,000 new rows, each dashboard query on DuckDB over Parquet and the same question asked of
Postgres (median of several runs; targets: DuckDB <= 100 ms and >= 10x faster), and the first render of the
Analytics page via AppTest (target < 2 s). Run: .venv/bin/python bench/analytics.py [--rows N] [--compression C]
(--compression compares Parquet codecs: the exports' own by default).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core import analytics, db, exports  # noqa: E402
from core.analytics import Analytics, Filters  # noqa: E402
from core.config import PROJECT_ROOT, load_settings  # noqa: E402

BENCH_DB = f"promptdev_bench_analytics_{os.getpid()}"
DAYS = 30
END = datetime(2025, 6, 30, tzinfo=timezone.utc)
REPEAT = 5
COLUMNS = ("created_at", "finished_at", "status", "source", "user_id", "template_name", "template_version", "label",
           "model_name", "backend", "prompt_tokens", "completion_tokens", "ttft_ms", "total_ms")


def synthetic(n: int, seed: int, start: datetime, end: datetime) -> pd.DataFrame:
    """n executions spread over [start, end): 20 templates x 3 versions, 3 models, 200 users, 4 sources."""
    rng = np.random.default_rng(seed)
    span = (end - start).total_seconds()
    created = pd.to_datetime(start.timestamp() + np.sort(rng.uniform(0, span, n)), unit="s", utc=True)
    status = rng.choice(np.array(["ok", "error", "blocked", "cancelled"]), n, p=[0.9, 0.05, 0.03, 0.02])
    ok = status == "ok"
    total = np.where(ok, rng.lognormal(6.5, 0.6, n), np.nan)
    template = rng.integers(0, 20, n)
    frame = pd.DataFrame({
        "created_at": created, "finished_at": created + pd.to_timedelta(np.nan_to_num(total, nan=1.0), unit="ms"),
        "status": status, "source": rng.choice(np.array(["chat", "api", "playground", "evaluation"]), n),
        "user_id": pd.Series(rng.integers(0, 200, n)).map(lambda i: f"user{i:03d}"),
        "template_name": pd.Series(template).map(lambda i: f"template-{i:02d}"),
        "template_version": rng.integers(1, 4, n),
        "label": rng.choice(np.array(["production", "staging", ""]), n, p=[0.7, 0.2, 0.1]),
        "model_name": rng.choice(np.array(["gemma-3-270m", "qwen-small", "remote-big"]), n, p=[0.6, 0.3, 0.1]),
        "backend": "llama_cpp",
        "prompt_tokens": pd.array(rng.integers(20, 2000, n), dtype="Int64"),
        "completion_tokens": pd.array(rng.integers(1, 512, n), dtype="Int64"),
        "ttft_ms": total * 0.15, "total_ms": total,
    })
    frame["label"] = frame["label"].replace("", None)
    frame.loc[status == "blocked", "prompt_tokens"] = pd.NA
    frame.loc[~ok, "completion_tokens"] = pd.NA
    return frame


def copy_frame(conn: psycopg.Connection, frame: pd.DataFrame) -> None:
    """COPY a frame into executions as CSV, in chunks (missing values become NULL)."""
    for lo in range(0, len(frame), 200_000):
        buf = io.StringIO()
        frame.iloc[lo:lo + 200_000].to_csv(buf, index=False, header=False, na_rep="",
                                           date_format="%Y-%m-%d %H:%M:%S.%f%z")
        with conn.cursor().copy(f"COPY executions ({', '.join(COLUMNS)}) FROM STDIN (FORMAT csv)") as copy:
            copy.write(buf.getvalue())


def timed(fn, repeat: int = REPEAT, budget_s: float = 10.0) -> float:
    """Median wall time of fn() over up to `repeat` runs after a warm-up (fewer when a run is slow)."""
    t = time.perf_counter()
    fn()
    warm = time.perf_counter() - t
    if warm >= budget_s:  # slow enough that warming up changes nothing measurable
        return warm
    times = []
    for _ in range(repeat if warm < budget_s / repeat else 1):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


PG_QUERIES = {
    "usage over time": """
        SELECT (created_at AT TIME ZONE 'UTC')::date AS day, count(*), sum(prompt_tokens), sum(completion_tokens),
               count(*) FILTER (WHERE status = 'error'), count(*) FILTER (WHERE status = 'blocked'),
               count(*) FILTER (WHERE status = 'cancelled')
        FROM executions WHERE created_at >= %(start)s AND created_at < %(end)s GROUP BY 1 ORDER BY 1""",
    "latency over time": """
        SELECT (created_at AT TIME ZONE 'UTC')::date AS day, count(*),
               percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY total_ms),
               percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ttft_ms)
        FROM executions WHERE created_at >= %(start)s AND created_at < %(end)s AND status = 'ok'
        GROUP BY 1 ORDER BY 1""",
    "latency by version and model": """
        SELECT template_name, template_version, model_name, count(*), avg(prompt_tokens), avg(completion_tokens),
               percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY total_ms),
               percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ttft_ms)
        FROM executions WHERE created_at >= %(start)s AND created_at < %(end)s AND status = 'ok'
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
    "production version comparison": """
        WITH v AS (
            SELECT template_name, template_version, count(*) AS n, min(created_at) AS first_seen,
                   avg(prompt_tokens) AS p, avg(completion_tokens) AS c,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY total_ms) FILTER (WHERE status = 'ok') AS l50,
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY total_ms) FILTER (WHERE status = 'ok') AS l95
            FROM executions WHERE created_at >= %(start)s AND created_at < %(end)s AND label = 'production'
            GROUP BY 1, 2)
        SELECT *, c / nullif(lag(c) OVER w, 0) - 1, l50 / nullif(lag(l50) OVER w, 0) - 1
        FROM v WINDOW w AS (PARTITION BY template_name ORDER BY first_seen, template_version)""",
    "cost by template": """
        WITH prices(model_name, pp, pc, ps) AS (VALUES ('remote-big', 1.0, 2.0, 0.0), ('*', 0.0, 0.0, 0.0001))
        SELECT e.template_name, count(*), sum(coalesce(e.prompt_tokens, 0) / 1000.0 * coalesce(p.pp, d.pp)
               + coalesce(e.completion_tokens, 0) / 1000.0 * coalesce(p.pc, d.pc)
               + coalesce(e.total_ms, 0) / 1000.0 * coalesce(p.ps, d.ps))
        FROM executions e LEFT JOIN prices p ON p.model_name = e.model_name
        LEFT JOIN prices d ON d.model_name = '*'
        WHERE e.created_at >= %(start)s AND e.created_at < %(end)s GROUP BY 1 ORDER BY 3 DESC""",
    "summary": """
        WITH prices(model_name, pp, pc, ps) AS (VALUES ('remote-big', 1.0, 2.0, 0.0), ('*', 0.0, 0.0, 0.0001)),
        m AS (SELECT model_name, count(*) AS n, sum(prompt_tokens) AS pt, sum(completion_tokens) AS ct,
                     sum(total_ms) AS ms, count(*) FILTER (WHERE status = 'error') AS errors
              FROM executions WHERE created_at >= %(start)s AND created_at < %(end)s GROUP BY 1),
        o AS (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY total_ms) AS l95,
                     percentile_cont(0.95) WITHIN GROUP (ORDER BY ttft_ms) AS t95
              FROM executions WHERE created_at >= %(start)s AND created_at < %(end)s AND status = 'ok')
        SELECT sum(n), sum(pt), sum(ct), sum(errors)::float8 / sum(n), min(o.l95), min(o.t95),
               sum(coalesce(pt, 0) / 1000.0 * coalesce(p.pp, d.pp) + coalesce(ct, 0) / 1000.0 * coalesce(p.pc, d.pc)
                   + coalesce(ms, 0) / 1000.0 * coalesce(p.ps, d.ps))
        FROM m CROSS JOIN o LEFT JOIN prices p ON p.model_name = m.model_name
        LEFT JOIN prices d ON d.model_name = '*'""",
    "anomalies (hourly rolling median + MAD)": """
        WITH hourly AS (
            SELECT template_name, date_trunc('hour', created_at AT TIME ZONE 'UTC') AS hour, count(*) AS n,
                   avg(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)) AS tokens,
                   stddev_samp(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))
                       / sqrt(count(*)) AS tokens_se,
                   avg(total_ms) FILTER (WHERE status = 'ok') AS latency,
                   stddev_samp(total_ms) FILTER (WHERE status = 'ok')
                       / sqrt(count(total_ms) FILTER (WHERE status = 'ok')) AS latency_se
            FROM executions WHERE created_at >= %(start)s AND created_at < %(end)s GROUP BY 1, 2 HAVING count(*) >= 3),
        long AS (SELECT template_name, hour, 'tokens' AS metric, tokens AS v, tokens_se AS se FROM hourly
                 UNION ALL SELECT template_name, hour, 'latency', latency, latency_se FROM hourly),
        base AS (
            SELECT h.*, b.med, b.cnt FROM long h, LATERAL (
                SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY p.v) AS med, count(*) AS cnt FROM (
                    SELECT v FROM long p WHERE p.template_name = h.template_name AND p.metric = h.metric
                      AND p.hour < h.hour ORDER BY p.hour DESC LIMIT 24) p) b),
        scored AS (
            SELECT b.*, m.mad FROM base b, LATERAL (
                SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY abs(p.v - b.med)) AS mad FROM (
                    SELECT v FROM long p WHERE p.template_name = b.template_name AND p.metric = b.metric
                      AND p.hour < b.hour ORDER BY p.hour DESC LIMIT 24) p) m)
        SELECT * FROM scored WHERE cnt >= 6 AND v > med
          AND (v - med) / greatest(1.4826 * mad, coalesce(se, 0), 0.05 * abs(med), 1e-9) >= 5
          AND (v - med) / nullif(abs(med), 0) >= 0.25""",
    "filter options": """
        SELECT (SELECT array_agg(DISTINCT template_name) FROM executions),
               (SELECT array_agg(DISTINCT model_name) FROM executions),
               (SELECT array_agg(DISTINCT source) FROM executions),
               (SELECT array_agg(DISTINCT user_id) FROM executions),
               (SELECT array_agg(DISTINCT (template_name, template_version)::text) FROM executions),
               (SELECT min(created_at) FROM executions), (SELECT max(created_at) FROM executions)""",
}


def duck_queries(board: Analytics, f: Filters, prices):
    return {
        "usage over time": lambda: board.usage_over_time(f, "day"),
        "latency over time": lambda: board.latency_over_time(f, "day"),
        "latency by version and model": lambda: board.latency_by_version(f),
        "production version comparison": lambda: board.version_comparison(f),
        "cost by template": lambda: board.cost(f, prices, by="template"),
        "summary": lambda: board.summary(f, prices),
        "anomalies (hourly rolling median + MAD)": lambda: board.anomalies(f),
        "filter options": lambda: board.filter_options(),
    }


def page_render(database_url: str, data_dir: Path) -> tuple[float, float]:
    """Seconds of the Analytics page's first render in AppTest (and of a rerun), with the exports in place."""
    from streamlit.testing.v1 import AppTest

    os.environ["PROMPTDEV_DATABASE_URL"] = database_url
    os.environ["PROMPTDEV_DATA_DIR"] = str(data_dir)
    page = str(PROJECT_ROOT / "pages" / "analytics.py")
    warm = AppTest.from_file(page, default_timeout=120)  # imports and the pool, as a running app has them
    warm.run()
    at = AppTest.from_file(page, default_timeout=120)
    started = time.perf_counter()
    at.run()
    first = time.perf_counter() - started
    if at.exception or at.error:
        raise SystemExit(f"the page failed: {at.exception or [e.value for e in at.error]}")
    requests = {m.label: m.value for m in at.metric}.get("Requests")
    started = time.perf_counter()
    at.run()
    again = time.perf_counter() - started
    print(f"  page shows {requests} requests")
    return first, again


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--compression", choices=("none", "snappy", "lz4", "zstd"), default=exports.PARQUET_COMPRESSION,
                        help=f"Parquet codec of the export (default: the exports' own, {exports.PARQUET_COMPRESSION})")
    args = parser.parse_args()
    exports.PARQUET_COMPRESSION = args.compression
    print(f"Parquet compression: {args.compression}, page checksums: {exports.PAGE_CHECKSUMS}")
    settings = load_settings()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other work slows every figure)")
    server = db.admin_url(settings)
    db.drop_database(server, BENCH_DB)
    db.create_database(server, BENCH_DB)
    url = db.with_database(server, BENCH_DB)
    work = Path(tempfile.mkdtemp(prefix="promptdev-bench-analytics-"))
    bench_settings = replace(settings, database_url=url, data_dir=work)
    pool = db.get_pool(bench_settings)
    try:
        start = END - timedelta(days=DAYS)
        t = time.perf_counter()
        frame = synthetic(args.rows, 1, start, END - timedelta(hours=1))
        with pool.connection() as conn:
            copy_frame(conn, frame)
        print(f"seeded {args.rows:,} executions with COPY in {time.perf_counter() - t:.1f} s")
        with pool.connection() as conn:  # a settled ledger: hint bits set, statistics current
            conn.execute("VACUUM ANALYZE executions")

        t = time.perf_counter()
        report = exports.export(pool, bench_settings, tables=["executions"])
        full = time.perf_counter() - t
        files = exports.parquet_files(bench_settings.exports_dir, "executions")
        size = sum(p.stat().st_size for p in files)
        print(f"full export: {report.rows:,} rows in {full:.2f} s ({len(files)} files, {size / 1e6:.1f} MB) "
              f"[target <= 5 s: {'ok' if full <= 5 else 'MISSED'}]")

        with pool.connection() as conn:
            copy_frame(conn, synthetic(10_000, 2, END - timedelta(hours=1), END))
        t = time.perf_counter()
        report = exports.export(pool, bench_settings, tables=["executions"])
        print(f"incremental export: {report.rows:,} new rows in {time.perf_counter() - t:.3f} s")
        t = time.perf_counter()
        report = exports.export(pool, bench_settings, tables=["executions"])
        print(f"export with nothing new: {report.rows} rows in {time.perf_counter() - t:.3f} s")

        analytics.set_price(pool, "remote-big", prompt_per_1k=1.0, completion_per_1k=2.0)
        analytics.set_price(pool, "*", per_compute_second=0.0001)
        prices = analytics.list_prices(pool)
        f = Filters(start=start.date(), end=END.date())
        params = {"start": start, "end": END + timedelta(days=1)}
        exports._verdicts.clear()  # as a process that did not write the files (the CLI, a restarted app) finds them
        t = time.perf_counter()
        checked = exports.verify_files(bench_settings.exports_dir)
        print(f"page checksums of {checked} files verified in {(time.perf_counter() - t) * 1000:.0f} ms "
              "(once per file and process; files the process wrote itself are not read again)")
        t = time.perf_counter()
        board = Analytics(bench_settings.exports_dir)
        print(f"DuckDB sandbox with views: {(time.perf_counter() - t) * 1000:.0f} ms")
        print(f"\n{'dashboard query':42} {'DuckDB ms':>10} {'Postgres ms':>12} {'ratio':>7}")
        worst, slowest = float("inf"), 0.0
        with pool.connection() as conn:
            for name, run in duck_queries(board, f, prices).items():
                duck = timed(run)
                pg = timed(lambda q=PG_QUERIES[name]: conn.execute(q, params).fetchall(), repeat=3)
                ratio = pg / duck
                worst, slowest = min(worst, ratio), max(slowest, duck)
                print(f"{name:42} {duck * 1000:10.1f} {pg * 1000:12.1f} {ratio:6.1f}x")
        board.close()
        print(f"slowest DuckDB query {slowest * 1000:.0f} ms [target <= 100 ms: {'ok' if slowest <= 0.1 else 'MISSED'}]"
              f"; smallest ratio {worst:.1f}x [target >= 10x: {'ok' if worst >= 10 else 'MISSED'}]")

        first, again = page_render(url, work)
        print(f"\nAnalytics page, first render with {args.rows + 10_000:,} rows exported: {first:.2f} s "
              f"[target < 2 s: {'ok' if first < 2 else 'MISSED'}]; rerun {again:.2f} s")
    finally:
        db.close_all_pools()
        db.drop_database(server, BENCH_DB)
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
