"""Accounts: who may use the workbench. Users, their passwords, browser sessions, login attempts and one-time setup
links.

- Passwords are hashed with Argon2id (argon2-cffi, OWASP's parameters: 19 MiB, 2 iterations, 1 lane); at least
  MIN_PASSWORD_LENGTH characters. A password is never logged, stored or put in an error message.
- A session is a random token (`secrets.token_urlsafe(32)`) the browser keeps in a cookie; the database keeps its
  SHA-256 only. It ends when revoked (logout, deactivation, a password reset or change), after SESSION_IDLE without
  use, or SESSION_LIFETIME after login, whichever comes first.
- Every login attempt is recorded. Failures are limited per account (MAX_FAILURES_PER_ACCOUNT in LOGIN_WINDOW, since
  the account's last success) and per address (MAX_FAILURES_PER_ADDRESS in LOGIN_WINDOW): past that, `login`
  raises RateLimited with `retry_after`, before looking at the password. The counts live in the database, so they
  hold across restarts and processes.
- A setup link carries a random token valid once, for SETUP_TOKEN_TTL: it creates an admin. The app prints one at
  start while there is no user; `promptdev users setup-link` prints another.
- Administration (create, list, deactivate, activate, reset a password) takes the acting user and checks, in the
  database, that it is an active instance admin: Forbidden otherwise. CONSOLE is the acting user of the command line
  (whoever can run it can reach the database anyway).

Times are the database's (`now()`), so expiry does not depend on the clocks of the processes.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from core.db import LockKey
from core.errors import Conflict, Forbidden, InvalidInput, NotFound, RateLimited

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024          # hashing is bounded; nobody types more
SESSION_IDLE = timedelta(hours=12)
SESSION_LIFETIME = timedelta(days=7)
SESSION_TOUCH_EVERY = timedelta(minutes=1)  # last_seen_at is written at most this often per session
SETUP_TOKEN_TTL = timedelta(hours=1)
LOGIN_WINDOW = timedelta(minutes=15)
MAX_FAILURES_PER_ACCOUNT = 5
MAX_FAILURES_PER_ADDRESS = 20
SESSION_COOKIE = "promptdev_session"  # the cookie that holds a session token (set by core.web, read by the pages)

USERNAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)  # Argon2id


class AccountError(InvalidInput):
    """A username, display name or password that cannot be accepted."""


class UserNotFound(NotFound):
    """No user has this name."""


class UserExists(Conflict):
    """A user has this name already."""


class LoginFailed(Forbidden):
    """Wrong username or password, or the account is deactivated (the message does not say which)."""


class AdminRequired(Forbidden):
    """Only an active instance admin may do this."""


class SetupLinkInvalid(Forbidden):
    """The setup link is unknown, used already or expired."""


@dataclass(frozen=True)
class User:
    """A workbench user (never its password hash)."""

    id: int
    username: str
    display_name: str
    is_admin: bool
    active: bool
    created_at: datetime | None
    last_login_at: datetime | None


# The acting user of the command line: `actor is CONSOLE` passes the admin checks.
CONSOLE = User(id=0, username="console", display_name="the command line", is_admin=True, active=True,
               created_at=None, last_login_at=None)

_USER_COLUMNS = "u.id, u.username, u.display_name, u.is_admin, u.active, u.created_at, u.last_login_at"


def hash_token(token: str) -> bytes:
    """The SHA-256 of a session or setup token: what the database keeps."""
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


def _well_formed(token: object) -> bool:
    """A token as token_urlsafe makes them (anything else is refused without asking the database)."""
    return isinstance(token, str) and bool(_TOKEN_PATTERN.match(token))


# ------------------------------------------------------------------------------------------------------ passwords

def check_password(password: object) -> str:
    """The password if it is acceptable: a string of MIN_PASSWORD_LENGTH to MAX_PASSWORD_LENGTH characters."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"A password needs at least {MIN_PASSWORD_LENGTH} characters.")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise AccountError(f"A password has at most {MAX_PASSWORD_LENGTH} characters.")
    return password


def hash_password(password: str) -> str:
    """The Argon2id hash (PHC string) of an acceptable password."""
    return _HASHER.hash(check_password(password))


