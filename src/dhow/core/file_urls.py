"""``file:`` URLs as the options that take a local path or a URL read them (``--payload-log``, ``--repository``,
``dhow batch run --input`` and ``--output``).

A file URL's host must be empty or ``localhost`` (RFC 8089). ``file://tmp/x`` is the path ``/x`` on the host
``tmp``: taken as it parses, it would write ``/x``; taken as text after ``file://``, the relative ``tmp/x``.
Neither is what its writer meant (``file:///tmp/x``), so it is refused, showing that spelling.

Its path is percent-decoded, as RFC 8089 writes it: ``file:///tmp/my%20models`` is ``/tmp/my models``. A ``#``
ends the path (a fragment follows) and so does a ``?`` (a query): ``file:///data/run#3/out`` would name
``/data/run``. Both are refused, showing the URL meant (``%23``, ``%3F``), but for ``--payload-log``, whose query
holds the file sink's options. A plain path, without ``file:``, is the file name as written, ``#`` and ``%`` included.

The path must be absolute (``file:data/x`` would name a folder of wherever the process runs, ``file://`` alone the
path ''), and may not hold ``%2F``: decoded, it would silently be a folder separator, which no name can hold.
"""

from __future__ import annotations

import os
from urllib.parse import unquote_to_bytes, urlsplit

from dhow.core.errors import InvalidInput

__all__ = ["local_path"]

_LOCAL_HOSTS = ("", "localhost")


def local_path(location: str, option: str, *, query: bool = False) -> str:
    """The path a file URL names, percent-decoded, or ``location`` itself when it is no file URL; ``InvalidInput``
    naming ``option`` when the URL names another host, has a fragment, or has a query and ``query`` is false (the
    option takes none: the caller reads the query's options itself when it is true)."""
    parts = urlsplit(location)
    if parts.scheme.lower() != "file":
        return location
    if parts.netloc.lower() not in _LOCAL_HOSTS:
        meant = "file:///" + location[len("file://") :]
        raise InvalidInput(
            f"{option} {location!r}: a file URL's host must be empty or localhost, and {parts.netloc!r} is taken "
            f"as a host; for a path that starts with /{parts.netloc}, write {meant}"
        )
    if not parts.path.startswith("/"):
        said = f"{parts.path!r} is no absolute path" if parts.path else "names no path"
        raise InvalidInput(
            f"{option} {location!r}: a file URL {said}; write file:///ABSOLUTE/PATH (three slashes), or give a "
            "relative path as it is, without file:"
        )
    if "%2f" in parts.path.lower():
        raise InvalidInput(f"{option} {location!r}: %2F is '/', which no file's name can hold; write / between folders")
    if "?" in location.partition("#")[0] and not query:
        raise InvalidInput(
            f"{option} {location!r}: a file URL's path ends at its first '?' (a query follows, and {option} takes "
            f"none); for a path with '?' in it, write ? as %3F{' and # as %23' if '#' in location else ''}: "
            + location.replace("?", "%3F").replace("#", "%23")
        )
    if "#" in location:
        # a '?' after the '#' is the path's too where the option takes no query: the URL shown encodes it as well
        also = "?" in location and not query
        meant = location.replace("#", "%23").replace("?", "%3F" if also else "?")
        raise InvalidInput(
            f"{option} {location!r}: a file URL's path ends at its first '#' (a fragment follows, which names no "
            f"file); for a path with '#' in it, write # as %23{' and ? as %3F' if also else ''}: {meant}"
        )
    # the bytes the escapes stand for, as the file system names them (a name that is no UTF-8 is kept, as os does)
    path = os.fsdecode(unquote_to_bytes(parts.path))
    if "\x00" in path:
        raise InvalidInput(f"{option} {location!r}: %00 (NUL) can be in no file's path")
    return path
