"""The Users page and the signed-in identity through AppTest: the name comes from the session cookie (no widget), a
run without a live session shows only the signed-out page, users change their password, admins create, deactivate,
reactivate and reset users, and a non-admin gets none of it."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from core import accounts, db
from tests import signin
from tests.conftest import APP_PATH

PAGE = "pages/users.py"


def open_page(page: str = PAGE) -> AppTest:
    at = AppTest.from_file(APP_PATH, default_timeout=60)
    at.switch_page(page)
    at.run()
    assert not at.exception, at.exception
    return at


def texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def test_streamlit_still_takes_cookies_from_the_client_context(app_env):
    """tests/signin.py replaces this private function: if it moved, every signed-in AppTest would be signed out."""
    from streamlit.runtime import context

    assert callable(getattr(context, "_get_client_context", None))
    at = open_page("pages/templates.py")
    assert at.title[0].value == "Templates"
    assert "Signed in as tester (tester)" in texts(at.sidebar.text)
    assert not at.sidebar.text_input  # no "You are" field: the identity is the session's


def test_without_a_live_session_only_the_signed_out_page_runs(app_env):
    signin.sign_out()
    at = open_page("pages/templates.py")
    assert texts(at.title) == ["Signed out"]
    signin.sign_in_as("tester")
    token = signin._state["browser"].cookies[accounts.SESSION_COOKIE]
    at.run()
    assert texts(at.title) != ["Signed out"]
    accounts.revoke_session(db.get_pool(app_env), token)  # signed out elsewhere while the tab is open
    at.run()
    assert texts(at.title) == ["Signed out"]


def test_a_member_changes_its_password_and_sees_no_admin_tools(app_env):
    at = open_page()
    assert "Signed in as tester (tester)" in texts(at.text)
    assert not at.dataframe and "Create a user" not in texts(at.subheader)
    at.text_input(key="users.own.current").input(signin.PASSWORD)
    at.text_input(key="users.own.new").input("a fresh passphrase")
    at.text_input(key="users.own.again").input("a different one!")
    at.button[0].click().run()
    assert "The two new passwords differ." in texts(at.error)
    at.text_input(key="users.own.current").input(signin.PASSWORD)
    at.text_input(key="users.own.new").input("a fresh passphrase")
    at.text_input(key="users.own.again").input("a fresh passphrase")
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert any("Password changed" in s for s in texts(at.success))
    assert texts(at.title) == ["Users"]  # this session was kept
    pool = db.get_pool(app_env)
    accounts.authenticate(pool, "tester", "a fresh passphrase")


def test_an_admin_creates_deactivates_reactivates_and_resets_users(app_env):
    signin.sign_in_as("root", admin=True)
    at = open_page()
    table = at.dataframe[0].value
    assert list(table["username"]) == ["root", "tester"]
    at.text_input(key="users.create.username").input("Nina")
    at.text_input(key="users.create.display_name").input("Nina <b>N</b>")
    at.text_input(key="users.create.password").input("short")
    at.button(key="FormSubmitter:users.create-Create").click().run()
    assert any("at least 12 characters" in e for e in texts(at.error))
    at.text_input(key="users.create.password").input("nina's first passphrase")
    at.button(key="FormSubmitter:users.create-Create").click().run()
    assert not at.exception and "Created `nina`" in texts(at.success)
    pool = db.get_pool(app_env)
    nina = accounts.get_user(pool, "nina")
    assert nina.display_name == "Nina <b>N</b>" and not nina.is_admin
    _, session = accounts.login(pool, "nina", "nina's first passphrase")

    at.selectbox(key="users.manage.user").select("nina").run()
    at.button(key="users.manage.deactivate").click().run()
    assert "Deactivated `nina`" in texts(at.success)
    assert accounts.user_for_session(pool, session) is None and not accounts.get_user(pool, "nina").active
    at.button(key="users.manage.activate").click().run()
    assert accounts.get_user(pool, "nina").active
    at.text_input(key="users.reset.password").input("reset by the admin!")
    at.button(key="FormSubmitter:users.reset-Reset password").click().run()
    assert any("New password set for `nina`" in s for s in texts(at.success))
    accounts.authenticate(pool, "nina", "reset by the admin!")


def test_admin_powers_are_checked_in_core_not_only_hidden(app_env):
    """The page shows a non-admin no admin tools, and core refuses it even when called directly."""
    member = signin.sign_in_as("tester")
    pool = db.get_pool(app_env)
    try:
        accounts.create_user(pool, member, "sneaky", "a long enough pass")
    except accounts.AdminRequired as exc:
        assert exc.status == 403
    else:
        raise AssertionError("a member created a user")
