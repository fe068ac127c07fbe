"""The native gRPC front against HTTP/2's known denial-of-service patterns: what a client makes the server hold or
do stays bounded (Rapid Reset, CONTINUATION and control-frame floods, a client that does not read)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import grpc
import numpy as np
import pytest

from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from dhow.protocols.grpc.h2 import bounds
from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.h2.keepalive import Liveness
from dhow.protocols.grpc.h2.server import NativeServer
from dhow.protocols.grpc.server import GrpcConnectionLimits
from dhow.protocols.linger import MIN_DRAIN_RATE
from tests.conftest import wait_until
from tests.test_grpc_native_front import (
    HELLO,
    Door,
    _answer,
    _connect,
    _goaway_code,
    _read_frames,
    _request,
    door,  # noqa: F401 (a fixture)
)

#: a ModelInfer call's headers as literals without indexing: the same block opens any number of streams
_INFER = b"".join(
    f.literal(name, value)
    for name, value in (
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
        (b":authority", b"x"),
        (b"content-type", b"application/grpc"),
    )
)
#: a call of a method the port does not have, answered UNIMPLEMENTED as its headers arrive
_UNKNOWN = (
    f.literal(b":method", b"POST")
    + f.literal(b":path", b"/no.Such/Method")
    + f.literal(b"content-type", b"application/grpc")
)
_PING = f.frame(f.PING, 0, 0, b"12345678")


def _opened(streams: range) -> bytes:
    """HEADERS opening each stream, its request not sent: every one is a call the server holds."""
    return b"".join(f.frame(f.HEADERS, f.END_HEADERS, stream, _INFER) for stream in streams)


def test_a_client_that_does_not_read_is_not_read_either(door: Door) -> None:  # noqa: F811
    """PING acknowledgements to a client that never reads: the server stops reading it rather than queue them."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", door.port))
    with sock:
        sock.sendall(HELLO)
        pings, sent, limit = _PING * 60_000, 0, 64 * 1024 * 1024  # a megabyte of PINGs a send
        sock.settimeout(2)
        try:
            while sent < limit:
                sent += sock.send(pings)
        except TimeoutError:
            pass  # the server has stopped reading: the kernel's buffers both ways are full
        buffered = door.run(_write_buffers(door.server))
        assert sent < limit, "the server read all 64 MiB of PINGs from a client that reads nothing"
        assert buffered < 4 * 1024 * 1024, buffered


async def _write_buffers(server: NativeServer) -> int:
    return sum(
        connection.transport.get_write_buffer_size()
        for connection in server.front.connections
        if connection.transport is not None
    )


