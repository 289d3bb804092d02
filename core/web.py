"""The HTTP side of the app in front of Streamlit: sign-in routes and the middleware that lets nobody in without a
session. Starlette only (no Streamlit here): app.py hands `app_options(...)` to `st.App`, which serves these routes
and Streamlit on one port.

Routes (plain HTML forms, every value escaped, no script):
- `GET/POST /login`: username and password; on success a session cookie (SESSION_COOKIE: HttpOnly, SameSite=Lax,
  Secure when PROMPTDEV_BASE_URL is https) and a redirect to where the browser was going.
- `GET/POST /logout`: a confirmation form; posting it revokes the session and clears the cookie.
- `GET/POST /setup/{token}`: a one-time setup link creates an admin (core.accounts).
- `GET /healthz`: `ok` while the process is up (no session needed, nothing else checked).

Every form is protected against cross-site posts twice: a double-submit token (a random CSRF_COOKIE that the form
repeats in a hidden field; they must match) and, when the browser sends one, an Origin that must be this site.

`AuthMiddleware` runs before everything else and refuses any request without a live session — Streamlit's pages,
static files, media, `/_stcore/*` endpoints and the `/_stcore/stream` websocket (closed before it is accepted, which
the server answers with 403) — except the routes above. A browser asking for a page is redirected to /login;
anything else gets 401. With a session, a websocket opens and a write (not GET, HEAD or OPTIONS) passes only from this
origin (the Lax cookie comes along from the host's other ports too), and an open websocket closes at the next message
its browser sends once the session has ended. The workbench's own responses may be framed by the workbench only.
"""

from __future__ import annotations

import hmac
import html
import logging
import math
import re
import secrets
import time
import urllib.parse
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, AsyncIterator, Callable

import anyio.to_thread
from psycopg_pool import ConnectionPool
from starlette.datastructures import URL, MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from core import accounts, runtime
from core.config import Settings
from core.errors import EXPECTED_ERRORS, RateLimited, user_message

log = logging.getLogger(__name__)

LOGIN_PATH, LOGOUT_PATH, HEALTH_PATH, SETUP_PREFIX = "/login", "/logout", "/healthz", "/setup/"
CSRF_COOKIE, CSRF_FIELD = "promptdev_csrf", "csrf"
SESSION_COOKIE = accounts.SESSION_COOKIE
MAX_FORM_BYTES = 16 * 1024
SESSION_CACHE_SECONDS = 5.0  # the middleware trusts a checked session this long (a page rerun always asks again)
_PUBLIC = re.compile(r"^(?:/login|/logout|/healthz|/setup/[A-Za-z0-9_-]{1,128})/?$")
_WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "same-origin",  # a setup link's token never leaves in a Referer (no-referrer: Origin null)
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def public_url(settings: Settings, port: int) -> str:
    """Where browsers reach the app: PROMPTDEV_BASE_URL, else http://ADDRESS:PORT (loopback for a wildcard)."""
    if settings.base_url:
        return settings.base_url.rstrip("/")
    host = "127.0.0.1" if settings.address in _WILDCARD_ADDRESSES else settings.address
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def is_public(path: str) -> bool:
    """True for the paths anyone may reach: sign-in, sign-out, setup links and the health check."""
    return bool(_PUBLIC.match(path))