def verify_password(password_hash: str, password: str) -> bool:
    """True when the password matches the hash (a malformed hash never matches)."""
    try:
        return _HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


_dummy_hash: str | None = None


def _spend_a_verification(password: str) -> None:
    """Verify against a throwaway hash: an unknown user costs as much time as a wrong password."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = _HASHER.hash(secrets.token_urlsafe(16))
    verify_password(_dummy_hash, password)


def normalize_username(username: object) -> str:
    """The username as stored: trimmed, lower case; AccountError unless 1-64 of a-z, 0-9, `.`, `_`, `-` (starting
    with a letter or digit)."""
    name = username.strip().lower() if isinstance(username, str) else ""
    if not USERNAME_PATTERN.match(name):
        raise AccountError("A username has 1 to 64 characters: letters, digits, '.', '_' or '-', starting with a "
                           "letter or digit.")
    return name


def _display_name(display_name: object, username: str) -> str:
    name = " ".join(display_name.split()) if isinstance(display_name, str) else ""
    if "\x00" in name:
        raise AccountError("A display name cannot contain NUL characters.")
    if len(name) > 200:
        raise AccountError("A display name has at most 200 characters.")
    return name or username


# ---------------------------------------------------------------------------------------------------------- users

def _require_admin(conn: psycopg.Connection, actor: User) -> None:
    """Raise AdminRequired unless actor is CONSOLE or, in the database now, an active admin."""
    if actor is CONSOLE:
        return
    row = conn.execute("SELECT is_admin AND active FROM users WHERE id = %s", (actor.id,)).fetchone()
    if not row or not row[0]:
        raise AdminRequired("Only an admin may manage users.")


def _get(conn: psycopg.Connection, username: str, *, lock: bool = False) -> User:
    with conn.cursor(row_factory=class_row(User)) as cur:
        user = cur.execute(f"SELECT {_USER_COLUMNS} FROM users u WHERE u.username = %s"
                           f"{' FOR UPDATE' if lock else ''}", (username,)).fetchone()
    if user is None:
        raise UserNotFound(f"No user named {username!r}.")
    return user


def _insert_user(conn: psycopg.Connection, username: str, password: str, display_name: str | None,
                 is_admin: bool, created_by: int | None) -> User:
    name = normalize_username(username)
    shown = _display_name(display_name, name)
    password_hash = hash_password(password)
    try:
        with conn.transaction(), conn.cursor(row_factory=class_row(User)) as cur:
            return cur.execute(
                f"""INSERT INTO users AS u (username, display_name, password_hash, is_admin, created_by)
                    VALUES (%s, %s, %s, %s, %s) RETURNING {_USER_COLUMNS}""",
                (name, shown, password_hash, is_admin, created_by)).fetchone()
    except psycopg.errors.UniqueViolation:
        raise UserExists(f"A user named {name!r} exists already.") from None


def has_users(pool: ConnectionPool) -> bool:
    """True once any user exists."""
    with pool.connection() as conn:
        return conn.execute("SELECT EXISTS (SELECT 1 FROM users)").fetchone()[0]


def create_user(pool: ConnectionPool, actor: User, username: str, password: str, *,
                display_name: str | None = None, is_admin: bool = False) -> User:
    """Create a user (actor: an admin, or CONSOLE); AccountError for a bad name or password, UserExists."""
    with pool.connection() as conn:
        _require_admin(conn, actor)
        return _insert_user(conn, username, password, display_name, is_admin,
                            None if actor is CONSOLE else actor.id)


def get_user(pool: ConnectionPool, username: str) -> User:
    """The user of this name; UserNotFound."""
    with pool.connection() as conn:
        return _get(conn, normalize_username(username))


def list_users(pool: ConnectionPool, actor: User) -> list[User]:
    """Every user, by name (actor: an admin, or CONSOLE)."""
    with pool.connection() as conn:
        _require_admin(conn, actor)
        with conn.cursor(row_factory=class_row(User)) as cur:
            return cur.execute(f"SELECT {_USER_COLUMNS} FROM users u ORDER BY u.username").fetchall()


def _revoke_all(conn: psycopg.Connection, user_id: int, keep: bytes | None = None) -> int:
    return conn.execute(
        "UPDATE user_sessions SET revoked_at = now() WHERE user_id = %s AND revoked_at IS NULL "
        "AND token_hash IS DISTINCT FROM %s", (user_id, keep)).rowcount


def deactivate_user(pool: ConnectionPool, actor: User, username: str) -> User:
    """Deactivate a user and end its sessions (actor: an admin, or CONSOLE). Conflict for oneself and for the last
    active admin: someone must be able to sign in and manage users."""
    name = normalize_username(username)
    with pool.connection() as conn, conn.transaction():
        _require_admin(conn, actor)
        conn.execute("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")  # two admins deactivating each other
        user = _get(conn, name, lock=True)
        if user.id == actor.id:
            raise Conflict("You cannot deactivate yourself.")
        if user.is_admin and user.active:
            others = conn.execute("SELECT count(*) FROM users WHERE is_admin AND active AND id <> %s",
                                  (user.id,)).fetchone()[0]
            if not others:
                raise Conflict(f"{name!r} is the last active admin.")
        conn.execute("UPDATE users SET active = false WHERE id = %s", (user.id,))
        _revoke_all(conn, user.id)
        return _get(conn, name)


def activate_user(pool: ConnectionPool, actor: User, username: str) -> User:
    """Let a deactivated user sign in again (actor: an admin, or CONSOLE)."""
    name = normalize_username(username)
    with pool.connection() as conn, conn.transaction():
        _require_admin(conn, actor)
        user = _get(conn, name, lock=True)
        conn.execute("UPDATE users SET active = true WHERE id = %s", (user.id,))
        return _get(conn, name)


def reset_password(pool: ConnectionPool, actor: User, username: str, new_password: str) -> User:
    """Set another user's password and end its sessions (actor: an admin, or CONSOLE)."""
    name = normalize_username(username)
    password_hash = hash_password(new_password)
    with pool.connection() as conn, conn.transaction():
        _require_admin(conn, actor)
        user = _get(conn, name, lock=True)
        conn.execute("UPDATE users SET password_hash = %s, password_changed_at = now() WHERE id = %s",
                     (password_hash, user.id))
        _revoke_all(conn, user.id)
        return user


