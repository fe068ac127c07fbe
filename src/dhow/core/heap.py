"""The garbage collector and a long-lived server process.

A serving process builds most of its objects once (models, routes, metrics) and keeps them. Python's full
collections walk every tracked object each time, and while they run every request in flight waits: measured
on mlp at c=64, pauses of about 100 ms that made the p99. ``settle_heap`` moves what exists now out of the
collector's reach (``gc.freeze``); only what is made later is walked.

It also raises the youngest generation's threshold (``YOUNG_THRESHOLD`` instead of Python's 700). A young
collection starts when the tracked objects made exceed those freed by the threshold, and walks every young
object still alive: under load, the requests in flight. At 700 a loaded server collected every ~18 mlp
requests at c=64, each time walking (and promoting) the ~64 requests waiting for the model: ~5% of the event
loop's instructions. The objects a request makes are freed by their reference counts when it is answered, so
a higher threshold is rarely reached: collections become rare, and one that runs walks at most about as many
objects as the threshold (a pause of about a millisecond). Cyclic garbage waits as long before it is freed:
a model that fails often with large inputs caught in exceptions' tracebacks (a cycle through the frames) holds
more memory until then (a review measured a Python model with 128 KiB inputs, half of 8,000 requests failing:
302 MB resident after the run against 243 MB at 700; flat, not growing).
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "frozen_objects", "settle_heap"]

#: the youngest generation's threshold once start-up is done (Python's default: 700); the older generations'
#: thresholds are left as they are
YOUNG_THRESHOLD = 10_000

#: how many objects the last ``settle_heap`` froze: counted once there, since ``gc.get_freeze_count`` walks every
#: frozen object (CPython 3.11: 2-70 ms with numpy or torch loaded), too slow for each scrape on the event loop
_frozen = 0


def settle_heap(*, young_threshold: int | None = YOUNG_THRESHOLD) -> None:
    """Collect once, then freeze what is left and raise the young threshold (None: leave it as it is): call when
    start-up (loading the models) is done."""
    global _frozen
    gc.collect()
    gc.freeze()
    _frozen = gc.get_freeze_count()
    if young_threshold is not None:
        _, middle, old = gc.get_threshold()
        gc.set_threshold(young_threshold, middle, old)


def frozen_objects() -> int:
    """The objects the last ``settle_heap`` froze (0 before it ran), as it counted them: free to read."""
    return _frozen
