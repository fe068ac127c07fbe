"""Waiting out a busy core: what an in-process caller that cannot give up (a batch job, a stream consumer) does
with an overload or an unavailable model, instead of failing a row or a message that would pass a moment later."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from dhow.core.errors import DhowError, ErrorCode

__all__ = ["PASSING", "retrying"]

#: refusals that pass: tried again after a pause that doubles each time
PASSING = frozenset({ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED})

_T = TypeVar("_T")


async def retrying(attempt: Callable[[], Awaitable[_T]], *, first_s: float, most_s: float, tries: int = 8) -> _T:
    """``attempt()``'s result; a passing refusal is tried again (``tries`` in all), any other error raised."""
    for number in range(tries):
        try:
            return await attempt()
        except DhowError as exc:
            if exc.code not in PASSING or number == tries - 1:
                raise
            await asyncio.sleep(min(first_s * 2**number, most_s))
    raise AssertionError("unreachable")
