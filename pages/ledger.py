"""Ledger: every recorded execution, whatever ran it (playground, chat, evaluations, CLI, API): filter them, open one
to see exactly what the model got and gave, and re-run it exactly to check that it reproduces."""

from __future__ import annotations

import difflib
from datetime import datetime, timedelta
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from core import executions, models
from core.executions import Execution
from pages import glue, widgets
from pages.execution_widgets import save_to_dataset, show_figures, status_line, stream_recorded

KEY_RERUN = "ledger.rerun_result"  # (original id, new id) of the last exact re-run
TIME_WINDOWS = {"Last hour": timedelta(hours=1), "Last 24 hours": timedelta(days=1), "Last 7 days": timedelta(days=7),
                "Last 30 days": timedelta(days=30), "All time": None}
ALL = "All"
LIMIT = 500


def inline_code(value: Any) -> str:
    """A value as inline code (shown literally: names like q4_k_m, and any link or image in it, stay text)."""
    return "–" if value == "–" else widgets.code_span(value)


def server_text(e: Execution) -> str:
    """The server an execution ran on and the model name there (from the registry entry it refers to)."""
    if not e.base_url:
        return "–"
    remote = models.served_model_name(pool, e)
    return e.base_url + (f" · model {remote}" if remote else "")


def describe(e: Execution) -> str:
    """One line naming an execution."""
    what = e.template_ref + (f" ({e.label})" if e.label else "") if e.template_ref else "free-form"
    return f"#{e.id} · {what} · {e.model_name} · {e.status}"


def filters() -> dict[str, Any]:
    """The filters, as arguments of executions.list_executions."""
    options = executions.filter_options(pool)
    f1, f2, f3, f4, f5, f6 = st.columns(6)
    template = f1.selectbox("Template", [ALL, *options["template_name"]], key="ledger.template")
    version = f2.selectbox("Version", [ALL, *options["template_version"]], key="ledger.version")
    model = f3.selectbox("Model", [ALL, *options["model_name"]], key="ledger.model")
    source = f4.selectbox("Source", [ALL, *executions.SOURCES], key="ledger.source")
    status = f5.selectbox("Status", [ALL, *executions.STATUSES], key="ledger.status")
    window = TIME_WINDOWS[f6.selectbox("Time", list(TIME_WINDOWS), index=len(TIME_WINDOWS) - 1, key="ledger.time")]
    return {"template_name": None if template == ALL else template,
            "template_version": None if version == ALL else int(version),
            "model_name": None if model == ALL else model, "source": None if source == ALL else source,
            "status": None if status == ALL else status,
            "since": datetime.now().astimezone() - window if window else None}


def executions_table(rows: list[Execution]) -> None:
    """The executions as a table, and their total time as a chart."""
    frame = pd.DataFrame([{
        "id": e.id, "created": e.created_at, "status": e.status, "source": e.source,
        "template": e.template_ref or "", "label": e.label or "", "model": e.model_name, "user": e.user_id or "",
        "prompt tokens": e.prompt_tokens, "completion tokens": e.completion_tokens,
        "TTFT ms": None if e.ttft_ms is None else round(e.ttft_ms, 1),
        "total ms": None if e.total_ms is None else round(e.total_ms, 1),
        "output": (e.output or e.error or "")[:120]} for e in rows])
    st.caption(f"{len(rows)} execution(s)" + (f" (newest {LIMIT})" if len(rows) == LIMIT else ""))
    st.dataframe(frame, hide_index=True, key="ledger.table")
    timed = frame.dropna(subset=["total ms"])
    if len(timed) >= 2:
        st.altair_chart(alt.Chart(timed, title="Total time per execution").mark_circle(size=60).encode(
            x=alt.X("created:T", title=None), y=alt.Y("total ms:Q", title="total ms"),
            color=alt.Color("model:N"), shape=alt.Shape("status:N"),
            tooltip=["id", "template", "model", "status", "total ms", "completion tokens"]), width="stretch")


