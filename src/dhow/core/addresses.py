"""Where a store's URL points, for messages and logs: never its user name or password."""

from __future__ import annotations

import urllib.parse

__all__ = ["redis_address"]


def redis_address(url: str) -> str:
    """HOST:PORT (or the socket path) of a Redis URL, without its user name or password."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
    except ValueError:
        return "an unparseable URL"
