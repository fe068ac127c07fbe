"""The native gRPC front against HTTP/2's known denial-of-service patterns: what a client makes the server hold or
do stays bounded (Rapid Reset, CONTINUATION and control-frame floods, a client that does not read)."""

from __future__ import annotations

import socket

from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.h2.server import NativeServer
from tests.test_grpc_native_front import (
    HELLO,
    Door,
    door,  # noqa: F401 (a fixture)
)

_PING = f.frame(f.PING, 0, 0, b"12345678")


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
