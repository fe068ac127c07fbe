"""The REST access log: one line per request, written off the event loop.

    POST /v2/models/fraud/infer 200 3.1ms principal=key:ci-bot request_id=4f1c2a9b0d6e8f7a

The request id is the one in the request's audit record: the client's ``x-request-id`` when it is a plain
token, else one the server made. The event loop only builds a record and puts it on a queue
(``logging.handlers.QueueHandler``); a thread (``QueueListener``) masks it and writes it through the root
logger's handlers, the same masked ones every log line goes through, so a slow terminal or disk never stalls a
request. The path is the raw one (percent escapes kept: no decoded newline can forge a line) without its query
string, which may carry data.
"""

from __future__ import annotations

import logging
import queue
from logging.handlers import QueueHandler, QueueListener

from dhow.protocols.rest.body import Scope

__all__ = ["AccessLog"]


class AccessLog:
    """The access log's logger, its queue and the thread that writes it; ``enabled`` may change (SIGHUP)."""

    def __init__(self, *, enabled: bool) -> None:
        self.logger = logging.getLogger("dhow.http")
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
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
        self._listener = QueueListener(self._queue, *root.handlers, respect_handler_level=True)
        self._listener.start()
        self.refresh()
        self.logger.addHandler(QueueHandler(self._queue))
        self.logger.propagate = False  # the root's handlers write it, from the listener's thread only

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def write(self, scope: Scope, status: int, seconds: float, principal: str, request: str) -> None:
        path = scope.get("raw_path") or scope["path"].encode()
        self.logger.info(
            "%s %s %d %.1fms principal=%s request_id=%s",
            scope["method"],
            path.decode("latin-1"),
            status,
            seconds * 1000,
            principal,
            request,
        )
