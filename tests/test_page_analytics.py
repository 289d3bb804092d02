"""AppTest of the Analytics page: automatic and on-demand export, filters, every dashboard tab with its charts and
CSV downloads, prices, and the SQL box (answers and refusals)."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from core import analytics
from tests.conftest import APP_PATH
from tests.test_exports import seed


def open_page() -> AppTest:
    at = AppTest.from_file(APP_PATH, default_timeout=120)
    at.run()
    at.switch_page("pages/analytics.py")
    at.run()
    assert not at.exception, at.exception
    return at


def show_tab(at: AppTest, tab: str) -> None:
    at.session_state["analytics.tab"] = tab
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def downloads(at: AppTest) -> list[str]:
    return [d.proto.label for d in at.get("download_button")]


def charts(at: AppTest) -> list[str]:
    return [c.proto.spec for c in at.get("vega_lite_chart")]


def pg_count(pool, where: str = "true") -> int:
    with pool.connection() as conn:
        return conn.execute(f"SELECT count(*) FROM executions WHERE {where}").fetchone()[0]


def test_overview_exports_stale_data_and_filters(app_env, pool):
    seed(pool, 800)
    analytics.set_price(pool, "*", per_compute_second=0.01)
    at = open_page()
    assert [s.label for s in at.status] == ["Exported 800 new rows"]  # stale: exported before querying
    figures = metrics(at)
    assert figures["Requests"] == "800" and figures["Cost"] != "0.0000"
    assert [t.label for t in at.tabs][:3] == ["Overview", "Latency", "Versions"]
    assert len(charts(at)) == 3 and downloads(at) == ["Download usage.csv"]
    at.selectbox(key="analytics.template").select("summary").run()
    assert metrics(at)["Requests"] == format(pg_count(pool, "template_name = 'summary'"), ",")
    at.selectbox(key="analytics.version").select(2).run()
    assert metrics(at)["Requests"] == format(pg_count(pool, "template_name = 'summary' AND template_version = 2"), ",")
    at.selectbox(key="analytics.template").select("All").run()
    at.selectbox(key="analytics.user").select("bob").run()
    assert metrics(at)["Requests"] == format(pg_count(pool, "user_id = 'bob'"), ",")
    # new rows are exported on demand
    seed(pool, 50, rng_seed=9)
    at.button(key="analytics.export").click().run()
    assert not at.exception
    assert [s.label for s in at.status] == ["Exported 50 new rows"]
    at.selectbox(key="analytics.user").select("All").run()
    assert metrics(at)["Requests"] == "850"


def test_every_dashboard_tab_renders_with_downloads(app_env, pool):
    seed(pool, 600)
    at = open_page()
    show_tab(at, "Latency")
    assert len(charts(at)) == 3 and {"Download latency_over_time.csv", "Download latency_by_version.csv"} <= set(
        downloads(at))
    show_tab(at, "Versions")
    assert downloads(at) == ["Download version_comparison.csv"] and len(charts(at)) == 1
    assert list(at.dataframe[0].value["template_name"].unique()) == ["greeter", "summary", "support"]
    show_tab(at, "Cost")
    assert any("No prices set yet" in i.value for i in at.info)
    assert downloads(at) == ["Download cost_by_template.csv"]
    at.button(key="analytics.prices_save").click().run()
    assert not at.exception and at.success and analytics.list_prices(pool) == []
    show_tab(at, "Guardrails")
    assert any("No guardrail hits" in i.value for i in at.info)
    show_tab(at, "Evaluations")
    assert any("No evaluation results" in i.value for i in at.info)
    show_tab(at, "Anomalies")
    assert at.success or at.warning


def test_sql_box_answers_and_refuses(app_env, pool):
    seed(pool, 300)
    at = open_page()
    show_tab(at, "SQL")
    at.text_area(key="analytics.sql").input("SELECT count(*) AS n FROM executions")
    at.button(key="analytics.sql.run").click().run()
    assert not at.exception and not at.error
    assert at.dataframe[0].value["n"].iloc[0] == 300 and downloads(at) == ["Download query.csv"]
    for query, reason in (("SELECT * FROM read_csv('/etc/passwd')", "refused: only the exports can be read"),
                          ("COPY executions TO 'x.csv'", "refused: COPY statements are not allowed"),
                          ("ATTACH 'x.duckdb'", "refused: ATTACH statements are not allowed"),
                          ("SELECT * FROM '/etc/passwd'", "refused: only the exports can be read"),
                          ("WITH a AS (SELECT * FROM read_text('/etc/passwd')) SELECT * FROM a",
                           "refused: only the exports can be read"),
                          ("SELECT ';'; INSTALL httpfs", "refused: one statement at a time"),
                          ("SELECT count(*) FROM range(100000000) a, range(100000000) b",
                           "stopped: the query ran longer than the 1 s time limit")):
        at.text_area(key="analytics.sql").input(query)
        at.number_input(key="analytics.sql.time_limit").set_value(1)
        at.button(key="analytics.sql.run").click().run()
        assert not at.exception
        assert len(at.error) == 1 and at.error[0].value.startswith(reason), [e.value for e in at.error]
        assert "\n" not in at.error[0].value  # one line
        assert not at.dataframe  # the previous result is gone


def test_empty_ledger_is_explained(app_env):
    at = open_page()
    assert metrics(at)["Requests"] == "0" and metrics(at)["Cost"] == "–"  # no prices: no made-up zero cost
    assert any("No executions in this range" in i.value for i in at.info)


def test_a_running_export_is_not_waited_for(app_env, pool):
    from core import exports

    seed(pool, 100)
    running = exports.export_iter(pool, app_env)
    next(running)  # another export holds the directory
    try:
        seed(pool, 5, rng_seed=4)
        with pool.connection() as conn:  # the last export attempt is long ago: the page wants to export
            conn.execute("UPDATE export_watermarks SET checked_at = now() - interval '1 hour'")
        at = AppTest.from_file(APP_PATH, default_timeout=120)
        at.run()
        at.switch_page("pages/analytics.py")
        at.run()
        assert not at.exception
        assert [s.label for s in at.status] == ["Another export is running: showing the data exported so far"]
    finally:
        list(running)


def test_a_day_of_clean_data_is_drawn_by_hour_without_an_empty_error_chart(app_env, pool):
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    with pool.connection() as conn:
        for hours_ago in (0, 1, 1, 2):
            conn.execute("INSERT INTO executions (created_at, finished_at, status, source, model_name, backend, "
                         "prompt_tokens, completion_tokens, ttft_ms, total_ms) "
                         "VALUES (%s, %s, 'ok', 'api', 'gemma', 'llama_cpp', 10, 4, 5, 50)",
                         (now - timedelta(hours=hours_ago), now - timedelta(hours=hours_ago)))
    at = open_page()
    assert metrics(at)["Requests"] == "4" and not at.error
    assert any("No errors, blocked or cancelled" in s.value for s in at.success)
    assert len(charts(at)) == 2  # requests and tokens; no chart of zeros
    assert "%H:%M" in charts(at)[0]  # drawn by hour although the range picked is 30 days
