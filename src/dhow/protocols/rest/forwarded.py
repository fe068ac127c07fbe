"""Who the client is behind a trusted proxy: ``X-Forwarded-For`` and ``X-Forwarded-Proto``, as uvicorn reads them.

uvicorn's server (``--http-front uvicorn``) trusts these headers from the addresses in ``FORWARDED_ALLOW_IPS``
(by default ``127.0.0.1``: a gateway on the same host, ``dhow gateway``); the native front reads them the
same way, so that the address a request is counted under (the failed-authentication budget per source, the
audit trail) does not change with the front.
"""

from __future__ import annotations

import os

from dhow.protocols.rest.body import Scope

__all__ = ["TrustedProxies"]

_SCHEMES = frozenset(("http", "https", "ws", "wss"))


class TrustedProxies:
    """The proxies whose forwarding headers are believed; ``addresses``: comma-separated, ``*`` for any."""

    def __init__(self, addresses: str | None = None) -> None:
        if addresses is None:
            addresses = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
        self.hosts = frozenset(a.strip() for a in addresses.split(",") if a.strip())
        self.any = "*" in self.hosts

    def trusts(self, host: str) -> bool:
        return self.any or host in self.hosts

    def apply(self, scope: Scope, forwarded: dict[bytes, bytes]) -> None:
        """Put the forwarded scheme and client (port 0: unknown) in the scope of a request from a trusted proxy."""
        proto = forwarded.get(b"x-forwarded-proto")
        if proto is not None and (scheme := proto.decode("latin-1").strip().lower()) in _SCHEMES:
            scope["scheme"] = scheme
        chain = forwarded.get(b"x-forwarded-for")
        if chain is not None:
            hosts = [h.strip() for h in chain.decode("latin-1").split(",")]
            scope["client"] = (self._client(hosts), 0)

    def _client(self, hosts: list[str]) -> str:
        """The nearest address that is not a trusted proxy (each proxy appends the one it heard from)."""
        if not self.any:
            for host in reversed(hosts):
                if host not in self.hosts:
                    return host
        return hosts[0]