def execution_detail(e: Execution) -> None:
    """Everything recorded about one execution: status, figures, facts, parameters, variables, messages, output."""
    status_line(e)
    show_figures(e)
    facts = {
        "Created": e.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "Finished": e.finished_at.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z") if e.finished_at else "–",
        "Source": e.source, "User": e.user_id or "–",
        "Template": (e.template_ref or "free-form") + (f" (label {e.label})" if e.label else ""),
        "Model": e.model_name + (f" · {e.backend}" if e.backend else ""),
        "Model file SHA-256": e.model_sha256 or "–", "Server": server_text(e), "Seed": e.seed,
        "Re-run of": f"#{e.rerun_of}" if e.rerun_of else "–", "Worker": e.worker or "–"}
    items = list(facts.items())
    for col, part in zip(st.columns(2), (items[:6], items[6:])):
        col.markdown("\n".join(f"- **{k}:** {inline_code(v)}" for k, v in part))
    for col, title, value in zip(st.columns(2), ("Parameters", "Variables"), (e.params, e.variables)):
        with col:
            st.markdown(f"**{title}**")
            st.json(value, expanded=True)
    with st.expander("Messages and exact prompt", expanded=False):
        widgets.show_messages(e.messages, e.prompt)
    st.markdown("**Output**")
    st.code(e.output if e.output is not None else "", language=None, wrap_lines=True)


def rerun_exactly(e: Execution) -> None:
    """Re-run an execution exactly, streamed, and say whether it reproduced the original."""
    rerunnable = e.done and (e.messages is not None or e.prompt is not None) and e.seed is not None
    if st.button("Re-run exactly", key="ledger.rerun", disabled=not rerunnable,
                 help="Same model file, messages, parameters and seed; says whether the output is identical"):
        st.session_state.pop(KEY_RERUN, None)
        with glue.reported():
            run = executions.start_rerun(pool, models.backend_for_execution(pool, settings, e), e.id, user_id=user)
            stream_recorded(run)
            st.session_state[KEY_RERUN] = (e.id, run.execution_id)
    rerun_ids = st.session_state.get(KEY_RERUN)
    if rerun_ids and rerun_ids[0] == e.id:
        with glue.reported():
            rerun_verdict(*(executions.get_execution(pool, i) for i in rerun_ids))


def rerun_verdict(original: Execution, new: Execution) -> None:
    """Whether a re-run reproduced its original; when not, why it may differ and how the outputs do."""
    if executions.is_identical(original, new):
        st.success(f"Identical output: execution #{new.id} reproduces #{original.id} exactly (seed {new.seed}).")
    elif new.status == "error":
        st.error(widgets.md("Re-run #{} failed, so it does not reproduce #{}: {}", new.id, original.id, new.error))
    else:
        why = executions.why_rerun_differs(original, new)
        st.warning(widgets.md("Output differs: execution #{} ({}) does not reproduce #{} ({}).{}", new.id, new.status,
                              original.id, original.status, " " + why if why else ""))
        diff = "\n".join(difflib.unified_diff((original.output or "").splitlines(), (new.output or "").splitlines(),
                                              f"#{original.id}", f"#{new.id}", lineterm=""))
        if diff:
            st.code(diff, language="diff")
    show_figures(new)


def template_usage() -> None:
    """Runs and last use of every template, from the ledger."""
    usage = executions.templates_usage(pool)
    if usage:
        with st.expander("Template usage: runs and last use of every template, from the ledger"):
            st.dataframe(pd.DataFrame([{"template": u["template"], "runs": u["uses"], "last used": u["last_used"]}
                                       for u in usage]), hide_index=True, key="ledger.usage")


st.title("Ledger")
settings = glue.settings()
pool = glue.pool()
user = glue.current_user()
widgets.carry_over()

chosen_filters = filters()
usage_box = st.container()  # filled at the end, so that it counts a re-run made below
rows = executions.list_executions(pool, **chosen_filters, limit=LIMIT)
if not rows:
    st.info("No executions match these filters.")
else:
    executions_table(rows)
    by_id = {e.id: e for e in rows}
    chosen = by_id[st.selectbox("Open execution", list(by_id), key="ledger.open",
                                format_func=lambda i: describe(by_id[i]))]
    execution_detail(chosen)
    save_to_dataset(pool, "ledger", chosen)
    rerun_exactly(chosen)
with usage_box:
    template_usage()
