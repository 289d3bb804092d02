"""Streamlit glue shared by the pages: cached resources (settings, pool, model, worker), error display, keys.

Pages call `core` through these; they never touch SQL or the model library. Never mutate what a cached resource returns.

Errors follow core.errors: an expected one (a `PromptDevError`, an unreachable database) is shown as one line; anything
else is a bug, shown as Streamlit's error box with its traceback and logged with it on the server.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import streamlit as st

from core import accounts, models, runtime
from core.config import Settings, SettingsError, load_settings
from core.errors import EXPECTED_ERRORS, is_expected, user_message
from core.text import escape_markdown
from pages import routing

log = logging.getLogger("promptdev.ui")

# Session-state keys (named constants; each page prefixes its own).
KEY_ACCOUNT = "promptdev.account"  # the signed-in accounts.User, set by app.py at the start of every run
LOGIN_URL, LOGOUT_URL = "/login", "/logout"  # served by core.web in front of Streamlit
KEY_WARMUP = "home.warmup_result"


def settings() -> Settings:
    """The workbench settings, read from the environment on each run (cheap); stops the page on bad config."""
    routing.leave_pages_directory_mode()
    try:
        return load_settings()
    except SettingsError as exc:
        st.error(f"Configuration error — {escape_markdown(exc)}")
        st.stop()
        raise  # unreachable


@st.cache_resource(show_spinner="Starting the database…")
def _pool(url: str | None, data_dir: str):
    return runtime.database(load_settings())


def pool():
    """The process-wide connection pool (one per database), migrated."""
    s = settings()
    try:
        return _pool(s.database_url, str(s.data_dir))
    except EXPECTED_ERRORS as exc:
        st.error(f"Database unavailable — {escape_markdown(user_message(exc))}")
        st.stop()
        raise


def _backend(s: Settings):
    # No st.cache_resource here: core.llm's registry keeps one backend per spec (and frees idle models beyond
    # PROMPTDEV_MAX_LOADED_MODELS), so a cache here could only hand out a stale one. A spinner while a model loads.
    if runtime.model_loaded(s):
        return runtime.model(s)
    with st.spinner("Loading the model…"):
        return runtime.model(s)


def backend():
    """The process-wide model backend for the current settings (loaded once per spec, shared by every session)."""
    s = settings()
    try:
        return _backend(s)
    except EXPECTED_ERRORS as exc:
        st.error(f"Model unavailable — {escape_markdown(user_message(exc))}")
        st.stop()
        raise


@st.cache_resource
def _worker(url: str | None, data_dir: str):
    return runtime.start_worker(load_settings())


def start_worker() -> None:
    """Start this process's background worker once (submitted executions, evaluation runs)."""
    s = settings()
    try:
        _worker(s.database_url, str(s.data_dir))
    except EXPECTED_ERRORS as exc:
        log.warning("worker not started: %s", user_message(exc))


@st.cache_resource
def _metrics(port: int) -> int | None:
    return runtime.start_metrics(load_settings())


def start_metrics() -> None:
    """Serve Prometheus metrics on PROMPTDEV_METRICS_PORT once per process (off when the port is 0)."""
    s = settings()
    if s.metrics_port:
        _metrics(s.metrics_port)


def show_error(exc: BaseException) -> None:
    """Show an exception: an expected one as one line (details at INFO in the log), anything else as Streamlit's
    error box with its traceback, logged with it. The line is escaped: messages quote names and inputs."""
    if is_expected(exc):
        log.info("user-facing error", exc_info=exc)
        st.error(escape_markdown(user_message(exc)))
    else:
        log.error("unexpected error in the UI", exc_info=exc)
        st.exception(exc)


@contextmanager
def reported(stop: bool = False) -> Iterator[None]:
    """Run a block; an error in it is shown (see show_error) instead of ending the page. With stop, the page stops
    there after showing it."""
    try:
        yield
    except Exception as exc:  # st.stop and st.rerun are not Exceptions: they pass
        show_error(exc)
        if stop:
            st.stop()


def model_registry(pool, settings: Settings) -> list:
    """The registered models, the default first (registered on first use; a failure to is shown as one line)."""
    with reported():
        models.ensure_default_model_registered(pool, settings)
    return models.list_models(pool)


def session_token() -> str | None:
    """The session token in this browser's cookie (sent when its websocket opened), or None."""
    token = st.context.cookies.get(accounts.SESSION_COOKIE)
    return token if isinstance(token, str) else None


def signed_in_user() -> accounts.User | None:
    """Who is signed in: the user of the session cookie, checked in the database on every run (so a session that
    was revoked or expired ends at the next interaction), or None. app.py calls it first; pages use current_account."""
    user = accounts.user_for_session(pool(), session_token())
    st.session_state[KEY_ACCOUNT] = user
    return user


def current_account() -> accounts.User:
    """The signed-in user of this run (app.py let the page run only with one)."""
    user = st.session_state.get(KEY_ACCOUNT)
    if not isinstance(user, accounts.User):
        st.stop()
    return user


def current_user() -> str:
    """The signed-in user's name, recorded as author and operator."""
    return current_account().username


def sidebar_user(user: accounts.User) -> None:
    """The sidebar's account line: who is signed in, and the way out (a confirmation page: a link cannot post)."""
    st.sidebar.text(f"Signed in as {user.display_name} ({user.username})")  # plain text: names are not Markdown
    st.sidebar.html(f'<a href="{LOGOUT_URL}">Sign out</a>')


def signed_out() -> None:
    """The only page of a run without a live session (it ended while the tab was open)."""
    st.title("Signed out")
    st.info("Your session has ended: you signed out, an admin ended it, or it expired.")
    st.html(f'<a href="{LOGIN_URL}">Sign in again</a>')


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
