"""What only the native gRPC front (``--grpc-front native``) has to get right itself, grpcio's server doing it
for the other: HTTP/2 flow control over large messages, many streams on one connection, cancellation, deadlines,
gzip, protocol errors, PING, and GOAWAY when it stops. Real clients (grpcio's stubs, raw sockets speaking HTTP/2)
against a real server on a free port; the tests common to both fronts are in ``test_grpc_door.py``."""

from __future__ import annotations

import asyncio
import contextvars
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import hpack
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dhow.core.types import InferenceRequest, InferenceResponse, Outcome
from dhow.protocols.grpc import create_grpc_server
from dhow.protocols.grpc.decoding import Methods
from dhow.protocols.grpc.errors import credentials
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.h2.server import NativeServer
from dhow.protocols.grpc.server import GrpcConnectionLimits
from dhow.serving.dataplane import Placement
from tests.conftest import wait_until
from tests.inprocess import open_service
from tests.test_grpc_door import FakeDataPlane

MAX_MESSAGE = 64 * 1024 * 1024
BIG = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


class GatedPlane(FakeDataPlane):
    """The fake data plane, plus model "slow", whose calls wait until the test opens ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None

    @staticmethod
    def _check(name: str) -> None:
        if name != "slow":
            FakeDataPlane._check(name)

    async def infer(self, request: InferenceRequest, placement: Placement) -> tuple[InferenceResponse, Outcome]:
        if request.model_name == "slow":
            assert self.gate is not None
            await self.gate.wait()
            request.model_name = "echo"
        return await super().infer(request, placement)


@dataclass
class Door:
    address: str
    port: int
    server: NativeServer
    plane: GatedPlane
    loop: asyncio.AbstractEventLoop

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def streams(self) -> int:
        return sum(len(connection.streams) for connection in self.server.front.connections)

    def open_gate(self) -> None:
        gate = self.plane.gate
        assert gate is not None
        self.loop.call_soon_threadsafe(gate.set)


@pytest.fixture
def door(request: pytest.FixtureRequest) -> Iterator[Door]:
    """A native front on a free port, with the limits a test's indirect parameter gives (default: the defaults)."""
    yield from serving(getattr(request, "param", None) or GrpcConnectionLimits(), asyncio.new_event_loop())


