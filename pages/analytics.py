"""Analytics: what the service costs, how fast it is, which prompt versions changed that, and when something went
wrong — DuckDB over the Parquet exports of the ledger, drawn with Altair. Every chart's data downloads as CSV."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import altair as alt
import pandas as pd
import streamlit as st

from core import analytics, exports
from core.analytics import Analytics, Filters
from core.text import frame_to_csv
from pages import glue, widgets
from pages.widgets import code_span, md

ALL = "All"
TABS = ("Overview", "Latency", "Versions", "Cost", "Guardrails", "Evaluations", "Anomalies", "SQL")

# Session-state keys.
KEY_TAB = "analytics.tab"
KEY_DATES = "analytics.dates"
KEY_TEMPLATE = "analytics.template"
KEY_VERSION = "analytics.version"
KEY_MODEL = "analytics.model"
KEY_SOURCE = "analytics.source"
KEY_USER = "analytics.user"
KEY_EXPORT = "analytics.export"
KEY_LAST_EXPORT = "analytics.last_export"  # a one-line summary of the last export this session ran
KEY_SQL = "analytics.sql"
KEY_SQL_RESULT = "analytics.sql_result"
KEY_PRICES = "analytics.prices_editor"


def utc(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """Mark naive UTC timestamps as UTC, so charts place them right whatever the browser's time zone."""
    frame = frame.copy()
    for column in columns:
        if column in frame and not frame.empty:
            frame[column] = pd.to_datetime(frame[column]).dt.tz_localize("UTC")
    return frame


AXIS_FORMATS = {"hour": "%b %d %H:%M", "day": "%b %d", "week": "%b %d"}


def count_axis(field: str, title: str, **kwargs) -> alt.Y:
    """A y axis of whole counts (no 0.000000 ticks when every count is zero or small)."""
    return alt.Y(field, title=title, axis=alt.Axis(format=",d", tickMinStep=1), **kwargs)


def time_axis(column: str = "bucket", title: str = "Time (UTC)", bucket: str = "hour") -> alt.X:
    """An x axis of UTC timestamps."""
    return alt.X(f"{column}:T", title=title, scale=alt.Scale(type="utc"),
                 axis=alt.Axis(format=AXIS_FORMATS.get(bucket, "%b %d %H:%M"), labelAngle=0))


def nothing(frame: pd.DataFrame, message: str) -> bool:
    """True, after saying `message`, when a frame has no rows."""
    if frame.empty:
        st.info(message)
    return frame.empty


def download(frame: pd.DataFrame, name: str) -> None:
    """A button that downloads the data behind a chart or table as CSV (cells a spreadsheet would evaluate as a
    formula are quoted)."""
    st.download_button(f"Download {name}.csv", frame_to_csv(frame), file_name=f"{name}.csv",
                       mime="text/csv", key=f"analytics.download.{name}")


def run_export(pool, settings, *, reason: str, wait: bool = True) -> None:
    """Export new rows to Parquet, showing progress table by table."""
    with st.status(reason, expanded=False) as box:
        bar = st.progress(0.0)
        done = []
        names = [s.name for s in exports.TABLES]
        try:
            for i, result in enumerate(exports.export_iter(pool, settings, wait=wait), start=1):
                done.append(result)
                bar.progress(i / len(names), text=f"{result.table}: {result.rows:,} new rows")
        except exports.ExportBusy:
            box.update(label="Another export is running: showing the data exported so far", state="complete")
            return
        rows = sum(r.rows for r in done)
        box.update(label=f"Exported {rows:,} new rows", state="complete")
    st.session_state[KEY_LAST_EXPORT] = f"{rows:,} new rows at {datetime.now().strftime('%H:%M:%S')}"


def choose(label: str, options: list, key: str, column) -> object:
    """A selectbox with an 'All' choice; returns None for All (and forgets a choice no longer offered)."""
    choices = [ALL, *options]
    if st.session_state.get(key) not in choices:
        st.session_state.pop(key, None)
    value = column.selectbox(label, choices, key=key)
    return None if value == ALL else value


