"""CORS for browser clients: which web origins may call the REST port, with which methods and headers.

A pure ASGI wrapper around the REST app, built once. Off unless origins are given (then it is not even in
the chain): a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) then reaches the app, which
answers 405 without any ``Access-Control-*`` header, so a browser refuses the call. On, it answers
preflights itself (204 with what is allowed, or 403 saying what is not), and adds
``Access-Control-Allow-Origin`` to the answers of allowed origins. A request without ``Origin`` (every
non-browser client) costs one scan of the headers.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import orjson

from dhow.core.errors import InvalidInput
from dhow.protocols.rest.body import Message, Receive, Scope, Send

__all__ = ["CorsMiddleware", "CorsPolicy"]

Headers = list[tuple[bytes, bytes]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
#: answer headers a browser script may read (besides the CORS-safelisted ones)
_EXPOSED = b"inference-header-content-length, retry-after, x-request-id"
#: what a browser sends as Origin: scheme, host and optional port, no path
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|\*")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    #: allowed origins (``scheme://host[:port]``); ``*``: any
    origins: frozenset[str]
    methods: tuple[str, ...]
    #: request headers a browser may send (lower case)
    headers: tuple[str, ...]
    #: seconds a browser may cache a preflight's answer
    max_age_s: int = 600

    @classmethod
    def of(cls, origins: Iterable[str], methods: Iterable[str], headers: Iterable[str]) -> CorsPolicy | None:
        """The policy, or None (CORS off) when no origin is given."""
        allowed = frozenset(origin.strip().rstrip("/") for origin in origins if origin.strip())
        if not allowed:
            return None
        for origin in allowed:
            if not _ORIGIN.fullmatch(origin):
                raise InvalidInput(
                    f"--cors-origin {origin!r} is not a web origin: give scheme://host[:port] "
                    "(e.g. https://app.example.com, no path) or '*'"
                )
        names = (*methods, *headers)
        for name in names:
            if not _TOKEN.fullmatch(name.strip()):
                raise InvalidInput(
                    f"CORS: {name!r} is not an HTTP method or header name (--cors-method, --cors-header)"
                )
        return cls(allowed, tuple(m.strip().upper() for m in methods), tuple(h.strip().lower() for h in headers))

    def allows(self, origin: str) -> bool:
        return "*" in self.origins or origin in self.origins

    def refusal(self, origin: str, method: str, headers: list[str]) -> str | None:
        """Why a preflight is refused, or None when it is allowed."""
        if not self.allows(origin):
            return f"origin {origin!r} may not call this server (allowed: {', '.join(sorted(self.origins))})"
        if method not in self.methods:
            return f"method {method!r} is not allowed from a browser (allowed: {', '.join(self.methods)})"
        unknown = [header for header in headers if header not in self.headers]
        if unknown:
            return f"header {unknown[0]!r} is not allowed from a browser (allowed: {', '.join(self.headers)})"
        return None


class CorsMiddleware:
    def __init__(self, app: App, policy: CorsPolicy) -> None:
        self.app = app
        self.policy = policy
        self._preflight_headers: Headers = [
            (b"access-control-allow-methods", ", ".join(policy.methods).encode()),
            (b"access-control-allow-headers", ", ".join(policy.headers).encode()),
            (b"access-control-max-age", str(policy.max_age_s).encode()),
            (b"vary", b"origin"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.app
        origin = _header(scope, b"origin") if scope["type"] == "http" else None
        if origin is None:
            await app(scope, receive, send)
            return
        requested = _header(scope, b"access-control-request-method")
        if scope["method"] == "OPTIONS" and requested is not None:
            await self._preflight(scope, origin, requested, send)
            return
        if not self.policy.allows(origin):
            await app(scope, receive, send)  # answered without CORS headers: the browser hides the answer
            return
        allowed = self._allowed(origin)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], *allowed]}
            await send(message)

        await app(scope, receive, send_with_cors)

    def _allowed(self, origin: str) -> Headers:
        value = b"*" if "*" in self.policy.origins else origin.encode("latin-1")
        return [
            (b"access-control-allow-origin", value),
            (b"access-control-expose-headers", _EXPOSED),
            (b"vary", b"origin"),
        ]

    async def _preflight(self, scope: Scope, origin: str, method: str, send: Send) -> None:
        listed = _header(scope, b"access-control-request-headers") or ""
        headers = [name.strip().lower() for name in listed.split(",") if name.strip()]
        refusal = self.policy.refusal(origin, method.upper(), headers)
        if refusal is None:
            answer: Headers = [*self._allowed(origin)[:1], *self._preflight_headers]
            await send({"type": "http.response.start", "status": 204, "headers": answer})
            await send({"type": "http.response.body", "body": b""})
            return
        body = orjson.dumps({"error": f"CORS preflight refused: {refusal}"})
        start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 403, "headers": start})
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
