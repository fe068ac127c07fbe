"""Sampling by counting down: a geometric gap drawn once per sample, the answers between only counted.

Drawing a random number for every request costs a call on the request's path (~0.8 µs in a loaded server:
``benchmarks/monitoring_insitu.py``); a count down costs a subtraction. Gaps drawn from the geometric distribution
make sampling every ``gap``-th request the same as sampling each with probability ``rate``: each request's chance
is ``rate`` whatever came before (the distribution has no memory).
"""

from __future__ import annotations

import math
import random

__all__ = ["NEVER", "sampling_gap"]

#: the gap of a rate of 0: past any server's lifetime of requests
NEVER = 1 << 62


def sampling_gap(rate: float) -> int:
    """How many requests from one sampled request to the next (at least 1): geometric with mean ``1 / rate``."""
    if rate >= 1:
        return 1
    if rate <= 0:
        return NEVER
    return int(math.log(1.0 - random.random()) / math.log(1.0 - rate)) + 1
