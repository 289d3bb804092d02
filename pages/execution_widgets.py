"""An execution on screen, shared by the Playground and the Ledger: its status line and figures, its output
streamed while it is recorded, and saving that output as a dataset item."""

from __future__ import annotations

import logging

import streamlit as st

from core import datasets, executions
from core.errors import InvalidInput, is_expected, user_message
from core.executions import Execution
from pages import glue
from pages.widgets import md, write_stream_text

log = logging.getLogger("promptdev.ui")


def status_line(e: Execution) -> None:
    """The execution's status as one coloured line."""
    text = md("Execution #{} · {} · {} · seed {}", e.id, e.status, e.model_name, e.seed)
    if e.status == "ok":
        st.caption(text)
    elif e.status == "error":
        st.error(text + md(" — {}", e.error))
    else:
        st.warning(text + (md(" — {}", e.error) if e.error else ""))


def show_figures(e: Execution, columns: int = 6) -> None:
    """Token counts, time to first token, speed, total time and finish reason of an execution."""
    figures = [("Prompt tokens", "–" if e.prompt_tokens is None else f"{e.prompt_tokens:,}"),
               ("Completion tokens", "–" if e.completion_tokens is None else f"{e.completion_tokens:,}"),
               ("TTFT", "–" if e.ttft_ms is None else f"{e.ttft_ms:,.0f} ms"),
               ("Tokens/s", "–" if not e.tokens_per_second else f"{e.tokens_per_second:,.1f}"),
               ("Total", "–" if e.total_ms is None else f"{e.total_ms / 1000:,.2f} s"),
               ("Finish", e.finish_reason if e.status == "ok" else e.status)]
    for i in range(0, len(figures), columns):
        for col, (label, value) in zip(st.columns(columns), figures[i:i + columns]):
            col.metric(label, value)


def stream_recorded(run: executions.ExecutionRun, border: bool = True) -> None:
    """Stream a run into a container. Leaving the block (the end, an error, or a rerun abandoning the stream) closes
    the run, which releases the model and records the execution. An expected failure the ledger recorded is not
    raised again: the execution's status line shows it, once; anything else (a bug, or nothing recorded) propagates."""
    try:
        with st.container(border=border):
            with run:
                write_stream_text(run)
    except Exception as exc:
        if run.execution_id is None or not is_expected(exc):
            raise
        log.info("execution %s failed: %s", run.execution_id, user_message(exc))


def save_to_dataset(pool, prefix: str, e: Execution) -> None:
    """Save a successful execution's output as a dataset item (the dataset is created when new)."""
    if e.status != "ok":
        return
    with st.expander("Save output as a dataset item"):
        name = st.text_input("Dataset", key=f"{prefix}.dataset", placeholder="dataset name (created if new)")
        if st.button("Save output as dataset item", key=f"{prefix}.dataset_save"):
            with glue.reported():
                if not name.strip():
                    raise InvalidInput("name the dataset to save the item in")
                datasets.add_item_from_execution(pool, name.strip(), e.id, create=True)
                st.success(md("Execution #{} saved in dataset {!r}", e.id, name.strip()))
