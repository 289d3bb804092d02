"""`promptdev export` and `promptdev analytics …`: export the ledger to Parquet, query it with DuckDB, set prices."""

from __future__ import annotations

import argparse
import sys
from datetime import date, datetime, timedelta, timezone
from typing import Any

from core import db
from core.cli._common import fail
from core.config import Settings
from core.text import csv_safe

# core.analytics and core.exports load DuckDB, pandas and pyarrow, which take about a second to import: the commands
# below import them when they run, so that every other promptdev command starts without them.

FORMATS = ("table", "csv", "json")


def register(subparsers: Any) -> None:
    """Add `export` and `analytics` to the promptdev command line."""
    p = subparsers.add_parser("export", help="export the ledger (and conversations, guardrail events, evaluation "
                                             "results) to Parquet under data/exports, incrementally")
    p.add_argument("--table", action="append", dest="tables", metavar="NAME",
                   help="only this table (repeatable); default: all")
    p.add_argument("--full", action="store_true", help="discard the existing export and export everything again")
    p.set_defaults(func=_export)

    a = subparsers.add_parser("analytics", help="query the exports with DuckDB; cost, anomalies, prices")
    sub = a.add_subparsers(dest="analytics_command", required=True, metavar="ACTION")

    q = sub.add_parser("query", help="run one read-only SELECT over the exports (tables: executions, "
                                     "conversation_messages, interventions, guardrail_events, eval_results)")
    q.add_argument("sql", help='e.g. "SELECT model_name, count(*) FROM executions GROUP BY 1"')
    q.add_argument("--limit", type=int, default=1000, help="row limit (default 1000, at most 100,000)")
    q.add_argument("--timeout", type=float, default=30.0, help="time limit in seconds (default 30, at most 120)")
    _common(q)
    q.set_defaults(func=_query)

    s = sub.add_parser("summary", help="requests, tokens, errors, latency and cost over a date range")
    _range(s)
    _common(s)
    s.set_defaults(func=_summary)

    c = sub.add_parser("cost", help="cost totals by template, user, day or model")
    c.add_argument("--by", choices=("template", "user", "day", "model"), default="template")
    _range(c)
    _common(c)
    c.set_defaults(func=_cost)

    n = sub.add_parser("anomalies", help="token spikes and latency regressions per template and hour")
    n.add_argument("--window", type=int, default=24, help="hours of history the baseline uses (default 24)")
    n.add_argument("--threshold", type=float, default=5.0, help="robust deviations that count as a jump (default 5)")
    _range(n)
    _common(n)
    n.set_defaults(func=_anomalies)

    pr = sub.add_parser("prices", help="list the prices per model")
    pr.add_argument("--format", choices=FORMATS, default="table")
    pr.set_defaults(func=_prices)

    sp = sub.add_parser("price", help="set a model's price ('*' for every model without its own), or --delete it")
    sp.add_argument("model")
    sp.add_argument("--prompt-per-1k", type=float, default=0.0, help="price of 1,000 prompt tokens")
    sp.add_argument("--completion-per-1k", type=float, default=0.0, help="price of 1,000 completion tokens")
    sp.add_argument("--per-second", type=float, default=0.0, help="price of one compute-second (local models)")
    sp.add_argument("--delete", action="store_true", help="remove the model's price")
    sp.add_argument("--by", default="", help="who sets it (recorded)")
    sp.set_defaults(func=_price)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--no-export", action="store_true", help="query the exports as they are (no export first)")


def _range(p: argparse.ArgumentParser) -> None:
    p.add_argument("--days", type=int, default=30, help="the last N days up to today, UTC (default 30)")
    p.add_argument("--since", help="first day, YYYY-MM-DD (instead of --days)")
    p.add_argument("--until", help="last day, YYYY-MM-DD (default today)")
    p.add_argument("--template")
    p.add_argument("--version", type=int)
    p.add_argument("--model")
    p.add_argument("--source")
    p.add_argument("--user")


