"""The served app over HTTP (tests/app_server.py: `streamlit run app.py` on 127.0.0.1): nothing but the sign-in
routes and the health check without a session — no page, no static file, no `/_stcore` endpoint and no websocket —;
forged and expired cookies are refused; login with CSRF protection and rate limits; logout revokes; the first-run
setup link creates the first admin once."""

from __future__ import annotations

import http.client
import re
import time
import urllib.parse
from http.cookies import SimpleCookie

import pytest
import websockets.exceptions
import websockets.sync.client
from streamlit.proto.BackMsg_pb2 import BackMsg

from core import accounts, db
from core.web import CSRF_COOKIE, SESSION_CACHE_SECONDS, SESSION_COOKIE
from tests.app_server import AppServer, cloned_database, drop_database
from tests.conftest import free_port

PASSWORD = "alice's long passphrase"


@pytest.fixture(scope="module")
def server(pg_server_url, template_db, default_model_path, tmp_path_factory):
    name, url = cloned_database(pg_server_url, template_db)
    app = AppServer(url, tmp_path_factory.mktemp("served") / "data", default_model_path, free_port())
    try:
        app.start()
        yield app
    finally:
        app.stop()
        drop_database(pg_server_url, name, url)


@pytest.fixture(scope="module")
def pool(server):
    return db.get_pool(server.settings)


@pytest.fixture(autouse=True)
def no_earlier_failures(pool):
    """Each test starts with no failed logins on record (the rate limits count them)."""
    with pool.connection() as conn:
        conn.execute("DELETE FROM login_attempts")


@pytest.fixture(scope="module")
def alice(pool):
    return accounts.create_user(pool, accounts.CONSOLE, "alice", PASSWORD, display_name="Alice")


class Response:
    """What came back: status, headers (lower-case names, last value), Set-Cookie values by name, body."""

    def __init__(self, raw: http.client.HTTPResponse):
        self.status = raw.status
        self.headers = {k.lower(): v for k, v in raw.getheaders()}
        self.set_cookies = {}
        for header in raw.headers.get_all("Set-Cookie") or []:
            cookie = SimpleCookie()
            cookie.load(header)
            for key, morsel in cookie.items():
                self.set_cookies[key] = (morsel.value, header)
        self.body = raw.read().decode("utf-8", "replace")

    def field(self, name: str) -> str:
        """The value of a hidden form field."""
        match = re.search(rf"name={name} value='([^']*)'", self.body)
        assert match, f"no field {name} in {self.body[:500]}"
        return match.group(1)


