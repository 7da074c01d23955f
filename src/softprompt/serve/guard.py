"""What every request meets before its route, as one pure ASGI middleware (so a refusal is sent before any of the
body is read): the Host header (a keyless server on a loopback address answers only requests addressed to a loopback
name, which a DNS-rebinding page cannot send), the API key, cross-site writes (a keyless server refuses what a
browser sends from another site), the body's size (413 before parsing, by Content-Length or, for a chunked body,
by counting while reading), `X-Content-Type-Options: nosniff` on every response, and the count of requests by route
and status for /metrics."""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from . import prometheus, protocol

NOSNIFF = (b"x-content-type-options", b"nosniff")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CLIENT_GONE = 499
"""The status counted for a request whose client left before the answer (nginx's convention)."""


@dataclass
class Rules:
    """What the guard checks: the key (None: none needed), the address the server is bound to (None: unknown, no
    Host check), the largest body, which paths need no key, and how a path is named in the counters."""

    api_key: str | None
    host: str | None
    max_body_bytes: int
    is_open: Callable[[str], bool]
    route: Callable[[str], str]


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine's loopback."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name in a Host header or an origin's authority, without the port."""
    return urlsplit(f"//{value}").hostname or ""


class Guard:
    """The middleware (see the module's docstring); `counters` are /metrics' request counters."""

    def __init__(self, app, rules: Rules, counters: prometheus.Counters):
        self.app, self.rules, self.counters = app, rules, counters
        self.rebinding_check = rules.api_key is None and rules.host is not None and is_loopback(rules.host)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]  # what is counted when the app raises before answering

        async def marked(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), NOSNIFF]}
            await send(message)

        left = False  # the client went away while sending its body
        try:
            refusal = self.refusal(scope)
            if refusal is None:
                replay, refusal = await self.read_body(scope, receive)
                left = replay is None and refusal is None
            if refusal is not None:
                return await self.refuse(*refusal, marked)
            if not left:
                await self.app(scope, replay, marked)
        finally:
            gone = left or scope.get("state", {}).get("status") == CLIENT_GONE
            self.counters.requests[(self.rules.route(scope["path"]), CLIENT_GONE if gone else status[0])] += 1

    def refusal(self, scope) -> tuple[int, dict] | None:
        """(status, error body) when the request is refused on its headers alone. Marks the request's state
        `key_given` when it carries the right key (/health then says more)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if self.rebinding_check and host is not None and not is_loopback(host_name(host)):
            return 403, protocol.error_body(
                f"the Host header names {host_name(host)[:100]!r}, but this server listens on {self.rules.host} without"
                " an API key, so it answers requests addressed to this machine only (localhost, 127.0.0.1): a web "
                "page elsewhere must not reach it. Address it by that name, or start it with --api-key.",
                "permission_error", code="host_not_allowed")  # fmt: skip
        key = self.rules.api_key
        if key is None:
            if scope["method"] not in SAFE_METHODS and self.cross_site(headers):
                return 403, protocol.error_body(
                    "a browser sent this request from another site, and this server has no API key: it takes no "
                    "cross-site requests. Send it from the server's own page or a program, or start the server with "
                    "--api-key.", "permission_error", code="cross_site")  # fmt: skip
            return None
        if hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {key}".encode()):
            scope.setdefault("state", {})["key_given"] = True
        elif not self.rules.is_open(scope["path"]):
            return 401, protocol.error_body(
                "Invalid or missing API key: send the header 'Authorization: Bearer <key>' with the server's "
                "--api-key.", "authentication_error", code="invalid_api_key")  # fmt: skip
        return None

    @staticmethod
    def cross_site(headers: dict[str, str]) -> bool:
        """Whether a browser says the request comes from another site (Sec-Fetch-Site), or its Origin is not the
        host it is sent to (older browsers)."""
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None:
            return fetch_site not in ("same-origin", "none")
        origin = headers.get("origin")
        if origin is None:
            return False  # not a browser's cross-site write (those always carry an Origin)
        return origin == "null" or urlsplit(origin).netloc.lower() != headers.get("host", "").lower()

    async def read_body(self, scope, receive):
        """(a `receive` that replays the whole body, None) once it is read, within the limit; (None, None) when the
        client left meanwhile; (None, the 413) as soon as it is known to be over the limit: by its Content-Length
        before reading any of it, or while counting a chunked body."""
        limit = self.rules.max_body_bytes
        length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            return None, self.too_large(int(length))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None, self.too_large(None)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return replay, None

    def too_large(self, length: int | None) -> tuple[int, dict]:
        size = f" ({length} bytes)" if length is not None else ""
        return 413, protocol.error_body(
            f"the request body{size} is over this server's limit of {self.rules.max_body_bytes} bytes "
            "(--max-body-bytes); send fewer or shorter prompts, or several requests.",
            code="body_too_large")  # fmt: skip

    @staticmethod
    async def refuse(status: int, body: dict, send) -> None:
        """Answer a refusal and close the connection: a body left unread is never read (nor drained)."""
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

