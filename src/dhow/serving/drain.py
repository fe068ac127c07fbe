"""Graceful drain: what a server does between SIGTERM and its exit, and the hook other doors finish through.

On SIGTERM the server turns not-ready at once (REST ``/v2/health/ready`` answers 503, gRPC health
NOT_SERVING), keeps serving for ``--drain-delay`` seconds so that a load balancer that polls readiness moves
new traffic away first, then stops taking new connections and gives what is in flight ``--drain-seconds``
to finish: REST requests and gRPC calls (with the batches they wait on), and whatever registered a hook
here. A stream consumer registers one (``Drain.on_drain``): it is called once, when the doors close, with the
seconds left; it stops fetching, waits for the messages it was given, commits their offsets and returns.

The figures for Kubernetes: ``terminationGracePeriodSeconds`` must cover the ``preStop`` hook's sleep, then
``drain_delay + drain_seconds``, plus a margin for closing the models (``GRACE_MARGIN_S``). The defaults
(``drain_seconds`` 25, no delay, no ``preStop``) fit the default grace period of 30 s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["GRACE_MARGIN_S", "Drain", "DrainHook"]

log = logging.getLogger("dhow.drain")

#: seconds a stopping server needs after its drain to close models and stores (the supervisor waits this long
#: past the drain before it kills a worker; a Kubernetes grace period should add it too)
GRACE_MARGIN_S = 5.0

#: a hook: called with the seconds left of the drain, returns when what it had in flight is finished
DrainHook = Callable[[float], Awaitable[None]]


@dataclass
class Drain:
    """The hooks that finish in-flight work on a stop, run together, each within the drain's deadline."""

    hooks: list[tuple[str, DrainHook]] = field(default_factory=list)
    #: set when the drain began (the server stopped taking new work): a long-running loop may watch it
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def on_drain(self, name: str, hook: DrainHook) -> None:
        """Call ``hook`` when the server drains; ``name`` says in the log what did not finish in time."""
        self.hooks.append((name, hook))

    async def run(self, seconds: float) -> list[str]:
        """Run every hook at once, each given ``seconds``; the names of those that failed or ran out of time."""
        self.started.set()
        if not self.hooks:
            return []
        results = await asyncio.gather(*(self._one(name, hook, seconds) for name, hook in self.hooks))
        return [name for name in results if name is not None]

    @staticmethod
    async def _one(name: str, hook: DrainHook, seconds: float) -> str | None:
        try:
            await asyncio.wait_for(hook(seconds), timeout=seconds)
        except TimeoutError:
            log.error("drain: %s did not finish in %g s", name, seconds)
            return name
        except Exception:
            log.exception("drain: %s failed", name)
            return name
        return None
