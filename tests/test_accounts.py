"""core.accounts on the real database: password hashing and rules, sessions (idle and absolute expiry, revocation),
login rate limits per account and per address, one-time setup tokens, and the admin checks (Forbidden for others)."""

from __future__ import annotations

import logging
import secrets

import pytest

from core import accounts
from core.errors import Conflict, Forbidden, InvalidInput, RateLimited, kind_of

PASSWORD = "a long enough passphrase"


def make(pool, name: str, *, admin: bool = False, password: str = PASSWORD) -> accounts.User:
    return accounts.create_user(pool, accounts.CONSOLE, name, password, is_admin=admin)


def sql(pool, query: str, *params):
    with pool.connection() as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else cur.rowcount


def test_passwords_are_argon2id_hashes_and_never_stored_or_logged(pool, caplog):
    caplog.set_level(logging.DEBUG)
    user = make(pool, "Ann", password=PASSWORD)
    assert user.username == "ann" and user.display_name == "ann" and not user.is_admin and user.active
    (stored,), = sql(pool, "SELECT password_hash FROM users WHERE id = %s", user.id)
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert accounts.verify_password(stored, PASSWORD) and not accounts.verify_password(stored, PASSWORD + "x")
    assert not accounts.verify_password("not a hash", PASSWORD)
    with pytest.raises(accounts.LoginFailed):
        accounts.login(pool, "ann", "wrong " + PASSWORD, "10.0.0.1")
    accounts.login(pool, "ann", PASSWORD, "10.0.0.1")
    dump = "\n".join(str(row) for table in ("users", "user_sessions", "login_attempts")
                     for row in sql(pool, f"SELECT * FROM {table}"))
    assert PASSWORD not in dump and PASSWORD not in caplog.text


@pytest.mark.parametrize("password, ok", [
    ("x" * (accounts.MIN_PASSWORD_LENGTH - 1), False), ("x" * accounts.MIN_PASSWORD_LENGTH, True),
    ("x" * (accounts.MAX_PASSWORD_LENGTH + 1), False), (None, False)])
def test_password_length(pool, password, ok):
    if ok:
        assert make(pool, "bob", password=password).username == "bob"
    else:
        with pytest.raises(accounts.AccountError) as caught:
            make(pool, "bob", password=password)
        assert kind_of(caught.value) is InvalidInput and "password" in str(caught.value)


@pytest.mark.parametrize("name", ["", " ", "-lead", "has space", "ü", "a" * 65, "semi;colon"])
def test_bad_usernames_are_refused(pool, name):
    with pytest.raises(accounts.AccountError):
        make(pool, name)


def test_nul_characters_are_refused_in_names_and_fail_a_login(pool):
    with pytest.raises(accounts.AccountError):
        accounts.create_user(pool, accounts.CONSOLE, "nul", "a long enough password", display_name="a\x00b")
    accounts.create_user(pool, accounts.CONSOLE, "nul", "a long enough password")
    with pytest.raises(accounts.LoginFailed):
        accounts.login(pool, "n\x00ul", "a long enough password", "192.0.2.1")


def test_usernames_are_unique_ignoring_case(pool):
    make(pool, "carol")
    with pytest.raises(accounts.UserExists) as caught:
        make(pool, " CAROL ")
    assert kind_of(caught.value) is Conflict


def test_login_opens_a_session_that_names_the_user(pool):
    make(pool, "dana")
    user, token = accounts.login(pool, "Dana", PASSWORD, "10.0.0.2")
    assert user.username == "dana" and user.last_login_at is not None
    assert len(token) >= 43
    assert accounts.user_for_session(pool, token) == user
    (stored,), = sql(pool, "SELECT token_hash FROM user_sessions")
    assert bytes(stored) == accounts.hash_token(token) and token.encode() not in bytes(stored)


def test_wrong_password_unknown_user_and_deactivated_user_fail_alike(pool):
    make(pool, "erin")
    make(pool, "root", admin=True)
    accounts.deactivate_user(pool, accounts.CONSOLE, "erin")
    messages = set()
    for name, password in (("erin", PASSWORD), ("root", "wrong password!"), ("nobody", PASSWORD)):
        with pytest.raises(accounts.LoginFailed) as caught:
            accounts.login(pool, name, password, "10.0.0.3")
        messages.add(str(caught.value))
    assert messages == {"Wrong username or password."}
    outcomes = [o for (o,) in sql(pool, "SELECT outcome FROM login_attempts ORDER BY id")]
    assert outcomes == ["inactive", "bad_password", "unknown_user"]


@pytest.mark.parametrize("token", [None, "", 42, "short", "x" * 200, "ünïcode" * 5, secrets.token_urlsafe(32)])
def test_forged_or_malformed_tokens_name_nobody(pool, token):
    make(pool, "fred")
    accounts.login(pool, "fred", PASSWORD)
    assert accounts.user_for_session(pool, token) is None
    assert accounts.revoke_session(pool, token) is False


