"""The REST access log: one line per request, written off the event loop.

    POST /v2/models/fraud/infer 200 3.1ms principal=key:ci-bot request_id=4f1c2a9b0d6e8f7a

The request id is the one in the request's audit record (``dhow.core.ids``): the client's ``x-request-id``,
else an inference body's ``id``, when it is a plain token, else one the server made. The event loop only puts
the line's fields and the time on a queue; a thread (``QueueListener``) makes the log record, masks it and
writes it through the root logger's handlers, the same masked ones every log line goes through, so a slow
terminal or disk never stalls a request. Making the record on the loop (``logger.info``, then ``QueueHandler``
formatting and copying it) cost a request ~88k instructions there; the queued tuple costs ~3k. The path is the
raw one (percent escapes kept: no decoded newline can forge a line) without its query string, which may carry
data.
"""

from __future__ import annotations

import logging
import queue
import time
from logging.handlers import QueueListener
from typing import Any

from dhow.core import affinity
from dhow.core.ids import client_request_id
from dhow.protocols.rest.body import Scope

__all__ = ["AccessLog", "unrouted_request_id"]

_FORMAT = "%s %s %d %.1fms principal=%s request_id=%s"
#: what the loop queues per line: method, path, status, seconds, principal, request id, time.time()
_Line = tuple[str, str, int, float, str, str, float]


class AccessLog:
    """The access log's logger, its queue and the thread that writes it; ``enabled`` may change (SIGHUP)."""

    def __init__(self, *, enabled: bool) -> None:
        self.logger = logging.getLogger("dhow.http")
        self._queue: queue.SimpleQueue[_Line] = queue.SimpleQueue()
        self._listener: QueueListener | None = None
        self._enabled = enabled
        #: whether a line would be written (enabled, and info lines logged): else the door skips the clock too
        self.writing = False
        self.refresh()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        self.refresh()

    def refresh(self) -> None:
        """Look again at whether lines are written (after the log level changed)."""
        self.writing = self._enabled and self.logger.isEnabledFor(logging.INFO)

    def start(self) -> None:
        """Write through the root logger's handlers (with their masking filters), from a thread of its own."""
        root = logging.getLogger()
        self._listener = _Lines(self._queue, self.logger.name, *root.handlers)
        self._listener.start()
        self.refresh()
        self.logger.propagate = False  # the root's handlers write it, from the listener's thread only

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def write(self, scope: Scope, status: int, seconds: float, principal: str, request: str) -> None:
        path = scope.get("raw_path") or scope["path"].encode()
        line = (scope["method"], path.decode("latin-1"), status, seconds * 1000, principal, request)
        if self._listener is None:  # not started (an app without a server): written here, as any log line
            self.logger.info(_FORMAT, *_printable(line))
            return
        self._queue.put((*line, time.time()))


def _printable(fields: Any) -> tuple[Any, ...]:
    """The line's fields, a principal with a character that is not printable written with escapes: a bearer
    token's ``sub`` is any JSON string, and one holding a newline would otherwise forge a line of its own."""
    method, path, status, ms, principal, request = fields
    if not principal.isprintable():
        principal = principal.encode("unicode_escape").decode("ascii")
    return method, path, status, ms, principal, request


class _Lines(QueueListener):
    """Makes each queued line the record ``logger.info`` would have made on the loop, then hands it on.

    As ``QueueHandler`` did, the record's message is formatted and its arguments dropped before the handlers see
    it; its time is the loop's, when the request ended.
    """

    def __init__(self, lines: queue.SimpleQueue[_Line], name: str, *handlers: logging.Handler) -> None:
        super().__init__(lines, *handlers, respect_handler_level=True)
        self._name = name

    def _monitor(self) -> None:
        affinity.as_helper()  # (off the event loop's CPU, with ``--cpu-affinity auto``)
        super()._monitor()  # type: ignore[misc]

    def prepare(self, record: Any) -> logging.LogRecord:
        *fields, created = record
        message = _FORMAT % _printable(fields)
        made = logging.LogRecord(self._name, logging.INFO, __file__, 0, message, None, None, "write")
        made.relativeCreated -= (made.created - created) * 1000  # both since logging's start, as LogRecord counts
        made.created = created
        made.msecs = int((created - int(created)) * 1000) + 0.0
        made.message = message
        return made


def unrouted_request_id(scope: Scope) -> str:
    """The client's ``x-request-id`` of a request that matched no route (no ``Request`` was made for it), else ""."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return client_request_id(value)
    return ""