def overview_tab(board: Analytics, f: Filters, bucket: str) -> None:
    """Requests, tokens, error rate, latency and cost, and their course over time."""
    prices = analytics.list_prices(pool)
    s = board.summary(f, prices)
    m1, m2, m3, m4, m5 = st.columns(5)
    m1.metric("Requests", f"{int(s['requests']):,}")
    m2.metric("Tokens", f"{int(s['prompt_tokens'] + s['completion_tokens']):,}",
              help=f"{int(s['prompt_tokens']):,} prompt + {int(s['completion_tokens']):,} completion")
    m3.metric("Error rate", f"{s['error_rate']:.1%}")
    m4.metric("Latency p95", f"{s['latency_p95_ms']:,.0f} ms" if pd.notna(s["latency_p95_ms"]) else "–")
    if prices:
        m5.metric("Cost", f"{s['cost']:,.4f}", help="At the prices set in the Cost tab")
    else:
        m5.metric("Cost", "–", help="No prices set yet: add them in the Cost tab")
    usage = board.usage_over_time(f, bucket)
    if nothing(usage, "No executions in this range. Widen the dates or clear the filters."):
        return
    data = utc(usage, "bucket")
    left, right = st.columns(2)
    with left:
        st.subheader("Requests")
        st.altair_chart(alt.Chart(data).mark_line(point=True).encode(
            time_axis(bucket=bucket), count_axis("requests:Q", "Generations"),
            tooltip=["bucket:T", "requests:Q"]), width="stretch")
    with right:
        st.subheader("Errors, blocked, cancelled")
        if not data[["errors", "blocked", "cancelled"]].to_numpy().any():
            st.success("No errors, blocked or cancelled generations in this range.")
        else:
            outcomes = data.melt("bucket", ["errors", "blocked", "cancelled"], var_name="outcome",
                                 value_name="count")
            st.altair_chart(alt.Chart(outcomes).mark_bar().encode(
                time_axis(bucket=bucket), count_axis("count:Q", "Generations", stack=True),
                alt.Color("outcome:N", title=None, scale=alt.Scale(
                    domain=["errors", "blocked", "cancelled"], range=["#d62728", "#ff7f0e", "#9e9e9e"])),
                tooltip=["bucket:T", "outcome:N", "count:Q"]), width="stretch")
    tokens = data.rename(columns={"prompt_tokens": "prompt", "completion_tokens": "completion"}).melt(
        "bucket", ["prompt", "completion"], var_name="kind", value_name="tokens")
    st.subheader("Tokens")
    st.altair_chart(alt.Chart(tokens).mark_area(opacity=0.8).encode(
        time_axis(bucket=bucket), alt.Y("tokens:Q", stack=True, title="Tokens"),
        alt.Color("kind:N", title=None), tooltip=["bucket:T", "kind:N", "tokens:Q"]), width="stretch")
    download(usage, "usage")


def latency_tab(board: Analytics, f: Filters, bucket: str) -> None:
    """Latency and time to first token percentiles over time, and by template version and model."""
    lat = board.latency_over_time(f, bucket)
    if nothing(lat, "No successful generations in this range."):
        return
    data = utc(lat, "bucket")
    for prefix, title in (("latency", "Latency (ms)"), ("ttft", "Time to first token (ms)")):
        cols = [f"{prefix}_p50_ms", f"{prefix}_p95_ms", f"{prefix}_p99_ms"]
        long = data.melt("bucket", cols, var_name="percentile", value_name="ms")
        long["percentile"] = long["percentile"].str.extract(r"_(p\d+)_")[0]
        st.subheader(title)
        st.altair_chart(alt.Chart(long).mark_line(point=True).encode(
            time_axis(bucket=bucket), alt.Y("ms:Q", title="ms"), alt.Color("percentile:N", title=None),
            tooltip=["bucket:T", "percentile:N", alt.Tooltip("ms:Q", format=",.0f")]),
            width="stretch")
    download(lat, "latency_over_time")
    by_version = board.latency_by_version(f)
    st.subheader("By template version and model")
    by_version["version"] = by_version["template_name"] + " v" + \
        by_version["template_version"].astype("Int64").astype(str).replace("<NA>", "–")
    st.altair_chart(alt.Chart(by_version).mark_bar().encode(
        alt.X("latency_p95_ms:Q", title="p95 latency (ms)"), alt.Y("version:N", title=None),
        alt.Color("model_name:N", title="Model"), alt.YOffset("model_name:N"),
        tooltip=["version", "model_name", "requests", alt.Tooltip("latency_p50_ms", format=",.0f"),
                 alt.Tooltip("latency_p95_ms", format=",.0f"),
                 alt.Tooltip("ttft_p95_ms", format=",.0f")]), width="stretch")
    st.dataframe(by_version.drop(columns="version"), hide_index=True, width="stretch")
    download(by_version, "latency_by_version")