def test_a_settings_change_costs_no_work_per_open_stream(door: Door) -> None:  # noqa: F811
    """SETTINGS_INITIAL_WINDOW_SIZE, over and over in large SETTINGS frames, with every stream the server allows
    open: each change moves every stream's window, which must not cost a pass over the streams."""
    entries = b"".join(
        (f.SETTINGS_INITIAL_WINDOW_SIZE).to_bytes(2, "big") + (65_535 - i % 2).to_bytes(4, "big")
        for i in range(bounds.MAX_FRAME_IN // 6)
    )
    with _connect(door) as sock:
        sock.sendall(HELLO + _opened(range(1, 2 * bounds.MAX_STREAMS, 2)))
        sock.sendall(f.frame(f.SETTINGS, 0, 0, entries) * 4 + _PING)
        started = time.monotonic()
        frames = _read_frames(sock, f.PING)  # 10 s at most
        assert frames[-1] == (f.PING, f.ACK, 0, b"12345678"), frames[-1]
        assert door.streams() == bounds.MAX_STREAMS
    assert time.monotonic() - started < 10


def test_a_header_block_in_endless_empty_continuations_is_refused(door: Door) -> None:  # noqa: F811
    """Empty CONTINUATION frames add no bytes to a header block: their number is what bounds them."""
    with _connect(door) as sock:
        sock.sendall(HELLO + f.frame(f.HEADERS, 0, 1, _INFER))
        sock.sendall(f.frame(f.CONTINUATION, 0, 1) * (bounds.MAX_HEADER_FRAMES + 1) + _PING)
        assert _goaway_code(_read_frames(sock, f.GOAWAY))[0] == f.ENHANCE_YOUR_CALM


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param(lambda s: f.rst_stream(s, f.CANCEL), id="RST_STREAM"),
        # MadeYouReset (CVE-2025-8671): a frame the server must answer by ending the call does what a reset does
        pytest.param(lambda s: f.frame(f.WINDOW_UPDATE, 0, s, b"\0\0\0\0"), id="WINDOW_UPDATE-0"),
        pytest.param(lambda s: f.frame(f.DATA, f.END_STREAM, s), id="no-request-message"),
        pytest.param(lambda s: f.frame(f.DATA, 0, s, b"\7\0\0\0\0"), id="bad-message-flag"),
    ],
)
@pytest.mark.parametrize("due", [b"", b"0n", b"1n"], ids=["no-timeout", "timeout-0n", "timeout-1n"])
def test_rapid_reset_ends_the_connection_past_its_budget(
    door: Door,  # noqa: F811
    ending: Callable[[int], bytes],
    due: bytes,
) -> None:
    """Streams opened and ended at once, by the client's RST_STREAM or by a frame the server ends the call for:
    the burst a client may end goes through, the flood past it ends the connection with ENHANCE_YOUR_CALM
    (CVE-2023-44487, CVE-2025-8671); a grpc-timeout already past (0 or 1 ns) buys no free resets."""
    block = _INFER + (f.literal(b"grpc-timeout", due) if due else b"")

    def opened_and_ended(streams: range) -> bytes:
        return b"".join(f.frame(f.HEADERS, f.END_HEADERS, s, block) + ending(s) for s in streams)

    burst = bounds.RESET_BURST - 100  # what a client cancelling many calls at once may do
    with _connect(door) as sock:
        sock.sendall(HELLO + opened_and_ended(range(1, 2 * burst, 2)) + _PING)
        frames = _read_frames(sock, f.PING, flags=f.ACK)
        assert frames[-1] == (f.PING, f.ACK, 0, b"12345678"), frames[-1]
        assert door.streams() == 0
        sock.sendall(opened_and_ended(range(2 * burst + 1, 2 * burst + 1000, 2)) + _PING)
        code, reason = _goaway_code(_read_frames(sock, f.PING, flags=f.ACK))
    assert (code, reason) == (f.ENHANCE_YOUR_CALM, b"too many calls reset by the client")


def test_calls_their_client_gave_up_on_at_their_deadline_are_no_rapid_reset(door: Door) -> None:  # noqa: F811
    """A grpc channel's deadlines reset each call when it expires: 1600 calls with a 0.1 s timeout to a model that
    takes longer each end DEADLINE_EXCEEDED, and the connection is never ended as a reset flood."""
    with grpc.insecure_channel(door.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        codes = collections.Counter()
        for _ in range(16):
            calls = [
                stub.ModelInfer.future(_request("slow", np.ones((1, 4), np.float32)), timeout=0.1) for _ in range(100)
            ]
            for call in calls:
                codes[call.exception(timeout=30).code()] += 1  # type: ignore[union-attr]
    assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED: 1600}, codes


def test_a_window_update_wakes_only_the_answers_it_lets_go_on(door: Door) -> None:  # noqa: F811
    """Answers held back by windows of 0, then one-byte WINDOW_UPDATEs on one stream, each in a read of its own:
    each wakes that stream's answer, not every answer waiting, so that the answers waiting on other streams cost
    each such read nothing (a thousand would cost a client's 13 bytes a thousand calls' wake-up, CVE-2019-9511's
    class). Measured against the same reads with no other answer waiting."""
    alone, among_many = _one_byte_round_trips(door, 1), _one_byte_round_trips(door, bounds.MAX_STREAMS - 1)
    assert among_many < 5 * alone + 0.25, (alone, among_many)


