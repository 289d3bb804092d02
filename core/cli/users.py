"""`promptdev users`: workbench accounts from the shell — create (the first admin too), list, deactivate, activate,
reset a password, and print a one-time setup link. Whoever can run this can reach the database: it acts as an admin
(core.accounts.CONSOLE). A password is read from the terminal (asked twice) or, with --password-stdin, from the
first line of standard input; never from the command line, where other users of the machine could see it."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from core import accounts, runtime
from core.cli._common import fail, table
from core.config import Settings


def _password(args: argparse.Namespace, prompt: str) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    if not sys.stdin.isatty():
        fail("no terminal to ask for the password on: pipe it in with --password-stdin")
    first = getpass.getpass(prompt)
    accounts.check_password(first)  # say so before asking again
    if getpass.getpass("Repeat it: ") != first:
        fail("the two passwords differ")
    return first


def _create(args: argparse.Namespace, settings: Settings) -> None:
    name = accounts.normalize_username(args.name)
    password = _password(args, f"Password for {name} (at least {accounts.MIN_PASSWORD_LENGTH} characters): ")
    user = accounts.create_user(runtime.database(settings), accounts.CONSOLE, name, password,
                                display_name=args.display_name, is_admin=args.admin)
    print(f"created {user.username}{' (admin)' if user.is_admin else ''}")


def _list(args: argparse.Namespace, settings: Settings) -> None:
    users = accounts.list_users(runtime.database(settings), accounts.CONSOLE)
    if args.json:
        print(json.dumps([{"username": u.username, "display_name": u.display_name, "admin": u.is_admin,
                           "active": u.active, "created_at": u.created_at and u.created_at.isoformat(),
                           "last_login_at": u.last_login_at and u.last_login_at.isoformat()} for u in users],
                         indent=2))
        return
    print(table(["USERNAME", "DISPLAY NAME", "ADMIN", "ACTIVE", "LAST LOGIN"],
                [[u.username, u.display_name, "yes" if u.is_admin else "", "yes" if u.active else "no",
                  u.last_login_at.strftime("%Y-%m-%d %H:%M") if u.last_login_at else ""] for u in users]))


def _deactivate(args: argparse.Namespace, settings: Settings) -> None:
    user = accounts.deactivate_user(runtime.database(settings), accounts.CONSOLE, args.name)
    print(f"deactivated {user.username}; its sessions are ended")


def _activate(args: argparse.Namespace, settings: Settings) -> None:
    user = accounts.activate_user(runtime.database(settings), accounts.CONSOLE, args.name)
    print(f"activated {user.username}")


def _reset_password(args: argparse.Namespace, settings: Settings) -> None:
    pool = runtime.database(settings)
    name = accounts.get_user(pool, args.name).username  # an unknown name fails before the password is asked
    password = _password(args, f"New password for {name} (at least {accounts.MIN_PASSWORD_LENGTH} characters): ")
    accounts.reset_password(pool, accounts.CONSOLE, name, password)
    print(f"new password set for {name}; its sessions are ended")


def _setup_link(args: argparse.Namespace, settings: Settings) -> None:
    from core.web import SETUP_PREFIX, public_url  # Starlette: only this command needs it

    token = accounts.create_setup_token(runtime.database(settings), "promptdev users setup-link")
    print(f"{public_url(settings, args.port)}{SETUP_PREFIX}{token}")
    print(f"(valid once, for {int(accounts.SETUP_TOKEN_TTL.total_seconds() // 60)} minutes: it creates an admin)",
          file=sys.stderr)


def register(subparsers: Any) -> None:
    """Add `users` to the promptdev command line."""
    group = subparsers.add_parser("users", help="create, list, deactivate and reset workbench users; setup links")
    sub = group.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    p = sub.add_parser("create", help="create a user (the password is asked for, or read with --password-stdin)")
    p.add_argument("name", help="1 to 64 of a-z, 0-9, '.', '_', '-'")
    p.add_argument("--admin", action="store_true", help="an instance admin: manages users")
    p.add_argument("--display-name", dest="display_name", help="the name pages show (default: the username)")
    p.add_argument("--password-stdin", dest="password_stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.set_defaults(func=_create)
    p = sub.add_parser("list", help="every user")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)
    p = sub.add_parser("deactivate", help="stop a user from signing in and end its sessions")
    p.add_argument("name")
    p.set_defaults(func=_deactivate)
    p = sub.add_parser("activate", help="let a deactivated user sign in again")
    p.add_argument("name")
    p.set_defaults(func=_activate)
    p = sub.add_parser("reset-password", help="set a user's password and end its sessions")
    p.add_argument("name")
    p.add_argument("--password-stdin", dest="password_stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.set_defaults(func=_reset_password)
    p = sub.add_parser("setup-link", help="print a one-time link (valid 1 hour) that creates an admin in the browser")
    p.add_argument("--port", type=int, default=8501, help="the port the app listens on (unless PROMPTDEV_BASE_URL "
                                                          "is set)")
    p.set_defaults(func=_setup_link)
