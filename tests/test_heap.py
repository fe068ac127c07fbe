"""settle_heap: what exists when start-up ends is out of the full collections' reach; what comes later is not; young
collections come rarer."""

from __future__ import annotations

import contextlib
import gc
import sys
import weakref
from collections.abc import Iterator

import pytest

from dhow.core import heap
from dhow.core.heap import YOUNG_THRESHOLD, frozen_objects, settle_heap
from dhow.monitoring.resources import HeapCollector


class _Node:
    def __init__(self) -> None:
        self.itself = self


@contextlib.contextmanager
def _unfrozen() -> Iterator[None]:
    """An ordinary heap before and after (nothing frozen, the thresholds as they were), and ``frozen_objects``
    saying so: a test's ``settle_heap`` must not leave its count to the collector of a later test's server."""
    thresholds = gc.get_threshold()
    gc.unfreeze()
    heap._frozen = 0
    try:
        yield
    finally:
        gc.unfreeze()  # the rest of the test run keeps an ordinary heap
        heap._frozen = 0
        gc.set_threshold(*thresholds)


@pytest.fixture
def unfrozen() -> Iterator[None]:
    with _unfrozen():
        yield


def test_unfrozen_leaves_nothing_frozen_nor_counted() -> None:
    with _unfrozen():
        settle_heap()
        assert frozen_objects() > 0
    assert frozen_objects() == 0 == gc.get_freeze_count()


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


def _scraped(collector: HeapCollector) -> tuple[dict[str, float], list[str]]:
    """The collector's samples, and the C functions it called while collecting (``sys.setprofile`` sees them)."""
    called: list[str] = []

    def watch(frame: object, event: str, arg: object) -> None:
        if event == "c_call":
            called.append(getattr(arg, "__qualname__", repr(arg)))

    sys.setprofile(watch)
    try:
        families = list(collector.collect())
    finally:
        sys.setprofile(None)
    samples = {s.name + str(sorted(s.labels.values())): s.value for family in families for s in family.samples}
    return samples, called


def test_a_scrape_reads_the_frozen_count_settle_heap_kept_and_walks_nothing(unfrozen: None) -> None:
    """``gc.get_freeze_count`` walks every frozen object (2-70 ms with numpy or torch loaded) and a scrape runs on
    the event loop: the collector reports the count ``settle_heap`` took once, and never calls it."""
    settle_heap()
    settled = gc.get_freeze_count()
    samples, called = _scraped(HeapCollector())
    assert "get_freeze_count" not in called, called
    assert samples["dhow_gc_frozen_objects[]"] == settled > 0
    assert samples["dhow_gc_threshold['0']"] == YOUNG_THRESHOLD
    kept = [[index] for index in range(1000)]
    gc.freeze()  # (no server does this after settle_heap: what the metric shows is settle_heap's count, not a new one)
    assert gc.get_freeze_count() >= settled + len(kept)
    assert _scraped(HeapCollector())[0]["dhow_gc_frozen_objects[]"] == settled