def test_session_idle_expiry_and_touch(pool):
    make(pool, "gina")
    _, token = accounts.login(pool, "gina", PASSWORD)
    sql(pool, "UPDATE user_sessions SET last_seen_at = now() - interval '11 hours'")
    assert accounts.user_for_session(pool, token) is not None  # used: last_seen_at moves to now
    (fresh,), = sql(pool, "SELECT now() - last_seen_at < interval '1 minute' FROM user_sessions")
    assert fresh
    sql(pool, "UPDATE user_sessions SET last_seen_at = now() - %s - interval '1 second'", accounts.SESSION_IDLE)
    assert accounts.user_for_session(pool, token) is None


def test_session_absolute_expiry(pool):
    make(pool, "hank")
    _, token = accounts.login(pool, "hank", PASSWORD)
    (lifetime,), = sql(pool, "SELECT expires_at - created_at FROM user_sessions")
    assert lifetime == accounts.SESSION_LIFETIME
    sql(pool, "UPDATE user_sessions SET created_at = created_at - interval '8 days', "
              "expires_at = now() - interval '1 second'")  # in use all along (last_seen_at is recent)
    assert accounts.user_for_session(pool, token) is None


def test_logout_revokes_only_that_session(pool):
    make(pool, "ivy")
    _, first = accounts.login(pool, "ivy", PASSWORD)
    _, second = accounts.login(pool, "ivy", PASSWORD)
    assert accounts.revoke_session(pool, first) is True
    assert accounts.user_for_session(pool, first) is None
    assert accounts.user_for_session(pool, second) is not None
    assert accounts.revoke_session(pool, first) is False


def test_account_rate_limit_counts_failures_since_the_last_success(pool):
    make(pool, "jay")
    for _ in range(accounts.MAX_FAILURES_PER_ACCOUNT - 1):
        with pytest.raises(accounts.LoginFailed):
            accounts.login(pool, "jay", "wrong password!", "10.1.0.1")
    accounts.login(pool, "jay", PASSWORD, "10.1.0.1")  # a success starts the count again
    for i in range(accounts.MAX_FAILURES_PER_ACCOUNT):
        with pytest.raises(accounts.LoginFailed):
            accounts.login(pool, "jay", "wrong password!", f"10.1.0.{i + 2}")  # from anywhere
    with pytest.raises(RateLimited) as caught:
        accounts.login(pool, "jay", PASSWORD, "10.9.9.9")  # even the right password, from another address
    assert 0 < caught.value.retry_after <= accounts.LOGIN_WINDOW.total_seconds()
    assert caught.value.status == 429
    (last,), = sql(pool, "SELECT outcome FROM login_attempts ORDER BY id DESC LIMIT 1")
    assert last == "rate_limited"
    with pytest.raises(RateLimited):  # refused attempts do not count, but the limit holds
        accounts.login(pool, "jay", PASSWORD, "10.9.9.9")
    sql(pool, "UPDATE login_attempts SET at = at - %s", accounts.LOGIN_WINDOW)  # the window passes
    accounts.login(pool, "jay", PASSWORD, "10.9.9.9")


def test_address_rate_limit_spans_accounts(pool):
    make(pool, "kim")
    for i in range(accounts.MAX_FAILURES_PER_ADDRESS):
        with pytest.raises(accounts.LoginFailed):
            accounts.login(pool, f"guess{i}", PASSWORD, "192.0.2.7")
    with pytest.raises(RateLimited):
        accounts.login(pool, "kim", PASSWORD, "192.0.2.7")
    accounts.login(pool, "kim", PASSWORD, "192.0.2.8")  # another address is not held back


