"""DuckDB analytics over the exports: dashboards against the same aggregates in Postgres, filters, version
comparison, cost, guardrails, evaluation pass rates, anomalies on planted spikes, prices, and the SQL sandbox."""

from __future__ import annotations

import math
import random
import re
import threading
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from core import analytics, exports
from core.analytics import Analytics, AnalyticsError, Filters, QueryRefused
from tests.test_exports import seed

UTC = timezone.utc
T0 = datetime(2025, 3, 1, tzinfo=UTC)
COLS = ("created_at", "status", "source", "user_id", "template_name", "template_version", "label", "model_name",
        "backend", "prompt_tokens", "completion_tokens", "ttft_ms", "total_ms")


def row(at: datetime, *, template="greeter", version=1, label="production", model="gemma", status="ok", user="ann",
        source="chat", prompt=100, completion=50, total=500.0, ttft=50.0) -> tuple:
    return (at, status, source, user, template, version, label, model, "llama_cpp", prompt,
            completion if status == "ok" else None, ttft if status == "ok" else None,
            total if status == "ok" else None)


def copy_rows(pool, rows: list[tuple]) -> None:
    with pool.connection() as conn:
        with conn.cursor().copy(f"COPY executions ({', '.join(COLS)}) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)


@pytest.fixture
def seeded(pool, settings):
    """3,000 mixed executions over four days, exported; yields an Analytics over them."""
    seed(pool, 3000)
    exports.export(pool, settings)
    with Analytics(settings.exports_dir) as a:
        yield a


def pg(pool, query: str, params=()):
    with pool.connection() as conn:
        return conn.execute(query, params).fetchall()


def test_usage_and_latency_equal_postgres(pool, seeded):
    f = Filters(start=date(2025, 3, 1), end=date(2025, 3, 31))
    usage = seeded.usage_over_time(f, "day")
    expect = pg(pool, """SELECT (created_at AT TIME ZONE 'UTC')::date, count(*), coalesce(sum(prompt_tokens), 0),
                                coalesce(sum(completion_tokens), 0), count(*) FILTER (WHERE status = 'error')
                         FROM executions GROUP BY 1 ORDER BY 1""")
    got = [(b.date(), r, p, c, e) for b, r, p, c, e in
           usage[["bucket", "requests", "prompt_tokens", "completion_tokens", "errors"]].itertuples(index=False)]
    assert got == [tuple(x) for x in expect] and len(got) >= 4
    latency = seeded.latency_over_time(f, "day")
    pg_lat = pg(pool, """SELECT (created_at AT TIME ZONE 'UTC')::date,
                                percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY total_ms),
                                percentile_cont(0.5) WITHIN GROUP (ORDER BY ttft_ms)
                         FROM executions WHERE status = 'ok' GROUP BY 1 ORDER BY 1""")
    for (day, lat, ttft50), r in zip(pg_lat, latency.itertuples(index=False)):
        assert r.bucket.date() == day
        assert [r.latency_p50_ms, r.latency_p95_ms, r.latency_p99_ms] == pytest.approx(lat, rel=1e-9)
        assert r.ttft_p50_ms == pytest.approx(ttft50, rel=1e-9)
    hourly = seeded.usage_over_time(Filters(start=date(2025, 3, 2), end=date(2025, 3, 2)))
    assert len(hourly) == 24 and hourly["requests"].sum() == usage.iloc[1]["requests"]  # a one-day range: hours


def test_filters_restrict_like_a_where_clause(pool, seeded):
    cases = [(Filters(template="summary"), "template_name = 'summary'"),
             (Filters(template="summary", version=2), "template_name = 'summary' AND template_version = 2"),
             (Filters(model="remote-big"), "model_name = 'remote-big'"),
             (Filters(source="api", user="bob"), "source = 'api' AND user_id = 'bob'"),
             (Filters(start=date(2025, 3, 2), end=date(2025, 3, 3)),
              "(created_at AT TIME ZONE 'UTC')::date BETWEEN '2025-03-02' AND '2025-03-03'")]
    for f, where in cases:
        got = seeded.usage_over_time(f, "day")["requests"].sum()
        assert got == pg(pool, f"SELECT count(*) FROM executions WHERE {where}")[0][0] > 0
    by_version = seeded.latency_by_version(Filters(model="gemma-3-270m"))
    expect = pg(pool, """SELECT template_name, template_version, count(*) FROM executions
                         WHERE status = 'ok' AND model_name = 'gemma-3-270m' GROUP BY 1, 2 ORDER BY 1, 2""")
    assert [tuple(x) for x in by_version[["template_name", "template_version", "requests"]].itertuples(index=False)] \
        == [tuple(x) for x in expect]
    assert (by_version["latency_p95_ms"] >= by_version["latency_p50_ms"]).all()
    with pytest.raises(AnalyticsError, match="reversed"):
        Filters(start=date(2025, 3, 5), end=date(2025, 3, 1))


def test_consecutive_production_versions_are_compared(pool, settings):
    rows = []
    for i in range(60):
        at = T0 + timedelta(minutes=10 * i)
        rows.append(row(at, version=1, completion=100, total=400.0))
        rows.append(row(at + timedelta(days=1), version=2, completion=200, total=800.0))
        rows.append(row(at + timedelta(days=2), version=3, completion=150, total=600.0))
        rows.append(row(at, version=9, label="staging", completion=999))  # not production: left out
    copy_rows(pool, rows)
    exports.export(pool, settings)
    with Analytics(settings.exports_dir) as a:
        cmp = a.version_comparison(Filters())
    assert list(cmp["template_version"]) == [1, 2, 3]
    assert list(cmp["previous_version"].fillna(0).astype(int)) == [0, 1, 2]
    assert cmp["completion_tokens_change"].iloc[1] == pytest.approx(1.0)
    assert cmp["completion_tokens_change"].iloc[2] == pytest.approx(-0.25)
    assert cmp["latency_p50_change"].iloc[1] == pytest.approx(1.0)
    assert list(cmp["requests"]) == [60, 60, 60]


def test_cost_uses_prices_per_model_and_the_default(pool, seeded):
    analytics.set_price(pool, "remote-big", prompt_per_1k=1.5, completion_per_1k=2.0, updated_by="ops")
    analytics.set_price(pool, "*", per_compute_second=0.25)
    prices = analytics.list_prices(pool)
    assert [p.model_name for p in prices] == ["*", "remote-big"]
    by_template = seeded.cost(Filters(), prices, by="template")
    expect = dict(pg(pool, """SELECT template_name,
                                     sum(CASE WHEN model_name = 'remote-big'
                                              THEN coalesce(prompt_tokens, 0) / 1000.0 * 1.5
                                                   + coalesce(completion_tokens, 0) / 1000.0 * 2.0
                                              ELSE coalesce(total_ms, 0) / 1000.0 * 0.25 END)::float8
                              FROM executions GROUP BY 1"""))
    assert dict(zip(by_template["template"], by_template["cost"])) == pytest.approx(expect, rel=1e-9)
    by_user = seeded.cost(Filters(), prices, by="user")
    by_day = seeded.cost(Filters(), prices, by="day")
    assert by_user["cost"].sum() == pytest.approx(sum(expect.values())) == pytest.approx(by_day["cost"].sum())
    assert "(anonymous)" in set(by_user["user"])
    assert seeded.summary(Filters(), prices)["cost"] == pytest.approx(sum(expect.values()))
    with pytest.raises(AnalyticsError, match="grouped by"):
        seeded.cost(Filters(), prices, by="colour")


class _CountingConnection:
    """A DuckDB connection that counts the statements run on it."""

    def __init__(self, con) -> None:
        self.con, self.statements = con, 0

    def execute(self, *args):
        self.statements += 1
        return self.con.execute(*args)

    def __getattr__(self, name):
        return getattr(self.con, name)


def test_summary_equals_postgres_in_one_query(pool, seeded):
    analytics.set_price(pool, "remote-big", prompt_per_1k=1.5, completion_per_1k=2.0)
    analytics.set_price(pool, "*", per_compute_second=0.25)
    prices = analytics.list_prices(pool)
    seeded.con = counting = _CountingConnection(seeded.con)
    for f, where in [(Filters(), "true"), (Filters(template="summary", model="remote-big"),
                                            "template_name = 'summary' AND model_name = 'remote-big'"),
                     (Filters(start=date(2025, 3, 2), end=date(2025, 3, 2)),
                      "(created_at AT TIME ZONE 'UTC')::date = '2025-03-02'")]:
        before = counting.statements
        got = seeded.summary(f, prices)
        assert counting.statements - before == 1  # cost folded into the same query
        expect = pg(pool, f"""SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),
                                     avg(CASE WHEN status = 'error' THEN 1.0 ELSE 0.0 END)::float8,
                                     percentile_cont(0.95) WITHIN GROUP (ORDER BY total_ms) FILTER (WHERE ok),
                                     percentile_cont(0.95) WITHIN GROUP (ORDER BY ttft_ms) FILTER (WHERE ok),
                                     sum(CASE WHEN model_name = 'remote-big'
                                              THEN coalesce(prompt_tokens, 0) / 1000.0 * 1.5
                                                   + coalesce(completion_tokens, 0) / 1000.0 * 2.0
                                              ELSE coalesce(total_ms, 0) / 1000.0 * 0.25 END)::float8
                              FROM executions, LATERAL (SELECT status = 'ok' AS ok) AS s WHERE {where}""")[0]
        requests, prompt, completion, error_rate, p95, ttft95, cost = expect
        counts = (got["requests"], got["prompt_tokens"], got["completion_tokens"])
        assert counts == (requests, prompt, completion) and requests > 0
        assert all(type(got[k]) is int for k in ("requests", "prompt_tokens", "completion_tokens"))
        assert got["error_rate"] == pytest.approx(error_rate, rel=1e-12)
        assert (got["latency_p95_ms"], got["ttft_p95_ms"]) == pytest.approx((p95, ttft95), rel=1e-12)
        assert got["cost"] == pytest.approx(cost, rel=1e-9)
        assert got["cost"] == pytest.approx(float(seeded.cost(f, prices, by="model")["cost"].sum()), rel=1e-12)
    nothing = seeded.summary(Filters(template="no-such-template"), prices)
    assert {k: v for k, v in nothing.items() if not k.endswith("p95_ms")} == {
        "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "error_rate": 0.0, "cost": 0.0}
    assert math.isnan(nothing["latency_p95_ms"]) and math.isnan(nothing["ttft_p95_ms"])
    assert seeded.summary(Filters())["cost"] == 0.0  # no prices: nothing costs anything


def test_latency_by_version_labels_runs_without_a_template(pool, settings):
    copy_rows(pool, [row(T0 + timedelta(minutes=i), template=None, version=None, total=100.0 + i) for i in range(5)]
              + [row(T0 + timedelta(minutes=i), template="aaa", total=200.0) for i in range(3)])
    exports.export(pool, settings)
    with Analytics(settings.exports_dir) as a:
        by_version = a.latency_by_version(Filters())
    assert list(by_version["template_name"]) == ["(no template)", "aaa"]
    assert list(by_version["requests"]) == [5, 3]
    assert list(by_version["latency_p50_ms"]) == [102.0, 200.0]


def test_prices_are_validated_and_replaced_atomically(pool):
    analytics.set_price(pool, "a", prompt_per_1k=1)
    with pytest.raises(AnalyticsError, match="zero or more"):
        analytics.set_price(pool, "b", completion_per_1k=-1)
    with pytest.raises(AnalyticsError, match="must be a number"):
        analytics.replace_prices(pool, [{"model_name": "a", "prompt_per_1k": "cheap"}])
    with pytest.raises(AnalyticsError, match="more than one price"):
        analytics.replace_prices(pool, [{"model_name": "x"}, {"model_name": "x"}])
    with pytest.raises(AnalyticsError, match="needs a model name"):
        analytics.replace_prices(pool, [{"model_name": "x"}, {"model_name": " "}])
    assert [(p.model_name, p.prompt_per_1k) for p in analytics.list_prices(pool)] == [("a", 1.0)]  # untouched
    got = analytics.replace_prices(pool, [{"model_name": "b", "per_compute_second": 0.5}, {"model_name": "*"}],
                                   updated_by="ops")
    assert [(p.model_name, p.per_compute_second, p.updated_by) for p in got] == [("*", 0.0, "ops"), ("b", 0.5, "ops")]
    analytics.delete_price(pool, "b")
    with pytest.raises(LookupError, match="no price set"):
        analytics.delete_price(pool, "b")


def test_guardrail_hits_halts_and_eval_pass_rates(pool, settings):
    from tests.test_exports import test_conversations_guardrails_and_evaluation_results_are_exported as populate

    populate(pool, settings)  # one input hit (flag), one halt, two evaluation results (one passed)
    with Analytics(settings.exports_dir) as a:
        events = a.guardrails_over_time(Filters(), "day")
        assert sorted(zip(events["event"], events["count"])) == [("conversation halted", 1), ("hit: flag", 1)]
        assert a.guardrails_over_time(Filters(user="bob"), "day").empty
        assert list(a.guardrail_rules(Filters())["rule_name"]) == ["no-pii"]
        rates = a.eval_pass_rates(Filters(), "day")
        assert list(rates["template_name"]) == ["greeter"] and rates["results"].iloc[0] == 2
        assert rates["pass_rate"].iloc[0] == pytest.approx(0.5)
        assert a.eval_pass_rates(Filters(template="other"), "day").empty
        assert a.counts()["eval_results"] == 2


def test_anomalies_flag_planted_spikes_only(pool, settings):
    rng = random.Random(7)
    rows = []
    for hour in range(72):
        for template in ("greeter", "summary"):
            for k in range(5):
                at = T0 + timedelta(hours=hour, minutes=10 * k)
                completion = rng.randint(45, 55)
                total = rng.uniform(480, 520)
                if template == "greeter" and hour == 40:
                    completion = 400  # a token spike
                if template == "summary" and hour == 60:
                    total = 2000.0  # a latency regression
                rows.append(row(at, template=template, completion=completion, total=total))
    rows.append(row(T0 + timedelta(hours=80), template="greeter", completion=5000))  # a lone request: too few
    copy_rows(pool, rows)
    exports.export(pool, settings)
    with Analytics(settings.exports_dir) as a:
        found = a.anomalies(Filters())
        assert [(r.template_name, r.hour, r.metric) for r in found.itertuples()] == [
            ("summary", datetime(2025, 3, 3, 12), "mean latency (ms)"),
            ("greeter", datetime(2025, 3, 2, 16), "tokens per request")]
        spike = found.iloc[1]
        assert spike["value"] == pytest.approx(500) and spike["baseline"] == pytest.approx(150, abs=6)
        assert spike["jump"] == pytest.approx(spike["value"] - spike["baseline"]) and spike["jump_pct"] > 2
        # a date range that starts after the spike's history still sees the hours before it
        late = a.anomalies(Filters(start=date(2025, 3, 3), end=date(2025, 3, 3)))
        assert list(late["template_name"]) == ["summary"]
        with pytest.raises(AnalyticsError, match="positive"):
            a.anomalies(Filters(), window_hours=1)


def test_empty_exports_give_empty_dashboards(settings):
    with Analytics(settings.exports_dir) as a:
        assert a.usage_over_time(Filters()).empty and a.anomalies(Filters()).empty
        assert a.summary(Filters())["requests"] == 0
        assert a.filter_options()["template"] == []
        assert a.query("SELECT count(*) AS n FROM executions").frame["n"].iloc[0] == 0


def test_sql_box_reads_the_exports(seeded):
    result = seeded.query("SELECT status, count(*) AS n FROM executions GROUP BY status ORDER BY n DESC;")
    assert not result.truncated and result.frame["n"].sum() == 3000
    capped = seeded.query("SELECT id FROM executions", limit=10)
    assert capped.truncated and len(capped.frame) == 10
    files = exports.parquet_files(seeded.exports_dir, "executions")
    direct = seeded.query(f"SELECT count(*) AS n FROM read_parquet('{files[0]}')")
    assert direct.frame["n"].iloc[0] > 0
    cte = seeded.query("WITH t AS (SELECT * FROM executions) SELECT count(*) AS n FROM t -- trailing comment")
    assert cte.frame["n"].iloc[0] == 3000


@pytest.mark.parametrize("query, reason", [
    ("SELECT * FROM read_csv('/etc/passwd')", "only the exports can be read"),
    ("SELECT * FROM read_text('/etc/hostname')", "only the exports can be read"),
    ("SELECT * FROM glob('/*')", "only the exports can be read"),
    ("COPY (SELECT * FROM executions) TO '{exports}/stolen.csv'", "COPY statements are not allowed"),
    ("COPY executions TO '/tmp/stolen.parquet'", "COPY statements are not allowed"),
    ("ATTACH '{exports}/x.duckdb' AS x", "ATTACH statements are not allowed"),
    ("ATTACH '/tmp/x.duckdb'", "ATTACH statements are not allowed"),
    ("INSTALL httpfs", "not allowed"),
    ("SET enable_external_access = true", "not allowed"),
    ("CREATE TABLE t AS SELECT 1", "not allowed"),
    ("SELECT 1; SELECT 2", "one statement at a time"),
    ("SELECT * FROM read_parquet('{exports}/../../../../etc/passwd')", "only the exports can be read"),
])
def test_sql_box_refuses_with_a_reason(seeded, query, reason):
    exports_dir = str(Path(seeded.exports_dir).resolve())
    with pytest.raises(QueryRefused, match=reason):
        seeded.query(query.format(exports=exports_dir))
    assert not (Path(exports_dir) / "stolen.csv").exists() and not Path("/tmp/stolen.parquet").exists()


def test_sql_box_time_limit_and_errors(seeded):
    with pytest.raises(QueryRefused, match="time limit"):
        seeded.query("SELECT count(*) FROM range(1000000000000) AS a(x) WHERE x % 7 = 3", time_limit_s=0.5)
    with pytest.raises(AnalyticsError, match="syntax error"):
        seeded.query("SELEC 1")
    with pytest.raises(AnalyticsError, match="nope"):
        seeded.query("SELECT * FROM nope")
    with pytest.raises(AnalyticsError, match="enter a SELECT"):
        seeded.query("   ")
    assert seeded.query("SELECT 1 AS one").frame["one"].iloc[0] == 1  # still usable afterwards


def test_analytics_commands(app_env, pool, capsys):
    from core.cli import main

    seed(pool, 200, start=datetime.now(UTC) - timedelta(hours=30), span_hours=24)
    assert main(["analytics", "query", "SELECT count(*) AS n FROM executions", "--format", "csv"]) == 0  # exports first
    assert capsys.readouterr().out.split() == ["n", "200"]
    assert main(["analytics", "query", "SELECT id FROM executions", "--limit", "3", "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert out.count('"id"') == 3 and "first 3 rows" in err
    assert main(["analytics", "query", "SELECT * FROM read_csv('/etc/passwd')"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("promptdev: refused: only the exports can be read") and err.count("\n") == 1
    assert main(["analytics", "price", "gemma-3-270m", "--per-second", "0.002", "--by", "ops"]) == 0
    assert main(["analytics", "prices", "--format", "csv"]) == 0
    assert "gemma-3-270m,0.0,0.0,0.002,ops" in capsys.readouterr().out
    assert main(["analytics", "cost", "--by", "model", "--format", "csv"]) == 0
    assert "compute_s" in capsys.readouterr().out
    assert main(["analytics", "summary", "--days", "7"]) == 0
    assert "requests" in capsys.readouterr().out
    assert main(["analytics", "anomalies", "--since", "2025-01-01"]) == 0
    assert main(["analytics", "summary", "--since", "March"]) == 1
    assert "--since: not a date: 'March'" in capsys.readouterr().err
    assert main(["analytics", "price", "x", "--prompt-per-1k", "-1"]) == 1
    assert "zero or more" in capsys.readouterr().err


def test_unreadable_exports_are_one_clear_error(pool, settings):
    seed(pool, 20)
    exports.export(pool, settings)
    damaged = exports.parquet_files(settings.exports_dir, "executions")[0]
    damaged.write_bytes(b"not parquet at all")
    name = damaged.relative_to(settings.exports_dir)
    with pytest.raises(AnalyticsError, match=rf"^cannot read the exports: the export file {re.escape(str(name))} is "
                                             r"damaged \(.*\); rebuild the exports with `promptdev export --full`$"):
        Analytics(settings.exports_dir)
    exports.export(pool, settings, full=True)
    with Analytics(settings.exports_dir) as a:
        assert a.summary(Filters())["requests"] == 20


def tiny_exports(root: Path) -> Path:
    """An exports directory with three executions written straight to Parquet (the sandbox needs no Postgres)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    day = exports.table_dir(root, "executions") / "day=2025-03-01"
    day.mkdir(parents=True)
    schema = exports.EXECUTIONS.schema
    cols = {f.name: pa.array([None] * 3, f.type) for f in schema}
    cols["id"] = pa.array([1, 2, 3], pa.int64())
    cols["created_at"] = pa.array([datetime(2025, 3, 1, 1)] * 3, pa.timestamp("us"))
    cols["status"] = pa.array(["ok", "ok", "error"])
    pq.write_table(pa.table(cols, schema=schema), day / "part-test.parquet")
    return root


@pytest.fixture
def sandboxed(tmp_path):
    """A tiny exports directory, a secret outside it, and symlinks inside it that point outside."""
    root = tiny_exports(tmp_path / "exports")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("secret\nSECRET\n")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "secret.csv").symlink_to(outside / "secret.csv")
    (root / "passwd.csv").symlink_to("/etc/passwd")
    (tmp_path / "exports2").mkdir()  # a sibling whose name starts like the exports directory
    (tmp_path / "exports2" / "s.csv").write_text("a\nSIBLING\n")
    return root


REFUSED = [  # (query, what the one-line refusal says)
    ("SELECT * FROM read_blob('/etc/hostname')", "only the exports can be read"),
    ("SELECT * FROM read_parquet('/etc/passwd')", "only the exports can be read"),
    ("select * from READ_CSV_AUTO('/etc/passwd')", "only the exports can be read"),
    ("SELECT * FROM read_json('/etc/passwd')", "only the exports can be read"),
    ("SELECT * FROM sniff_csv('/etc/passwd')", "only the exports can be read"),
    ("SELECT * FROM read_text('/proc/self/environ')", "only the exports can be read"),
    ("SELECT * FROM '/etc/passwd'", "only the exports can be read"),
    ("FROM 'file:///etc/passwd'", "only the exports can be read"),
    ("SELECT * FROM read_text('file:///etc/passwd')", "only the exports can be read"),
    ("SELECT * FROM read_csv('http://127.0.0.1:9/x.csv')", "only the exports can be read"),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "only the exports can be read"),
    ("SELECT * FROM read_csv('{root}/secret.csv')", "only the exports can be read"),  # symlink to a file outside
    ("SELECT * FROM read_csv('{root}/passwd.csv')", "only the exports can be read"),
    ("SELECT * FROM read_csv('{root}/linked/secret.csv')", "only the exports can be read"),  # symlinked directory
    ("SELECT * FROM read_csv('{root}/executions/../../outside/secret.csv')", "only the exports can be read"),
    ("SELECT * FROM read_csv('{root}2/s.csv')", "only the exports can be read"),
    ("SELECT * FROM read_text('../../etc/passwd')", "only the exports can be read"),
    ("WITH a AS (SELECT * FROM read_text('/etc/passwd')) SELECT * FROM a", "only the exports can be read"),
    ("SELECT (SELECT content FROM read_text('/etc/passwd')) AS c", "only the exports can be read"),
    ("SELECT * FROM executions WHERE id IN (SELECT size FROM read_blob('/etc/passwd'))", "only the exports can be read"),
    ("SELECT * FROM query('SELECT * FROM read_text(''/etc/passwd'')')", "only the exports can be read"),
    ("SELECT * FROM duckdb_extensions()", "only the exports can be read"),
    ("EXPORT DATABASE '{root}/dump'", "EXPORT statements are not allowed"),
    ("/* hi */ cOpY (select 1) TO '{root}/x.csv'", "COPY statements are not allowed"),
    ("  \n-- c\ncopy executions from '/etc/passwd'", "COPY statements are not allowed"),
    ("LOAD httpfs", "extensions cannot be installed or loaded"),
    ("FORCE INSTALL httpfs FROM 'http://127.0.0.1:9'", "extensions cannot be installed or loaded"),
    ("RESET enable_external_access", "settings are locked"),
    ("SET GLOBAL allowed_directories = ['/']", "settings are locked"),
    ("PRAGMA enable_profiling", "settings are locked"),
    ("CALL pragma_version()", "only queries can run here"),
    ("CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 'v')", "read-only"),
    ("CREATE OR REPLACE VIEW executions AS SELECT 1", "read-only"),
    ("DETACH memory", "read-only"),
    ("SELECT ';' AS a; COPY (SELECT 1) TO '{root}/y.csv'", "one statement at a time"),
    # breaking out of the wrapping subquery does not parse, so nothing runs
    ("SELECT 1) AS q; COPY (SELECT 1) TO '{root}/z.csv'; SELECT * FROM (SELECT 1", "syntax error"),
    ("PIVOT executions ON status USING count(*)", "PIVOT must list its values"),
]


def test_sandbox_caches_parquet_footers_and_reads_without_prefetching(sandboxed):
    con = analytics.sandbox(sandboxed)
    try:
        settings = dict(con.execute("SELECT name, value FROM duckdb_settings() WHERE name IN "
                                    "('parquet_metadata_cache', 'disable_parquet_prefetching', 'lock_configuration')"
                                    ).fetchall())
        assert settings == {"parquet_metadata_cache": "true", "disable_parquet_prefetching": "true",
                            "lock_configuration": "true"}
        assert con.execute("SELECT count(*) FROM executions").fetchone()[0] > 0
    finally:
        con.close()


@pytest.mark.parametrize("query, reason", REFUSED)
def test_sql_box_refuses_escapes_in_one_line(sandboxed, query, reason):
    with pytest.raises(AnalyticsError) as caught:
        analytics.run_sql(sandboxed, query.format(root=sandboxed), time_limit_s=5)
    message = str(caught.value)
    assert reason in message and "\n" not in message
    assert isinstance(caught.value, QueryRefused) == (reason != "syntax error")
    assert not any((sandboxed / n).exists() for n in ("dump", "x.csv", "y.csv", "z.csv"))


def test_sql_box_allows_reads_inside_the_exports(sandboxed):
    assert analytics.run_sql(sandboxed, "SELECT count(*) AS n FROM executions").frame["n"].iloc[0] == 3
    pivot = analytics.run_sql(sandboxed, "PIVOT executions ON status IN ('ok', 'error') USING count(*) GROUP BY day")
    assert pivot.frame[["ok", "error"]].iloc[0].tolist() == [2, 1]
    listed = analytics.run_sql(sandboxed, f"SELECT file FROM glob('{sandboxed}/**/*.parquet')").frame["file"]
    assert [Path(p).name for p in listed] == ["part-test.parquet"]
    assert analytics.run_sql(sandboxed, "SELECT ';' AS a -- ; COPY").frame["a"].iloc[0] == ";"


def warm(root: Path) -> None:
    """Start the SQL box's forkserver (once per process, not counted in any time limit) before timing a query."""
    assert analytics.run_sql(root, "SELECT 1 AS one").frame["one"].iloc[0] == 1


def test_sql_box_answers_at_the_time_limit_even_when_duckdb_cannot_be_interrupted(sandboxed):
    warm(sandboxed)
    started = time.perf_counter()
    with pytest.raises(QueryRefused, match=r"^stopped: the query ran longer than the 0.5 s time limit$"):
        analytics.run_sql(sandboxed, "SELECT list_sort(range(20000000))[1] AS x", time_limit_s=0.5)
    assert time.perf_counter() - started < 0.5 + 1.5
    started = time.perf_counter()
    with pytest.raises(QueryRefused, match="time limit"):  # a cross join that would run for ever
        analytics.run_sql(sandboxed, "SELECT count(*) FROM range(100000000) a, range(100000000) b", time_limit_s=0.5)
    assert time.perf_counter() - started < 0.5 + 1.5
    assert analytics.run_sql(sandboxed, "SELECT 1 AS one").frame["one"].iloc[0] == 1


def test_sql_box_limits_are_capped(sandboxed):
    with pytest.raises(AnalyticsError, match=rf"^the time limit must be more than 0 and at most "
                                             rf"{analytics.MAX_TIME_LIMIT_S:g} s, not 3600$"):
        analytics.run_sql(sandboxed, "SELECT 1", time_limit_s=3600)
    with pytest.raises(AnalyticsError, match="time limit"):
        analytics.run_sql(sandboxed, "SELECT 1", time_limit_s=0)
    with pytest.raises(AnalyticsError, match=r"^the row limit must be between 1 and 100,000, not 1,000,000$"):
        analytics.run_sql(sandboxed, "SELECT 1", limit=1_000_000)
    assert len(analytics.run_sql(sandboxed, "SELECT range AS n FROM range(200000)",
                                 limit=analytics.MAX_ROW_LIMIT).frame) == analytics.MAX_ROW_LIMIT


def test_sql_box_refuses_a_result_too_large_to_show(sandboxed, monkeypatch):
    monkeypatch.setattr(analytics, "MAX_RESULT_BYTES", 1 << 20)
    with pytest.raises(QueryRefused, match=r"^refused: the result is too large to show \(\d+ MB or more, at most 1 "
                                           r"MB\)"):
        analytics.run_sql(sandboxed, "SELECT repeat('x', 100000) AS s FROM range(50)")
    assert len(analytics.run_sql(sandboxed, "SELECT repeat('x', 100) AS s FROM range(50)").frame) == 50


def test_sql_box_refuses_queries_beyond_the_concurrency_cap(sandboxed):
    slow = "SELECT count(*) FROM range(100000000) a, range(100000000) b"
    threads = [threading.Thread(target=lambda: pytest.raises(QueryRefused, analytics.run_sql, sandboxed, slow,
                                                             time_limit_s=4)) for _ in range(
        analytics.MAX_CONCURRENT_QUERIES)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # they are running
    with pytest.raises(analytics.QueryBusy, match=rf"^refused: {analytics.MAX_CONCURRENT_QUERIES} queries are "
                                                  r"running already; try again in a moment$"):
        analytics.run_sql(sandboxed, "SELECT 1")
    for t in threads:
        t.join(30)
    assert analytics.run_sql(sandboxed, "SELECT 1 AS one").frame["one"].iloc[0] == 1


def test_cli_query_over_its_time_limit_exits_at_once_with_one_line(app_env):
    import os
    import subprocess
    import sys
    import time as _time

    promptdev = Path(sys.executable).with_name("promptdev")
    started = _time.monotonic()
    done = subprocess.run([str(promptdev), "analytics", "query", "SELECT list_sort(range(20000000))[1] AS x",
                           "--timeout", "0.5", "--no-export"], capture_output=True, text=True, env=os.environ.copy(),
                          timeout=120)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if not line.startswith("WARNING")]
    assert lines == ["promptdev: stopped: the query ran longer than the 0.5 s time limit"]
    assert _time.monotonic() - started < 30


# ------------------------------------------------------------------------------------------- damaged export files

def corrupt_middle(path: Path) -> None:
    """Overwrite 32 bytes in the middle of the file's largest column chunk (page data, past its header), as a bad
    sector or a stray write would."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    chunks = [meta.row_group(r).column(c) for r in range(meta.num_row_groups) for c in range(meta.num_columns)]
    big = max(chunks, key=lambda c: c.total_compressed_size)
    at = (big.dictionary_page_offset or big.data_page_offset) + big.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    for i in range(at, at + 32):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_damaged_export_file_is_one_clear_error_naming_it(pool, app_env, monkeypatch, capsys):
    from core.cli import main

    settings = app_env
    root = Path(settings.exports_dir)
    seed(pool, 3000)
    exports.export(pool, settings)
    with Analytics(root) as a:
        requests = a.summary(Filters())["requests"]
    known = dict(exports._verdicts)
    assert len(known) >= len(exports.parquet_files(root, "executions"))
    with Analytics(root):  # every file checked once: the verdicts are remembered, not redone
        assert exports._verdicts == known
    target = max(exports.parquet_files(root, "executions"), key=lambda p: p.stat().st_size)
    corrupt_middle(target)
    expected = (rf"^cannot read the exports: the export file {re.escape(str(target.relative_to(root)))} is damaged "
                r"\(a page checksum does not match\); rebuild the exports with `promptdev export --full`$")
    with pytest.raises(analytics.ExportsUnreadable, match=expected):
        Analytics(root)
    with pytest.raises(analytics.ExportsUnreadable, match=expected):
        analytics.run_sql(root, "SELECT count(*) FROM executions")
    assert main(["analytics", "query", "SELECT count(*) AS n FROM executions", "--no-export"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(expected.replace("^", "^promptdev: "), err.strip())
    # Compaction reads the file verified: the damage is refused, never rewritten with fresh checksums.
    monkeypatch.setattr(exports, "COMPACT_AT", 2)
    day = datetime.strptime(target.parent.name, "day=%Y-%m-%d").replace(hour=12, tzinfo=UTC)
    seed(pool, 5, start=day, span_hours=1, rng_seed=7)
    with pytest.raises(exports.ExportDamaged, match=re.escape(str(target.relative_to(root)))):
        exports.export(pool, settings)
    monkeypatch.undo()
    exports.export(pool, settings, full=True)  # what the message says to do
    with Analytics(root) as a:
        assert a.summary(Filters())["requests"] == requests + 5


def test_files_are_written_with_page_checksums(pool, settings):
    seed(pool, 500)
    exports.export(pool, settings)
    path = exports.parquet_files(settings.exports_dir, "executions")[0]
    corrupt_middle(path)
    with pytest.raises(exports.ExportDamaged, match=r"a page checksum does not match"):
        exports.verify_file(Path(settings.exports_dir), path)


# ------------------------------------------------------------------------------------------------ hostile queries

HOSTILE = [  # (query, row limit): each must end within its time limit, in bounded memory, without a stall
    ("SELECT repeat('x', 100000000) AS s FROM range(80)", 1000),  # one 100 MB value, 80 rows
    ("SELECT repeat('x', 100000000 + range::INT) AS s FROM range(80)", 1000),  # 80 distinct 100 MB values
    ("SELECT repeat('x', 2000000000) AS s", 1000),  # one huge value
    ("SELECT range AS n, 'row ' || range AS s FROM range(1000000000)", 100_000),  # many rows
    ("SELECT " + ", ".join(f"repeat('w', 10000) || range AS c{i}" for i in range(200)) + " FROM range(1000)",
     1000),  # wide rows: 2 MB each
    ("SELECT length(string_agg('x' || range, ',')) AS n FROM range(300000000)", 1000),
    ("SELECT count(*) FROM range(100000000) a, range(100000000) b", 1000),  # cross join
    ("SELECT list(range) AS l FROM range(1000000000)", 1000),  # one huge list
    ("SELECT 'v' || range AS s, range AS n FROM range(1000000)", 100_000),  # many small strings, up to the limit
]
HOSTILE_TIME_LIMIT_S = 5.0


class Watch:
    """Samples this process's RSS, its descendants' (the query's child) and the longest gap between the ticks of a
    thread that wants to run every 10 ms."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.base = self.me.memory_info().rss
        self.peak, self.child_peak, self.stall = self.base, 0, 0.0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._tick), threading.Thread(target=self._sample)]
        for t in self.threads:
            t.start()

    def _tick(self) -> None:
        last = time.perf_counter()
        while not self.stop.is_set():
            time.sleep(0.01)
            now = time.perf_counter()
            self.stall = max(self.stall, now - last - 0.01)
            last = now

    def _sample(self) -> None:
        import psutil

        while not self.stop.is_set():
            self.peak = max(self.peak, self.me.memory_info().rss)
            for child in self.me.children(recursive=True):
                try:
                    self.child_peak = max(self.child_peak, child.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.02)

    def done(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


@pytest.mark.parametrize("query, limit", HOSTILE)
def test_hostile_queries_stay_bounded(sandboxed, query, limit):
    warm(sandboxed)
    watch = Watch()
    started = time.perf_counter()
    try:
        result = analytics.run_sql(sandboxed, query, limit=limit, time_limit_s=HOSTILE_TIME_LIMIT_S)
        outcome = f"{len(result.frame):,} rows"
    except AnalyticsError as exc:
        outcome = str(exc)
        assert "\n" not in outcome and isinstance(exc, QueryRefused), outcome
    finally:
        took = time.perf_counter() - started
        watch.done()
    growth = (watch.peak - watch.base) >> 20
    print(f"\n{query[:70]}: {outcome[:90]} in {took:.2f} s; RSS growth {growth} MB, child peak "
          f"{watch.child_peak >> 20} MB, longest stall {watch.stall * 1000:.0f} ms")
    assert took < HOSTILE_TIME_LIMIT_S + 1.5
    assert growth < 500
    assert watch.child_peak < (analytics.CHILD_MEMORY_BYTES >> 20) * 2**20 + (600 << 20)
    assert watch.stall < 0.5


# ---------------------------------------------------------------------------------------- no paths in messages

def test_messages_name_tables_not_server_paths(sandboxed, tmp_path):
    root = sandboxed.resolve()
    leaky = [  # each makes DuckDB print the path of an export file
        f"SELECT error('at ' || file) FROM glob('{root}/executions/**/*.parquet')",
        f"SELECT CAST(file AS INT) FROM glob('{root}/executions/*/*.parquet')",
        f"SELECT CAST(filename AS DATE) FROM read_parquet('{root}/*/*/*.parquet', filename = true)",
    ]
    for query in leaky:
        with pytest.raises(AnalyticsError) as caught:
            analytics.run_sql(root, query)
        message = str(caught.value)
        assert "executions" in message and "day=2025-03-01" not in message and "part-test" not in message, message
        assert "\n" not in message
    with pytest.raises(QueryRefused) as caught:
        analytics.run_sql(root, "SELECT * FROM read_text('../../etc/passwd')")
    assert str(Path.cwd()) not in str(caught.value) and str(root) not in str(caught.value)
    with pytest.raises(QueryRefused) as caught:
        analytics.run_sql(root, "SELECT * FROM '/etc/passwd'")
    assert str(root) not in str(caught.value)
    # A dashboard over a file swapped after the sandbox opened: the table, not the file, is named.
    with Analytics(root) as a:
        exports.parquet_files(root, "executions")[0].write_bytes(b"PAR1 not really")
        with pytest.raises(AnalyticsError) as caught:
            a.summary(Filters())
    assert str(root) not in str(caught.value) and "executions" in str(caught.value)


def test_an_exports_path_that_cannot_be_a_directory_is_one_line(tmp_path, app_env, monkeypatch, capsys):
    from core.cli import main

    (tmp_path / "a-file").write_text("not a directory")
    under_a_file = tmp_path / "a-file" / "exports"
    with pytest.raises(analytics.ExportsUnreadable, match=rf"^cannot use the exports directory "
                                                          rf"{re.escape(str(under_a_file))}: Not a directory$"):
        Analytics(under_a_file)
    with pytest.raises(analytics.ExportsUnreadable, match="Not a directory"):
        analytics.run_sql(under_a_file, "SELECT 1")
    monkeypatch.setenv("PROMPTDEV_DATA_DIR", str(tmp_path / "a-file"))
    assert main(["analytics", "query", "SELECT 1 AS one", "--no-export"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"promptdev: cannot use the exports directory {tmp_path / 'a-file' / 'exports'}: ")
