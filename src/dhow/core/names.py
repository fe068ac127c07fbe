"""What names may be: a model's name becomes a folder, a file-name part and a log-line word, so it is checked
once, where it enters (a door, the repository), before anything uses it; a data region names an audit store.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from dhow.core.errors import InvalidInput

__all__ = ["MAX_NAME_BYTES", "check_model_name", "check_region_name"]

#: room for the name in a file name of 255 bytes, with the prefixes and suffixes dhow adds (".x.staging")
MAX_NAME_BYTES = 200
_HOW = "use letters, digits and - _ . (not first) : @ +, up to 200 bytes"


def check_model_name(name: str, what: str = "model name") -> str:
    """The name, if it is one a folder may have and a log line may quote; ``InvalidInput`` saying why if not."""
    problem = _name_problem(name)
    if problem:
        raise InvalidInput(f"the {what} {problem}; {_HOW}")
    return name


@functools.lru_cache(maxsize=4096)  # every request names a model: the few names in use are checked once each
def _name_problem(name: str) -> str:
    if not name:
        return "is empty"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long"
    if name.startswith("."):
        return f"{name!r} starts with '.'"
    for char in name:
        if char in "/\\\"'`<>|*?" or char.isspace() or unicodedata.category(char)[0] in "CZ":
            return f"{name!r} holds {char!r}, which a model name may not"
    return ""


_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def check_region_name(region: str, where: str) -> str:
    """A data region's name (``ae``, ``eu``); ``where`` says which option or field gave it."""
    if not isinstance(region, str) or not _REGION.match(region):
        raise InvalidInput(f"{where}: a region is 1-32 lower-case letters, digits or '-' (e.g. ae, eu), got {region!r}")
    return region