def test_address_rate_limit_holds_against_concurrent_guesses_at_many_names(pool):
    """Guesses at different names from one address, all at once, are counted one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    def guess(i: int) -> str:
        try:
            accounts.login(pool, f"burst{i}", PASSWORD, "192.0.2.9")
        except RateLimited:
            return "limited"
        except accounts.LoginFailed:
            return "failed"
        return "in"

    with ThreadPoolExecutor(8) as pool_of_threads:
        outcomes = list(pool_of_threads.map(guess, range(accounts.MAX_FAILURES_PER_ADDRESS + 12)))
    assert outcomes.count("failed") == accounts.MAX_FAILURES_PER_ADDRESS and outcomes.count("limited") == 12
    assert sql(pool, "SELECT count(*) FROM login_attempts WHERE outcome = 'unknown_user'") == \
        [(accounts.MAX_FAILURES_PER_ADDRESS,)]


def test_setup_token_is_valid_once(pool):
    token = accounts.first_run_setup_token(pool)
    assert token and accounts.setup_token_valid(pool, token)
    with pytest.raises(accounts.AccountError):  # a refused password leaves the token unspent
        accounts.create_admin_with_setup_token(pool, token, "root", "short")
    admin = accounts.create_admin_with_setup_token(pool, token, "root", PASSWORD, display_name="  The   Root ")
    assert admin.is_admin and admin.display_name == "The Root"
    assert not accounts.setup_token_valid(pool, token)
    with pytest.raises(accounts.SetupLinkInvalid) as caught:
        accounts.create_admin_with_setup_token(pool, token, "root2", PASSWORD)
    assert kind_of(caught.value) is Forbidden
    assert accounts.first_run_setup_token(pool) is None  # users exist: no link at start


def test_setup_token_expires(pool):
    token = accounts.create_setup_token(pool, "test")
    (ttl,), = sql(pool, "SELECT expires_at - created_at FROM setup_tokens")
    assert ttl == accounts.SETUP_TOKEN_TTL
    sql(pool, "UPDATE setup_tokens SET expires_at = now() - interval '1 second'")
    assert not accounts.setup_token_valid(pool, token)
    with pytest.raises(accounts.SetupLinkInvalid):
        accounts.create_admin_with_setup_token(pool, token, "late", PASSWORD)
    for forged in (secrets.token_urlsafe(32), "../../etc", None):
        with pytest.raises(accounts.SetupLinkInvalid):
            accounts.create_admin_with_setup_token(pool, forged, "late", PASSWORD)


def test_only_active_admins_manage_users(pool):
    admin = make(pool, "boss", admin=True)
    member = make(pool, "member")
    for call in (lambda: accounts.create_user(pool, member, "new", PASSWORD),
                 lambda: accounts.create_user(pool, member, "new", PASSWORD, is_admin=True),
                 lambda: accounts.list_users(pool, member),
                 lambda: accounts.deactivate_user(pool, member, "boss"),
                 lambda: accounts.activate_user(pool, member, "member"),
                 lambda: accounts.reset_password(pool, member, "boss", "taken over by member")):
        with pytest.raises(accounts.AdminRequired) as caught:
            call()
        assert kind_of(caught.value) is Forbidden and caught.value.status == 403
    # a stale object saying is_admin=True does not help: the database decides
    pretender = accounts.User(**{**member.__dict__, "is_admin": True})
    with pytest.raises(Forbidden):
        accounts.create_user(pool, pretender, "new", PASSWORD)
    created = accounts.create_user(pool, admin, "new", PASSWORD, display_name="New One")
    assert [u.username for u in accounts.list_users(pool, admin)] == ["boss", "member", "new"]
    (by,), = sql(pool, "SELECT created_by FROM users WHERE id = %s", created.id)
    assert by == admin.id
    second = make(pool, "boss2", admin=True)
    accounts.deactivate_user(pool, second, "boss")
    with pytest.raises(Forbidden):  # a deactivated admin manages nothing
        accounts.create_user(pool, admin, "another", PASSWORD)


def test_deactivation_ends_sessions_and_keeps_one_admin(pool):
    admin = make(pool, "chief", admin=True)
    make(pool, "lee")
    _, token = accounts.login(pool, "lee", PASSWORD)
    accounts.deactivate_user(pool, admin, "lee")
    assert accounts.user_for_session(pool, token) is None
    with pytest.raises(accounts.LoginFailed):
        accounts.login(pool, "lee", PASSWORD)
    accounts.activate_user(pool, admin, "lee")
    accounts.login(pool, "lee", PASSWORD)
    with pytest.raises(Conflict, match="yourself"):
        accounts.deactivate_user(pool, admin, "chief")
    with pytest.raises(Conflict, match="last active admin"):
        accounts.deactivate_user(pool, accounts.CONSOLE, "chief")
    with pytest.raises(accounts.UserNotFound):
        accounts.deactivate_user(pool, admin, "ghost")


def test_reset_and_change_password(pool):
    admin = make(pool, "head", admin=True)
    user = make(pool, "mo")
    _, old_session = accounts.login(pool, "mo", PASSWORD)
    accounts.reset_password(pool, admin, "mo", "a brand new passphrase")
    assert accounts.user_for_session(pool, old_session) is None
    with pytest.raises(accounts.LoginFailed):
        accounts.login(pool, "mo", PASSWORD)
    _, here = accounts.login(pool, "mo", "a brand new passphrase")
    _, elsewhere = accounts.login(pool, "mo", "a brand new passphrase")
    with pytest.raises(accounts.LoginFailed):
        accounts.change_password(pool, user, "not the current one", "yet another passphrase")
    with pytest.raises(accounts.AccountError):
        accounts.change_password(pool, user, "a brand new passphrase", "too short")
    accounts.change_password(pool, user, "a brand new passphrase", "yet another passphrase", keep_session=here)
    assert accounts.user_for_session(pool, here) is not None
    assert accounts.user_for_session(pool, elsewhere) is None
    accounts.login(pool, "mo", "yet another passphrase")
