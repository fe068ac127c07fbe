"""Request ids: one per request, shared by the audit record, the access log line, the payload log's event and the
trace, so one finds the others (the feedback join takes the client's id as sent: ``serving.feedback.feedback_id``).

A client may name its request: its ``x-request-id`` header (gRPC: metadata), else the request's own ``id`` (the
v2 JSON body's, ``ModelInferRequest.id``), whichever is a plain token first; otherwise the server counts: a
random prefix per process, then a counter (unique across servers, and no system call per request as random
bytes would be). A gRPC stream's message is a request of its own: its own ``id`` when it is a plain token, else
``<stream id>.<n>``, the stream's ``x-request-id`` (else one made here) and its place in the stream from 1.
"""

from __future__ import annotations

import itertools
import re
import secrets

__all__ = ["client_request_id", "is_client_request_id", "new_request_id"]

_PREFIX = secrets.token_hex(4)
_COUNTER = itertools.count(1)
#: a request id a client may choose; anything else is replaced by one of ours
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_CLIENT_TEXT = re.compile(_CLIENT_ID.pattern.decode())


def new_request_id() -> str:
    """16 hex digits, unique per request."""
    return f"{_PREFIX}{next(_COUNTER):08x}"


def client_request_id(value: bytes) -> str:
    """The client's id when it is a plain token of up to 64 characters, else "" (the server makes one)."""
    return value.decode("ascii") if _CLIENT_ID.fullmatch(value) else ""


def is_client_request_id(value: str) -> bool:
    """Whether a request's own id (a body's) may name it: a plain token of up to 64 characters."""
    return _CLIENT_TEXT.fullmatch(value) is not None
