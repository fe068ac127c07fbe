"""``file:`` URLs as the options that take a local path or a URL read them (``--payload-log``, ``--repository``,
``dhow batch run --input`` and ``--output``).

A file URL's host must be empty or ``localhost`` (RFC 8089). ``file://tmp/x`` is the path ``/x`` on the host
``tmp``: taken as it parses, it would write ``/x``; taken as text after ``file://``, the relative ``tmp/x``.
Neither is what its writer meant (``file:///tmp/x``), so it is refused, showing that spelling.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from dhow.core.errors import InvalidInput

__all__ = ["local_path"]

_LOCAL_HOSTS = ("", "localhost")


def local_path(location: str, option: str) -> str:
    """The path a file URL names (query and fragment left off), or ``location`` itself when it is no file URL;
    ``InvalidInput`` naming ``option`` when the URL names another host."""
    parts = urlsplit(location)
    if parts.scheme.lower() != "file":
        return location
    if parts.netloc.lower() not in _LOCAL_HOSTS:
        meant = "file:///" + location[len("file://") :]
        raise InvalidInput(
            f"{option} {location!r}: a file URL's host must be empty or localhost, and {parts.netloc!r} is taken "
            f"as a host; for a path that starts with /{parts.netloc}, write {meant}"
        )
    return parts.path
