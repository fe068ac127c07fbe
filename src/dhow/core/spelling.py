"""The name a user probably meant, for refusals of unknown names ("did you mean max_batch_size?")."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean"]

#: how alike a typo and a known name must be (difflib's ratio); 0.6 is difflib's own default
_CUTOFF = 0.6


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``"did you mean max_batch_size?"`` for the known name closest to ``word``, or ``""`` when none is close.

    Case and ``-`` versus ``_`` are ignored when matching (``Max-Batch-Size`` finds ``max_batch_size``).
    """
    names = list(known)
    by_shape = {_shape(name): name for name in names}
    close = difflib.get_close_matches(_shape(word), list(by_shape), n=1, cutoff=_CUTOFF)
    return f"did you mean {by_shape[close[0]]}?" if close else ""


def _shape(name: str) -> str:
    return name.lower().replace("-", "_")
