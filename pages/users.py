"""Users: change your own password; admins also see every user and create, deactivate, reactivate and reset them.

The admin checks live in core.accounts (each call takes the acting user and raises Forbidden for a non-admin); this
page only leaves out what a non-admin could not do anyway. Usernames (a-z, 0-9, '.', '_', '-': no backtick) are shown
as code spans, display names (free text) only as plain text.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core import accounts
from pages import glue, widgets

KEY_PREFIX = "users."


def change_password_form(user: accounts.User) -> None:
    """Your own password: the current one, then the new one twice. Your other sessions end."""
    st.subheader("Your password")
    with st.form(f"{KEY_PREFIX}own", clear_on_submit=True):
        current = st.text_input("Current password", type="password", key=f"{KEY_PREFIX}own.current")
        new = st.text_input(f"New password (at least {accounts.MIN_PASSWORD_LENGTH} characters)", type="password",
                            key=f"{KEY_PREFIX}own.new")
        again = st.text_input("Repeat the new password", type="password", key=f"{KEY_PREFIX}own.again")
        if st.form_submit_button("Change my password"):
            if new != again:
                st.error("The two new passwords differ.")
                return
            with glue.reported():
                accounts.change_password(pool, user, current, new, keep_session=glue.session_token())
                widgets.flash("success", "Password changed; your other sessions were signed out.")
                st.rerun()


def users_table(actor: accounts.User) -> list[accounts.User]:
    """Every user (admins only)."""
    users = accounts.list_users(pool, actor)
    st.dataframe(pd.DataFrame([{
        "username": u.username, "display name": u.display_name, "admin": u.is_admin, "active": u.active,
        "created": u.created_at, "last login": u.last_login_at} for u in users]),
        hide_index=True, key=f"{KEY_PREFIX}table")
    return users


def create_form(actor: accounts.User) -> None:
    """A new user with a first password (tell it to them; they can change it here)."""
    st.subheader("Create a user")
    with st.form(f"{KEY_PREFIX}create", clear_on_submit=False):
        left, right = st.columns(2)
        username = left.text_input("Username", key=f"{KEY_PREFIX}create.username",
                                   help="1 to 64 of a-z, 0-9, '.', '_', '-'")
        display_name = right.text_input("Display name", key=f"{KEY_PREFIX}create.display_name")
        password = st.text_input(f"Password (at least {accounts.MIN_PASSWORD_LENGTH} characters)", type="password",
                                 key=f"{KEY_PREFIX}create.password")
        is_admin = st.checkbox("Admin (manages users)", key=f"{KEY_PREFIX}create.admin")
        if st.form_submit_button("Create"):
            with glue.reported():
                created = accounts.create_user(pool, actor, username, password, display_name=display_name,
                                               is_admin=is_admin)
                widgets.flash("success", f"Created {widgets.code_span(created.username)}")
                widgets.rerun_with(**{f"{KEY_PREFIX}create.username": "", f"{KEY_PREFIX}create.display_name": "",
                                      f"{KEY_PREFIX}create.password": "", f"{KEY_PREFIX}create.admin": False})


def manage_form(actor: accounts.User, users: list[accounts.User]) -> None:
    """Deactivate or reactivate a user, or set a new password (its sessions end)."""
    others = [u.username for u in users if u.id != actor.id]
    if not others:
        return
    st.subheader("Manage a user")
    name = st.selectbox("User", others, key=f"{KEY_PREFIX}manage.user")
    chosen = next(u for u in users if u.username == name)
    left, right = st.columns(2)
    if chosen.active:
        if left.button("Deactivate", key=f"{KEY_PREFIX}manage.deactivate", help="Signs them out everywhere"):
            with glue.reported():
                accounts.deactivate_user(pool, actor, name)
                widgets.flash("success", f"Deactivated {widgets.code_span(name)}")
                st.rerun()
    elif left.button("Reactivate", key=f"{KEY_PREFIX}manage.activate"):
        with glue.reported():
            accounts.activate_user(pool, actor, name)
            widgets.flash("success", f"Reactivated {widgets.code_span(name)}")
            st.rerun()
    with right.form(f"{KEY_PREFIX}reset", clear_on_submit=True):
        new = st.text_input("New password", type="password", key=f"{KEY_PREFIX}reset.password")
        if st.form_submit_button("Reset password"):
            with glue.reported():
                accounts.reset_password(pool, actor, name, new)
                widgets.flash("success", f"New password set for {widgets.code_span(name)}; their sessions were ended")
                st.rerun()


st.title("Users")
settings = glue.settings()
pool = glue.pool()
me = glue.current_account()
widgets.carry_over()

st.text(f"Signed in as {me.display_name} ({me.username}){', an admin' if me.is_admin else ''}")  # names: plain text
change_password_form(me)
if me.is_admin:
    st.divider()
    with glue.reported(stop=True):
        everyone = users_table(me)
    create_form(me)
    manage_form(me, everyone)