def change_password(pool: ConnectionPool, user: User, current_password: str, new_password: str, *,
                    keep_session: str | None = None, address: str | None = None) -> None:
    """A user changes its own password: the current one must match (LoginFailed otherwise; a mismatch counts as a
    failed login, and the login rate limits apply). Its other sessions end; keep_session (the token of the session
    asking) stays."""
    password_hash = hash_password(new_password)
    current = (current_password if isinstance(current_password, str) else "")[:MAX_PASSWORD_LENGTH + 1]
    wait, matched = None, False
    with pool.connection() as conn:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (int(LockKey.LOGIN), user.username))
            wait = _account_retry_after(conn, user.username)
            row = None if wait is not None else conn.execute(
                "SELECT password_hash FROM users WHERE id = %s AND active FOR UPDATE", (user.id,)).fetchone()
            matched = row is not None and verify_password(row[0], current)
            if matched:
                conn.execute("UPDATE users SET password_hash = %s, password_changed_at = now() WHERE id = %s",
                             (password_hash, user.id))
                _revoke_all(conn, user.id, hash_token(keep_session) if _well_formed(keep_session) else None)
            elif row is not None:
                _record(conn, user.username, user.id, address, "bad_password")
    if wait is not None:
        raise RateLimited(f"Too many failed attempts; try again in {math.ceil(wait)} seconds.", retry_after=wait)
    if not matched:
        raise LoginFailed("The current password is wrong.")


# ----------------------------------------------------------------------------------------------- login, sessions

def _retry_after(conn: psycopg.Connection, where: str, params: tuple, limit: int) -> float | None:
    """Seconds until fewer than `limit` failures match `where` in the window; None when fewer already do."""
    row = conn.execute(
        f"""SELECT extract(epoch FROM at + %s - now()) FROM login_attempts
            WHERE outcome IN ('bad_password', 'unknown_user', 'inactive') AND at > now() - %s AND {where}
            ORDER BY at DESC OFFSET %s LIMIT 1""", (LOGIN_WINDOW, LOGIN_WINDOW, *params, limit - 1)).fetchone()
    return None if row is None else max(1.0, float(row[0]))