def serving(limits: GrpcConnectionLimits, loop: asyncio.AbstractEventLoop) -> Iterator[Door]:
    """A native front on a free port with ``limits``, served by ``loop`` in a thread of its own, until closed."""
    thread = threading.Thread(target=loop.run_forever, name="native-door", daemon=True)
    thread.start()
    plane = GatedPlane()
    service, trail = open_service(plane)

    async def start() -> Any:
        plane.gate = asyncio.Event()
        await trail.start()
        bound = await create_grpc_server(
            service, "127.0.0.1", 0, max_message_bytes=MAX_MESSAGE, front="native", limits=limits
        )
        await bound.server.start()
        return bound

    bound = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    assert isinstance(bound.server, NativeServer)
    try:
        yield Door(bound.address, bound.port, bound.server, plane, loop)
    finally:
        asyncio.run_coroutine_threadsafe(bound.server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _request(model: str, array: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(array.shape))
    request.raw_input_contents.append(array.astype("<f4").tobytes())
    return request


def _answer(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(response.outputs[0].shape)


def test_ten_megabytes_each_way_through_the_flow_control_windows(door: Door) -> None:
    # 10 MB is well past every window (64 KiB at first on the client's side, 4 MiB per stream on the server's)
    array = np.arange(2_621_440, dtype=np.float32).reshape(-1, 2)
    with grpc.insecure_channel(door.address, options=BIG) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(2):  # the second call reuses the windows the first one left
            answer = stub.ModelInfer(_request("echo", array), timeout=60)
            np.testing.assert_array_equal(_answer(answer), array * 2)


def test_many_concurrent_calls_on_one_connection(door: Door) -> None:
    with grpc.insecure_channel(door.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(_request("echo", np.full((1, 2), i, np.float32))) for i in range(300)]
        for i, call in enumerate(calls):
            np.testing.assert_array_equal(_answer(call.result(timeout=60)), np.full((1, 2), 2 * i, np.float32))
    assert len(door.server.front.connections) <= 1


def test_a_cancelled_call_ends_on_the_server(door: Door) -> None:
    with grpc.insecure_channel(door.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer.future(_request("slow", np.ones((1, 2), np.float32)))
        wait_until(lambda: door.streams() == 1, 10, "the call arriving")
        call.cancel()  # RST_STREAM
        wait_until(lambda: door.streams() == 0, 10, "the server ending the cancelled call")
        # the connection goes on serving
        assert _answer(stub.ModelInfer(_request("echo", np.ones((1, 2), np.float32)), timeout=10))[0, 0] == 2


def test_a_deadline_ends_the_call_with_deadline_exceeded(door: Door) -> None:
    with grpc.insecure_channel(door.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_request("slow", np.ones((1, 2), np.float32)), timeout=0.5)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: door.streams() == 0, 10, "the server ending the expired call")


def test_gzip_requests_are_read(door: Door) -> None:
    with grpc.insecure_channel(door.address, compression=grpc.Compression.Gzip) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        array = np.zeros((1000, 2), np.float32)
        np.testing.assert_array_equal(_answer(stub.ModelInfer(_request("echo", array), timeout=10)), array)


def test_server_streaming_health_watch_and_unknown_method(door: Door) -> None:
    with grpc.insecure_channel(door.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/no.Such/Method")(b"", timeout=10)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED


# -- raw HTTP/2 ----------------------------------------------------------------------------------------------


def _connect(door: Door) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", door.port), timeout=10)
    return sock


def _read_frames(
    sock: socket.socket, until: int, stream: int | None = None, flags: int = 0
) -> list[tuple[int, int, int, bytes]]:
    """Frames until one of type ``until`` (on ``stream`` and with ``flags`` when given) or the connection closes."""
    frames, data = [], b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        while len(data) >= 9 and len(data) >= 9 + int.from_bytes(data[:3], "big"):
            length = int.from_bytes(data[:3], "big")
            kind, frame_flags, sid = data[3], data[4], int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
            frames.append((kind, frame_flags, sid, data[9 : 9 + length]))
            data = data[9 + length :]
            if kind == until and (stream is None or sid == stream) and flags & frame_flags == flags:
                return frames
        chunk = sock.recv(65536)
        if not chunk:
            return frames
        data += chunk
    raise AssertionError(f"no frame of type {until} in time: {frames}")


def _goaway_code(frames: list[tuple[int, int, int, bytes]]) -> tuple[int, bytes]:
    found = [payload for kind, _, _, payload in frames if kind == f.GOAWAY]
    assert found, frames
    return struct.unpack(">L", found[0][4:8])[0], found[0][8:]


HELLO = f.PREFACE + f.settings({})


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", f.PROTOCOL_ERROR),  # not HTTP/2
        (f.PREFACE + f.frame(f.PING, 0, 0, b"12345678"), f.PROTOCOL_ERROR),  # no SETTINGS first
        (HELLO + f.frame(f.WINDOW_UPDATE, 0, 0, b"\0\0\1"), f.FRAME_SIZE_ERROR),
        (HELLO + f.frame(f.HEADERS, f.END_HEADERS, 2, b"\x82"), f.PROTOCOL_ERROR),  # an even stream id
        (HELLO + f.frame(f.HEADERS, f.END_HEADERS, 1, b"\xff\xff\xff\xff"), f.COMPRESSION_ERROR),
        (HELLO + f.frame(f.DATA, 0, 7, b"\0\0\0\0\0"), f.PROTOCOL_ERROR),  # a stream never opened
        (HELLO + f.frame(f.CONTINUATION, f.END_HEADERS, 1, b"\x82"), f.PROTOCOL_ERROR),
        (HELLO + f.frame(f.SETTINGS, 0, 0, b"\0\5\0\0\0\1"), f.PROTOCOL_ERROR),  # MAX_FRAME_SIZE of 1
        (HELLO + f.frame(f.PUSH_PROMISE, f.END_HEADERS, 1, b"\0\0\0\2"), f.PROTOCOL_ERROR),
        (HELLO + f.frame(f.PRIORITY, 0, 0, b"\0\0\0\1"), f.PROTOCOL_ERROR),  # on stream 0 (and of 4 bytes)
    ],
)
def test_protocol_errors_end_the_connection_with_goaway_not_the_server(door: Door, sent: bytes, code: int) -> None:
    with _connect(door) as sock:
        sock.sendall(sent)
        assert _goaway_code(_read_frames(sock, f.GOAWAY))[0] == code
    with grpc.insecure_channel(door.address) as channel:  # the server goes on
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_ping_is_answered_and_settings_acknowledged(door: Door) -> None:
    with _connect(door) as sock:
        sock.sendall(HELLO + f.frame(f.PING, 0, 0, b"dhow-ping"[:8]))
        frames = _read_frames(sock, f.PING)
        assert (f.SETTINGS, f.ACK, 0, b"") in frames
        assert frames[-1] == (f.PING, f.ACK, 0, b"dhow-pin")


def test_a_stop_sends_goaway_and_lets_the_call_in_flight_finish(door: Door) -> None:
    with grpc.insecure_channel(door.address) as channel, _connect(door) as watcher:
        watcher.sendall(HELLO)
        _read_frames(watcher, f.SETTINGS)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer.future(_request("slow", np.ones((1, 2), np.float32)))
        wait_until(lambda: door.streams() == 1, 10, "the call arriving")
        stopped: Future[Any] = asyncio.run_coroutine_threadsafe(door.server.stop(30), door.loop)
        code, reason = _goaway_code(_read_frames(watcher, f.GOAWAY))
        assert (code, reason) == (f.NO_ERROR, b"the server is stopping")
        assert not stopped.done()  # it waits for the call in flight
        door.open_gate()
        assert _answer(call.result(timeout=10))[0, 0] == 2
        stopped.result(10)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", door.port), timeout=2).close()


def test_unsupported_encoding_is_unimplemented_with_the_reason(door: Door) -> None:
    headers = b"".join(
        f.literal(name, value)
        for name, value in (
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/inference.GRPCInferenceService/ServerLive"),
            (b":authority", b"x"),
            (b"content-type", b"application/grpc"),
            (b"grpc-encoding", b"br"),
        )
    )
    with _connect(door) as sock:
        sock.sendall(HELLO + f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 1, headers))
        frames = _read_frames(sock, f.HEADERS, stream=1)
    block = f.HeaderDecoder(65536).decode(frames[-1][3]).fields
    assert (b"grpc-status", b"12") in block
    assert any(name == b"grpc-message" and b"is not supported" in value for name, value in block), block


