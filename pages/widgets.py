"""Page helpers shared by the pages: what one run leaves for the next (messages, widget values), tabs that run only
when open, rendered messages and variable fields.

An action that changes something usually ends its run with `rerun_with(...)` (or `st.rerun()`) after `flash(...)`:
the next run first calls `carry_over()`, before any widget exists, which sets the widget values asked for and shows
the messages once.

Untrusted text (user ids, messages, model output, names, dataset cells, audit entries, error messages) is never
handed to an st.* call that renders Markdown as it is: `safe_md(text)` escapes it (core.text.escape_markdown), `md`
formats our own Markdown around escaped values, `code_span` shows one as inline code, and `write_stream_text`
streams model output escaped. Plain-text elements (st.text, st.code, dataframe cells, selectbox options) need none.
"""

from __future__ import annotations

import json
import logging
from typing import Any, NoReturn, Sequence

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from core.errors import is_expected, user_message
from core.executions import VariableSpec
from core.text import code_span, escape_markdown, md  # noqa: F401 (code_span and md are for the pages too)

log = logging.getLogger("promptdev.ui")

KEY_FLASH = "promptdev.flash"  # [(kind, message)] shown once on the next run
KEY_PENDING = "promptdev.pending"  # widget values to set on the next run, before the widgets exist
AVATARS = {"system": "⚙️", "user": "user", "assistant": "assistant"}


def safe_md(text: Any) -> str:
    """Untrusted text for any st.* call that renders Markdown (markdown, caption, write, alerts, labels, help):
    shown exactly as written, with no link, image, HTML or formatting."""
    return escape_markdown(text)


def write_stream_text(stream: Any) -> str:
    """Stream text chunks (model output) into one element, escaped as it grows (st.write_stream would render it as
    Markdown: links and images in the output would go live); returns the whole text."""
    slot, text = None, ""
    for chunk in stream:
        if not chunk:
            continue
        text += chunk
        if slot is None:
            slot = st.empty()
        slot.markdown(escape_markdown(text))
    return text


def flash(kind: str, message: Any) -> None:
    """Queue a message for the next run: kind is success, info, warning, error, or exception (an exception). The
    message is Markdown: build one holding untrusted text with `md` (or `safe_md`)."""
    st.session_state.setdefault(KEY_FLASH, []).append((kind, message))


def flash_error(exc: Exception) -> None:
    """Queue an error for the next run: an expected one as one line; anything else, logged now with its traceback,
    as Streamlit's error box."""
    if is_expected(exc):
        log.info("user-facing error", exc_info=exc)
        flash("error", escape_markdown(user_message(exc)))
    else:
        log.error("unexpected error in the UI", exc_info=exc)
        flash("exception", exc)


def rerun_with(**widgets: Any) -> NoReturn:
    """Rerun, first setting these widget values (None clears one)."""
    st.session_state[KEY_PENDING] = {**st.session_state.get(KEY_PENDING, {}), **widgets}
    st.rerun()


def carry_over() -> None:
    """What the previous run left: set the widget values it asked for (call before any widget), show its messages."""
    for key, value in st.session_state.pop(KEY_PENDING, {}).items():
        if value is None:
            st.session_state.pop(key, None)
        else:
            st.session_state[key] = value
    for kind, message in st.session_state.pop(KEY_FLASH, []):
        getattr(st, kind)(message)


def show_messages(messages: list[dict[str, str]] | None, prompt: str | None = None) -> None:
    """Rendered messages as chat bubbles showing their exact text, then the exact prompt text when there is one."""
    for m in messages or ():
        with st.chat_message(m["role"], avatar=AVATARS.get(m["role"])):
            st.caption(escape_markdown(m["role"]))
            st.code(m["content"], language=None, wrap_lines=True)
    if prompt is not None:
        st.caption("Exact prompt text")
        st.code(prompt, language=None, wrap_lines=True)


def variable_inputs(prefix: str, specs: list[VariableSpec], columns: int = 1) -> tuple[dict[str, Any], list[str]]:
    """A form field per variable, typed by its spec; returns (values, problems). Values left empty are omitted, so a
    variable the template needs is named as missing; every field is drawn even when one is invalid, and each problem
    is shown as one line."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    cols = st.columns(columns) if columns > 1 and len(specs) > 1 else [st.container()]
    for i, spec in enumerate(specs):
        with cols[i % len(cols)]:
            problem = _variable_input(prefix, spec, values)
        if problem:
            problems.append(problem)
    for problem in problems:
        st.error(escape_markdown(problem))
    return values, problems


def _variable_input(prefix: str, spec: VariableSpec, values: dict[str, Any]) -> str | None:
    """One variable's field; puts its value in `values` (unless left empty) and returns a problem, if any."""
    key = f"{prefix}.var.{spec.name}" + ("" if spec.type == "string" and not spec.enum else f".{spec.type}")
    label = escape_markdown(spec.name) + ("" if spec.required else " (optional)")  # names come from input schemas
    help_ = escape_markdown(spec.description) if spec.description else None
    if spec.enum:
        options = list(spec.enum)
        index = options.index(spec.default) if spec.default in options else 0
        values[spec.name] = st.selectbox(label, options, index=index, key=key, help=help_,
                                         format_func=lambda v: json.dumps(v) if not isinstance(v, str) else v)
    elif spec.type == "boolean":
        values[spec.name] = st.checkbox(label, value=bool(spec.default), key=key, help=help_)
    elif spec.type in ("integer", "number"):
        whole = spec.type == "integer"
        numeric = isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool)
        default = spec.default if numeric else None
        value = st.number_input(label, value=None if default is None else int(default) if whole else float(default),
                                step=1 if whole else 0.1, key=key, help=help_,
                                placeholder="a whole number" if whole else "a number")
        if value is not None:
            values[spec.name] = int(value) if whole else float(value)
    elif spec.type in ("array", "object"):
        empty = "[]" if spec.type == "array" else "{}"
        text = st.text_area(f"{label} — JSON {spec.type}", value=json.dumps(spec.default) if spec.default is not None
                            else empty, key=key, help=help_, height=80)
        try:
            values[spec.name] = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"{spec.name}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    else:
        text = st.text_area(label, value=spec.default if isinstance(spec.default, str) else "", key=key, help=help_,
                            height=80)
        if text:
            values[spec.name] = text
    return None


def open_tab(labels: Sequence[str], key: str) -> tuple[str, DeltaGenerator]:
    """Tabs whose content runs only while open (choosing another reruns the page): the open tab's label and
    container."""
    containers = st.tabs(list(labels), key=key, on_change="rerun")
    return next(((label, tab) for label, tab in zip(labels, containers) if tab.open), (labels[0], containers[0]))
