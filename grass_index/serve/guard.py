"""What stands between the network and the API: the bind check (loopback unless a token is
set), Starlette's TrustedHostMiddleware for the Host name (its refusal said as JSON), and an
ASGI middleware for the token (constant-time), cross-origin writes and the request-body cap.
Every refusal is JSON ``{"error", "fix"}`` like every other error."""
from __future__ import annotations

import hmac
import ipaddress
import json
from urllib.parse import parse_qs, urlsplit

from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..errors import option, spelled
from .engine import ServeError
from .errors import ApiError

TOKEN_ENV = "GRASS_INDEX_TOKEN"
LOOPBACK_NAMES = ("localhost",)
SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")
SAFE_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                (b"cache-control", b"no-store")]


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Only this machine may connect unless a token guards the API."""
    if not is_loopback(host) and not token:
        raise ServeError(f"refusing to serve on {host}: a non-loopback address lets other "
                         "machines read the index; set a token with "
                         f"{spelled('--token T', 'token=T')} (or {TOKEN_ENV}=T) and send it as "
                         "'Authorization: Bearer T', or bind to 127.0.0.1")
    if token is not None and len(token) < 8:
        raise ServeError("the token is shorter than 8 characters; use a longer one, e.g. "
                         "python3 -c 'import secrets; print(secrets.token_urlsafe())'")


def loopback_hosts(bind: str) -> list[str]:
    """Host names a loopback server answers to (an IPv6 address is bracketed in Host)."""
    names = ["127.0.0.1", "localhost", "[::1]", bind]
    return names + ([f"[{bind}]"] if ":" in bind and not bind.startswith("[") else [])


class _Passed(Exception):
    """Raised by the app TrustedHostMiddleware calls when the Host name is allowed."""


class HostCheck:
    """Starlette's TrustedHostMiddleware decides; its plain-text refusal becomes our JSON
    (without a token the server answers only requests addressed to it: no DNS rebinding)."""

    def __init__(self, app, hosts):
        self.app = app
        self.check = TrustedHostMiddleware(self._passed, allowed_hosts=list(hosts),
                                           www_redirect=False)

    @staticmethod
    async def _passed(scope, receive, send):
        raise _Passed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def discard(message):  # the middleware's own plain-text refusal
            pass

        try:
            await self.check(scope, receive, discard)
            allowed = False
        except _Passed:
            allowed = True
        if allowed:  # (outside the except: the request does not run inside its context)
            return await self.app(scope, receive, send)
        got = _header(scope, b"host").decode("latin-1")
        await send_error(send, 400, f"Host {got!r} is not served here",
                         "open the page by this machine's loopback address, e.g. "
                         "http://127.0.0.1:PORT/ (without a token the server answers only "
                         "requests addressed to it, so a web page cannot reach it by DNS "
                         "rebinding)")


class Guard:
    """Pure ASGI middleware: the token check (constant-time), the refusal of cross-origin
    writes, and the request-body cap; adds the safe headers to every reply."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check(scope)
        except ApiError as e:
            extra = [(b"www-authenticate", b"Bearer")] if e.status == 401 else []
            return await send_error(send, e.status, e.error, e.fix, extra)
        seen = 0

        async def capped():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise ApiError(413, f"request body is over the limit of {self.max_body} "
                                   "bytes", "send fewer examples per request")
            return msg

        async def with_headers(msg):
            if msg["type"] == "http.response.start":
                msg = dict(msg, headers=[*msg.get("headers", ()), *SAFE_HEADERS])
            await send(msg)

        return await self.app(scope, capped, with_headers)

    def _check(self, scope) -> None:
        if self.token is not None and not hmac.compare_digest(presented_token(scope),
                                                              self.token):
            raise ApiError(401, "missing or wrong token", "send 'Authorization: Bearer TOKEN' "
                           "or add ?token=TOKEN to the URL (the token the server was started "
                           "with)")
        if scope["method"].encode() not in SAFE_METHODS:
            refuse_cross_origin(scope)
        length = _header(scope, b"content-length")
        if length and (not length.isdigit() or int(length) > self.max_body):
            raise ApiError(413, f"request body of {length.decode('latin-1')} bytes is over the "
                           f"limit of {self.max_body}", "send fewer examples per request (or "
                           f"restart the server with a larger {option('max_body')})")


def presented_token(scope) -> bytes:
    """The token a request carries (``Authorization: Bearer T`` or ``?token=T``), as UTF-8
    bytes (any percent-escape decodes; a non-UTF-8 one simply does not match)."""
    auth = _header(scope, b"authorization")
    if auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    query = scope.get("query_string", b"").decode("latin-1")
    vals = parse_qs(query, encoding="utf-8", errors="replace").get("token")
    return vals[0].encode("utf-8") if vals else b""


def refuse_cross_origin(scope) -> None:
    """A write (POST) must come from the server's own page or from a non-browser client: a
    browser names the page that sent it (Sec-Fetch-Site, Origin), and a form on any other
    site could otherwise POST to a loopback server without a CORS preflight."""
    site = _header(scope, b"sec-fetch-site")
    if site:  # the browser's own verdict (it holds behind a proxy that rewrites Host, too)
        if site in (b"same-origin", b"none"):
            return
        raise ApiError(403, f"cross-origin request refused (Sec-Fetch-Site: "
                       f"{site.decode('latin-1')})", "send queries from this server's own "
                       "page or from a script (curl, requests), not from another web site")
    origin = _header(scope, b"origin")  # a browser without Sec-Fetch-Site: compare with Host
    if origin and urlsplit(origin.decode("latin-1")).netloc.lower() != \
            _header(scope, b"host").decode("latin-1").lower():
        raise ApiError(403, f"cross-origin request refused (Origin: {origin.decode('latin-1')})",
                       "send queries from this server's own page or from a script (curl, "
                       "requests), not from another web site")


def _header(scope, name: bytes) -> bytes:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value
    return b""


async def send_error(send, status: int, error: str, fix: str, extra=()) -> None:
    body = json.dumps(dict(error=error, fix=fix)).encode()
    await send(dict(type="http.response.start", status=status,
                    headers=[(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode()), *SAFE_HEADERS,
                             *extra]))
    await send(dict(type="http.response.body", body=body))