def _account_retry_after(conn: psycopg.Connection, username: str) -> float | None:
    """_retry_after for one account: its failures since its last successful login."""
    return _retry_after(conn, "username = %s AND at > coalesce((SELECT max(at) FROM login_attempts "
                              "WHERE username = %s AND outcome = 'ok'), '-infinity')",
                        (username, username), MAX_FAILURES_PER_ACCOUNT)


def _record(conn: psycopg.Connection, username: str, user_id: int | None, address: str | None,
            outcome: str) -> None:
    conn.execute("INSERT INTO login_attempts (username, user_id, address, outcome) VALUES (%s, %s, %s, %s)",
                 (username, user_id, address, outcome))


def authenticate(pool: ConnectionPool, username: str, password: str, address: str | None = None) -> User:
    """Check a username and password and record the attempt: the user, or LoginFailed (wrong name or password, or a
    deactivated account, alike), or RateLimited (too many failures for the account or from the address)."""
    typed = (username.strip().lower() if isinstance(username, str) else "")[:64]
    typed = typed.replace("\x00", "\ufffd")  # PostgreSQL text holds no NUL; no username has either character
    password = (password if isinstance(password, str) else "")[:MAX_PASSWORD_LENGTH + 1]  # longer never matches
    user, wait = None, None
    with pool.connection() as conn:
        with conn.transaction():  # the attempt is recorded whatever comes of it: the errors are raised after
            # One login at a time per name: the count and the record of concurrent guesses stay exact.
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (int(LockKey.LOGIN), typed))
            if address:  # and one per address (after the name's: always in this order), for the address's count
                conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (int(LockKey.LOGIN), "@" + address))
            wait = _account_retry_after(conn, typed)
            if wait is None and address:
                wait = _retry_after(conn, "address = %s", (address,), MAX_FAILURES_PER_ADDRESS)
            if wait is not None:
                _record(conn, typed, None, address, "rate_limited")
            else:
                user = _check_password_of(conn, typed, password, address)
    if wait is not None:
        raise RateLimited(f"Too many failed logins; try again in {math.ceil(wait)} seconds.", retry_after=wait)
    if user is None:
        raise LoginFailed("Wrong username or password.")
    return user


def _check_password_of(conn: psycopg.Connection, typed: str, password: str, address: str | None) -> User | None:
    """Verify and record one attempt: the user when it may sign in (its last login now), else None."""
    row = conn.execute("SELECT id, password_hash, active FROM users WHERE username = %s", (typed,)).fetchone()
    if row is None:
        _spend_a_verification(password)
        _record(conn, typed, None, address, "unknown_user")
        return None
    user_id, password_hash, active = row
    outcome = "bad_password" if not verify_password(password_hash, password) else "ok" if active else "inactive"
    _record(conn, typed, user_id, address, outcome)
    if outcome != "ok":
        return None
    if _HASHER.check_needs_rehash(password_hash):
        conn.execute("UPDATE users SET password_hash = %s WHERE id = %s", (_HASHER.hash(password), user_id))
    with conn.cursor(row_factory=class_row(User)) as cur:
        return cur.execute(f"UPDATE users u SET last_login_at = now() WHERE id = %s RETURNING {_USER_COLUMNS}",
                           (user_id,)).fetchone()


