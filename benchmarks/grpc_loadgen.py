"""The gRPC twin of loadgen.py: N unary calls in flight (each caller on its own HTTP/2 connection unless
told to share), each sends its next when the last answers.

grpcio's Python client spends 120 to 200 µs of CPU per call here, more than the servers it would measure on
a 2-core machine (perf_analyzer, C++, about 60 µs). So this speaks just enough HTTP/2 itself: the request
frames are built once (HPACK literals without indexing are stateless, so one header block serves every
call), answers are never decoded, and a call counts as answered when its stream brings a message before
it ends; a stream that ends without one (a trailers-only error, RST_STREAM, GOAWAY) is a failure. Flow
control is honoured both ways. Any v2 server's ``inference.GRPCInferenceService/ModelInfer`` takes the
same bytes; run.py checks each server's answer once with grpcio before measuring.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Sequence

import numpy as np
from loadgen import Result

from dhow.protocols.grpc.generated import grpc_service_pb2 as pb

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x3, 0x4, 0x5
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65_535
_DATATYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}


def infer_request(model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str] = ()) -> bytes:
    """One ``ModelInferRequest`` with the tensors in ``raw_input_contents``, as Triton's clients send them."""
    request = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=_DATATYPES[array.dtype.name], shape=list(array.shape))
        request.raw_input_contents.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return bytes(request.SerializeToString())


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def _hpack_integer(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out, value = bytearray((first | limit,)), value - limit
    while value >= 0x80:
        out.append(0x80 | value & 0x7F)
        value >>= 7
    return bytes((*out, value))


def _hpack_string(text: str) -> bytes:
    raw = text.encode()
    return _hpack_integer(len(raw), 7, 0x00) + raw  # no Huffman coding: the server reads either


def header_block(authority: str, path: str) -> bytes:
    """The request headers, HPACK-coded with static-table names and literal values (RFC 7541, appendix A)."""
    return b"".join(
        (
            b"\x83",  # :method POST (static index 3)
            b"\x86",  # :scheme http (static index 6)
            _hpack_integer(4, 4, 0x00) + _hpack_string(path),  # :path, literal without indexing
            _hpack_integer(1, 4, 0x00) + _hpack_string(authority),  # :authority
            _hpack_integer(31, 4, 0x00) + _hpack_string("application/grpc"),  # content-type
            b"\x00" + _hpack_string("te") + _hpack_string("trailers"),  # a new name, literal
        )
    )


class Connection:
    """One HTTP/2 connection carrying concurrent unary gRPC calls."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: bytes) -> None:
        self._reader, self._writer, self._headers = reader, writer, headers
        self._next_stream = 1
        self._pending: dict[int, asyncio.Future[bool]] = {}
        self._answered: set[int] = set()
        self._send_window = DEFAULT_WINDOW
        self._window_opened = asyncio.Event()
        self._received = 0
        self.max_frame = 16_384
        self.stream_window = DEFAULT_WINDOW
        self.max_streams = MAX_WINDOW
        self.settled = asyncio.Event()
        self._reading = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, host: str, port: int, path: str = MODEL_INFER) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        connection = cls(reader, writer, header_block(f"{host}:{port}", path))
        settings = struct.pack(">HIHI", 0x2, 0, SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)  # no push; wide windows
        window = struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW)
        writer.write(PREFACE + _frame(SETTINGS, 0, 0, settings) + _frame(WINDOW_UPDATE, 0, 0, window))
        await asyncio.wait_for(connection.settled.wait(), 10)
        return connection

    async def call(self, message: bytes) -> bool:
        """Send one request message; answer whether a response message came back."""
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        if len(body) > self.stream_window:
            raise ValueError(f"a {len(body)}-byte request exceeds the server's {self.stream_window}-byte stream window")
        while self._send_window < len(body):
            self._window_opened.clear()
            await self._window_opened.wait()
        self._send_window -= len(body)
        stream, self._next_stream = self._next_stream, self._next_stream + 2
        answered: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[stream] = answered
        chunks = [body[i : i + self.max_frame] for i in range(0, len(body), self.max_frame)]
        frames = [_frame(DATA, 0, stream, chunk) for chunk in chunks[:-1]]
        frames.append(_frame(DATA, END_STREAM, stream, chunks[-1]))
        self._writer.write(_frame(HEADERS, END_HEADERS, stream, self._headers) + b"".join(frames))
        return await answered

    async def close(self) -> None:
        self._reading.cancel()
        self._writer.close()

    def _finish(self, stream: int, ok: bool) -> None:
        answered = self._pending.pop(stream, None)
        self._answered.discard(stream)
        if answered is not None and not answered.done():
            answered.set_result(ok)

    async def _read(self) -> None:
        try:
            while True:
                head = await self._reader.readexactly(9)
                length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = int.from_bytes(head[5:], "big") & MAX_WINDOW
                payload = await self._reader.readexactly(length) if length else b""
                self._on_frame(kind, flags, stream, payload)
        except (asyncio.IncompleteReadError, ConnectionError, _GoingAway):
            for stream in list(self._pending):
                self._finish(stream, False)

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == DATA:
            if payload:
                self._answered.add(stream)
            self._received += len(payload)
            if self._received > 1 << 30:  # give the connection window back long before it runs out
                self._writer.write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._received)))
                self._received = 0
            if flags & END_STREAM:
                self._finish(stream, stream in self._answered)
        elif kind == HEADERS:
            if flags & END_STREAM:
                self._finish(stream, stream in self._answered)
        elif kind == RST_STREAM:
            self._finish(stream, False)
        elif kind == SETTINGS and not flags & ACK:
            self._apply_settings(payload)
            self._writer.write(_frame(SETTINGS, ACK, 0, b""))
            self.settled.set()
        elif kind == PING and not flags & ACK:
            self._writer.write(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE and stream == 0:
            self._send_window += int.from_bytes(payload, "big") & MAX_WINDOW
            self._window_opened.set()
        elif kind == GOAWAY:
            raise _GoingAway

    def _apply_settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                self.stream_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self.max_frame = value
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.max_streams = value


class _GoingAway(Exception):
    """The server sent GOAWAY: the calls in flight fail."""


async def _caller(
    connection: Connection, requests: Sequence[bytes], stop_at: float, measure_from: float, out: list[float]
) -> int:
    failures = 0
    index = 0
    while (now := time.perf_counter()) < stop_at:
        ok = await connection.call(requests[index % len(requests)])
        index += 1
        done = time.perf_counter()
        if now >= measure_from:
            failures += not ok
            out.append((done - now) * 1000)
    return failures


async def _run(
    host: str, port: int, requests: list[bytes], concurrency: int, connections: int, warmup: float, seconds: float
) -> Result:
    opened = [await Connection.open(host, port) for _ in range(max(1, min(connections, concurrency)))]
    try:
        for connection in opened:
            callers = -(-concurrency // len(opened))
            if connection.max_streams < callers:
                raise ValueError(f"the server allows {connection.max_streams} concurrent streams, not {callers}")
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + seconds
        latencies: list[float] = []
        failures = await asyncio.gather(
            *(
                _caller(opened[i % len(opened)], requests[i:] + requests[:i], stop_at, measure_from, latencies)
                for i in range(concurrency)
            )
        )
    finally:
        for connection in opened:
            await connection.close()
    return Result(len(latencies), sum(failures), seconds, np.asarray(latencies))


def run(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    concurrency: int,
    connections: int = 0,
    warmup: float = 2,
    seconds: float = 10,
) -> Result:
    """Drive ``requests`` (serialised ``ModelInferRequest``s, cycled) at a fixed concurrency; measure after
    ``warmup`` seconds for ``seconds``. Callers share ``connections`` HTTP/2 connections round-robin; 0 gives
    each caller its own, as independent clients have (and as loadgen.py's REST callers have)."""
    connections = connections or concurrency
    return asyncio.run(_run(host, port, list(requests), concurrency, connections, warmup, seconds))
