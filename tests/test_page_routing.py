"""Routing through app.py's st.navigation despite the `pages/` folder (pages/routing.py): these fail when a Streamlit
upgrade changes the private behaviour the workaround relies on, so that it is revisited rather than silently broken."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from pages import routing
from tests.conftest import APP_PATH


def test_streamlit_still_has_the_pages_directory_mode_the_workaround_switches_off(monkeypatch):
    from streamlit.runtime.pages_manager import PagesManager  # a private module: moved means revisit routing.py

    assert hasattr(PagesManager, "uses_pages_directory"), "PagesManager.uses_pages_directory is gone"
    monkeypatch.setattr(PagesManager, "uses_pages_directory", None)  # as at a server's start
    PagesManager(APP_PATH)
    assert PagesManager.uses_pages_directory is True, "a pages/ folder no longer turns the v1 mode on"
    assert routing.APP_SCRIPT == str(Path(APP_PATH).resolve())


def test_a_deep_link_is_routed_through_app_navigation(deep_link_env):
    """A first visitor landing on /templates gets app.py's navigation, not the pages/ folder as v1 pages."""
    at = AppTest.from_file(APP_PATH, default_timeout=60)
    at.switch_page("pages/templates.py")
    at.run()
    assert not at.exception
    assert "Signed in as tester (tester)" in [t.value for t in at.sidebar.text]  # app.py ran: its sidebar is there
    assert at.title[0].value == "Templates"


def test_the_tests_stay_in_navigation_mode(app_env):
    """AppTest turns the v1 mode back on before every run; app_env keeps every run going through app.py."""
    at = AppTest.from_file(APP_PATH, default_timeout=60)
    at.run()
    at.switch_page("pages/ledger.py")
    at.run()
    assert not at.exception
    assert "Signed in as tester (tester)" in [t.value for t in at.sidebar.text] and at.title[0].value == "Ledger"