def create_session(pool: ConnectionPool, user: User, address: str | None = None) -> str:
    """Open a session for a user: the token for its cookie (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    with pool.connection() as conn:
        # Sessions that ended a while ago go (what is left of them is in login_attempts).
        conn.execute("DELETE FROM user_sessions WHERE user_id = %s AND (expires_at < now() - interval '1 day' "
                     "OR revoked_at < now() - interval '1 day')", (user.id,))
        conn.execute("INSERT INTO user_sessions (token_hash, user_id, expires_at, address) "
                     "VALUES (%s, %s, now() + %s, %s)", (hash_token(token), user.id, SESSION_LIFETIME, address))
    return token


def login(pool: ConnectionPool, username: str, password: str, address: str | None = None) -> tuple[User, str]:
    """authenticate, then create_session: the user and its new session token."""
    user = authenticate(pool, username, password, address)
    return user, create_session(pool, user, address)


def user_for_session(pool: ConnectionPool, token: object) -> User | None:
    """The active user whose live session this token is, or None (unknown, revoked, idle too long, expired,
    deactivated, or not a token at all). Marks the session used."""
    if not _well_formed(token):
        return None
    token_hash = hash_token(token)
    with pool.connection() as conn:
        with conn.cursor(row_factory=class_row(User)) as cur:
            user = cur.execute(
                f"""SELECT {_USER_COLUMNS} FROM user_sessions s JOIN users u ON u.id = s.user_id
                    WHERE s.token_hash = %s AND s.revoked_at IS NULL AND u.active
                      AND s.expires_at > now() AND s.last_seen_at > now() - %s""",
                (token_hash, SESSION_IDLE)).fetchone()
        if user is not None:
            conn.execute("UPDATE user_sessions SET last_seen_at = now() WHERE token_hash = %s "
                         "AND last_seen_at < now() - %s", (token_hash, SESSION_TOUCH_EVERY))
        return user


def revoke_session(pool: ConnectionPool, token: object) -> bool:
    """End a session (logout); False when it was not live."""
    if not _well_formed(token):
        return False
    with pool.connection() as conn:
        return conn.execute("UPDATE user_sessions SET revoked_at = now() WHERE token_hash = %s "
                            "AND revoked_at IS NULL", (hash_token(token),)).rowcount > 0


# --------------------------------------------------------------------------------------------------- setup links

def _insert_setup_token(conn: psycopg.Connection, created_by: str) -> str:
    token = secrets.token_urlsafe(32)
    conn.execute("DELETE FROM setup_tokens WHERE expires_at < now() - interval '30 days'")
    conn.execute("INSERT INTO setup_tokens (token_hash, created_by, expires_at) VALUES (%s, %s, now() + %s)",
                 (hash_token(token), created_by, SETUP_TOKEN_TTL))
    return token


def create_setup_token(pool: ConnectionPool, created_by: str) -> str:
    """A new one-time setup token (valid SETUP_TOKEN_TTL): whoever opens its link creates an admin."""
    with pool.connection() as conn:
        return _insert_setup_token(conn, created_by)


def first_run_setup_token(pool: ConnectionPool) -> str | None:
    """A setup token when no user exists yet (the app prints its link at start), else None."""
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (int(LockKey.FIRST_RUN),))
        if conn.execute("SELECT EXISTS (SELECT 1 FROM users)").fetchone()[0]:
            return None
        return _insert_setup_token(conn, "first run")


def setup_token_valid(pool: ConnectionPool, token: object) -> bool:
    """True while a setup token is unused and unexpired."""
    if not _well_formed(token):
        return False
    with pool.connection() as conn:
        return conn.execute("SELECT EXISTS (SELECT 1 FROM setup_tokens WHERE token_hash = %s AND used_at IS NULL "
                            "AND expires_at > now())", (hash_token(token),)).fetchone()[0]


def create_admin_with_setup_token(pool: ConnectionPool, token: object, username: str, password: str, *,
                                  display_name: str | None = None) -> User:
    """Spend a setup token on creating an admin; SetupLinkInvalid when it is unknown, used or expired (the token
    stays unspent when the name or password is refused)."""
    if not _well_formed(token):
        raise SetupLinkInvalid("This setup link is invalid, used or expired.")
    normalize_username(username)
    check_password(password)
    with pool.connection() as conn, conn.transaction():
        row = conn.execute("SELECT 1 FROM setup_tokens WHERE token_hash = %s AND used_at IS NULL "
                           "AND expires_at > now() FOR UPDATE", (hash_token(token),)).fetchone()
        if row is None:
            raise SetupLinkInvalid("This setup link is invalid, used or expired.")
        user = _insert_user(conn, username, password, display_name, True, None)
        conn.execute("UPDATE setup_tokens SET used_at = now(), used_by = %s WHERE token_hash = %s",
                     (user.id, hash_token(token)))
        return user
