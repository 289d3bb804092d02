"""Streamlit glue shared by the pages: cached resources (settings, pool, model, worker), error display, keys.

Pages call `core` through these; they never touch SQL or the model library. Never mutate what a cached resource returns.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import streamlit as st

from core import runtime
from core.config import Settings, SettingsError, load_settings
from core.errors import EXPECTED_ERRORS, user_message

log = logging.getLogger("promptdev.ui")

# Session-state keys (named constants; each page prefixes its own).
KEY_USER = "promptdev.user"
KEY_WARMUP = "home.warmup_result"


class UserError(Exception):
    """Something the user can fix; shown as a one-line error."""


APP_SCRIPT = str(Path(__file__).resolve().parent.parent / "app.py")


def _running_under_app() -> bool:
    """True when this page runs inside app.py's st.navigation (app.py is on the call stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == APP_SCRIPT:
            return True
        frame = frame.f_back
    return False


def _leave_pages_directory_mode() -> None:
    """Make app.py's st.navigation the only router.

    Streamlit treats a `pages/` folder beside the main script as a v1 multipage app until some run calls
    st.navigation; a first visitor landing on a deep link (/templates) would get the page file run on its own,
    with the folder's files (glue included) as the navigation. Pages call `settings()` first, which calls this:
    when the page is not running inside app.py, switch that mode off and rerun through app.py.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - internal module moved
        return
    if getattr(PagesManager, "uses_pages_directory", False) and not _running_under_app():
        PagesManager.uses_pages_directory = False
        st.rerun()


def settings() -> Settings:
    """The workbench settings, read from the environment on each run (cheap); stops the page on bad config."""
    _leave_pages_directory_mode()
    try:
        return load_settings()
    except SettingsError as exc:
        st.error(f"Configuration error — {exc}")
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
        st.error(f"Database unavailable — {user_message(exc)}")
        st.stop()
        raise


@st.cache_resource(show_spinner="Loading the model…")
def _backend(key: tuple):
    return runtime.model(load_settings())


def backend():
    """The process-wide model backend for the current settings (loaded once, shared by every session)."""
    s = settings()
    try:
        return _backend(runtime.model_key(s))
    except EXPECTED_ERRORS as exc:
        st.error(f"Model unavailable — {user_message(exc)}")
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


error_message = user_message  # a one-line message for an exception, without internals (core.errors)


def show_error(exc: BaseException) -> None:
    """Show an exception as a clear one-line error (the traceback goes to the server log only)."""
    log.info("user-facing error", exc_info=exc)
    st.error(user_message(exc))


@contextmanager
def reported(*errors: type[BaseException]) -> Iterator[None]:
    """Run a block; expected errors (bad input, database, model, UserError and any given) are shown as one line
    instead of a traceback."""
    try:
        yield
    except (UserError, *EXPECTED_ERRORS, *errors) as exc:
        show_error(exc)


def current_user() -> str:
    """Who is using the workbench (free text until login exists), shown in the sidebar."""
    return st.session_state.get(KEY_USER) or "anonymous"


def sidebar_user() -> None:
    """The sidebar field naming the current user, recorded as author/operator."""
    st.sidebar.text_input("You are", key=KEY_USER, placeholder="your name", help="Recorded as author and operator.")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