def _day(text: str | None, what: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        fail(f"{what}: not a date: {text!r} (use YYYY-MM-DD)")


def _filters(args: argparse.Namespace):
    from core.analytics import Filters  # DuckDB: see the top

    if args.days < 1:
        fail("--days must be at least 1")
    end = _day(args.until, "--until") or datetime.now(timezone.utc).date()
    start = _day(args.since, "--since") or end - timedelta(days=args.days - 1)
    return Filters(start=start, end=end, template=args.template, version=args.version, model=args.model,
                   source=args.source, user=args.user)


def progress(iterable, total: int | None = None, label: str = "", stream=None):
    """Yield from iterable while drawing a one-line progress bar on stderr (ended by a line break also when the
    iterable fails, so that the error is a line of its own)."""
    stream = stream or sys.stderr
    count = 0
    try:
        for item in iterable:
            yield item
            count += 1
            if total:
                width = 30
                filled = int(width * count / total)
                stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {count}/{total}")
            else:
                stream.write(f"\r{label} {count}")
            stream.flush()
    finally:
        if count:
            stream.write("\n")
            stream.flush()


def _run_export(settings: Settings, tables=None, full: bool = False, quiet: bool = False) -> list:
    from core import exports  # pyarrow: see the top

    pool = db.get_pool(settings)
    names = tables or [s.name for s in exports.TABLES]
    results = []
    iterator = exports.export_iter(pool, settings, tables=tables, full=full)
    if not quiet:
        iterator = progress(iterator, total=len(names), label="export")
    for result in iterator:
        results.append(result)
    return results


def _export(args: argparse.Namespace, settings: Settings) -> int:
    results = _run_export(settings, args.tables, args.full)
    for r in results:
        if r.skipped:
            print(f"{r.table}: skipped ({r.skipped})")
        else:
            waiting = f", {r.pending:,} waiting" if r.pending else ""
            print(f"{r.table}: {r.rows:,} new rows in {r.files} file{'s' if r.files != 1 else ''}{waiting} "
                  f"({r.seconds:.2f} s)")
    print(f"exports: {settings.exports_dir}")
    return 0


def _maybe_export(args: argparse.Namespace, settings: Settings) -> None:
    from core import exports  # pyarrow: see the top

    if getattr(args, "no_export", False):
        return
    try:
        if exports.is_stale(db.get_pool(settings), settings, min_interval_s=0):
            _run_export(settings, quiet=True)
    except exports.ExportError as exc:  # one line, with the way to query the exports as they are
        if isinstance(exc, (exports.ExportBusy, exports.ExportDamaged)):
            raise
        raise type(exc)(f"{exc} (--no-export queries the exports as they are)") from exc


def _print(frame, fmt: str) -> None:
    if fmt == "csv":  # cells a spreadsheet would evaluate as a formula are quoted
        csv_safe(frame).to_csv(sys.stdout, index=False)
    elif fmt == "json":
        print(frame.to_json(orient="records", date_format="iso"))
    elif frame.empty:
        print("(no rows)")
    else:
        import pandas as pd  # see the top

        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
            print(frame.to_string(index=False))


def _query(args: argparse.Namespace, settings: Settings) -> int:
    from core.analytics import run_sql  # DuckDB: see the top

    _maybe_export(args, settings)
    # The query runs in a child process, killed at the time limit: the command ends on time whatever DuckDB does.
    result = run_sql(settings.exports_dir, args.sql, limit=args.limit, time_limit_s=args.timeout)
    _print(result.frame, args.format)
    if result.truncated:
        print(f"(first {result.limit:,} rows; raise --limit for more)", file=sys.stderr)
    return 0


def _summary(args: argparse.Namespace, settings: Settings) -> int:
    import pandas as pd  # see the top

    from core.analytics import Analytics, list_prices  # DuckDB: see the top

    f = _filters(args)
    _maybe_export(args, settings)
    with Analytics(settings.exports_dir) as a:
        figures = a.summary(f, list_prices(db.get_pool(settings)))
    _print(pd.DataFrame([{"from": f.start, "to": f.end, **figures}]), args.format)
    return 0


def _cost(args: argparse.Namespace, settings: Settings) -> int:
    from core.analytics import Analytics, list_prices  # DuckDB: see the top

    f = _filters(args)
    _maybe_export(args, settings)
    with Analytics(settings.exports_dir) as a:
        _print(a.cost(f, list_prices(db.get_pool(settings)), by=args.by), args.format)
    return 0


def _anomalies(args: argparse.Namespace, settings: Settings) -> int:
    from core.analytics import Analytics  # DuckDB: see the top

    f = _filters(args)
    _maybe_export(args, settings)
    with Analytics(settings.exports_dir) as a:
        _print(a.anomalies(f, window_hours=args.window, threshold=args.threshold), args.format)
    return 0


def _prices(args: argparse.Namespace, settings: Settings) -> int:
    import pandas as pd  # see the top

    from core.analytics import Price, list_prices  # DuckDB: see the top

    prices = list_prices(db.get_pool(settings))
    columns = list(Price.__dataclass_fields__)
    _print(pd.DataFrame([p.__dict__ for p in prices], columns=columns), args.format)
    return 0


def _price(args: argparse.Namespace, settings: Settings) -> int:
    from core.analytics import delete_price, set_price  # DuckDB: see the top

    pool = db.get_pool(settings)
    if args.delete:
        delete_price(pool, args.model)
        print(f"price of {args.model} removed")
        return 0
    p = set_price(pool, args.model, prompt_per_1k=args.prompt_per_1k, completion_per_1k=args.completion_per_1k,
                  per_compute_second=args.per_second, updated_by=args.by)
    print(f"price of {p.model_name}: {p.prompt_per_1k:g} per 1k prompt tokens, {p.completion_per_1k:g} per 1k "
          f"completion tokens, {p.per_compute_second:g} per compute-second")
    return 0
