"""Refusals of callers nobody knows: bounded in the audit trail, and slowed down per source address.

A flood of requests without valid credentials must not fill the audit trail (43,025 refusals in 10 s were
43,025 records) nor cost the server its work. So, per window of ``window_s`` seconds:

- the first refusal of each (source address, who, reason) is recorded at once, as any refusal is;
- the rest are counted, and written as one record per (source, who, reason) when the window ends
  (``details.count``: how many were refused, ``details.window_s``), at most ``max_keys`` such records per
  window (the others are counted under the source ``*``);
- each source has a budget of failed authentications (``rate`` per second, ``burst``): past it, its failures
  are answered 429 with Retry-After instead of 401, until the budget refills. Valid credentials from the same
  address still pass: only failing is limited.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from dhow.core.errors import DhowError, Overloaded

__all__ = ["Refusal", "UnknownCallers"]


class Refusal(NamedTuple):
    """What one aggregate audit record counts."""

    source: str
    actor: str
    outcome: str
    action: str
    model: str
    reason: str


@dataclass(slots=True)
class _Budget:
    tokens: float
    at: float


class UnknownCallers:
    def __init__(
        self,
        write: Callable[[Refusal, int, float], None],
        *,
        window_s: float = 10.0,
        max_keys: int = 1000,
        rate: float = 10.0,
        burst: float = 200.0,
        max_sources: int = 10_000,
    ) -> None:
        #: writes one record: what, how many times, over which window (0: a first refusal, written at once)
        self.write = write
        self.window_s = window_s
        self.max_keys = max_keys
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._tally: dict[Refusal, int] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._budgets: OrderedDict[str, _Budget] = OrderedDict()

    def refused(self, source: str, actor: str, action: str, model: str, exc: DhowError) -> DhowError:
        """Account one refusal; the error to answer (429 past the source's budget, else ``exc``)."""
        answer: DhowError = exc
        if not self._spend(source):
            answer = Overloaded(
                f"too many failed authentications from {source or 'this address'}; retry later",
                retry_after=max(1.0, 1.0 / self.rate),
            )
        key = Refusal(source, actor, exc.code.value, action, model, exc.message)
        if key not in self._tally and len(self._tally) >= self.max_keys:
            key = Refusal("*", "*", exc.code.value, "*", "", "refusals of more sources than a window records")
        first = key not in self._tally
        self._tally[key] = self._tally.get(key, 0) + (0 if first else 1)
        if first:
            self.write(key, 1, 0.0)
            self._schedule()
        return answer

    def flush(self) -> None:
        """Write the window's counts (those beyond each key's first refusal) and start a new window."""
        tally, self._tally = self._tally, {}
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for key, count in tally.items():
            if count:
                self.write(key, count, self.window_s)

    def _schedule(self) -> None:
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self.window_s, self.flush)

    def _spend(self, source: str) -> bool:
        now = time.monotonic()
        budget = self._budgets.get(source)
        if budget is None:
            budget = self._budgets[source] = _Budget(self.burst, now)
            if len(self._budgets) > self.max_sources:
                self._budgets.popitem(last=False)  # bounded: the oldest source starts afresh
        else:
            self._budgets.move_to_end(source)
            budget.tokens = min(self.burst, budget.tokens + (now - budget.at) * self.rate)
            budget.at = now
        if budget.tokens < 1.0:
            return False
        budget.tokens -= 1.0
        return True