def test_answers_larger_than_the_windows_all_arrive_at_concurrency_64(door: Door) -> None:  # noqa: F811
    """A heavy client as perf_analyzer is, 64 calls at once on one connection: answers of 256 KiB wait in turn for
    the connection's window (64 KiB at first, grpc's own), and every one arrives."""
    with grpc.insecure_channel(door.address, options=[("grpc.max_receive_message_length", 1 << 24)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            calls = [stub.ModelInfer.future(_request("echo", np.full((1, 65_536), i, np.float32))) for i in range(64)]
            for i, call in enumerate(calls):
                np.testing.assert_array_equal(_answer(call.result(timeout=60)), np.full((1, 65_536), 2 * i))


def _one_byte_round_trips(served: Door, calls: int) -> float:
    """Seconds for 300 one-byte WINDOW_UPDATEs on stream 1, each sent once the byte before it has come (``calls``
    answers waiting); then every answer goes once the windows open."""
    request = _request("echo", np.ones((1, 100), np.float32)).SerializeToString()
    message = b"\0" + len(request).to_bytes(4, "big") + request
    sent = b"".join(
        f.frame(f.HEADERS, f.END_HEADERS, stream, _INFER) + f.frame(f.DATA, f.END_STREAM, stream, message)
        for stream in range(1, 2 * calls, 2)
    )
    with _connect(served) as sock:
        sock.sendall(f.PREFACE + f.settings({f.SETTINGS_INITIAL_WINDOW_SIZE: 0}) + sent)
        waiting = "every answer waiting for a window"
        wait_until(lambda: served.run(_answers_waiting(served.server)) == calls, 10, waiting)
        started = time.monotonic()
        for _ in range(300):
            sock.sendall(f.window_update(1, 1))
            _read_frames(sock, f.DATA, stream=1)
        seconds = time.monotonic() - started
        # every window opens: the answers, held by their streams' windows, then by the connection's, all go
        sock.sendall(f.settings({f.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20}))
        wait_until(lambda: served.run(_answers_waiting(served.server)) < calls, 10, "answers going on")
        sock.sendall(f.window_update(0, 1 << 24))
        wait_until(lambda: served.streams() == 0, 10, "every answer sent")
        return seconds


async def _answers_waiting(server: NativeServer) -> int:
    return sum(
        1 for connection in server.front.connections for stream in connection.streams.values() if stream.headers_sent
    )


def test_large_header_blocks_are_not_kept(door: Door) -> None:  # noqa: F811
    """Header blocks of 60 KiB each, every one new and leaving HPACK's table as it is: the connection's cache of
    blocks sent again must not keep them (256 of them would hold 30 MiB a connection for as long as it lives)."""
    with _connect(door) as sock:
        sock.sendall(HELLO)
        for stream in range(1, 2 * 64, 2):
            pad = f.literal(b"x-pad", str(stream).encode().rjust(60_000, b"."))
            sock.sendall(f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, stream, _UNKNOWN + pad))
            _read_frames(sock, f.HEADERS, stream=stream)
        kept = door.run(_cached_block_bytes(door.server))
    assert kept < 1024 * 1024, kept


async def _cached_block_bytes(server: NativeServer) -> int:
    return sum(len(block) for connection in server.front.connections for block in connection.decoder._cache)


def test_a_wake_up_for_the_connections_window_is_handed_on_when_its_call_is_reset(door: Door) -> None:  # noqa: F811
    """Four answers waiting for the connection's window; one byte of window, and the first answer's reset, in one
    read: the byte wakes the first, which is cancelled before it runs, so the next answer must take the byte."""
    request = _request("echo", np.ones((1, 17_000), np.float32)).SerializeToString()  # answers above 64 KiB
    message = b"\0" + len(request).to_bytes(4, "big") + request
    calls = b"".join(
        f.frame(f.HEADERS, f.END_HEADERS, s, _INFER) + f.frame(f.DATA, f.END_STREAM, s, message) for s in (1, 3, 5, 7)
    )
    with _connect(door) as sock:
        sock.sendall(f.PREFACE + f.settings({f.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 20}) + calls)
        waiting = "four answers waiting for the connection's window"
        wait_until(lambda: door.run(_connection_waiters(door.server)) == 4, 10, waiting)
        sock.sendall(f.window_update(0, 1) + f.rst_stream(1, f.CANCEL))
        data, deadline = b"", time.monotonic() + 10
        while b"\0\0\1\0\0\0\0\0" not in data:  # the header of a DATA frame of one byte, on a stream below 256
            assert time.monotonic() < deadline, "no answer took the byte its reset call was woken for"
            data += sock.recv(1 << 20)
        stream = data[data.index(b"\0\0\1\0\0\0\0\0") + 8]
        assert stream in (3, 5, 7), stream


async def _connection_waiters(server: NativeServer) -> int:
    return sum(len(connection.waits._shared) for connection in server.front.connections)


_QUICK = GrpcConnectionLimits(keepalive_s=0.3, keepalive_timeout_s=1.0, idle_s=30)


@pytest.mark.parametrize("door", [_QUICK], indirect=True)
def test_a_client_that_reads_nothing_is_disconnected(door: Door) -> None:  # noqa: F811
    """A client that sends until the server stops reading it, and reads nothing: the keepalive closes it, and the
    connection ends though its GOAWAY, behind what the client never read, cannot leave (its lingering close reads
    the client again, for a while: the client may see the end as a reset while it still sends)."""
    with _stuffed(door) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # (the server has ended the connection)
            _send_until_unread(sock)
        wait_until(lambda: not door.server.front.connections, 10, "the server ending the connection")


def _stuffed(served: Door) -> socket.socket:
    """A connection to ``served`` that reads little (a small receive buffer), its preface sent."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", served.port))
    sock.sendall(HELLO)
    sock.settimeout(2)
    return sock


def _send_until_unread(sock: socket.socket) -> None:
    """PINGs sent, and nothing read, until the server stops reading ``sock`` (a send that waits 2 s): its answers
    then wait in its write buffer."""
    with contextlib.suppress(TimeoutError):
        while True:
            sock.send(_PING * 60_000)


def test_window_errors_are_those_rfc_9113_names(door: Door) -> None:  # noqa: F811
    """A stream's WINDOW_UPDATE of 0 resets it PROTOCOL_ERROR (§6.9); a SETTINGS_INITIAL_WINDOW_SIZE that takes a
    stream's window above 2^31-1 ends the connection FLOW_CONTROL_ERROR (§6.9.2)."""
    with _connect(door) as sock:
        sock.sendall(HELLO + _opened(range(1, 4, 2)) + f.frame(f.WINDOW_UPDATE, 0, 1, b"\0\0\0\0") + _PING)
        frames = _read_frames(sock, f.PING, flags=f.ACK)
        assert (f.RST_STREAM, 0, 1, f.PROTOCOL_ERROR.to_bytes(4, "big")) in frames, frames
        sock.sendall(f.window_update(3, f.MAX_WINDOW - 65_535) + f.settings({f.SETTINGS_INITIAL_WINDOW_SIZE: 65_536}))
        assert _goaway_code(_read_frames(sock, f.GOAWAY))[0] == f.FLOW_CONTROL_ERROR


def _large_call(sock: socket.socket) -> np.ndarray:
    """An 8 MB echo call sent on ``sock``, whose answer the server writes at once (the client's windows and frame
    size take it whole); the array it sends."""
    array = np.arange(2_097_152, dtype=np.float32).reshape(-1, 2)
    message = _request("echo", array).SerializeToString()
    framed = b"\0" + len(message).to_bytes(4, "big") + message
    data = b"".join(
        f.frame(f.DATA, f.END_STREAM if end >= len(framed) else 0, 1, framed[end - 16384 : end])
        for end in range(16384, len(framed) + 16384, 16384)
    )
    opening = f.PREFACE + f.settings(
        {f.SETTINGS_INITIAL_WINDOW_SIZE: f.MAX_WINDOW, f.SETTINGS_MAX_FRAME_SIZE: f.MAX_FRAME_SIZE_LIMIT}
    )
    sock.sendall(opening + f.window_update(0, f.MAX_WINDOW - 65_535) + f.frame(f.HEADERS, f.END_HEADERS, 1, _INFER))
    sock.sendall(data)
    return array


def _slow_reader(door: Door) -> socket.socket:  # noqa: F811
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(("127.0.0.1", door.port))
    return sock


def _read_slowly(sock: socket.socket) -> bytes:
    """All the server sends, read at about 1 MB/s, till the end (or a reset)."""
    received = bytearray()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
        time.sleep(0.06)  # the pace of a slow reader, not a wait for the server
    return bytes(received)


def _assert_whole_answer(received: bytes, array: np.ndarray) -> None:
    """``received`` holds stream 1's whole answer and its trailers, grpc-status 0."""
    frames = [frame for frame in _frames(received) if frame[2] == 1]
    answer = b"".join(payload for kind, _, _, payload in frames if kind == f.DATA)
    assert frames and frames[-1][0] == f.HEADERS and frames[-1][1] & f.END_STREAM, (len(received), frames[-1:])
    np.testing.assert_array_equal(_answer(pb.ModelInferResponse.FromString(answer[5:])), array * 2)
    assert (b"grpc-status", b"0") in f.HeaderDecoder(65536).decode(frames[-1][3]).fields


def test_a_client_reading_slowly_gets_its_answer_after_the_connection_closes(door: Door) -> None:  # noqa: F811
    """An 8 MB answer written at once, then the connection closed as the call ends (the client sent GOAWAY): the
    client reads it at about 1 MB/s, slower than the buffer leaves in the close's 2 s grace, but steadily, so it
    must get all of it and its trailers, not be cut."""
    with _slow_reader(door) as sock:
        array = _large_call(sock)
        sock.sendall(f.frame(f.GOAWAY, 0, 0, b"\0\0\0\0\0\0\0\0"))
        received = _read_slowly(sock)
    _assert_whole_answer(received, array)


def test_a_call_answered_just_before_a_stop_reaches_a_slow_reader_whole(door: Door) -> None:  # noqa: F811
    """An 8 MB answer written at once, its call ended, then the server stops with a grace of 30 s: the client,
    reading at about 1 MB/s within the grace, gets all of it and its trailers; the stop's last step does not cut
    an answer still leaving (it waits for it within the grace), and ends once it has left."""
    with _slow_reader(door) as sock:
        array = _large_call(sock)
        wait_until(lambda: door.server.front.connections and door.streams() == 0, 30, "the call answered")
        stopped: Future[Any] = asyncio.run_coroutine_threadsafe(door.server.stop(30), door.loop)
        received = _read_slowly(sock)
    _assert_whole_answer(received, array)
    stopped.result(30)


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """The whole frames in ``data``, in order."""
    frames, position = [], 0
    while len(data) - position >= 9:
        length = int.from_bytes(data[position : position + 3], "big")
        if len(data) - position < 9 + length:
            break
        kind, flags = data[position + 3], data[position + 4]
        stream = int.from_bytes(data[position + 5 : position + 9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream, data[position + 9 : position + 9 + length]))
        position += 9 + length
    return frames


@pytest.mark.parametrize(("taken", "closed"), [(1460, True), (MIN_DRAIN_RATE * 5, False)])
def test_a_client_taking_its_answers_a_segment_at_a_time_is_silent(taken: int, closed: bool) -> None:
    """A client whose buffered answers fall by one segment a tick (5 s with the default limits), sending nothing, is
    pinged and closed as silent when its ping goes unanswered: any fall kept it and its answers for ever. One taking
    ``MIN_DRAIN_RATE`` a second is heard from. ``Liveness`` on its own: the kernel's buffers move a socket's bytes in
    bursts of their own sizing, which no test client can make a trickle of the server's buffer for certain."""
    limits = GrpcConnectionLimits()
    liveness = Liveness(limits)
    buffered, verdicts = 64 * 1024 * 1024, []
    for _ in range(round((limits.keepalive_s + limits.keepalive_timeout_s) / liveness.step) + 1):
        verdicts.append(liveness.tick(0, 1, True, buffered))
        buffered -= taken
    assert ("keepalive ping not answered" in verdicts) is closed, verdicts