def versions_tab(board: Analytics, f: Filters) -> None:
    """The versions that served under a label, in order, and what each changed."""
    label = st.text_input("Label", value="production", key="analytics.versions.label",
                          help="Compare the versions that served under this label, in the order they did")
    cmp = board.version_comparison(f, label=label.strip() or "production")
    if nothing(cmp, md("No executions under the label {!r} in this range.", label)):
        return
    single = sorted(n for n, c in cmp.groupby("template_name")["template_version"].count().items()
                    if c == 1)
    if single:
        st.caption(md("Only one version served under {!r} in this range for {}: nothing to compare it with yet.",
                      label, ", ".join(single)))
    cmp["version"] = "v" + cmp["template_version"].astype(str)
    measures = {"avg_prompt_tokens": "prompt tokens (mean)",
                "avg_completion_tokens": "completion tokens (mean)",
                "latency_p50_ms": "latency p50 (ms)", "latency_p95_ms": "latency p95 (ms)"}
    long = cmp.melt(["template_name", "version", "first_seen"], list(measures),
                    var_name="measure", value_name="value")
    long["measure"] = long["measure"].map(measures)
    st.altair_chart(alt.Chart(long).mark_bar().encode(
        alt.X("version:N", sort=alt.SortField("first_seen"), title=None),
        alt.Y("value:Q", title=None), alt.Color("version:N", legend=None),
        alt.Column("measure:N", title=None, sort=list(measures.values())),
        alt.Row("template_name:N", title=None),
        tooltip=["template_name", "version", "measure", alt.Tooltip("value:Q", format=",.1f")],
    ).resolve_scale(y="independent").properties(width=140, height=160))
    changes = cmp[["template_name", "template_version", "previous_version", "requests",
                   "avg_prompt_tokens", "avg_completion_tokens", "latency_p50_ms", "latency_p95_ms",
                   "error_rate", "prompt_tokens_change", "completion_tokens_change",
                   "latency_p50_change", "latency_p95_change"]]
    formats = {c: st.column_config.NumberColumn(format="percent") for c in changes.columns
               if c.endswith("_change") or c == "error_rate"}
    formats |= {c: st.column_config.NumberColumn(format="%.1f") for c in
                ("avg_prompt_tokens", "avg_completion_tokens", "latency_p50_ms", "latency_p95_ms")}
    st.dataframe(changes, hide_index=True, width="stretch", column_config=formats)
    download(cmp.drop(columns="version"), "version_comparison")


def cost_tab(board: Analytics, f: Filters, model_names: list[str]) -> None:
    """Cost by template, user, day or model at the prices set here, and the prices."""
    prices = analytics.list_prices(pool)
    by = st.segmented_control("Totals by", ["template", "user", "day", "model"], default="template",
                              key="analytics.cost.by") or "template"
    cost = board.cost(f, prices, by=by)
    if not prices:
        st.info("No prices set yet: add them below (per 1,000 tokens, or per compute-second for local "
                "models).")
    if cost.empty:
        st.info("No executions in this range.")
    else:
        if not cost["cost"].any():
            chart = None
        elif by == "day":
            chart = alt.Chart(utc(cost, "day")).mark_bar().encode(
                time_axis("day", "Day (UTC)", "day"), alt.Y("cost:Q", title="Cost"),
                tooltip=["day:T", alt.Tooltip("cost:Q", format=",.4f"), "requests:Q"])
        else:
            chart = alt.Chart(cost.head(30)).mark_bar().encode(
                alt.X("cost:Q", title="Cost"), alt.Y(f"{by}:N", sort="-x", title=None),
                tooltip=[f"{by}:N", alt.Tooltip("cost:Q", format=",.4f"), "requests:Q",
                         "prompt_tokens:Q", "completion_tokens:Q", alt.Tooltip("compute_s:Q", format=",.1f")])
        if chart is not None:
            st.altair_chart(chart, width="stretch")
        st.dataframe(cost, hide_index=True, width="stretch")
        download(cost, f"cost_by_{by}")
    st.subheader("Prices")
    st.caption("Per 1,000 prompt / completion tokens, plus per compute-second of generation (for local "
               "models). The model `*` prices every model without a row of its own.")
    table = pd.DataFrame([{"model_name": p.model_name, "prompt_per_1k": p.prompt_per_1k,
                           "completion_per_1k": p.completion_per_1k,
                           "per_compute_second": p.per_compute_second} for p in prices],
                         columns=["model_name", "prompt_per_1k", "completion_per_1k", "per_compute_second"])
    edited = st.data_editor(table, num_rows="dynamic", hide_index=True, key=KEY_PRICES, column_config={
        "model_name": st.column_config.SelectboxColumn(
            "Model", options=sorted({"*", *model_names, *table["model_name"]}), required=True),
        "prompt_per_1k": st.column_config.NumberColumn("Prompt / 1k", min_value=0.0, format="%.6f"),
        "completion_per_1k": st.column_config.NumberColumn("Completion / 1k", min_value=0.0,
                                                           format="%.6f"),
        "per_compute_second": st.column_config.NumberColumn("Per compute-second", min_value=0.0,
                                                            format="%.6f")})
    if st.button("Save prices", key="analytics.prices_save"):
        rows = edited.astype(object).where(edited.notna(), None).to_dict("records")
        analytics.replace_prices(pool, rows, updated_by=glue.current_user())
        st.success(f"Saved {len(rows)} price{'s' if len(rows) != 1 else ''}.")


