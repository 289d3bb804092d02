"""Routing: app.py's st.navigation is the only router, although the pages live in a folder named `pages/`.

Streamlit treats a `pages/` folder beside the main script as a v1 multipage app until some run calls st.navigation:
it records that in a private class attribute, `PagesManager.uses_pages_directory`, set on the first PagesManager
of the process. While it is True, a first visitor landing on a deep link (/templates) gets the page file run on its
own, with the folder's files (glue included) as the navigation. This module is the one place that knows about it:

- the app: every page calls `glue.settings()` first, which calls `leave_pages_directory_mode()`;
- the tests: the `app_env` fixture calls `stay_in_navigation_mode()`, because AppTest resets the attribute before
  every run, where a served app leaves that mode for good at its first run.

tests/test_page_routing.py fails when a Streamlit upgrade changes what this relies on.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import streamlit as st

APP_SCRIPT = str(Path(__file__).resolve().parent.parent / "app.py")


def _pages_manager() -> Any:
    """Streamlit's PagesManager class, or None when the private module has moved."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # the test fails loudly; the served app keeps working, deep links aside
        return None
    return PagesManager


def running_under_app() -> bool:
    """True when this page runs inside app.py's st.navigation (app.py is on the call stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == APP_SCRIPT:
            return True
        frame = frame.f_back
    return False


def leave_pages_directory_mode() -> None:
    """When Streamlit ran this page on its own as a v1 page, switch that mode off and rerun through app.py."""
    manager = _pages_manager()
    if manager is not None and getattr(manager, "uses_pages_directory", False) and not running_under_app():
        manager.uses_pages_directory = False
        st.rerun()


def stay_in_navigation_mode(monkeypatch: Any) -> None:
    """For AppTest (with pytest's monkeypatch): every run goes through app.py's st.navigation, as once served."""
    manager = _pages_manager()
    if manager is None:
        raise RuntimeError("streamlit.runtime.pages_manager.PagesManager has moved: see pages/routing.py")
    original_init = manager.__init__

    def init_in_navigation_mode(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        manager.uses_pages_directory = False

    monkeypatch.setattr(manager, "__init__", init_in_navigation_mode)
