"""What a model's name may be: it becomes a folder, a file-name part and a log-line word, so it is checked once,
where it enters (a door, the repository), before anything uses it.
"""

from __future__ import annotations

import unicodedata

from dhow.core.errors import InvalidInput

__all__ = ["MAX_NAME_BYTES", "check_model_name"]

#: room for the name in a file name of 255 bytes, with the prefixes and suffixes dhow adds (".x.staging")
MAX_NAME_BYTES = 200
_HOW = "use letters, digits and - _ . (not first) : @ +, up to 200 bytes"


def check_model_name(name: str, what: str = "model name") -> str:
    """The name, if it is one a folder may have and a log line may quote; ``InvalidInput`` saying why if not."""
    if not name:
        raise InvalidInput(f"the {what} is empty; {_HOW}")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise InvalidInput(f"the {what} is {size} bytes long; {_HOW}")
    if name.startswith(".") or name in (".", ".."):
        raise InvalidInput(f"the {what} {name!r} starts with '.'; {_HOW}")
    for char in name:
        if char in "/\\\"'`<>|*?" or char.isspace() or unicodedata.category(char)[0] in "CZ":
            raise InvalidInput(f"the {what} {name!r} holds {char!r}, which a model name may not; {_HOW}")
    return name
