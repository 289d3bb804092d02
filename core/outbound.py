"""Where the workbench sends HTTP requests of its own: the base URLs of OpenAI-compatible model servers.

A base URL comes from a user (the model registry) or from the settings; a request to it may carry an API key, and
what comes back may be shown. So a base URL must be

- `http://` or `https://`, with a host, without a user name or password (they would be sent to the server and
  shown wherever the URL is: give the key's variable instead), a query, a fragment, whitespace or control
  characters (nor backslashes, which parsers read differently);
- a host that is not, and does not resolve to, a link-local address (169.254.0.0/16, fe80::/10) or a cloud
  metadata service (169.254.169.254, fd00:ec2::254, 100.100.100.200, metadata.google.internal, …). Every address
  the name resolves to is checked, an IPv6 address that embeds an IPv4 one (::ffff:a.b.c.d, ::a.b.c.d, NAT64
  64:ff9b::/96, 6to4, Teredo) by its IPv4 address too; IPv4 literals in any form inet_aton accepts (2852039166,
  0xa9fea9fe, 0251.0376.0251.0376) are the addresses they denote. Loopback and private networks stay allowed: model
  servers live there.

`check_base_url` checks a URL when it is registered or configured. `open_url` makes the request itself with
`opener()`: the connection resolves the host once more and connects only to an address it has just checked (a name
that resolved to a loopback address at registration and to a metadata address now — DNS rebinding — is refused
before any byte is sent), redirects are never followed (a 3xx is an HTTPError like a 4xx), and no proxy from the
environment is used (the check must be of the host actually connected to). Refusals are `URLRefused` (an
InvalidInput) whose message never repeats the URL.

This module imports nothing of `core` but `errors`.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from core.errors import InvalidInput

SCHEMES = ("http", "https")
METADATA_HOSTNAMES = frozenset({
    "metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal",
})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.169.253", "100.100.100.200", "fd00:ec2::254", "fd00:ec2::23",
))
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class URLRefused(InvalidInput):
    """A URL the workbench does not send requests to; the message says why without repeating the URL."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address stands for on the way out: mapped, compatible, NAT64, 6to4, Teredo."""
    found = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    packed = address.packed
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # ::a.b.c.d (deprecated), not :: or ::1
        found.append(ipaddress.IPv4Address(packed[12:]))
    if any(address in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(packed[12:]))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


def refused_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why requests may not go to this address ("link-local", "cloud metadata"), or None when they may."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) does not matter
    candidates: list[Any] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        candidates.extend(_embedded_ipv4(address))
    for candidate in candidates:
        if candidate in METADATA_ADDRESSES:
            return "cloud metadata"
        if any(candidate.version == net.version and candidate in net for net in LINK_LOCAL):
            return "link-local"
    return None


def _normal_hostname(hostname: str) -> str:
    """The host name as a resolver and a TLS client see it: IDNA-encoded, lower case, without a trailing dot."""
    try:
        ascii_name = hostname.encode("idna").decode("ascii") if not hostname.isascii() else hostname
    except UnicodeError:
        raise URLRefused("base URL: the host name is not a valid domain name") from None
    return ascii_name.lower().rstrip(".")


def _check_host_name(hostname: str) -> None:
    name = _normal_hostname(hostname)
    if name in METADATA_HOSTNAMES or any(name.endswith("." + blocked) for blocked in ("metadata.google.internal",)):
        raise URLRefused("base URL: the host is a cloud metadata service; model servers cannot be there")


def _resolve(host: str, port: int, *, numeric_only: bool = False) -> list[tuple[Any, ...]]:
    flags = socket.AI_NUMERICHOST if numeric_only else 0
    return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, flags)


def check_addresses(host: str, port: int, infos: list[tuple[Any, ...]]) -> None:
    """Refuse (URLRefused) when any address of getaddrinfo's answer for host is link-local or cloud metadata."""
    for info in infos:
        why = refused_address(info[4][0])
        if why is not None:
            raise URLRefused(f"base URL: the host is or resolves to a {why} address; model servers cannot be there")


def check_base_url(url: str, *, resolve: bool = True, unresolvable_ok: bool = False) -> None:
    """Refuse (URLRefused, naming what is wrong but never repeating the URL) a base URL requests may not go to (see
    the module). `resolve`: also look the host name up and check every address (at registration); without it only
    literal addresses are checked (settings, which must load without the network). `unresolvable_ok`: a name that
    does not resolve now passes (it is checked again at each request)."""
    if not isinstance(url, str) or not url:
        raise URLRefused("base URL is empty")
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in url):
        raise URLRefused("base URL must not contain spaces, backslashes or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise URLRefused("base URL is not a valid URL (check the host and port)") from None
    if parts.scheme.lower() not in SCHEMES or not url.lower().startswith(("http://", "https://")):
        raise URLRefused("base URL must start with http:// or https://")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise URLRefused("base URL must not contain a user name or password (name the API key's environment "
                         "variable instead)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise URLRefused("base URL must not have a query (?…) or fragment (#…)")
    hostname = parts.hostname
    if not hostname:
        raise URLRefused("base URL has no host")
    hostname = hostname.replace("%25", "%")  # an IPv6 zone in a URL: [fe80::1%25eth0]
    _check_host_name(hostname)
    port = port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        literal = _resolve(hostname.split("%", 1)[0] if ":" in hostname else hostname, port, numeric_only=True)
    except (socket.gaierror, UnicodeError, ValueError):
        literal = []
    if literal:
        check_addresses(hostname, port, literal)
        return
    if not resolve:
        return
    try:
        infos = _resolve(hostname, port)  # the name as the connection will look it up
    except (socket.gaierror, UnicodeError, ValueError, OSError):
        if unresolvable_ok:
            return
        raise URLRefused("base URL: the host name does not resolve") from None
    check_addresses(hostname, port, infos)


def _guarded_connection(address: tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,
                        source_address: Any = None, **_: Any) -> socket.socket:
    """socket.create_connection, except that the host is resolved here, every address checked, and only a checked
    address connected to (no second lookup an attacker's DNS could answer differently)."""
    host, port = address
    infos = _resolve(host, port)
    check_addresses(host, port, infos)
    error: OSError | None = None
    for family, kind, proto, _name, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error if error is not None else OSError(f"no address to connect to for port {port}")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_connection


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_connection  # then TLS to the host name, as usual


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_GuardedHTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_GuardedHTTPSConnection, req, context=self._context)


def opener() -> urllib.request.OpenerDirector:
    """An opener for http(s) only, through guarded connections, with no proxy and no redirect handler: a 3xx
    answer is raised as an HTTPError, never followed."""
    director = urllib.request.OpenerDirector()
    for handler in (_HTTPHandler(), _HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor(), urllib.request.UnknownHandler()):
        director.add_handler(handler)
    return director


_OPENER = opener()


def open_url(request: urllib.request.Request, timeout: float) -> http.client.HTTPResponse:
    """Send a request through the guarded opener (see the module); URLRefused for a refused address."""
    return _OPENER.open(request, timeout=timeout)
