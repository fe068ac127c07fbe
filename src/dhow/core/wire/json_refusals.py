"""What a door tells a sender whose JSON the parser refused: the parser's reason and place and, where it stopped
at ``NaN`` or ``Infinity``, that JSON has none and how this door takes non-finite values.

Python's ``json.dumps`` (and TensorFlow Serving's parser) write and read ``NaN``, ``Infinity`` and ``-Infinity``;
JSON has no such token, so a sender meets the bare "unexpected character" of the parser, in a body (REST), a line
of a file (batch) or a message (stream). Every door words it here, each with its own way to send such values.
"""

from __future__ import annotations

import orjson

__all__ = ["BINARY_TENSORS", "json_refusal"]

#: how the REST and gRPC doors take non-finite values
BINARY_TENSORS = (
    "send non-finite values in binary tensors (the Open Inference Protocol's binary data extension, or gRPC)"
)

_NON_FINITE = ("NaN", "-NaN", "Infinity", "-Infinity")


def json_refusal(exc: orjson.JSONDecodeError, non_finite: str = BINARY_TENSORS, reason: str = "") -> str:
    """``reason`` (by default the parser's, with where it stopped: line, column, character); where it stopped at
    ``NaN`` or ``Infinity``, also that JSON has none and ``non_finite``: how the door takes such values."""
    said = reason or str(exc)
    # (the parser's position counts characters, not bytes: read where it stopped in the text it decoded)
    at = exc.doc[exc.pos : exc.pos + len("-Infinity")] if isinstance(exc.doc, str) else ""
    if at.startswith(_NON_FINITE):
        return f"{said}; JSON has no NaN or Infinity: {non_finite}"
    return said
