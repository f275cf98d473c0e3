"""What stands between the network and the API: the bind check (loopback unless a token is
set), and an ASGI middleware that checks the Host name, the token (constant-time) and caps
the request body. Its refusals are JSON ``{"error", "fix"}`` like every other error."""
from __future__ import annotations

import hmac
import ipaddress
import json
from urllib.parse import parse_qs

from .engine import ServeError

TOKEN_ENV = "GRASS_INDEX_TOKEN"
LOOPBACK_NAMES = ("localhost",)


class ApiError(Exception):
    """A request the server refuses: HTTP status, what is wrong, and how to fix it."""

    def __init__(self, status: int, error: str, fix: str):
        super().__init__(error)
        self.status, self.error, self.fix = status, error, fix


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
                         "machines read the index; set a token with --token T (or "
                         f"{TOKEN_ENV}=T) and send it as 'Authorization: Bearer T', or bind "
                         "to 127.0.0.1")
    if token is not None and len(token) < 8:
        raise ServeError("the token is shorter than 8 characters; use a longer one, e.g. "
                         "python3 -c 'import secrets; print(secrets.token_urlsafe())'")


def host_name(header: str) -> str:
    """The name in a Host header: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """Pure ASGI middleware: the Host check, the token check (constant-time) and the
    request-body cap."""

    def __init__(self, app, token: str | None, max_body: int, hosts=None):
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body
        self.hosts = {h.lower() for h in hosts} if hosts is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.hosts is not None:
            got = host_name(dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1"))
            if got not in self.hosts:
                return await send_error(send, 400, f"Host {got!r} is not served here",
                                         "open the page by this machine's loopback address, "
                                         "e.g. http://127.0.0.1:PORT/ (without a token the "
                                         "server answers only requests addressed to it, so a "
                                         "web page cannot reach it by DNS rebinding)")
        if self.token is not None and not self._authorized(scope):
            return await send_error(send, 401, "missing or wrong token",
                                     "send 'Authorization: Bearer TOKEN' or add ?token=TOKEN "
                                     "to the URL (the token the server was started with)",
                                     [(b"www-authenticate", b"Bearer")])
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await send_error(send, 413, f"request body of {length.decode()} bytes is "
                                     f"over the limit of {self.max_body}",
                                     "send fewer examples per request (or restart the server "
                                     "with a larger --max-body)")
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

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        got = b""
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            got = auth[7:].strip()
        else:
            vals = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            got = vals[0].encode("latin-1") if vals else b""
        return hmac.compare_digest(got, self.token)


SAFE_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                 (b"cache-control", b"no-store")]


async def send_error(send, status: int, error: str, fix: str, extra=()) -> None:
    body = json.dumps(dict(error=error, fix=fix)).encode()
    await send(dict(type="http.response.start", status=status,
                    headers=[(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode()), *SAFE_HEADERS,
                             *extra]))
    await send(dict(type="http.response.body", body=body))