def call(server: AppServer, method: str, path: str, *, cookies: dict[str, str] | None = None,
         form: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    sent = dict(headers or {})
    if cookies:
        sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    body = None
    if form is not None:
        body = urllib.parse.urlencode(form)
        sent["Content-Type"] = "application/x-www-form-urlencoded"
    conn.request(method, path, body=body, headers=sent)
    try:
        return Response(conn.getresponse())
    finally:
        conn.close()


def login(server: AppServer, username: str, password: str, *, headers: dict[str, str] | None = None,
          **extra: str) -> Response:
    """GET the form (CSRF cookie and field), then POST it (with these extra headers)."""
    page = call(server, "GET", "/login")
    csrf = page.set_cookies[CSRF_COOKIE][0]
    assert page.field("csrf") == csrf
    return call(server, "POST", "/login", cookies={CSRF_COOKIE: csrf}, headers=headers,
                form={"csrf": csrf, "username": username, "password": password, **extra})


def websocket_status(server: AppServer, cookies: dict[str, str] | None = None, origin: str | None = None) -> int:
    """Open Streamlit's websocket (from this Origin): 101 when accepted, else the HTTP status of the refusal."""
    header = {"Cookie": "; ".join(f"{k}={v}" for k, v in (cookies or {}).items())} if cookies else None
    try:
        with websockets.sync.client.connect(f"ws://127.0.0.1:{server.port}/_stcore/stream", open_timeout=20,
                                            additional_headers=header, subprotocols=["streamlit"],
                                            origin=origin):
            return 101
    except websockets.exceptions.InvalidStatus as exc:
        return exc.response.status_code


def test_health_answers_without_a_session(server):
    response = call(server, "GET", "/healthz")
    assert (response.status, response.body) == (200, "ok")


def test_first_start_prints_a_setup_link_that_creates_the_first_admin_once(server, pool):
    match = re.search(r"http://127\.0\.0\.1:\d+(/setup/[A-Za-z0-9_-]+)", server.output())
    assert match, server.output()
    path = match.group(1)
    page = call(server, "GET", path)
    assert page.status == 200 and "Set up PromptDev" in page.body
    csrf = page.set_cookies[CSRF_COOKIE][0]
    fields = {"csrf": csrf, "username": "root", "display_name": "Root", "password": "the root passphrase"}
    differ = call(server, "POST", path, cookies={CSRF_COOKIE: csrf}, form={**fields, "password2": "something else!"})
    assert differ.status == 422 and "The two passwords differ." in differ.body
    done = call(server, "POST", path, cookies={CSRF_COOKIE: csrf}, form={**fields, "password2": fields["password"]})
    assert done.status == 303 and done.headers["location"] == "/"
    token = done.set_cookies[SESSION_COOKIE][0]
    assert accounts.user_for_session(pool, token).is_admin
    assert call(server, "GET", "/", cookies={SESSION_COOKIE: token}).status == 200
    again = call(server, "GET", path)
    assert again.status == 404 and "invalid, used or expired" in again.body
    reuse = call(server, "POST", path, cookies={CSRF_COOKIE: csrf}, form={**fields, "username": "root2",
                                                                        "password2": fields["password"]})
    assert reuse.status == 404
    with pytest.raises(accounts.UserNotFound):
        accounts.get_user(pool, "root2")


def test_a_browser_without_a_session_is_sent_to_the_login_form(server):
    root = call(server, "GET", "/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert root.status == 303 and root.headers["location"] == "/login"
    deep = call(server, "GET", "/templates?x=1", headers={"Accept": "text/html"})
    assert deep.status == 303 and deep.headers["location"] == "/login?next=%2Ftemplates%3Fx%3D1"
    form = call(server, "GET", "/login?next=%2Ftemplates")
    assert form.status == 200 and "<form method=post action='/login'>" in form.body
    assert form.field("next") == "/templates"
    assert "frame-ancestors 'none'" in form.headers["content-security-policy"]


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/templates"), ("GET", "/index.html"), ("GET", "/static/js/index.js"),
    ("GET", "/favicon.png"), ("GET", "/_stcore/health"), ("GET", "/_stcore/host-config"),
    ("GET", "/_stcore/metrics"), ("GET", "/_stcore/stream"), ("PUT", "/_stcore/upload_file/s/f"),
    ("GET", "/media/abc.png"), ("GET", "/component/x/index.html"), ("GET", "/app/static/x.txt"),
    ("GET", "/setup/../_stcore/health"), ("GET", "/login/../_stcore/host-config"), ("POST", "/"),
])
def test_other_clients_get_401_everywhere_but_the_sign_in_routes(server, method, path):
    response = call(server, method, path, headers={"Accept": "*/*"})
    assert response.status == 401 and response.body == "Sign in first: /login", (path, response.body[:200])