def safe_next(target: str | None) -> str:
    """A local path to go to after signing in (anything else, another site included, is "/")."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target \
            or any(ord(c) < 32 for c in target) or is_public(urllib.parse.urlsplit(target).path):
        return "/"
    return target


class Site:
    """What the routes and the middleware share: the settings, the pool (opened on first use) and a few seconds'
    memory of checked sessions."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.secure = (settings.base_url or "").startswith("https://")
        self._checked: dict[bytes, tuple[accounts.User, float]] = {}

    def pool(self) -> ConnectionPool:
        """The process-wide pool (the pages use the same one); blocking: call it in a thread."""
        return runtime.database(self.settings)

    async def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking core function on the pool in a worker thread."""
        return await anyio.to_thread.run_sync(lambda: func(self.pool(), *args, **kwargs))

    async def user(self, token: str | None) -> accounts.User | None:
        """The user of a live session token, or None."""
        if not token:
            return None
        key = accounts.hash_token(token)
        hit = self._checked.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        user = await self.call(accounts.user_for_session, token)
        if len(self._checked) > 10_000:
            self._checked.clear()
        if user is None:
            self._checked.pop(key, None)
        else:
            self._checked[key] = (user, time.monotonic() + SESSION_CACHE_SECONDS)
        return user

    def forget(self, token: str | None) -> None:
        """Drop a session from memory (it was just revoked)."""
        if token:
            self._checked.pop(accounts.hash_token(token), None)


# ------------------------------------------------------------------------------------------------------- pages

_STYLE = """
body { font-family: system-ui, sans-serif; background: #f6f7f9; color: #1f2933; margin: 0; }
main { max-width: 26rem; margin: 8vh auto; background: #fff; padding: 2rem 2.25rem; border-radius: 10px;
       box-shadow: 0 1px 4px rgba(0,0,0,.12); }
h1 { font-size: 1.4rem; margin: 0 0 1.25rem; }
label { display: block; margin: .9rem 0 .3rem; font-size: .9rem; }
input[type=text], input[type=password] { width: 100%; box-sizing: border-box; padding: .55rem .6rem; font-size: 1rem;
       border: 1px solid #c4cbd4; border-radius: 6px; }
button { margin-top: 1.4rem; width: 100%; padding: .6rem; font-size: 1rem; border: 0; border-radius: 6px;
       background: #ff4b4b; color: #fff; cursor: pointer; }
p.error { background: #fdecec; color: #8a1c1c; padding: .6rem .75rem; border-radius: 6px; }
p.note { color: #52606d; font-size: .9rem; }
"""


def _page(title: str, body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    """A complete page (title escaped here; body already escaped by the caller)."""
    document = (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
                f"content='width=device-width, initial-scale=1'><title>{html.escape(title)} · PromptDev</title>"
                f"<style>{_STYLE}</style></head><body><main><h1>{html.escape(title)}</h1>{body}</main></body></html>")
    return HTMLResponse(document, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


def _error(message: str | None) -> str:
    return f"<p class=error role=alert>{html.escape(message)}</p>" if message else ""


def _hidden(name: str, value: str) -> str:
    return f"<input type=hidden name={name} value='{html.escape(value, quote=True)}'>"


def _field(label: str, name: str, kind: str = "text", value: str = "", autocomplete: str = "off",
           required: bool = True) -> str:
    return (f"<label for={name}>{html.escape(label)}</label><input id={name} name={name} type={kind} "
            f"value='{html.escape(value, quote=True)}' autocomplete={autocomplete}{' required' if required else ''}>")


# -------------------------------------------------------------------------------------------------------- CSRF

def _csrf_token(request: Request) -> str:
    """The request's CSRF cookie when it is well formed, else a new token (set_csrf puts it in the response)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    return token if re.fullmatch(r"[A-Za-z0-9_-]{32,64}", token) else secrets.token_urlsafe(32)


def _set_csrf(response: Response, token: str, site: Site) -> Response:
    response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="lax", secure=site.secure, path="/")
    return response


def _same_origin(request: HTTPConnection, site: Site, *, opaque_passes: bool = True) -> bool:
    """False when the browser says the request came from another origin (an absent Origin passes, and an opaque
    `null` one unless opaque_passes is False: for a form, the CSRF token decides)."""
    origin = request.headers.get("origin")
    if origin is None or (origin == "null" and opaque_passes):
        return True
    if site.settings.base_url:  # the scheme counts too: a plain-http page of the same host is another origin
        base = _scheme_host_port(site.settings.base_url)
        return base is not None and _scheme_host_port(origin) == base
    return urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")


def _scheme_host_port(url: str) -> tuple[str, str, int] | None:
    """An origin as browsers compare them (the default port made explicit), or None when it is not one."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return None
    return None if port is None or not parts.hostname else (parts.scheme.lower(), parts.hostname, port)


async def _form(request: Request) -> dict[str, str] | None:
    """The posted urlencoded form (first value of each field), or None when it is too large or not a form."""
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    fields: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        fields.setdefault(key, value)
    return fields


def _csrf_ok(request: Request, form: dict[str, str], site: Site) -> bool:
    cookie, field = request.cookies.get(CSRF_COOKIE, ""), form.get(CSRF_FIELD, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), field.encode()) and _same_origin(request, site)


FORWARDED_ADDRESS = "forwarded"  # what the login limits count a request naming an unchecked forwarded address as


def _client_address(request: Request, site: Site) -> str | None:
    """The address the login limits count by and the records keep. Uvicorn puts the X-Forwarded-For address in
    request.client when the connection comes from loopback: right behind a proxy on this machine (PROMPTDEV_BASE_URL
    set), but without one that is whatever the client says, a new allowance per guess. So, without a proxy, every
    request naming a forwarded address counts as one address, FORWARDED_ADDRESS (a browser sends no such header)."""
    if not site.settings.base_url and "x-forwarded-for" in request.headers:
        return FORWARDED_ADDRESS
    return request.client.host if request.client else None


# ------------------------------------------------------------------------------------------------------ routes

def _login_form(request: Request, site: Site, *, error: str | None = None, username: str = "", next_path: str = "/",
                status: int = 200, headers: dict[str, str] | None = None) -> Response:
    csrf = _csrf_token(request)
    body = (f"{_error(error)}<form method=post action='{LOGIN_PATH}'>{_hidden(CSRF_FIELD, csrf)}"
            f"{_hidden('next', next_path)}"
            f"{_field('Username', 'username', value=username, autocomplete='username')}"
            f"{_field('Password', 'password', 'password', autocomplete='current-password')}"
            f"<button type=submit>Sign in</button></form>")
    return _set_csrf(_page("Sign in to PromptDev", body, status, headers), csrf, site)


def _session_response(site: Site, token: str, target: str) -> Response:
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(SESSION_COOKIE, token, max_age=int(accounts.SESSION_LIFETIME.total_seconds()),
                        httponly=True, samesite="lax", secure=site.secure, path="/")
    return response


def login_route(site: Site) -> Route:
    """GET shows the form, POST signs in."""

    async def endpoint(request: Request) -> Response:
        next_path = safe_next(request.query_params.get("next"))
        if request.method == "GET":
            if await site.user(request.cookies.get(SESSION_COOKIE)) is not None:
                return RedirectResponse(next_path, status_code=303, headers=SECURITY_HEADERS)
            return _login_form(request, site, next_path=next_path)
        form = await _form(request)
        if form is None:
            return _login_form(request, site, error="The form could not be read; try again.", status=400)
        next_path = safe_next(form.get("next"))
        username = form.get("username", "")[:200]
        if not _csrf_ok(request, form, site):
            return _login_form(request, site, error="The form expired or came from another site; try again.",
                               username=username, next_path=next_path, status=403)
        try:
            _user, token = await site.call(accounts.login, username, form.get("password", ""),
                                           _client_address(request, site))
        except RateLimited as exc:
            return _login_form(request, site, error=user_message(exc), username=username, next_path=next_path,
                               status=429, headers={"Retry-After": str(math.ceil(exc.retry_after))})
        except accounts.LoginFailed as exc:
            log.info("login refused from %s", _client_address(request, site))
            return _login_form(request, site, error=user_message(exc), username=username, next_path=next_path,
                               status=401)
        except EXPECTED_ERRORS as exc:
            return _login_form(request, site, error=user_message(exc), username=username, next_path=next_path,
                               status=503)
        return _session_response(site, token, next_path)

    return Route(LOGIN_PATH, endpoint, methods=["GET", "POST"])


def logout_route(site: Site) -> Route:
    """GET asks for confirmation (a link cannot post), POST revokes the session and clears the cookie."""

    async def endpoint(request: Request) -> Response:
        token = request.cookies.get(SESSION_COOKIE)
        csrf = _csrf_token(request)
        if request.method == "GET":
            user = await site.user(token)
            if user is None:
                return RedirectResponse(LOGIN_PATH, status_code=303, headers=SECURITY_HEADERS)
            body = (f"<p>Signed in as <strong>{html.escape(user.display_name)}</strong> "
                    f"({html.escape(user.username)}).</p><form method=post action='{LOGOUT_PATH}'>"
                    f"{_hidden(CSRF_FIELD, csrf)}<button type=submit>Sign out</button></form>"
                    f"<p class=note><a href='/'>Back to the workbench</a></p>")
            return _set_csrf(_page("Sign out", body), csrf, site)
        form = await _form(request) or {}
        if not _csrf_ok(request, form, site):
            body = (f"{_error('The form expired or came from another site; try again.')}"
                    f"<form method=post action='{LOGOUT_PATH}'>{_hidden(CSRF_FIELD, csrf)}"
                    f"<button type=submit>Sign out</button></form>")
            return _set_csrf(_page("Sign out", body, 403), csrf, site)
        if token:
            site.forget(token)
            await site.call(accounts.revoke_session, token)
        response = RedirectResponse(LOGIN_PATH, status_code=303, headers=SECURITY_HEADERS)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=site.secure)
        return response

    return Route(LOGOUT_PATH, endpoint, methods=["GET", "POST"])


def setup_route(site: Site) -> Route:
    """A one-time setup link: GET shows the form to create an admin, POST creates it and signs it in."""
    invalid = ("This setup link is invalid, used or expired. Ask whoever runs PromptDev for a new one "
               "(promptdev users setup-link).")

    def form_page(request: Request, token: str, error: str | None = None, username: str = "",
                  display_name: str = "", status: int = 200) -> Response:
        csrf = _csrf_token(request)
        password_label = f"Password (at least {accounts.MIN_PASSWORD_LENGTH} characters)"
        body = (f"<p class=note>Create the administrator account. This link works once.</p>{_error(error)}"
                f"<form method=post action='{SETUP_PREFIX}{html.escape(token, quote=True)}'>"
                f"{_hidden(CSRF_FIELD, csrf)}"
                f"{_field('Username', 'username', value=username, autocomplete='username')}"
                f"{_field('Display name', 'display_name', value=display_name, required=False)}"
                f"{_field(password_label, 'password', 'password', autocomplete='new-password')}"
                f"{_field('Repeat the password', 'password2', 'password', autocomplete='new-password')}"
                f"<button type=submit>Create the admin and sign in</button></form>")
        return _set_csrf(_page("Set up PromptDev", body, status), csrf, site)

    async def endpoint(request: Request) -> Response:
        token = request.path_params["token"]
        try:
            valid = await site.call(accounts.setup_token_valid, token)
        except EXPECTED_ERRORS as exc:
            return _page("Set up PromptDev", _error(user_message(exc)), 503)
        if not valid:
            return _page("Set up PromptDev", _error(invalid), 404)
        if request.method == "GET":
            return form_page(request, token)
        form = await _form(request)
        if form is None:
            return form_page(request, token, "The form could not be read; try again.", status=400)
        username, display_name = form.get("username", "")[:200], form.get("display_name", "")[:200]
        if not _csrf_ok(request, form, site):
            return form_page(request, token, "The form expired or came from another site; try again.", username,
                             display_name, 403)
        if form.get("password", "") != form.get("password2", ""):
            return form_page(request, token, "The two passwords differ.", username, display_name, 422)
        try:
            user = await site.call(accounts.create_admin_with_setup_token, token, username,
                                   form.get("password", ""), display_name=display_name)
            session = await site.call(accounts.create_session, user, _client_address(request, site))
        except accounts.SetupLinkInvalid:
            return _page("Set up PromptDev", _error(invalid), 404)
        except EXPECTED_ERRORS as exc:
            return form_page(request, token, user_message(exc), username, display_name,
                             getattr(exc, "status", 503))
        log.info("admin %s created with a setup link", user.username)
        return _session_response(site, session, "/")

    return Route(SETUP_PREFIX + "{token}", endpoint, methods=["GET", "POST"])


async def healthz(_request: Request) -> Response:
    """The process is up (nothing else is checked: no session, no database)."""
    return PlainTextResponse("ok", headers={"Cache-Control": "no-store"})


# -------------------------------------------------------------------------------------------------- middleware

def _framed_by_nothing_else(send: Send) -> Send:
    """send, with the workbench's responses framed by the workbench only (its components are frames of its own;
    another port of this host is the same site, so its frames would carry the Lax cookie)."""

    async def send_framed_by_nothing_else(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            headers.setdefault("X-Frame-Options", "SAMEORIGIN")
            policy = headers.get("Content-Security-Policy")
            if policy is None or "frame-ancestors" not in policy:
                headers["Content-Security-Policy"] = "; ".join(filter(None, [policy, "frame-ancestors 'self'"]))
        await send(message)

    return send_framed_by_nothing_else


class AuthMiddleware:
    """Refuse every HTTP request and websocket without a live session, except the public paths (is_public)."""

    def __init__(self, app: ASGIApp, site: Site):
        self.app, self.site = app, site

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        token = connection.cookies.get(SESSION_COOKIE)
        try:
            user = await self.site.user(token)
        except EXPECTED_ERRORS as exc:
            log.warning("session check failed: %s", user_message(exc))
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1011})
            else:
                await PlainTextResponse("Service unavailable: the database cannot be reached.", 503,
                                        headers={"Retry-After": "5"})(scope, receive, send)
            return
        if user is not None and (scope["type"] == "websocket" or scope.get("method") not in _SAFE_METHODS) \
                and not _same_origin(connection, self.site, opaque_passes=False):
            # SameSite=Lax sends the cookie from the site's other origins too (another port of this host: Streamlit
            # would let any of them in): the websocket opens, and anything but a read is done, from this origin only.
            log.warning("%s refused from origin %s", scope["type"], connection.headers.get("origin"))
            if scope["type"] == "websocket":  # closed before accept: 403
                await send({"type": "websocket.close", "code": 1008})
            else:
                await PlainTextResponse("Refused: the request came from another origin.", 403,
                                        headers=SECURITY_HEADERS)(scope, receive, send)
            return
        if user is not None:
            scope.setdefault("state", {})["user"] = user
            if scope["type"] == "websocket":
                receive = self._while_signed_in(token, receive, send)
            else:
                send = _framed_by_nothing_else(send)
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # closed before accept: the server answers the upgrade with 403
            await send({"type": "websocket.close", "code": 1008})
            return
        await self._refuse(scope, connection)(scope, receive, send)

    def _while_signed_in(self, token: str, receive: Receive, send: Send) -> Receive:
        """The websocket's receive, checking the session at each message the browser sends (an interaction, a
        fragment's timed rerun, a request for upload URLs): once it has ended (sign-out, deactivation, password
        reset, expiry), the socket closes (1008) and the app sees a disconnect, not the message."""

        async def receive_while_signed_in() -> dict:
            message = await receive()
            if message["type"] == "websocket.receive":
                try:
                    signed_in = await self.site.user(token) is not None
                except EXPECTED_ERRORS as exc:  # the database is away: the app will say so itself
                    log.warning("session check failed: %s", user_message(exc))
                    signed_in = True
                if not signed_in:
                    await send({"type": "websocket.close", "code": 1008})
                    return {"type": "websocket.disconnect", "code": 1008}
            return message

        return receive_while_signed_in

    @staticmethod
    def _refuse(scope: Scope, connection: HTTPConnection) -> Response:
        wants_page = scope.get("method") in ("GET", "HEAD") and "text/html" in connection.headers.get("accept", "")
        if wants_page:
            url = URL(scope=scope)
            target = url.path + (f"?{url.query}" if url.query else "")
            query = "" if target == "/" else "?" + urllib.parse.urlencode({"next": target})
            return RedirectResponse(LOGIN_PATH + query, status_code=303, headers=SECURITY_HEADERS)
        return PlainTextResponse(f"Sign in first: {LOGIN_PATH}", status_code=401,
                                 headers={**SECURITY_HEADERS, "WWW-Authenticate": 'Cookie realm="PromptDev"'})


# ------------------------------------------------------------------------------------------------------- wiring

def _first_run(site: Site, port: int) -> str | None:
    """The setup link to print when no user exists yet."""
    token = accounts.first_run_setup_token(site.pool())
    return None if token is None else f"{public_url(site.settings, port)}{SETUP_PREFIX}{token}"


def app_options(settings: Settings, *, server_port: Callable[[], int],
                server_address: Callable[[], str] | None = None) -> dict[str, Any]:
    """Keyword arguments for `st.App`: the routes, the middleware and a lifespan that opens the database and, while
    there is no user, prints a one-time setup link. server_port and server_address say where Streamlit listens
    (an empty address: every interface)."""
    site = Site(settings)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        bound = None if server_address is None else server_address()
        if bound is not None and bound != settings.address:
            log.warning("listening on %s although PROMPTDEV_ADDRESS is %s: start the app with `make run` or "
                        "`promptdev serve`", bound or "every interface", settings.address)
        try:
            link = await anyio.to_thread.run_sync(partial(_first_run, site, int(server_port())))
        except EXPECTED_ERRORS as exc:
            log.warning("no setup link: %s", user_message(exc))
        else:
            if link:
                print(f"\n  No user yet. Create the first admin within {accounts.SETUP_TOKEN_TTL.seconds // 3600} "
                      f"hour at this one-time link:\n\n    {link}\n\n  (or: promptdev users create NAME --admin)\n",
                      flush=True)
        yield

    return {
        "routes": [login_route(site), logout_route(site), setup_route(site), Route(HEALTH_PATH, healthz)],
        "middleware": [Middleware(AuthMiddleware, site=site)],
        "lifespan": lifespan,
    }
