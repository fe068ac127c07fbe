"""What the REST door needs to answer a request from its audit record's departure instead of its own coroutine.

An inference's audit record leaves for the audit writer's pipe in one frame with the others of its pass of the event
loop, and its answer may go only once it has (``AuditTrail.record_before_answer``). Resuming the request's coroutine
for that, and the front's and the app's awaiting it, costs the event loop ~8k instructions a request; dhow's own
HTTP/1.1 sends the answer, logs it and goes on with the connection from the departure's callback instead
(``Exchange.answer_after``). These are what that callback answers when the record could not leave, and its access
log line.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import get_args

import orjson

from dhow.core.errors import DhowError, Unavailable
from dhow.core.ids import new_request_id
from dhow.protocols.rest.access_log import AccessLog
from dhow.protocols.rest.body import Scope
from dhow.protocols.rest.exchange import Answer
from dhow.protocols.rest.torchserve import error_body as torchserve_error
from dhow.protocols.routes import Protocol

__all__ = ["REFUSALS", "error_body", "log_later", "retry_after"]


def _refusal(protocol: Protocol, exc: BaseException) -> Answer:
    """The answer in place of a call's whose audit record could not leave: what the door answers the exception
    its ``await`` of the departure would have raised (a 503, ``Unavailable``)."""
    if not isinstance(exc, DhowError):  # (a departure fails with ``Unavailable`` only)
        exc = Unavailable(f"the audit record could not leave ({type(exc).__name__})")
    body = error_body(protocol, exc.http_status, exc.message)
    headers = [(b"content-type", b"application/json"), *retry_after(exc.retry_after)]
    return exc.http_status, [*headers, (b"content-length", b"%d" % len(body))], body


def error_body(protocol: Protocol, status: int, message: str) -> bytes:
    """``{"error": message}``; TorchServe's routes answer its own shape, which carries ``error`` too."""
    return torchserve_error(status, message) if protocol == "torchserve" else orjson.dumps({"error": message})


def retry_after(seconds: float | None) -> list[tuple[bytes, bytes]]:
    """The ``retry-after`` header of a refusal that says when to try again (none: no header)."""
    if seconds is None:
        return []
    return [(b"retry-after", str(max(1, math.ceil(seconds))).encode())]


#: each protocol's refusal, made once
REFUSALS = {protocol: partial(_refusal, protocol) for protocol in get_args(Protocol)}


def log_later(
    access_log: AccessLog, scope: Scope, started: float, principal: str, request_id: str, status: int
) -> None:
    """A request's access log line, with the status it was answered (from its record's departure when it waited for
    it: ``partial`` of all but the status)."""
    access_log.write(scope, status, time.perf_counter() - started, principal, request_id or new_request_id())