# -- the header-block cache and calls run without a Task --------------------------------------------------------


def _string(text: bytes) -> bytes:
    return bytes((len(text),)) + text  # HPACK string without Huffman (every string here is under 127 bytes)


#: the fields every call below sends besides its :path: :method POST, :scheme http (static indexes), then
#: content-type and te as literals without indexing (they leave the dynamic table as it is)
_REST = b"\x83\x86" + b"\x0f\x10" + _string(b"application/grpc") + b"\x00" + _string(b"te") + _string(b"trailers")
_LIVE = b"/inference.GRPCInferenceService/ServerLive"


def _status(sock: socket.socket, stream: int, block: bytes) -> int | str:
    """Send a call with an empty request; its grpc-status, or "GOAWAY <code>" when the connection ends."""
    sock.sendall(f.frame(f.HEADERS, f.END_HEADERS, stream, block) + f.frame(f.DATA, f.END_STREAM, stream, b"\0" * 5))
    frames = _read_frames(sock, f.HEADERS, stream, f.END_STREAM)
    if frames and frames[-1][0] == f.HEADERS and frames[-1][2] == stream:
        fields = dict(hpack.Decoder().decode(frames[-1][3], raw=True))  # the server's blocks use no table
        return int(fields[b"grpc-status"])
    return f"GOAWAY {_goaway_code(frames)[0]}"


