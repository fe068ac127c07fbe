"""settle_heap: what exists when start-up ends is out of the full collections' reach; what comes later is not; young
collections come rarer."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from dhow.core.heap import YOUNG_THRESHOLD, settle_heap


class _Node:
    def __init__(self) -> None:
        self.itself = self


@pytest.fixture
def unfrozen() -> Iterator[None]:
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test run keeps an ordinary heap
    gc.set_threshold(*thresholds)


def test_settle_heap_collects_then_freezes_what_start_up_built(unfrozen: None) -> None:
    kept = [[index] for index in range(1000)]
    garbage = weakref.ref(_Node())  # a cycle only a collection frees: it must not be frozen for good
    settle_heap()
    assert garbage() is None
    assert gc.get_freeze_count() >= len(kept)
    tracked = gc.get_objects()
    assert not any(obj is kept[0] for obj in tracked)
    later = [1]
    assert any(obj is later for obj in gc.get_objects())


def test_settle_heap_raises_the_young_threshold_only(unfrozen: None) -> None:
    gc.set_threshold(700, 11, 12)
    settle_heap()
    assert gc.get_threshold() == (YOUNG_THRESHOLD, 11, 12)
    assert YOUNG_THRESHOLD > 700
    gc.set_threshold(700, 11, 12)
    settle_heap(young_threshold=None)  # the stream runner's: its memory bound is a promise
    assert gc.get_threshold() == (700, 11, 12)