def guardrails_tab(board: Analytics, f: Filters, bucket: str) -> None:
    """Guardrail hits and halts over time, and by rule."""
    events = board.guardrails_over_time(f, bucket)
    if nothing(events, "No guardrail hits or halts in this range."):
        return
    st.altair_chart(alt.Chart(utc(events, "bucket")).mark_bar().encode(
        time_axis(bucket=bucket), count_axis("count:Q", "Events", stack=True), alt.Color("event:N", title=None),
        tooltip=["bucket:T", "event:N", "count:Q"]), width="stretch")
    st.caption("Halts are filtered by date and user only (an operator's halt has no template).")
    download(events, "guardrail_events")
    rules = board.guardrail_rules(f)
    st.dataframe(rules, hide_index=True, width="stretch")
    download(rules, "guardrail_rules")


def evaluations_tab(board: Analytics, f: Filters, bucket: str) -> None:
    """Evaluation pass rates over time, by template version."""
    rates = board.eval_pass_rates(f, bucket)
    if nothing(rates, "No evaluation results in this range."):
        return
    data = utc(rates, "bucket")
    data["version"] = data["template_name"] + " v" + data["template_version"].astype(str)
    st.altair_chart(alt.Chart(data).mark_line(point=True).encode(
        time_axis(bucket=bucket), alt.Y("pass_rate:Q", title="Pass rate", axis=alt.Axis(format="%"),
                           scale=alt.Scale(domain=[0, 1])),
        alt.Color("version:N", title=None),
        tooltip=["bucket:T", "version:N", alt.Tooltip("pass_rate:Q", format=".1%"), "results:Q"]),
        width="stretch")
    download(rates, "evaluation_pass_rates")


def anomalies_tab(board: Analytics, f: Filters) -> None:
    """Token spikes and latency regressions against each template's rolling median."""
    a1, a2 = st.columns(2)
    window = a1.number_input("Baseline window (hours)", 2, 24 * 14, 24, key="analytics.anomaly.window")
    threshold = a2.number_input("Threshold (robust deviations)", 1.0, 50.0, 5.0, step=0.5,
                                key="analytics.anomaly.threshold")
    found = board.anomalies(f, window_hours=int(window), threshold=float(threshold))
    if found.empty:
        st.success("No token spikes or latency regressions in this range.")
        return
    st.warning(f"{len(found)} anomalous hour{'s' if len(found) != 1 else ''} "
               "(value far above the template's rolling median).")
    st.altair_chart(alt.Chart(utc(found, "hour")).mark_circle(size=120).encode(
        time_axis("hour", "Hour (UTC)"), alt.Y("jump_pct:Q", title="Jump over baseline",
                                               axis=alt.Axis(format="%")),
        alt.Color("template_name:N", title="Template"), alt.Shape("metric:N", title=None),
        tooltip=["template_name", "metric", "hour:T", alt.Tooltip("value:Q", format=",.1f"),
                 alt.Tooltip("baseline:Q", format=",.1f"), alt.Tooltip("jump_pct:Q", format="+.0%"),
                 alt.Tooltip("score:Q", format=".1f")]), width="stretch")
    st.dataframe(found, hide_index=True, width="stretch", column_config={
        "jump_pct": st.column_config.NumberColumn("jump", format="percent")})
    download(found, "anomalies")