def test_an_anonymous_websocket_is_refused_before_it_opens(server):
    assert websocket_status(server) == 403
    # the same with a raw upgrade request, as any client would send it
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    conn.request("GET", "/_stcore/stream", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Protocol": "streamlit"})
    response = conn.getresponse()
    assert response.status == 403 and response.getheader("upgrade") is None
    conn.close()


def test_forged_and_expired_cookies_are_refused(server, pool, alice):
    forged = "A" * 43  # well formed, but no session
    assert call(server, "GET", "/", cookies={SESSION_COOKIE: forged}).status == 401
    assert websocket_status(server, {SESSION_COOKIE: forged}) == 403
    token = accounts.create_session(pool, alice)
    assert call(server, "GET", "/", cookies={SESSION_COOKIE: token}).status == 200
    assert websocket_status(server, {SESSION_COOKIE: token}) == 101
    with pool.connection() as conn:
        conn.execute("UPDATE user_sessions SET expires_at = now() - interval '1 second' WHERE token_hash = %s",
                     (accounts.hash_token(token),))
    time.sleep(SESSION_CACHE_SECONDS + 0.5)  # the middleware trusts a checked session that long
    assert call(server, "GET", "/", cookies={SESSION_COOKIE: token}).status == 401
    assert websocket_status(server, {SESSION_COOKIE: token}) == 403


def test_a_websocket_or_a_write_from_another_origin_of_this_site_is_refused(server, pool, alice):
    """The session cookie is SameSite=Lax: a page of the same site on another port (or, behind a proxy, another
    scheme) sends it along. Streamlit itself lets in any origin on 127.0.0.1, localhost or this machine's
    addresses; the workbench's websocket opens only from the workbench's own origin."""
    token = accounts.create_session(pool, alice)
    assert websocket_status(server, {SESSION_COOKIE: token}, origin=server.url) == 101
    for origin in (f"http://127.0.0.1:{server.port + 1}", f"http://localhost:{server.port}", "null"):
        assert websocket_status(server, {SESSION_COOKIE: token}, origin=origin) == 403, origin
        for method in ("POST", "PUT", "DELETE"):  # nor does anything but a read reach the app from there
            response = call(server, method, "/_stcore/upload_file/s/f", cookies={SESSION_COOKIE: token},
                            headers={"Origin": origin})
            assert response.status == 403 and "another origin" in response.body, (method, origin)
    for headers in ({}, {"Origin": server.url}):
        response = call(server, "PUT", "/_stcore/upload_file/s/f", cookies={SESSION_COOKIE: token}, headers=headers)
        assert "another origin" not in response.body


def test_the_workbench_is_framed_by_nothing_but_itself(server, pool, alice):
    """Another port of this host is the same site: the Lax cookie comes along into its frames. Only the workbench
    frames the workbench (its components are frames of its own)."""
    token = accounts.create_session(pool, alice)
    for path in ("/", "/static/js/index.js", "/_stcore/health"):
        response = call(server, "GET", path, cookies={SESSION_COOKIE: token})
        assert response.status == 200 and response.headers.get("x-frame-options") == "SAMEORIGIN", path
        assert "frame-ancestors 'self'" in response.headers.get("content-security-policy", ""), path


def test_an_open_websocket_closes_once_its_session_has_ended(server, pool, alice):
    """A tab left open keeps its websocket: after a sign-out, a deactivation or a password reset, the next message it
    sends (an interaction, a fragment's timed rerun) closes it, instead of reaching the app without a session."""
    token = accounts.create_session(pool, alice)
    with websockets.sync.client.connect(f"ws://127.0.0.1:{server.port}/_stcore/stream", open_timeout=20,
                                        additional_headers={"Cookie": f"{SESSION_COOKIE}={token}"},
                                        subprotocols=["streamlit"]) as ws:
        assert accounts.revoke_session(pool, token)
        time.sleep(SESSION_CACHE_SECONDS + 0.5)  # the middleware trusts a checked session that long
        ws.send(BackMsg(app_heartbeat=True).SerializeToString())  # a message the app answers with nothing
        deadline = time.monotonic() + 20
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            while time.monotonic() < deadline:
                ws.recv(timeout=deadline - time.monotonic())
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_login_sets_a_safe_cookie_and_logout_revokes_it(server, pool, alice):
    response = login(server, "Alice", PASSWORD, next="/templates")
    assert response.status == 303 and response.headers["location"] == "/templates"
    token, header = response.set_cookies[SESSION_COOKIE]
    assert "HttpOnly" in header and "SameSite=lax" in header and "Secure" not in header and "Path=/" in header
    assert accounts.user_for_session(pool, token).username == "alice"
    page = call(server, "GET", "/", cookies={SESSION_COOKIE: token})
    assert page.status == 200 and "<html" in page.body.lower()
    assert call(server, "GET", "/_stcore/health", cookies={SESSION_COOKIE: token}).status == 200
    assert websocket_status(server, {SESSION_COOKIE: token}) == 101

    confirm = call(server, "GET", "/logout", cookies={SESSION_COOKIE: token})
    assert confirm.status == 200 and "Alice" in confirm.body
    csrf = confirm.set_cookies[CSRF_COOKIE][0]
    refused = call(server, "POST", "/logout", cookies={SESSION_COOKIE: token, CSRF_COOKIE: csrf}, form={})
    assert refused.status == 403 and accounts.user_for_session(pool, token) is not None
    out = call(server, "POST", "/logout", cookies={SESSION_COOKIE: token, CSRF_COOKIE: csrf}, form={"csrf": csrf})
    assert out.status == 303 and out.headers["location"] == "/login"
    assert out.set_cookies[SESSION_COOKIE][0] == "" and "Max-Age=0" in out.set_cookies[SESSION_COOKIE][1]
    assert accounts.user_for_session(pool, token) is None
    assert call(server, "GET", "/", cookies={SESSION_COOKIE: token}).status == 401
    assert websocket_status(server, {SESSION_COOKIE: token}) == 403


def test_login_form_needs_its_csrf_token_and_this_origin(server, pool, alice):
    page = call(server, "GET", "/login")
    csrf = page.set_cookies[CSRF_COOKIE][0]
    good = {"username": "alice", "password": PASSWORD}
    attempts = [
        ({}, {**good}),                                           # no cookie, no field
        ({CSRF_COOKIE: csrf}, {**good}),                          # cookie, no field
        ({}, {**good, "csrf": csrf}),                             # field, no cookie
        ({CSRF_COOKIE: csrf}, {**good, "csrf": csrf[:-2] + "xx"}),  # mismatch
    ]
    for cookies, form in attempts:
        response = call(server, "POST", "/login", cookies=cookies, form=form)
        assert response.status == 403 and SESSION_COOKIE not in response.set_cookies
        assert "came from another site" in response.body
    cross = call(server, "POST", "/login", cookies={CSRF_COOKIE: csrf}, form={**good, "csrf": csrf},
                 headers={"Origin": "http://evil.example"})
    assert cross.status == 403
    with pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM login_attempts").fetchone()[0] == 0  # never got to the password
    same = call(server, "POST", "/login", cookies={CSRF_COOKIE: csrf}, form={**good, "csrf": csrf},
                headers={"Origin": server.url})
    assert same.status == 303


def test_failed_logins_are_rate_limited_per_account(server, pool, alice):
    for _ in range(accounts.MAX_FAILURES_PER_ACCOUNT):
        response = login(server, "alice", "not alice's password")
        assert response.status == 401 and "Wrong username or password." in response.body
    limited = login(server, "alice", PASSWORD)
    assert limited.status == 429 and SESSION_COOKIE not in limited.set_cookies
    assert 0 < int(limited.headers["retry-after"]) <= accounts.LOGIN_WINDOW.total_seconds()
    assert "Too many failed logins" in limited.body


def test_a_forwarded_for_header_does_not_escape_the_per_address_limit(server, pool, alice):
    """Without a proxy in front (no PROMPTDEV_BASE_URL) X-Forwarded-For is whatever the client says. Uvicorn
    believes it from loopback; the login limits must not: a new address per guess is no new allowance."""
    for i in range(accounts.MAX_FAILURES_PER_ADDRESS):
        response = login(server, f"nobody{i}", "not anyone's password", headers={"X-Forwarded-For": f"10.0.{i}.1"})
        assert response.status == 401
    limited = login(server, "alice", PASSWORD, headers={"X-Forwarded-For": "10.99.0.1"})
    assert limited.status == 429 and SESSION_COOKIE not in limited.set_cookies
    with pool.connection() as conn:
        assert not conn.execute("SELECT count(*) FROM login_attempts WHERE address LIKE '10.%'").fetchone()[0]


def test_a_nul_character_in_a_username_is_a_failed_login_not_a_server_error(server, pool, alice):
    response = login(server, "ali\x00ce", PASSWORD)
    assert response.status == 401 and "Wrong username or password." in response.body
    with pool.connection() as conn:
        assert conn.execute("SELECT outcome FROM login_attempts").fetchall() == [("unknown_user",)]


def test_what_is_reflected_is_escaped_and_next_stays_on_this_site(server, alice):
    hostile = "\"'><script>alert(1)</script>"
    response = login(server, hostile, "whatever it is", next="//evil.example/")
    assert response.status == 401
    assert "<script>alert(1)</script>" not in response.body and "&lt;script&gt;" in response.body
    assert response.field("next") == "/"
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example", "/login"):
        ok = login(server, "alice", PASSWORD, next=target)
        assert ok.status == 303 and ok.headers["location"] == "/", target


def test_cookies_are_secure_behind_https_and_links_use_the_base_url():
    from core import web
    from core.config import Settings

    plain = web._session_response(web.Site(Settings()), "t" * 43, "/")
    behind_tls = web._session_response(web.Site(Settings(base_url="https://promptdev.example")), "t" * 43, "/")
    cookie = {name: dict(r.raw_headers)[b"set-cookie"].decode() for name, r in (("plain", plain), ("tls", behind_tls))}
    assert "secure" not in cookie["plain"].lower() and "; Secure" in cookie["tls"]
    assert all("HttpOnly" in c and "SameSite=lax" in c for c in cookie.values())
    assert web.public_url(Settings(base_url="https://promptdev.example/"), 8501) == "https://promptdev.example"
    assert web.public_url(Settings(address="0.0.0.0"), 8502) == "http://127.0.0.1:8502"
    assert web.public_url(Settings(address="::1"), 8501) == "http://[::1]:8501"


def test_only_the_sign_in_routes_are_public():
    from core.web import is_public

    assert all(map(is_public, ["/login", "/logout", "/healthz", "/setup/abc_DEF-123", "/login/"]))
    assert not any(map(is_public, ["/", "/loginx", "/setup/", "/setup/a/b", "/setup/../_stcore/stream",
                                   "/_stcore/stream", "/healthz/x", "/static/login"]))


def test_behind_https_an_origin_of_another_scheme_is_another_origin():
    from starlette.requests import HTTPConnection

    from core import web
    from core.config import Settings

    site = web.Site(Settings(base_url="https://promptdev.example"))

    def same(origin: str) -> bool:
        scope = {"type": "http", "headers": [(b"host", b"promptdev.example"), (b"origin", origin.encode())]}
        return web._same_origin(HTTPConnection(scope), site, opaque_passes=False)

    assert same("https://promptdev.example") and same("https://PromptDev.example:443")
    assert not any(map(same, ["http://promptdev.example", "https://promptdev.example:8443", "null",
                              "https://other.promptdev.example"]))
