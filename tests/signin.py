"""Signing in under AppTest: a real user and a real session in the test's database, and its token in the cookie the
pages read, as a browser would send it.

A served page reads the cookie from `st.context.cookies`, which Streamlit takes from the client of the session (the
websocket's handshake). AppTest has no client and cannot seed cookies (AppTest.context takes only timezone, locale,
url, theme…), so `install` puts a browser-like client context in Streamlit's place for the test (pytest's
monkeypatch undoes it). Everything of ours runs as served: pages/glue.py reads the cookie and core.accounts checks
the session in the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core import accounts, db
from core.config import Settings

PASSWORD = "correct horse battery staple"
DEFAULT_USER = "tester"


@dataclass
class FakeBrowser:
    """What Streamlit's ClientContext gives a page: the handshake's headers and cookies and the client's address."""

    cookies: dict[str, str] = field(default_factory=dict)
    headers: list[tuple[str, str]] = field(default_factory=list)
    remote_ip: str | None = "127.0.0.1"


_state: dict[str, Any] = {}


def install(monkeypatch: Any, settings: Settings) -> FakeBrowser:
    """Give this test's AppTest runs a browser whose cookies the pages read (no session yet: see sign_in_as)."""
    from streamlit.runtime import context  # private: tests/test_users_page.py fails first if it moves

    browser = FakeBrowser()
    monkeypatch.setattr(context, "_get_client_context", lambda: browser)
    _state.update(browser=browser, settings=settings)
    return browser


def sign_in_as(username: str = DEFAULT_USER, *, admin: bool = False) -> accounts.User:
    """Sign the installed browser in as this user (created with PASSWORD when missing; admin only when created)."""
    settings, browser = _state["settings"], _state["browser"]
    pool = db.get_pool(settings)
    try:
        user = accounts.get_user(pool, username)
    except accounts.UserNotFound:
        user = accounts.create_user(pool, accounts.CONSOLE, username, PASSWORD, is_admin=admin)
    browser.cookies[accounts.SESSION_COOKIE] = accounts.create_session(pool, user)
    return user


def sign_out() -> None:
    """The installed browser sends no session cookie any more."""
    _state["browser"].cookies.pop(accounts.SESSION_COOKIE, None)
