"""Tracing's sampling decisions: the W3C traceparent read strictly, the caller's sampled flag followed, the ratio
for requests without a parent."""

from __future__ import annotations

import pytest

from dhow.core.errors import InvalidInput
from dhow.monitoring.tracing import Tracing, parse_traceparent, traces_url

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


def test_sampling_follows_the_caller_else_the_ratio() -> None:
    never, always = Tracing("http://127.0.0.1:9", 0.0), Tracing("http://127.0.0.1:9", 1.0)
    try:
        times = (1, 2, 3)
        assert never.start({}, "m", "r", times) is None
        assert never.start({"traceparent": f"00-{TRACE}-{SPAN}-00"}, "m", "r", times) is None
        followed = never.start({"traceparent": f"00-{TRACE}-{SPAN}-01"}, "m", "r", times)
        assert followed is not None and followed.trace_id.hex() == TRACE and followed.parent_id.hex() == SPAN
        assert always.start({"traceparent": f"00-{TRACE}-{SPAN}-00"}, "m", "r", times) is None, "the caller decides"
        root = always.start({}, "m", "r", times)
        assert root is not None and root.parent_id == b"" and root.trace_id != followed.trace_id
    finally:
        never.shutdown()
        always.shutdown()


def test_the_endpoint_must_be_an_otlp_http_url() -> None:
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("https://c/v1/traces") == "https://c/v1/traces"
    with pytest.raises(InvalidInput, match="expected an OTLP/HTTP URL"):
        traces_url("c:4317")
