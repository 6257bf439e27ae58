"""Who may ask `search serve` what, decided before the app sees a request: one pure-ASGI middleware.

- The Host must be one of the server's own names (loopback by default, plus `--allowed-host`), so a page the user
  visits cannot reach the server through a name of its own that resolves to 127.0.0.1 (DNS rebinding).
- A request that may change anything (any method but GET, HEAD, OPTIONS) carrying an Origin must come from the
  server's own origin; `Origin: null` (sandboxed frames, file pages) is foreign. Browsers send Origin on every such
  request, so a page elsewhere cannot post to the API; clients without a browser send none and are let through.
- With a token (required beyond loopback), every request shows it: `Authorization: Bearer ...` or the cookie that
  the link `/?token=...` sets. Compared in constant time.
- The body: Transfer-Encoding together with Content-Length is refused (which of them frames the body is the
  ambiguity request smuggling lives on), and whatever the headers say, a body is counted as it streams in and
  refused once past the limit, so no more than the limit ever reaches memory or a spooled file.
- NUL and invalid UTF-8 in the path or the query are 422 (PostgreSQL cannot even receive a NUL).
- Every answer says nosniff and same-origin; the page (any HTML answer) also forbids framing and carries a CSP without
  'unsafe-inline'.

It costs a few microseconds a request: a pass over the headers, nothing compiled, nothing looked up elsewhere.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_to_bytes

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
COOKIE = "ris_token"
FRAMING = 64 * 1024  # multipart boundaries and headers around an upload's bytes
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
EVERY_ANSWER_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-resource-policy", b"same-origin"),  # other sites cannot even show our pictures in <img>
]
PAGE_HEADERS = [  # what only a document needs (JSON and pictures are never framed nor run): fewer bytes per API answer
    *EVERY_ANSWER_HEADERS,
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CSP.encode()),
    (b"referrer-policy", b"no-referrer"),  # the one-time link's token never leaves in a Referer
]
# The page the link /?token=... answers: it sets the cookie and moves on to / by itself. Not a 303: after a
# redirect that began on another site (the link clicked in a web mail), browsers hold SameSite=Strict cookies back.
SIGNED_IN = (b'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url=/">'
             b'<title>reverse-image-search</title><a href="/">Open the search page</a>')
NEEDS_TOKEN = ("this server needs its token: open the link `search serve` printed when it started, "
               "or send `Authorization: Bearer <token>`")


class BodyTooLarge(Exception):
    """Raised from inside `receive` once a body passes the limit: the app stops reading, the guard answers 413."""


@dataclass(frozen=True)
class Guards:
    """What the guard enforces: the names the server answers to (`proxy_names`: the --allowed-host ones, whose
    origins are the server's own at any port, as behind a reverse proxy), the token if any, the largest body."""

    names: frozenset[str]
    proxy_names: frozenset[str]
    token: str | None
    max_body: int

    @classmethod
    def build(cls, allowed_hosts=(), token: str | None = None, *, max_upload: int) -> "Guards":
        proxy = frozenset(host_part(h) for h in allowed_hosts) - {""}
        return cls(LOOPBACK_NAMES | proxy, proxy, token or None, max_upload + FRAMING)


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server to this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def token_problem(token: str) -> str | None:
    """Why a token given with --token cannot be used (it travels in a URL and a cookie), or None."""
    if len(token) < 16:
        return "the token must have at least 16 characters"
    if not all(c.isascii() and (c.isalnum() or c in "-._~") for c in token):
        return "the token may hold only letters, digits and - . _ ~"
    return None


def served_names(host: str, allowed_hosts) -> list[str]:
    """The names beyond loopback the server answers to: --allowed-host, plus the address it listens on when that
    is one address (not 0.0.0.0 or ::), so the link it prints works."""
    names = list(allowed_hosts)
    if host not in WILDCARD_HOSTS and not is_loopback(host):
        names.append(host)
    return names


def link(host: str, port: int, names, token: str | None) -> str:
    """The address to open: on the address listened on (an allowed name when that is 0.0.0.0), with the token."""
    shown = host if host not in WILDCARD_HOSTS else (names[0] if names else "127.0.0.1")
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def host_part(value: str) -> str:
    """'Name:8000' -> 'name', '[::1]:8000' -> '::1'; '' when the value is no host[:port] at all."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, port = value[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return ""
        return name
    name, colon, port = value.partition(":")
    if colon and not port.isdigit():
        return ""
    return name


def bad_characters(raw: bytes) -> bool:
    """NUL or invalid UTF-8 (lone surrogates included) anywhere in a raw path or query, once %-decoded."""
    if b"%" in raw:
        raw = unquote_to_bytes(raw)
    if b"\x00" in raw:
        return True
    if raw.isascii():
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def same_token(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


def cookie_value(header: bytes, name: str) -> str | None:
    for part in header.decode("latin-1").split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key == name:
            return value
    return None


class GuardMiddleware:
    """The guards of the module docstring, in front of the whole app."""

    def __init__(self, app, guards: Guards):
        self.app = app
        self.guards = guards

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        hosts = 0
        for name, value in scope["headers"]:
            if name == b"host":
                hosts += 1
            headers[name] = value
        has_body = b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"
        refusal = self.refusal(scope, headers, hosts)
        if refusal is not None:
            return await answer(send, *refusal, close=has_body)
        if self.guards.token is not None and not await self.check_token(scope, headers, send):
            return
        if scope["method"] not in SAFE_METHODS and not self.same_origin(headers):
            return await answer(send, 403, "refused: this request comes from another site's page", close=has_body)

        started = False

        async def secured(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = message.get("headers", ())
                message["headers"] = [*headers, *security_headers(dict(headers).get(b"content-type", b""))]
            await send(message)

        if not has_body:
            return await self.app(scope, receive, secured)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.guards.max_body:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted, secured)
        except BodyTooLarge:
            if started:
                raise
            await answer(send, 413, too_large(self.guards.max_body - FRAMING), close=True)

    def refusal(self, scope, headers: dict, hosts: int) -> tuple[int, str] | None:
        """(status, one line) for a request refused from its line and headers alone; None to go on."""
        host = headers.get(b"host")
        if hosts != 1 or host_part(host.decode("latin-1")) not in self.guards.names:
            shown = host.decode("latin-1")[:100] if host else "none"
            return 400, (f"refused: this server does not answer to the host {shown!r} (start `search serve` "
                         "with --allowed-host NAME for a name it should answer to)")
        if b"transfer-encoding" in headers and b"content-length" in headers:
            return 400, "refused: a request may not carry both Transfer-Encoding and Content-Length"
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return 400, "refused: Content-Length is not a number"
        if length is not None and int(length) > self.guards.max_body:
            return 413, too_large(self.guards.max_body - FRAMING)
        if bad_characters(scope.get("raw_path") or scope["path"].encode()) or bad_characters(scope["query_string"]):
            return 422, "refused: the path or a parameter holds NUL or invalid UTF-8"
        return None

    def same_origin(self, headers: dict) -> bool:
        """No Origin (not a browser), or the server's own: the Host itself, or an --allowed-host name at any port."""
        origin = headers.get(b"origin")
        if origin is None:
            return True
        scheme, sep, netloc = origin.decode("latin-1").lower().partition("://")
        if not sep or scheme not in ("http", "https"):
            return False  # 'null' included
        return netloc == headers[b"host"].decode("latin-1").lower() or host_part(netloc) in self.guards.proxy_names

    async def check_token(self, scope, headers: dict, send) -> bool:
        """True when the request shows the token; else answers it (401, or the link's sign-in page) and returns False."""
        token = self.guards.token
        if scope["path"] == "/" and b"token=" in scope["query_string"]:
            given = dict(parse_qsl(scope["query_string"].decode("latin-1"))).get("token", "")
            if not same_token(given, token):
                await answer(send, 401, "refused: wrong token")
                return False
            secure = "; Secure" if scope.get("scheme") == "https" else ""
            cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}".encode()
            await respond(send, 200, SIGNED_IN, b"text/html; charset=utf-8",
                          [(b"set-cookie", cookie), (b"cache-control", b"no-store")])
            return False
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if authorization[:7].lower() == "bearer " and same_token(authorization[7:].strip(), token):
            return True
        cookie = cookie_value(headers[b"cookie"], COOKIE) if b"cookie" in headers else None
        if cookie is not None and same_token(cookie, token):
            return True
        await answer(send, 401, NEEDS_TOKEN, extra=[(b"www-authenticate", b"Bearer")])
        return False


def too_large(limit: int) -> str:
    return f"the upload is larger than the limit of {limit / (1024 * 1024):.3g} MB"


async def answer(send, status: int, detail: str, *, close: bool = False, extra=()) -> None:
    """A refusal as the API words every error: {"detail": one line}. `close` ends the connection, so the rest of
    a body the client is still sending is never read."""
    headers = [*extra, (b"connection", b"close")] if close else list(extra)
    await respond(send, status, json.dumps({"detail": detail}).encode(), b"application/json", headers)


async def respond(send, status: int, body: bytes, content_type: bytes, headers) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers,
                            *security_headers(content_type)]})
    await send({"type": "http.response.body", "body": body})


def security_headers(content_type: bytes) -> list[tuple[bytes, bytes]]:
    """Every answer says nosniff and same-origin; an HTML page also forbids framing, inline code and referrers."""
    return PAGE_HEADERS if content_type.startswith(b"text/html") else EVERY_ANSWER_HEADERS
