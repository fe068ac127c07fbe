"""The native gRPC front's bounds on what many connections, or calls the server ends itself, make it hold or do:
the connections a server process takes (``--max-connections``, counted apart from the REST port's), and calls
ended at once by a grpc-timeout too short to run (charged as resets, as Rapid Reset's are)."""

from __future__ import annotations

import collections
import socket

import grpc
import numpy as np
import pytest

from dhow.monitoring.metrics import ServerMetrics
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from dhow.protocols.grpc.h2 import bounds
from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.server import GrpcConnectionLimits
from tests.conftest import wait_until
from tests.test_grpc_native_front import (
    HELLO,
    Door,
    _connect,
    _goaway_code,
    _read_frames,
    _request,
    door,  # noqa: F401 (a fixture)
)
from tests.test_grpc_native_front_abuse import _INFER, _PING

_THREE = GrpcConnectionLimits(max_connections=3)
#: one ModelInfer request to the model that never answers in time, as a DATA frame's gRPC message
_SLOW_REQUEST = _request("slow", np.ones((1, 4), np.float32)).SerializeToString()
_SLOW_MESSAGE = b"\0" + len(_SLOW_REQUEST).to_bytes(4, "big") + _SLOW_REQUEST


def _slow_call(stream: int, block: bytes) -> bytes:
    """A whole call to the slow model on ``stream``: its header ``block``, then its request, ended."""
    return f.frame(f.HEADERS, f.END_HEADERS, stream, block) + f.frame(f.DATA, f.END_STREAM, stream, _SLOW_MESSAGE)


def _served(sock: socket.socket) -> bool:
    """Whether the connection is served: its PING acknowledged."""
    sock.sendall(HELLO + _PING)
    return any(kind == f.PING and flags & f.ACK for kind, flags, _, _ in _read_frames(sock, f.PING, flags=f.ACK))


def _refusals(metrics: ServerMetrics) -> float:
    value = metrics.registry.get_sample_value("dhow_connections_refused_total", {"port": "grpc"})
    return value or 0.0


@pytest.mark.parametrize("door", [_THREE], indirect=True)
def test_connections_past_the_bound_are_closed_and_counted(door: Door) -> None:  # noqa: F811
    """Three connections held, a fourth: closed before the server's SETTINGS (so that a grpc client backs off, see
    ``Front.admit``), and counted. A connection that closes frees its slot."""
    metrics = ServerMetrics()
    door.server.front.refused = metrics.connections_refused.labels(port="grpc").inc
    held = [_connect(door) for _ in range(3)]
    try:
        assert all(_served(sock) for sock in held)
        with _connect(door) as refused:
            assert refused.recv(65536) == b"", "the refused connection must be closed, nothing sent"
        assert _refusals(metrics) == 1
        assert len(door.server.front.connections) == 3
        held.pop().close()
        wait_until(lambda: len(door.server.front.connections) == 2, 10, "the closed connection's slot freed")
        with _connect(door) as again:
            assert _served(again)
        assert _refusals(metrics) == 1
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize("door", [_THREE], indirect=True)
def test_a_grpc_client_past_the_bound_gets_unavailable_then_is_served(door: Door) -> None:  # noqa: F811
    """A grpc channel refused at the bound: its call fails UNAVAILABLE well before its deadline, and the channel
    does not reconnect without pause (it did, about 90 times a second, when the refusal sent SETTINGS then GOAWAY);
    once a slot is free, a new channel is served."""
    metrics = ServerMetrics()
    door.server.front.refused = metrics.connections_refused.labels(port="grpc").inc
    held = [_connect(door) for _ in range(3)]
    try:
        assert all(_served(sock) for sock in held)
        with grpc.insecure_channel(door.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=20)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value  # type: ignore[attr-defined]
        assert 1 <= _refusals(metrics) < 20, _refusals(metrics)
        held.pop().close()
        wait_until(lambda: len(door.server.front.connections) == 2, 10, "the closed connection's slot freed")
        with grpc.insecure_channel(door.address) as channel:
            assert pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10).live
    finally:
        for sock in held:
            sock.close()


def test_connections_are_not_bounded_with_no_bound(door: Door) -> None:  # noqa: F811
    """``--max-connections 0`` (no bound, ``max_connections=None``): every connection is served."""
    assert door.server.front.limits.max_connections is None
    held = [_connect(door) for _ in range(20)]
    try:
        assert all(_served(sock) for sock in held)
    finally:
        for sock in held:
            sock.close()


