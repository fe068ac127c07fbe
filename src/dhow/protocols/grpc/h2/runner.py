"""A unary call's coroutine, run without an asyncio Task.

A Task costs a unary call about 13k instructions of the event loop's (``_asyncio.Task.__init__``: its entry in
asyncio's weak set of all tasks, a copy of the context, a first ``call_soon`` and a pass of the loop to start),
an eighth of what the native front spends on a call. ``CallRunner`` does for one coroutine what a Task does
for it, and no more: it starts it at once (inside ``data_received``), resumes it when the future it awaits is
done, each step in the call's own copy of the context, and cancels it by cancelling that future. What it does
not do: ``asyncio.current_task()`` is None in the call (nothing on a unary call's path asks for it: no
``asyncio.timeout`` or ``TaskGroup``; streaming calls, which use them, keep a Task).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("dhow.grpc")


class CallRunner:
    """Drives one coroutine as an asyncio Task would, started at once."""

    __slots__ = ("_context", "_coroutine", "_done", "_loop", "_must_cancel", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, None]) -> None:
        self._loop = loop
        self._coroutine: Coroutine[Any, Any, None] | None = coroutine
        self._context = contextvars.copy_context()
        self._waiter: asyncio.Future[Any] | None = None
        self._must_cancel = False
        self._done: asyncio.Future[None] | None = None  # made when a stop waits for the call's end

    def start(self) -> None:
        self._context.run(self._step, None)

    def done(self) -> bool:
        return self._coroutine is None

    def cancel(self) -> bool:
        """As ``Task.cancel``: the awaited future is cancelled (the coroutine resumes with ``CancelledError``),
        or the coroutine gets it at its next step."""
        if self._coroutine is None:
            return False
        waiter = self._waiter
        if waiter is None or not waiter.cancel():
            self._must_cancel = True
        return True

    def finished(self) -> asyncio.Future[None]:
        """A future done when the coroutine has ended."""
        if self._done is None:
            self._done = self._loop.create_future()
            if self._coroutine is None:
                self._done.set_result(None)
        return self._done

    def _step(self, error: BaseException | None) -> None:
        coroutine = self._coroutine
        if coroutine is None:
            return
        if self._must_cancel:
            self._must_cancel, error = False, asyncio.CancelledError()
        self._waiter = None
        try:
            awaited = coroutine.send(None) if error is None else coroutine.throw(error)
        except StopIteration:
            self._finish()
            return
        except (KeyboardInterrupt, SystemExit):
            self._finish()
            raise
        except BaseException:
            log.exception("a gRPC call's coroutine failed")
            self._finish()
            return
        if getattr(awaited, "_asyncio_future_blocking", None):
            awaited._asyncio_future_blocking = False
            self._waiter = awaited
            awaited.add_done_callback(self._wakeup, context=self._context)
            if self._must_cancel and awaited.cancel():
                self._must_cancel = False
        elif awaited is None:  # a bare yield (``asyncio.sleep(0)``): on the loop's next pass
            self._loop.call_soon(self._step, None, context=self._context)
        else:
            failure = RuntimeError(f"a gRPC call awaited {awaited!r}, not an asyncio future")
            self._loop.call_soon(self._step, failure, context=self._context)

    def _wakeup(self, future: asyncio.Future[Any]) -> None:
        try:
            future.result()
        except BaseException as exc:  # the coroutine's await raises it (a cancellation among them)
            self._step(exc)
        else:
            self._step(None)

    def _finish(self) -> None:
        self._coroutine = None
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