def sql_tab(board: Analytics) -> None:
    """One read-only SELECT over the exports."""
    st.caption("One read-only SELECT over the exports: views `executions`, `conversation_messages`, "
               "`interventions`, `guardrail_events`, `eval_results` (each with a `day` column). Files "
               "outside the exports cannot be read; results stop at the row limit and queries at the time "
               "limit.")
    sql_text = st.text_area("SQL", key=KEY_SQL, height=140,
                            placeholder="SELECT model_name, count(*) AS n FROM executions GROUP BY 1")
    q1, q2, q3 = st.columns([1, 1, 3], vertical_alignment="bottom")
    limit = q1.number_input("Row limit", 1, 100_000, 1000, key="analytics.sql.limit")
    time_limit = q2.number_input("Time limit (s)", 1, int(analytics.MAX_TIME_LIMIT_S), 10,
                                 key="analytics.sql.time_limit")
    if q3.button("Run", key="analytics.sql.run", type="primary"):
        st.session_state.pop(KEY_SQL_RESULT, None)
        with glue.reported():
            st.session_state[KEY_SQL_RESULT] = board.query(sql_text, limit=int(limit),
                                                           time_limit_s=float(time_limit))
    result = st.session_state.get(KEY_SQL_RESULT)
    if result is not None:
        st.caption(f"{len(result.frame):,} rows in {result.seconds * 1000:,.0f} ms"
                   + (f" — stopped at the row limit of {result.limit:,}" if result.truncated else ""))
        st.dataframe(result.frame, hide_index=True, width="stretch")
        download(result.frame, "query")


# --------------------------------------------------------------------------------------------------------------

settings = glue.settings()
pool = glue.pool()

st.title("Analytics")
st.caption("Usage, latency, cost, guardrails and evaluations from the Parquet exports of the ledger "
           "(DuckDB; times in UTC). New rows are exported automatically when the data is stale.")

head, button = st.columns([4, 1])
statuses = exports.status(pool, settings)
with glue.reported():
    if button.button("Export now", key=KEY_EXPORT, help="Export rows new since the last export to Parquet"):
        run_export(pool, settings, reason="Exporting new rows…")
        statuses = exports.status(pool, settings)
    elif exports.is_stale(pool, settings, statuses=statuses):
        run_export(pool, settings, reason="The exports are stale: exporting new rows…", wait=False)
        statuses = exports.status(pool, settings)
status = {s.table: s for s in statuses}
ex = status["executions"]
head.caption(f"{ex.rows_exported:,} executions exported"
             + (f" · last export {ex.exported_at:%Y-%m-%d %H:%M:%S %Z}" if ex.exported_at else "")
             + (f" · {ex.pending:,} waiting to be final" if ex.pending else "")
             + (f" · this session: {st.session_state[KEY_LAST_EXPORT]}" if KEY_LAST_EXPORT in st.session_state else "")
             + f" · {code_span(settings.exports_dir)}")

with glue.reported(stop=True):
    board = Analytics(settings.exports_dir)

try:
    options = board.filter_options()
    today = datetime.now(timezone.utc).date()
    last = options["last_day"] or today  # the default range ends with the newest data
    if KEY_DATES not in st.session_state:
        st.session_state[KEY_DATES] = (last - timedelta(days=29), last)
    c_dates, c_template, c_version, c_model, c_source, c_user = st.columns([2, 1.3, 0.8, 1.3, 1, 1])
    picked = c_dates.date_input("Dates (UTC)", key=KEY_DATES, format="YYYY-MM-DD")
    picked = tuple(picked) if isinstance(picked, (tuple, list)) else (picked,)
    start: date | None = picked[0] if picked else None
    end: date | None = picked[1] if len(picked) > 1 else start
    template = choose("Template", options["template"], KEY_TEMPLATE, c_template)
    version = choose("Version", options["versions"].get(template, []) if template else [], KEY_VERSION, c_version)
    model = choose("Model", options["model"], KEY_MODEL, c_model)
    source = choose("Source", options["source"], KEY_SOURCE, c_source)
    user = choose("User", options["user"], KEY_USER, c_user)
    f = Filters(start=start, end=end, template=template, version=version, model=model, source=source, user=user)
    # Bucket by the days that hold data within the range: a month's range over one day of data shows hours.
    lo = max([d for d in (start, options["first_day"]) if d], default=None)
    hi = min([d for d in (end, options["last_day"]) if d], default=None)
    bucket = Filters(start=lo, end=hi).bucket() if lo and hi and lo <= hi else f.bucket()

    tab, container = widgets.open_tab(TABS, KEY_TAB)
    with container, glue.reported():
        if tab == "Overview":
            overview_tab(board, f, bucket)
        elif tab == "Latency":
            latency_tab(board, f, bucket)
        elif tab == "Versions":
            versions_tab(board, f)
        elif tab == "Cost":
            cost_tab(board, f, options["model"])
        elif tab == "Guardrails":
            guardrails_tab(board, f, bucket)
        elif tab == "Evaluations":
            evaluations_tab(board, f, bucket)
        elif tab == "Anomalies":
            anomalies_tab(board, f)
        else:
            sql_tab(board)
finally:
    board.close()