def test_calls_ended_by_a_grpc_timeout_too_short_to_run_are_charged_as_resets(door: Door) -> None:  # noqa: F811
    """Calls with a grpc-timeout of 1 ns and no reset from the client: the server starts each and ends it
    DEADLINE_EXCEEDED at once, the work of a reset flood, so each is charged to the connection's reset budget (a
    burst goes through, a flood past it gets GOAWAY ENHANCE_YOUR_CALM)."""
    block = _INFER + f.literal(b"grpc-timeout", b"1n")

    def calls(streams: range) -> bytes:
        return b"".join(_slow_call(s, block) for s in streams)

    burst = bounds.RESET_BURST - 100
    with _connect(door) as sock:
        sock.sendall(HELLO + calls(range(1, 2 * burst, 2)) + _PING)
        frames = _read_frames(sock, f.PING, flags=f.ACK)
        wait_until(lambda: door.streams() == 0, 10, "every call past its deadline")
        sock.sendall(calls(range(2 * burst + 1, 2 * burst + 1000, 2)))
        frames = _read_frames(sock, f.GOAWAY)
        code, reason = _goaway_code(frames)
    assert code == f.ENHANCE_YOUR_CALM, (code, reason)
    assert b"grpc-timeout" in reason, reason
    trailers = [payload for kind, _, _, payload in frames if kind == f.HEADERS]
    assert trailers, "the calls before the GOAWAY are answered"


def test_a_reset_of_a_call_the_server_ended_is_not_charged_again(door: Door) -> None:  # noqa: F811
    """Calls running (their requests whole), each ended by the server for a WINDOW_UPDATE of 0 (charged: MadeYouReset)
    and then reset by the client in the same read, before the call's task has ended: one charge each, so 600 of
    them stay within the budget of 1000 (charged twice, they went past it)."""
    sent = b"".join(
        _slow_call(s, _INFER) + f.frame(f.WINDOW_UPDATE, 0, s, b"\0\0\0\0") + f.rst_stream(s, f.CANCEL)
        for s in range(1, 1200, 2)
    )
    _served_without_goaway(door, sent)


def _served_without_goaway(door: Door, sent: bytes) -> None:  # noqa: F811
    """``sent`` after the preface, then a PING: answered (its ACK last) with no GOAWAY before it."""
    with _connect(door) as sock:
        sock.sendall(HELLO + sent + _PING)
        frames = _read_frames(sock, f.PING, flags=f.ACK)
    assert not [frame for frame in frames if frame[0] == f.GOAWAY], _goaway_code(frames)
    assert frames[-1] == (f.PING, f.ACK, 0, b"12345678"), frames[-1]


def test_grpc_client_calls_reset_at_a_tight_deadline_are_no_rapid_reset(door: Door) -> None:  # noqa: F811
    """A grpc channel resets each call at its own deadline (RST_STREAM CANCEL), a little before the server's timer
    would end it: 1800 calls with a 40 ms timeout to a model that does not answer in time each end
    DEADLINE_EXCEEDED, and the connection is never ended as a reset flood (a reset is free once its call ran half
    its timeout, as an expiry is; they were charged under 50 ms, and the 1800th call found the connection gone)."""
    request = _request("slow", np.ones((1, 4), np.float32))
    codes: collections.Counter[grpc.StatusCode] = collections.Counter()
    with grpc.insecure_channel(door.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(6):
            calls = [stub.ModelInfer.future(request, timeout=0.04) for _ in range(300)]
            for call in calls:
                codes[call.exception(timeout=30).code()] += 1  # type: ignore[union-attr]
    assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED: 1800}, codes


def test_a_call_the_server_already_ended_is_not_charged_again(door: Door) -> None:  # noqa: F811
    """Calls running (their requests whole), each failed by the server for a WINDOW_UPDATE of 0 (charged:
    MadeYouReset), then sent DATA after its request's end in the same read, another frame the server ends a call
    for: the call has ended, so one charge each, and 600 of them stay within the budget of 1000."""
    sent = b"".join(
        _slow_call(s, _INFER)
        + f.frame(f.WINDOW_UPDATE, 0, s, b"\0\0\0\0")
        + f.frame(f.DATA, f.END_STREAM, s, _SLOW_MESSAGE)
        for s in range(1, 1200, 2)
    )
    _served_without_goaway(door, sent)


def test_calls_sent_in_one_write_then_reset_behind_them_are_charged(door: Door) -> None:  # noqa: F811
    """A flood written at once: groups of 1000 calls with a grpc-timeout of 10 ms, each group's resets right
    behind it. The server parses such a write for longer than 5 ms, but the calls never ran: the time they count
    from is the end of the read that opened them, and every reset is charged (GOAWAY ENHANCE_YOUR_CALM)."""
    block = _INFER + f.literal(b"grpc-timeout", b"10m")
    flood: list[bytes] = []
    for group in range(10):
        streams = range(1 + 2000 * group, 2000 * (group + 1), 2)
        flood += [_slow_call(s, block) for s in streams]
        flood += [f.frame(f.RST_STREAM, 0, s, (8).to_bytes(4, "big")) for s in streams]
    with _connect(door) as sock:
        sock.sendall(HELLO + b"".join(flood) + _PING)
        frames = _read_frames(sock, f.GOAWAY)
    code, reason = _goaway_code(frames)
    assert code == f.ENHANCE_YOUR_CALM and b"reset by the client" in reason, (code, reason)
