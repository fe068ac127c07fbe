"""A request's coroutine, run without an asyncio Task: a unary gRPC call's, a REST request's.

A Task costs a request about 13k instructions of the event loop's (``_asyncio.Task.__init__``: its entry in
asyncio's weak set of all tasks, in Python on 3.11, and its removal; a copy of the context; a first
``call_soon``). ``CallRunner`` does for one coroutine what a Task does for it, and no more: it starts it when
told (the native gRPC front at once, inside ``data_received``; the REST front on the loop's next pass, as a Task
would), resumes it when the future it awaits is done, each step in the request's own copy of the context, and
cancels it by cancelling that future. During each step it is ``asyncio.current_task()``, with the part of a
Task's interface that ``asyncio.timeout`` and ``TaskGroup`` use (``cancel``, ``cancelling``, ``uncancel``): code
the request reaches may time itself (redis' asyncio client does, for the shared rate limit). What it does not
do: appear in ``asyncio.all_tasks()``, or take done callbacks.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("dhow.protocols")

# asyncio's own (its C functions): what makes a coroutine's step ``current_task()``'s
_enter_task: Callable[[asyncio.AbstractEventLoop, object], None] = asyncio.tasks._enter_task  # type: ignore[assignment]
_leave_task: Callable[[asyncio.AbstractEventLoop, object], None] = asyncio.tasks._leave_task  # type: ignore[assignment]


class CallRunner:
    """Drives one coroutine as an asyncio Task would, started when told (``start``), or made to start on the
    loop's next pass (``soon``)."""

    __slots__ = ("_cancels", "_context", "_coroutine", "_done", "_loop", "_must_cancel", "_waiter", "_what")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        coroutine: Coroutine[Any, Any, None],
        what: str = "a gRPC call",
        context: contextvars.Context | None = None,
        *,
        soon: bool = False,
    ) -> None:
        self._loop = loop
        #: what the coroutine serves, for the log of its failure
        self._what = what
        self._coroutine: Coroutine[Any, Any, None] | None = coroutine
        # its own copy: of ``context`` (a connection's, so a pipelined request never sees what the one before it
        # set) or of the context it is made in
        self._context = context.copy() if context is not None else contextvars.copy_context()
        self._waiter: asyncio.Future[Any] | None = None
        self._must_cancel = False
        #: cancellations asked and not taken back (``Task.cancelling``)
        self._cancels = 0
        self._done: asyncio.Future[None] | None = None  # made when a stop waits for the call's end
        if soon:  # started on the loop's next pass, as a Task is: without a ``start`` frame of its own (~1k)
            loop.call_soon(self._step, None, context=self._context)

    def start(self) -> None:
        if asyncio.current_task(self._loop) is not None:  # asked inside a Task's step, which is current: next pass
            self._loop.call_soon(self._step, None, context=self._context)
        else:
            self._context.run(self._step, None)

    def done(self) -> bool:
        return self._coroutine is None

    def get_name(self) -> str:
        return self._what

    def cancelling(self) -> int:
        return self._cancels

    def uncancel(self) -> int:
        if self._cancels > 0:
            self._cancels -= 1
        return self._cancels

    def cancel(self, msg: Any = None) -> bool:
        """As ``Task.cancel``: the awaited future is cancelled (the coroutine resumes with ``CancelledError``),
        or the coroutine gets it at its next step."""
        if self._coroutine is None:
            return False
        self._cancels += 1
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

    def _step(self, future: asyncio.Future[Any] | None, error: BaseException | None = None) -> None:
        """One step of the coroutine: resumed with ``error`` thrown in, or with what ``future`` (the awaited
        future, done: this is its done callback) ended with, as ``Task.__wakeup`` reads it; its own frame, not a
        separate wake-up's, since a request's coroutine is woken several times (about 1.5k instructions each)."""
        if future is not None:
            try:
                future.result()
            except BaseException as exc:  # the coroutine's await raises it (a cancellation among them)
                error = exc
        coroutine = self._coroutine
        if coroutine is None:
            return
        if self._must_cancel:
            self._must_cancel, error = False, asyncio.CancelledError()
        self._waiter = None
        loop = self._loop
        _enter_task(loop, self)
        try:
            awaited = coroutine.send(None) if error is None else coroutine.throw(error)
        except StopIteration:
            self._finish()
            return
        except (KeyboardInterrupt, SystemExit):
            self._finish()
            raise
        except asyncio.CancelledError:  # cancelled, as a Task's end would be: nothing to log
            self._finish()
            return
        except BaseException:
            log.exception("%s's coroutine failed", self._what)
            self._finish()
            return
        finally:
            _leave_task(loop, self)
        if getattr(awaited, "_asyncio_future_blocking", None):
            awaited._asyncio_future_blocking = False
            self._waiter = awaited
            awaited.add_done_callback(self._step, context=self._context)
            if self._must_cancel and awaited.cancel():
                self._must_cancel = False
        elif awaited is None:  # a bare yield (``asyncio.sleep(0)``): on the loop's next pass
            self._loop.call_soon(self._step, None, context=self._context)
        else:
            failure = RuntimeError(f"{self._what} awaited {awaited!r}, not an asyncio future")
            self._loop.call_soon(self._step, None, failure, context=self._context)

    def _finish(self) -> None:
        self._coroutine = None
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