def test_a_cached_header_block_follows_the_dynamic_table(door: Door) -> None:
    """The same indexed block means another :path once the client's table has changed: the cache must not
    answer with what it meant before (a new entry, then a table size update emptying the table)."""
    indexed = b"\xbe" + _REST  # :path as dynamic index 62, the newest entry
    with _connect(door) as sock:
        sock.sendall(HELLO)
        assert _status(sock, 1, b"\x44" + _string(_LIVE) + _REST) == 0  # :path added to the table: index 62
        assert _status(sock, 3, indexed) == 0  # ServerLive, read once ...
        assert _status(sock, 5, indexed) == 0  # ... and from the cache
        assert _status(sock, 7, b"\x44" + _string(b"/no.Such/Method") + _REST) == 12  # now index 62
        assert _status(sock, 9, indexed) == 12  # the same bytes, another method: UNIMPLEMENTED
        assert _status(sock, 11, b"\x20\x04" + _string(_LIVE) + _REST) == 0  # table size 0, :path not indexed
        assert _status(sock, 13, indexed) == f"GOAWAY {f.COMPRESSION_ERROR}"  # index 62 is gone


@pytest.fixture
def probe() -> Iterator[str]:
    """A native front serving two test methods: ``Who`` answers the call's credentials and metadata as the
    door reads them, ``Own`` answers a context variable it set, read after the call has waited twice."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="native-probe", daemon=True)
    thread.start()
    mine: contextvars.ContextVar[bytes] = contextvars.ContextVar("mine")

    async def who(request: bytes, context: Any) -> bytes:
        tag = [value for key, value in context.invocation_metadata() if key == "x-tag"]
        headers = context.headers()  # what ModelInfer gives the data plane as the request's headers
        return f"{credentials(context).authorization}|{tag}|{headers.get('x-tag')}|{sorted(headers)}".encode()

    async def own(request: bytes, context: Any) -> bytes:
        mine.set(request)
        await asyncio.sleep(0)  # a bare yield
        await asyncio.sleep(0.01)  # a future
        return mine.get()

    async def start() -> tuple[NativeServer, int]:
        methods = Methods()
        handlers = {"Who": grpc.unary_unary_rpc_method_handler(who), "Own": grpc.unary_unary_rpc_method_handler(own)}
        methods.add_registered_method_handlers("t.Probe", handlers)
        server = NativeServer(methods, GrpcConnectionLimits(), MAX_MESSAGE, None)
        port = await server.bind("127.0.0.1", 0, False)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_credentials_and_metadata_follow_each_calls_headers_on_one_connection(probe: str) -> None:
    # grpcio indexes each header on first use: a call sent again is an indexed block, read from the cache
    sent = [("key-a", "1"), ("key-a", "1"), ("key-b", "1"), ("", "2"), ("key-a", "2"), ("key-b", "1"), ("", "2")]
    with grpc.insecure_channel(probe) as channel:
        call = channel.unary_unary("/t.Probe/Who")
        for key, tag in sent:
            metadata = [("x-tag", tag)] + ([("authorization", f"Bearer {key}")] if key else [])
            names = sorted(["x-tag", "user-agent", *(["authorization"] if key else [])])
            expected = f"{'Bearer ' + key if key else ''}|{[tag]}|{tag}|{names}"
            assert call(b"", metadata=metadata, timeout=10).decode() == expected


def test_the_headers_of_a_call_are_its_text_metadata(probe: str) -> None:
    with grpc.insecure_channel(probe) as channel:
        answer = channel.unary_unary("/t.Probe/Who")(b"", metadata=[("x-raw-bin", b"\0\1")], timeout=10).decode()
    assert answer.endswith("|None|['user-agent']")  # the binary entry and grpc's own headers are left out


def test_calls_on_one_connection_each_keep_their_own_context(probe: str) -> None:
    with grpc.insecure_channel(probe) as channel:
        call = channel.unary_unary("/t.Probe/Own")
        futures = [call.future(str(i).encode(), timeout=10) for i in range(50)]
        assert [future.result() for future in futures] == [str(i).encode() for i in range(50)]
