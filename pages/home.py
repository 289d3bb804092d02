"""Home: what is running — the database, the model — and a one-click warm-up."""

import streamlit as st

from core import status
from pages import glue
from pages.widgets import code_span, md

st.title("PromptDev")
st.caption("Local-first prompt engineering workbench: templates, playground, live conversations, evaluations.")

settings = glue.settings()
pool = glue.pool()

db_col, model_col = st.columns(2)
with db_col:
    st.subheader("Database")
    with glue.reported():
        info = status.database_status(pool, settings)
        st.markdown(md("**{}** PostgreSQL {}", info["kind"], info["version"]))
        a, b = st.columns(2)
        a.metric("Size", glue.human_bytes(info["size_bytes"]))
        b.metric("Migrations", info["migrations"])
        st.caption(f"Database {code_span(info['database'])} · {md('{}', info['location'])}")

with model_col:
    st.subheader("Model")
    backend = glue.backend()
    facts = status.model_status(backend)
    st.markdown(md("**{}** · {}", facts["name"], facts["backend"]))
    a, b, c = st.columns(3)
    a.metric("Context", f"{facts['n_ctx']:,}")
    if facts["in_process"]:
        b.metric("File size", glue.human_bytes(facts["file_size"]))
        c.metric("Load time", f"{facts['load_s']:.2f} s")
        st.caption(f"Architecture {code_span(facts['architecture'])} · {facts['n_threads']} threads · "
                   f"chat format {code_span(facts['chat_format'])} · {code_span(facts['path'])}")
    else:
        b.metric("Timeout", f"{facts['timeout_s']:.0f} s")
        c.metric("Retries", facts["max_retries"])
        st.caption(f"Server {code_span(facts['base_url'])} · model {code_span(facts['model'])}")
    if st.button("Warm up the model", key="home.warmup", help="Runs a short generation and measures its speed"):
        with st.spinner("Generating…"), glue.reported():
            st.session_state[glue.KEY_WARMUP] = status.warm_up(backend)
    result = st.session_state.get(glue.KEY_WARMUP)
    if result:
        st.success(f"Warm-up: {result['completion_tokens']} tokens at {result['tokens_per_second']:.1f} tokens/s "
                   f"(first token after {result['ttft_s'] * 1000:.0f} ms)")

figures = status.dashboard_figures(pool)
if figures:
    st.subheader("Activity")
    items = list(figures.items())
    for start in range(0, len(items), 4):
        row = items[start:start + 4]
        for col, (label, value) in zip(st.columns(4), row):
            col.metric(label, f"{value:,}")
