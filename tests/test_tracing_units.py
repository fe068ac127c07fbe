"""Tracing's sampling decisions: the W3C traceparent read strictly, the caller's sampled flag followed, the ratio
for requests without a parent."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from dhow.core.errors import InvalidInput
from dhow.monitoring import writer_pipe
from dhow.monitoring.tracing import (
    FLUSH_AT,
    FLUSH_S,
    Tracing,
    parse_traceparent,
    record_batch,
    spans_of,
    traces_url,
)
from dhow.serving.composition import TRACE_WRITER

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def test_a_valid_traceparent_gives_trace_parent_and_flag() -> None:
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-01") == (bytes.fromhex(TRACE), bytes.fromhex(SPAN), True)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00") == (bytes.fromhex(TRACE), bytes.fromhex(SPAN), False)
    # a later version may append fields after the four of version 00
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-09-more") == (bytes.fromhex(TRACE), bytes.fromhex(SPAN), True)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{TRACE.upper()}-{SPAN}-01",  # lower-case hex only
        f"00-{'0' * 32}-{SPAN}-01",  # an all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # an all-zero parent
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE[:-1]}g-{SPAN}-01",
    ],
)
def test_a_malformed_traceparent_is_no_parent(value: str | None) -> None:
    assert parse_traceparent(value) is None


def _tracing(ratio: float) -> Tracing:
    """A tracer with its own writer process (a collector that is not there: nothing is exported) and metrics."""
    return Tracing("http://127.0.0.1:9", ratio, command=TRACE_WRITER, registry=CollectorRegistry())


def test_sampling_follows_the_caller_else_the_ratio() -> None:
    never, always = _tracing(0.0), _tracing(1.0)
    try:
        times = (1, 2, 3)
        assert never.start({}, "m", "r", times) is None
        assert never.start({"traceparent": f"00-{TRACE}-{SPAN}-00"}, "m", "r", times) is None
        followed = never.start({"traceparent": f"00-{TRACE}-{SPAN}-01"}, "m", "r", times)
        assert followed is not None and followed.trace_id == TRACE and followed.parent_id == SPAN
        assert always.start({"traceparent": f"00-{TRACE}-{SPAN}-00"}, "m", "r", times) is None, "the caller decides"
        root = always.start({}, "m", "r", times)
        assert root is not None and root.parent_id == "" and root.trace_id != followed.trace_id
        assert len(root.trace_id) == 32 and int(root.trace_id, 16) != 0
    finally:
        never.shutdown()
        always.shutdown()


def test_a_ratio_traces_its_share_of_requests_by_a_count_down_that_parents_do_not_move() -> None:
    random.seed(11)
    tracing, always = _tracing(0.2), _tracing(1.0)
    try:
        decisions = [tracing.sample(None) for _ in range(20_000)]
        traced = [d for d in decisions if d is not None]
        assert 0.19 < len(traced) / len(decisions) < 0.21, "each request without a parent has the ratio's chance"
        assert len({trace_id for trace_id, _ in traced}) == len(traced) and all(p == "" for _, p in traced)
        gaps = [n for n, d in enumerate(decisions) if d is not None]
        assert min(b - a for a, b in itertools.pairwise(gaps)) == 1, "gaps are drawn, not fixed: two in a row happen"
        # a request with a parent is the caller's decision: it does not move the count down of the others
        tracing.skip = 3
        assert tracing.sample(f"00-{TRACE}-{SPAN}-01") == (TRACE, SPAN)
        assert tracing.sample(f"00-{TRACE}-{SPAN}-00") is None and tracing.skip == 3
        assert [tracing.sample(None) is not None for _ in range(3)] == [False, False, True], "the third is its turn"
        assert all(always.sample(None) is not None for _ in range(1_000)), "ratio 1: every request"
    finally:
        tracing.shutdown()
        always.shutdown()


def test_the_endpoint_must_be_an_otlp_http_url() -> None:
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("https://c/v1/traces") == "https://c/v1/traces"
    with pytest.raises(InvalidInput, match="expected an OTLP/HTTP URL"):
        traces_url("c:4317")


def test_the_export_parses_as_the_message_opentelemetry_proto_builds() -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

    from dhow.monitoring.otlp import SPAN_KIND_SERVER, FinishedSpan, export_request, resource_bytes

    trace, parent, own, other = bytes.fromhex(TRACE), bytes.fromhex(SPAN), b"\x01" * 8, b"\x02" * 8
    attributes = {"dhow.model": "tabular", "rows": 300, "negative": -2, "ratio": 0.5, "yes": True, "ü": "é"}
    span = FinishedSpan(trace, own, parent, "infer tabular", SPAN_KIND_SERVER, 1_700_000_000_123_456_789,
                        1_700_000_000_223_456_789, attributes, ((trace, other),), "INTERNAL")  # fmt: skip
    root = FinishedSpan(trace, other, b"", "batch", 1, 5, 6, None, (), "")
    written = ExportTraceServiceRequest.FromString(export_request(resource_bytes("dhow"), "dhow", [span, root]))

    def value(v: object) -> AnyValue:
        if isinstance(v, bool):
            return AnyValue(bool_value=v)
        if isinstance(v, int):
            return AnyValue(int_value=v)
        if isinstance(v, float):
            return AnyValue(double_value=v)
        return AnyValue(string_value=str(v))

    built = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value="dhow"))]),
                scope_spans=[
                    ScopeSpans(
                        scope=InstrumentationScope(name="dhow"),
                        spans=[
                            Span(
                                trace_id=trace, span_id=own, parent_span_id=parent, name="infer tabular",
                                kind=Span.SPAN_KIND_SERVER, start_time_unix_nano=span.start_ns,
                                end_time_unix_nano=span.end_ns,
                                attributes=[KeyValue(key=k, value=value(v)) for k, v in attributes.items()],
                                links=[Span.Link(trace_id=trace, span_id=other)],
                                status=Status(code=Status.STATUS_CODE_ERROR, message="INTERNAL"),
                            ),
                            Span(trace_id=trace, span_id=other, name="batch", kind=Span.SPAN_KIND_INTERNAL,
                                 start_time_unix_nano=5, end_time_unix_nano=6),
                        ],
                    )
                ],
            )
        ]
    )  # fmt: skip
    assert written == built


def test_the_door_decides_once_and_a_sampled_request_makes_its_spans_at_export() -> None:
    tracing = _tracing(0.0)
    try:
        assert tracing.sample(None) is None, "no parent, ratio 0: not traced"
        assert tracing.sample(f"00-{TRACE}-{SPAN}-00") is None, "the caller's unsampled flag is followed"
        assert tracing.sample("garbage") is None, "a malformed parent is none: the ratio decides"
        sampled = tracing.sample(f"00-{TRACE}-{SPAN}-01")
        assert sampled == (TRACE, SPAN)
        request = tracing.begin(sampled, "m", "r-1", (10, 20, 30))
        offset = tracing.monotonic_offset  # the batcher measures with the monotonic clock
        record_batch([None, request], {"dhow.batch.rows": 2}, 40 - offset, 50 - offset, [5, 10])
        spans = {span.name: span for span in spans_of(orjson.loads(orjson.dumps(request.record("3", 55, "", 60))))}
        root = spans["infer m"]
        assert set(spans) == {"infer m", "admission", "decoding", "queue", "compute", "batch", "encoding"}
        assert root.parent_id == bytes.fromhex(SPAN) and (root.start_ns, root.end_ns) == (10, 60)
        assert root.attributes == {"dhow.model": "m", "dhow.request_id": "r-1", "dhow.version": "3"}
        assert (spans["queue"].start_ns, spans["queue"].end_ns) == (30, 40), "it waited 10 ns for its batch"
        assert spans["compute"].attributes == {"dhow.batch.rows": 2, "dhow.batch.requests": 2}
        assert spans["batch"].links == ((bytes.fromhex(TRACE), root.span_id),), "the traced requests it carried"
        children = [span for name, span in spans.items() if name != "infer m"]
        assert all(s.parent_id == root.span_id and s.trace_id == root.trace_id for s in children)
        assert len({s.span_id for s in spans.values()}) == 7
        assert (spans["encoding"].start_ns, spans["encoding"].end_ns) == (55, 60)
    finally:
        tracing.shutdown()


def test_a_batch_is_kept_by_each_traced_request_it_carried_and_its_first_links_them_all() -> None:
    tracing = _tracing(0.0)
    try:
        first, second = (tracing.begin((TRACE, ""), "m", f"r-{n}", (1, 2, 3)) for n in range(2))
        record_batch([None, first, None, second], {"dhow.batch.rows": 4}, 100, 200, [7, 8, 9, 10])
        offset = tracing.monotonic_offset
        assert first.batch is second.batch, "one tuple for the batch, not one a request"
        assert first.batch == (100 + offset, 200 + offset, {"dhow.batch.rows": 4, "dhow.batch.requests": 4})
        assert (first.wait, second.wait) == (8, 10)
        assert first.links == [(TRACE, first.span_id), (TRACE, second.span_id)] and not second.links
        names = [span.name for span in spans_of(orjson.loads(orjson.dumps(second.record("1", 0, "CANCELLED", 300))))]
        assert names == ["admission", "decoding", "queue", "compute", "infer m"], "no batch span, not answered"
    finally:
        tracing.shutdown()


def test_a_batch_whose_first_traced_request_was_queued_already_goes_with_the_next_one() -> None:
    """A client that went away while its batch computed has its request queued (``finish``) before the batch is
    recorded: the batch span and its links go with the next traced request of the batch, not into a record that
    left."""
    tracing = _tracing(0.0)
    try:
        gone, staying = (tracing.begin((TRACE, ""), "m", f"r-{n}", (1, 2, 3)) for n in range(2))
        gone.finish("", 0, "CANCELLED")
        record_batch([gone, staying], {"dhow.batch.rows": 2}, 100, 200, [7, 8])
        assert not gone.links
        assert staying.links == [(TRACE, gone.span_id), (TRACE, staying.span_id)]
        names = [span.name for span in spans_of(orjson.loads(orjson.dumps(staying.record("1", 250, "", 300))))]
        assert "batch" in names
        alone = tracing.begin((TRACE, ""), "m", "r-3", (1, 2, 3))
        alone.finish("", 0, "CANCELLED")
        record_batch([alone], {"dhow.batch.rows": 1}, 100, 200, [7])  # no request left to carry the span: none
        assert not alone.links
    finally:
        tracing.shutdown()


def traced_requests(tracing: Tracing, registry: CollectorRegistry) -> tuple[Callable[[str], float], Callable[[], None]]:
    """How many traced requests ended as ``outcome`` (dhow_tracing_requests_total), and one more traced request."""

    def count(outcome: str) -> float:
        return registry.get_sample_value("dhow_tracing_requests_total", {"outcome": outcome}) or 0.0

    def finished() -> None:
        trace = tracing.start({}, "m", "r", (1, 2, 3))
        assert trace is not None
        trace.finish("1", 4)

    return count, finished


def test_a_full_queue_drops_and_a_dead_writer_fails_what_it_is_handed_and_both_are_counted() -> None:
    registry = CollectorRegistry()
    tracing = Tracing("http://127.0.0.1:9", 1.0, command=TRACE_WRITER, registry=registry, capacity=2)

    count, finished = traced_requests(tracing, registry)

    async def one_turn() -> None:  # three finish in one turn of the loop: the queue holds two until it ends
        for _ in range(3):
            finished()

    try:
        asyncio.run(one_turn())
        assert count("dropped") == 1 and count("failed") == 0
        tracing._process.kill()
        tracing._process.wait()
        tracing._reader.join(10)  # the reader sees the pipe close: the writer is gone
        before = count("failed")
        finished()
        assert count("failed") == before + 1, "a request handed to a dead writer is counted failed, nothing raises"
    finally:
        tracing.shutdown()


def _turns(tracing: Tracing, sizes: list[int]) -> tuple[list[int], list[int], list[float], int]:
    """``sizes[n]`` traced requests finished in the loop's nth turn: what was queued after each turn, the frames
    handed over (their records), the delays of the timers scheduled and how many are still pending."""
    _, finished = traced_requests(tracing, CollectorRegistry())
    frames: list[int] = []
    hand = tracing._hand
    tracing._hand = lambda count: frames.append(count) or hand(count)  # type: ignore[method-assign]
    delays: list[float] = []
    timers: list[asyncio.TimerHandle] = []

    async def run() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        call_later = loop.call_later

        def later(delay: float, *args: Any) -> asyncio.TimerHandle:
            delays.append(delay)
            timers.append(call_later(delay, *args))
            return timers[-1]

        loop.call_later = later  # type: ignore[method-assign, assignment]
        queued = []
        for size in sizes:
            for _ in range(size):
                finished()
            await asyncio.sleep(0)
            queued.append(len(tracing._queue))
        return queued, sum(not timer.cancelled() for timer in timers)

    queued, pending = asyncio.run(run())
    return queued, frames, delays, pending


def test_traced_requests_wait_longer_than_payload_events_and_a_full_frame_goes_on_the_next_turn_in_its_timer_s_place(
) -> None:  # fmt: skip
    """Each frame wakes two of the writer's threads, and it posts about a second apart: tracing hands over every
    ``FLUSH_S`` (not the payload log's 10 ms), or on the loop's next turn once ``FLUSH_AT`` are queued, once a turn
    whatever came meanwhile, its timer cancelled: no later frame of a few records, no timer left behind."""
    tracing = Tracing("http://127.0.0.1:9", 1.0, command=TRACE_WRITER, registry=CollectorRegistry(),
                      capacity=4 * FLUSH_AT)  # fmt: skip
    try:
        queued, frames, delays, pending = _turns(tracing, [FLUSH_AT - 1, 1, 600, 600, 600, 600, 10])
        assert queued == [FLUSH_AT - 1, 0, 600, 0, 600, 0, 10]
        assert frames == [FLUSH_AT, 1200, 1200] and pending == 1
        assert set(delays) == {FLUSH_S} and FLUSH_S > writer_pipe.FLUSH_S
    finally:
        tracing.shutdown()


def test_a_full_queue_waits_for_its_timer_while_the_pipe_has_not_taken_the_last_frame() -> None:
    """The pipe has not taken the last frame: nothing is handed over before it has, and the queue past
    ``FLUSH_AT`` waits for its one timer (not a timer a record)."""
    tracing = Tracing("http://127.0.0.1:9", 1.0, command=TRACE_WRITER, registry=CollectorRegistry(),
                      capacity=4 * FLUSH_AT)  # fmt: skip
    tracing._unsent = b"a frame's rest"  # (as the pipe leaves it when full)
    try:
        queued, frames, delays, pending = _turns(tracing, [FLUSH_AT, 500, 500])
        assert queued == [FLUSH_AT, FLUSH_AT + 500, FLUSH_AT + 1000]
        assert frames == [] and delays == [FLUSH_S] and pending == 1
    finally:
        tracing._unsent = b""  # (never written: the writer would read it as a frame)
        tracing.shutdown()


def _handed_in(tracing: Tracing, steps: Any) -> tuple[list[int], int]:
    """``steps(finished)`` run on an event loop: the frames handed over (their records) and the timers still
    pending."""
    _, finished = traced_requests(tracing, CollectorRegistry())
    frames: list[int] = []
    hand = tracing._hand
    tracing._hand = lambda count: frames.append(count) or hand(count)  # type: ignore[method-assign]
    timers: list[asyncio.TimerHandle] = []

    async def run() -> int:
        loop = asyncio.get_running_loop()
        call_later = loop.call_later

        def later(delay: float, *args: Any) -> asyncio.TimerHandle:
            timers.append(call_later(delay, *args))
            return timers[-1]

        loop.call_later = later  # type: ignore[method-assign, assignment]
        await steps(finished)
        return sum(not timer.cancelled() for timer in timers)

    return frames, asyncio.run(run())


def test_a_flush_when_the_pipe_drained_leaves_no_timer_behind() -> None:
    """The pipe took a frame's rest: the flush that follows (``_write_more``) hands over in the pending timer's
    place, which it cancels; left, it would write a stray frame and the next ``_put`` a second chain of timers."""
    tracing = Tracing("http://127.0.0.1:9", 1.0, command=TRACE_WRITER, registry=CollectorRegistry(),
                      capacity=4 * FLUSH_AT)  # fmt: skip
    tracing._unsent = b"a frame's rest"  # (as the pipe leaves it when full)

    async def steps(finished: Any) -> None:
        for _ in range(10):
            finished()
        await asyncio.sleep(0)
        tracing._unsent = b""  # the pipe took it ...
        tracing._flush()  # ... and the loop's writer callback flushes (``_write_more``)
        for _ in range(10):
            finished()
        await asyncio.sleep(0)

    try:
        frames, pending = _handed_in(tracing, steps)
        assert frames == [10] and pending == 1
    finally:
        tracing.shutdown()


def test_a_timer_due_once_the_close_began_hands_nothing_over() -> None:
    """The server closes the pipe from another thread while its loop still runs: a timer due meanwhile hands
    nothing over (the close takes what is queued itself: no record twice, no frame's bytes within another's)."""
    tracing = Tracing("http://127.0.0.1:9", 1.0, command=TRACE_WRITER, registry=CollectorRegistry(),
                      capacity=4 * FLUSH_AT)  # fmt: skip
    left: list[int] = []

    async def steps(finished: Any) -> None:
        for _ in range(5):
            finished()
        tracing._closing = True  # (as ``close`` sets it first)
        tracing._flush()  # the timer, due now
        left.append(len(tracing._queue))
        tracing._closing = False

    frames, pending = _handed_in(tracing, steps)
    assert frames == [] and left == [5] and pending == 0
    tracing.shutdown()  # the close hands the five over
    assert frames == [5]


def test_a_request_queued_after_the_close_took_the_queue_is_counted_failed() -> None:
    """The close runs in a thread while the loop still runs: a traced request that ends after the close took the
    queue is not handed over (no flush once the close began) and is counted failed once the close ends, not left
    uncounted: every traced request is counted once."""
    registry = CollectorRegistry()
    tracing = Tracing("http://127.0.0.1:9", 1.0, command=TRACE_WRITER, registry=registry, capacity=8)
    count, finished = traced_requests(tracing, registry)
    tracing._scheduled = True  # (a timer is due: what ends is queued, not handed over at once)
    finished()
    hand = tracing._hand

    def meanwhile(handed: int) -> bool:
        finished()  # a request of the loop's, ending as the close hands the queue over
        return hand(handed)

    tracing._hand = meanwhile  # type: ignore[method-assign]
    tracing.shutdown()
    # the one handed over: failed by the writer (its collector unreachable); the one after: failed by the close
    assert count("failed") == 2 and count("exported") == 0 and not tracing._queue


def _record(parent: str, error: str, computed: bool, first: bool) -> list[Any]:
    """A finished request's record as the writer gets it (JSON), computed in a batch or not (refused before), the
    first traced request of its batch (its batch span links two) or not, answered unless it failed."""
    batch = [40, 50, {"dhow.model": "m", "dhow.version": "3", "dhow.batch.rows": 2, "dhow.batch.requests": 2}]
    own, other = int("11" * 8, 16), int("cd" * 8, 16)
    links = [(TRACE, own), ("ab" * 16, other)] if computed and first else ()
    record = (TRACE, own, parent, "m", "r-1", "" if error else "3", error, 10, 20, 30, 0 if error else 55, 60, 10,
              batch if computed else None, links)  # fmt: skip
    loaded: list[Any] = orjson.loads(orjson.dumps(record))
    return loaded


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("computed", [True, False])
@pytest.mark.parametrize(("parent", "error"), [("", ""), (SPAN, "INTERNAL")])
def test_the_writer_writes_a_record_as_the_message_of_its_spans_written_one_by_one(
    parent: str, error: str, computed: bool, first: bool
) -> None:
    """``record_fields`` (what tracing's writer exports, its spans' fields in another order, a request's stages
    without attributes packed together) parses as the same message as the spans of ``spans_of`` written one by one
    (``span_fields``: ``test_the_export_parses_as_the_message_opentelemetry_proto_builds``), the same ids given."""
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

    from dhow.monitoring.otlp import span_fields
    from dhow.monitoring.tracing import record_fields

    record = _record(parent, error, computed, first)
    count = len(spans_of(record)) - 1
    ids = bytes(range(1, 1 + 8 * count))
    written = ScopeSpans.FromString(record_fields(record, ids))
    assert written == ScopeSpans.FromString(span_fields(spans_of(record, ids)))
    assert len(written.spans) == 3 + (2 if computed else 0) + (1 if computed and first else 0) + (0 if error else 1)
    assert len({span.span_id for span in ScopeSpans.FromString(record_fields(record)).spans}) == count + 1, "drawn"


@pytest.mark.parametrize(("parent", "error"), [("", ""), (SPAN, "INTERNAL")])
def test_the_writer_writes_a_record_as_the_request_s_span_parented_by_the_caller_with_its_stages_under_it(
    parent: str, error: str
) -> None:
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

    from dhow.monitoring.tracing import record_fields

    other = ("ab" * 16, "cd" * 8)
    spans = {span.name: span for span in ScopeSpans.FromString(record_fields(_record(parent, error, True, True))).spans}
    root = spans.pop("infer m")
    assert root.parent_span_id.hex() == parent and root.span_id.hex() == "11" * 8
    assert (root.start_time_unix_nano, root.end_time_unix_nano) == (10, 60)
    assert root.status.message == error
    assert set(spans) == {"admission", "decoding", "queue", "compute", "batch"} | ({"encoding"} if not error else set())
    assert all(s.parent_span_id == root.span_id and s.trace_id.hex() == TRACE for s in spans.values())
    assert [link.span_id.hex() for link in spans["batch"].links] == ["11" * 8, other[1]]
    assert {kv.key: kv.value.int_value for kv in spans["compute"].attributes}["dhow.batch.rows"] == 2
    assert (spans["queue"].start_time_unix_nano, spans["queue"].end_time_unix_nano) == (30, 40)
    assert {kv.key: kv.value.string_value for kv in root.attributes} == {
        "dhow.model": "m",
        "dhow.request_id": "r-1",
        **({"dhow.version": "3"} if not error else {}),
    }
    assert len({s.span_id for s in spans.values()}) == len(spans) and all(any(s.span_id) for s in spans.values())


def _canonical(fields: bytes) -> list[bytes]:
    """The spans of a ``ScopeSpans``' fields, the random ids of a request's stages mapped to their names (one a
    name in a request), in a fixed order: what renders of the same records written in other orders share."""
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span

    spans = list(ScopeSpans.FromString(fields).spans)
    stages = [span for span in spans if span.kind == Span.SPAN_KIND_INTERNAL]
    assert len({span.span_id for span in stages}) == len(stages) and all(any(s.span_id) for s in stages)
    for span in stages:
        span.span_id = span.name.encode()
    return sorted(span.SerializeToString(deterministic=True) for span in spans)


def test_a_chunk_is_written_at_once_as_the_spans_of_its_records_written_one_by_one() -> None:
    """``chunk_fields`` (the writer's render of a chunk) writes the spans ``record_fields`` writes of each record,
    for records of every shape, unusual models and request ids among them."""
    import random

    from dhow.monitoring.trace_chunk import chunk_fields
    from dhow.monitoring.tracing import record_fields

    chance = random.Random(15)
    chunk = []
    for n in range(50):
        shape = [SPAN if n % 2 else "", "INTERNAL" if n % 3 == 0 else "", n % 5 != 1, n % 4 == 0]
        record = _record(*shape)  # type: ignore[arg-type]
        record[0], record[1] = f"{chance.getrandbits(128):032x}", chance.getrandbits(64)
        record[3] = ["m", "mödel/ü", "x" * 200, ""][n % 4]
        record[4] = ["r-1", "", "ü" * 60, f"r-{n}" * 30][n % 4]
        record[5] = "" if n % 6 == 0 else record[5]
        if record[13]:
            record[13][2]["dhow.batch.rows"] = n // 7  # batches of several requests, another's attributes
        chunk.append(record)
    together = _canonical(chunk_fields(chunk))
    assert together == _canonical(b"".join(map(record_fields, chunk)))
    assert len(together) == sum(len(spans_of(record)) for record in chunk)


def test_a_record_the_chunk_cannot_write_fails_alone() -> None:
    from dhow.serving.trace_writer import TraceWriter

    writer = TraceWriter.__new__(TraceWriter)  # its render alone: no sink, no threads
    good = [_record("", "", True, True), _record(SPAN, "", False, False)]
    bad = _record("", "", True, False)
    bad[1] = -1  # no span id
    rendered, failures = writer.render_chunk([good[0], bad, good[1]])
    assert [record for record, _ in failures] == [bad]
    assert _canonical(b"".join(fields for _, fields in rendered)) == _canonical(
        b"".join(fields for _, fields in writer.render_chunk(good)[0])
    )
    assert len(writer.render_chunk(good)[0]) == 2, "the sink counts requests"


def test_the_compiled_structs_of_chunks_of_ever_new_sizes_stay_bounded_by_what_they_hold() -> None:
    """A chunk's ``Struct`` holds an item per field of each of its spans: a writer seeing chunks of new sizes (a
    traced rate that moves) must not keep one per size, as a cache bounded by its number of entries would."""
    from dhow.monitoring import otlp

    for count in range(1, 600):
        assert len(otlp.random_ids(count)) == count
        otlp.repeated("<19sQ11sQ", count)
    assert sum(count for _, count in otlp._REPEATED) <= otlp.MAX_STRUCT_ITEMS
