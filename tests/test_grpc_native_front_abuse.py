"""The native gRPC front against HTTP/2's known denial-of-service patterns: what a client makes the server hold or
do stays bounded (Rapid Reset, CONTINUATION and control-frame floods, a client that does not read)."""

from __future__ import annotations

import socket
import time

from dhow.protocols.grpc.h2 import bounds
from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.h2.server import NativeServer
from tests.test_grpc_native_front import (
    HELLO,
    Door,
    _connect,
    _goaway_code,
    _read_frames,
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


def test_rapid_reset_ends_the_connection_past_its_budget(door: Door) -> None:  # noqa: F811
    """Streams opened and reset at once: the burst a client may reset goes through, the flood past it ends the
    connection with ENHANCE_YOUR_CALM (CVE-2023-44487)."""

    def opened_and_reset(streams: range) -> bytes:
        return b"".join(_opened(range(s, s + 1)) + f.rst_stream(s, f.CANCEL) for s in streams)

    burst = bounds.RESET_BURST - 100  # what a client cancelling many calls at once may do
    with _connect(door) as sock:
        sock.sendall(HELLO + opened_and_reset(range(1, 2 * burst, 2)) + _PING)
        frames = _read_frames(sock, f.PING)
        assert frames[-1] == (f.PING, f.ACK, 0, b"12345678"), frames[-1]
        assert door.streams() == 0
        sock.sendall(opened_and_reset(range(2 * burst + 1, 2 * burst + 1000, 2)) + _PING)
        code, reason = _goaway_code(_read_frames(sock, f.PING))
    assert (code, reason) == (f.ENHANCE_YOUR_CALM, b"too many calls reset by the client")
