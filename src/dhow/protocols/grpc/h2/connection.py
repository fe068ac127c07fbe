"""One HTTP/2 connection of the native gRPC front, read on the event loop as an ``asyncio.Protocol``.

Frames are parsed as they arrive; a unary call starts as soon as its request has ended (``CallRunner``, no Task),
while the read goes on, so calls that arrive in one read queue together for the batcher. Flow control both ways:
the client may send ``RECEIVE_WINDOW`` per stream and ``CONNECTION_WINDOW`` (``bounds``) in all before the server's
WINDOW_UPDATEs, sent as the bytes are taken; answers wait for the client's windows. A protocol error ends the
connection with GOAWAY and the error's code, then a lingering close (``close``); an error of one call, that call.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING, Any, cast

import grpc

from dhow.protocols.grpc.h2 import bounds
from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.h2.calls import INBOX_LIMIT, RECEIVE_WINDOW, RESET, CallContext, Stream, run_call
from dhow.protocols.grpc.h2.keepalive import PING, Liveness
from dhow.protocols.grpc.h2.requests import parse_request
from dhow.protocols.grpc.h2.sending import Sender, WindowWaits, auth_context, peer_name, trailers
from dhow.protocols.linger import close_at_once, close_lingering
from dhow.protocols.runner import CallRunner

if TYPE_CHECKING:
    from dhow.protocols.grpc.h2.server import Front

log = logging.getLogger("dhow.grpc")


class H2Connection(Sender, asyncio.Protocol):
    """One client's connection: frames in, calls started, frames out (``Sender``)."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.loop = front.loop
        self.transport: asyncio.Transport | None = None
        self.wire: asyncio.Transport | None = None  # under TLS, the socket's transport (``TlsDoor``)
        self.accepted = 0.0  # under TLS, when the door accepted it: the handshake's limit counts from then
        self.peer = ""
        self.auth_context: dict[str, list[bytes]] = {}
        self.streams: dict[int, Stream] = {}
        self.decoder = f.HeaderDecoder(bounds.MAX_HEADER_LIST)
        self.last_stream = 0
        self.send_window = f.DEFAULT_WINDOW
        self.initial_send_window = f.DEFAULT_WINDOW
        self.largest_delta = 0  # at least every open stream's ``window_delta`` (``bounds.largest_delta``)
        self.max_frame_out = f.DEFAULT_FRAME_SIZE
        self.receive_window = bounds.CONNECTION_WINDOW
        self.received = 0
        self.closed = False
        self.goaway_sent = False
        self.peer_goaway = False
        self._pending = bytearray()
        self._preface = False
        self._settings = False
        self._continuing: tuple[int, int, list[bytes]] | None = None
        self.waits = WindowWaits()
        self._writable = asyncio.Event()
        self._writable.set()
        self._timers: list[asyncio.TimerHandle] = []
        self.resets = bounds.ResetBudget(self.loop)
        self._liveness = Liveness(front.limits)
        self._reads = self._opened = 0

    # -- the connection's life ----------------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's: no isinstance check
        self.transport = transport = cast(asyncio.Transport, base)
        self.peer = peer_name(transport.get_extra_info("peername"))
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            if ssl_object.selected_alpn_protocol() not in (None, "h2"):
                self.closed = True  # what it sent with its handshake is not read (``data_received``), also not
                transport.close()  # by the close's own flush: an HTTPS client that did not ask for HTTP/2
                return
            self.auth_context = auth_context(transport.get_extra_info("peercert"))
        if not self.front.admit(self, transport):  # past ``--max-connections``: aborted before any SETTINGS
            self.closed = True
            return
        start = self.accepted or self.loop.time()
        self._timers.append(self.loop.call_at(start + self.front.limits.handshake_s, self._handshake_over))
        self._timers.append(self.loop.call_later(self._liveness.step, self._tick))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.front.connections.discard(self)
        for timer in self._timers:
            timer.cancel()
        for stream in list(self.streams.values()):
            self.end_call(stream, RESET)
        self.waits.all()
        self._writable.set()

    def pause_writing(self) -> None:
        # what a client asks for is answered whether it reads or not (PING and SETTINGS acknowledgements, resets,
        # refusals): one that does not read is not read either, or the server would queue for it without end
        self._writable.clear()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._reads += 1  # the client has taken what was written: it is heard from (``keepalive``)
        self._writable.set()
        if self.transport is not None:
            self.transport.resume_reading()

    def close_with(self, code: int, reason: str) -> None:
        """GOAWAY with ``code`` (the reason as its debug data), then ``close``."""
        if self.transport is not None and not self.closed:
            if code != f.NO_ERROR:
                log.info("gRPC connection from %s closed: %s", self.peer, reason)
            self.transport.write(f.goaway(self.last_stream, code, reason))
            self.goaway_sent = True
            self.close()

    def drain(self) -> None:
        """Stop: no new calls (GOAWAY), the ones in flight go on; closed when the last ends."""
        if self.transport is None or self.closed or self.goaway_sent:
            return
        self.transport.write(f.goaway(self.last_stream, f.NO_ERROR, "the server is stopping"))
        self.goaway_sent = True
        if not self.streams:
            self.close()

    def close(self) -> None:
        """The calls in flight end now, as when the connection is lost; the socket as ``linger.py`` closes it (nothing
        the client sends now is read as a frame); without lingering if it was never heard from (``_reads``: a silent
        client sent no byte, and is never paused for, with a SETTINGS and pings written to it)."""
        transport, grace_s, heard = self.transport, bounds.CLOSE_GRACE_S, self._reads > 0
        if transport is not None and not self.closed:
            self.closed = True
            window = bounds.CONNECTION_WINDOW
            close_lingering(transport, self, grace_s, self.wire, linger=heard, grace_s=grace_s, max_bytes=window)
            for stream in list(self.streams.values()):
                self.end_call(stream, RESET)

    def eof_received(self) -> None:
        """The client's FIN: ``close``, so that frames it does not read are bounded by the drain rate (``linger``)."""
        self.close()

    def close_now(self) -> None:
        """``close``, the socket closed now (``close_at_once``), what has not left included: the stop's last step."""
        if self.transport is not None:
            close_at_once(self.transport, self.wire)
        self.close()

    def _handshake_over(self) -> None:
        if not self._settings:
            self.close_with(f.PROTOCOL_ERROR, "handshake timeout: no HTTP/2 preface and SETTINGS in time")

    def _tick(self) -> None:
        if self.closed or self.transport is None:
            return
        buffered = None if self._writable.is_set() else self.transport.get_write_buffer_size()
        verdict = self._liveness.tick(self._reads, self._opened, bool(self.streams), buffered)
        if verdict == PING:
            self.write(f.frame(f.PING, 0, 0, b"keepaliv"))
        elif verdict is not None:
            self.close_with(f.NO_ERROR, verdict)
            return
        self._timers[1] = self.loop.call_later(self._liveness.step, self._tick)

    # -- reading ------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._reads += 1
        self.resets.begin_read()
        pending = self._pending
        if pending:
            pending += data
            if len(pending) < 9 or (
                self._preface and len(pending) < 9 + (pending[0] << 16 | pending[1] << 8 | pending[2])
            ):
                return  # the frame is not whole yet: keep gathering
            data = bytes(pending)
            pending.clear()
        try:
            used = self._frames(data)
        except f.ConnectionError_ as exc:
            self.close_with(exc.code, exc.reason)
            return
        self.resets.end_read()
        if used < len(data) and not self.closed:
            pending += memoryview(data)[used:]

    def _frames(self, data: bytes) -> int:
        position, end = 0, len(data)
        if not self._preface:
            if data[:24] != f.PREFACE[:end]:  # (the preface's start, while it has not all come)
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "not an HTTP/2 connection preface (gRPC needs HTTP/2)")
            if end < 24:
                return 0
            self._preface, position = True, 24
        unpack = f.FRAME_HEADER.unpack_from
        while end - position >= 9 and not self.closed:  # (closed by a frame: the rest is not read, nor served)
            high, low, kind, flags, stream_id = unpack(data, position)
            length = high << 16 | low
            if length > bounds.MAX_FRAME_IN:
                raise f.ConnectionError_(f.FRAME_SIZE_ERROR, f"a frame of {length} bytes, above {bounds.MAX_FRAME_IN}")
            stop = position + 9 + length
            if stop > end:
                break
            payload = data[position + 9 : stop]
            position = stop
            stream_id &= 0x7FFFFFFF
            if self._continuing is not None and kind != f.CONTINUATION:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "a header block was interrupted by another frame")
            if not self._settings and kind != f.SETTINGS:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "the first frame must be SETTINGS")
            if kind == f.DATA:
                self._data(flags, stream_id, payload)
            elif kind == f.HEADERS:
                self._headers(flags, stream_id, payload)
            elif kind == f.WINDOW_UPDATE:
                self._window_update(stream_id, payload)
            elif kind == f.SETTINGS:
                self._apply_settings(flags, stream_id, payload)
            elif kind == f.PING:
                self._ping(flags, stream_id, payload)
            elif kind == f.RST_STREAM:
                self._rst_stream(stream_id, payload)
            elif kind == f.CONTINUATION:
                self._continuation(flags, stream_id, payload)
            elif kind == f.GOAWAY:
                self.peer_goaway = True
                if not self.streams:
                    self.close()
            elif kind == f.PRIORITY:
                if stream_id == 0:  # else it would be answered with a RST_STREAM on stream 0, which is no stream
                    raise f.ConnectionError_(f.PROTOCOL_ERROR, "PRIORITY on stream 0")
                if length != 5:
                    self.write(f.rst_stream(stream_id, f.FRAME_SIZE_ERROR))
            elif kind == f.PUSH_PROMISE:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "a client may not send PUSH_PROMISE")
            # frames of unknown types are ignored, as HTTP/2 says
        return position

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        self.receive_window -= size
        if self.receive_window < 0:
            raise f.ConnectionError_(f.FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        self.received += size
        if self.received >= bounds.CONNECTION_WINDOW // 2:
            self.write(f.window_update(0, self.received))
            self.receive_window += self.received
            self.received = 0
        if flags & f.PADDED:
            payload = f.unpadded(payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id > self.last_stream:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, f"DATA on stream {stream_id}, never opened")
            if stream is not None:
                self._fail(
                    stream, grpc.StatusCode.INTERNAL, "DATA after the end of the request stream", f.STREAM_CLOSED
                )
            return  # a stream ended or reset here: its frames in flight are dropped
        stream.received += size
        if stream.received > RECEIVE_WINDOW:
            self._fail(stream, grpc.StatusCode.INTERNAL, "DATA beyond the stream's window", f.FLOW_CONTROL_ERROR)
            return
        if stream.ending is not False:
            return  # the call has ended (failed, expired): what the client still sends is dropped
        if payload:
            self._take(stream, payload)
        if flags & f.END_STREAM:
            stream.remote_closed = True
            self._request_ended(stream)
        elif stream.received >= RECEIVE_WINDOW // 2 and (stream.inbox is None or stream.inbox.qsize() < INBOX_LIMIT):
            self.credit(stream)

    def credit(self, stream: Stream) -> None:
        """Let the client send as much again on the stream as it has sent since the last WINDOW_UPDATE."""
        if stream.ending is False and not stream.remote_closed and stream.received:
            self.write(f.window_update(stream.id, stream.received))
            stream.received = 0

    def _take(self, stream: Stream, payload: bytes) -> None:
        """The payload's whole messages, to the call; a partial one waits in the stream's buffer."""
        try:
            messages = stream.take(payload, self.front.max_message)
        except OverflowError as exc:
            self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return
        except ValueError as exc:
            self._fail(stream, grpc.StatusCode.INTERNAL, str(exc))
            return
        if stream.inbox is not None:
            for message in messages:
                stream.inbox.put_nowait(message)
        else:
            stream.messages += messages

    def _request_ended(self, stream: Stream) -> None:
        if stream.ending is not False:
            return
        if stream.buffer:
            self._fail(stream, grpc.StatusCode.INTERNAL, "the request stream ended inside a message")
        elif stream.inbox is not None:
            stream.inbox.put_nowait(None)
        elif len(stream.messages) != 1:
            count = len(stream.messages)
            self._fail(stream, grpc.StatusCode.INTERNAL, f"a unary call needs one request message, it sent {count}")
        else:
            # Started at once, inside ``data_received``, not on the next pass as the REST front's runners are, and
            # that is sound: the REST front's parser (httptools, in C) is inside its callback when a request ends,
            # and its app's end feeds it the next pipelined request; here the parse's state is ``_frames``' locals
            # and ``_pending``/``_continuing``/the HPACK decoder, which no call touches (its answer's frames use no
            # table). A call that ends in its first step (answered, refused) leaves ``streams``: frames for it later
            # in the read are dropped as for any ended stream; a drain's close then leaves the rest unanswered as
            # GOAWAY said. Order is as on the next pass: calls start in the order their requests ended, and the
            # batcher's workers wake on a later pass, so the calls of one read (and of the pass's other reads)
            # still queue together. What it saves: a ``call_soon`` handle a call (``runner.py``).
            stream.task = runner = CallRunner(self.loop, run_call(self, stream))
            runner.start()

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & f.PADDED:
            payload = f.unpadded(payload)
        if flags & f.PRIORITY_FLAG:
            payload = payload[5:]
        if flags & f.END_HEADERS:
            self._header_block(flags, stream_id, payload)
        else:
            self._continuing = (stream_id, flags, [payload])

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        continuing = self._continuing
        if continuing is None or continuing[0] != stream_id:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "CONTINUATION without the HEADERS it continues")
        parts = continuing[2]
        parts.append(payload)
        if len(parts) > bounds.MAX_HEADER_FRAMES or sum(len(part) for part in parts) > 2 * bounds.MAX_HEADER_LIST:
            raise f.ConnectionError_(f.ENHANCE_YOUR_CALM, "a header block larger than the server takes")
        if flags & f.END_HEADERS:
            self._continuing = None
            self._header_block(continuing[1], stream_id, b"".join(continuing[2]))

    def _header_block(self, flags: int, stream_id: int, block: bytes) -> None:
        decoded = self.decoder.decode(block)  # always: it keeps HPACK's table in step with the client's
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client end its side
            if not flags & f.END_STREAM:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "a second header block that does not end the stream")
            stream.remote_closed = True
            self._request_ended(stream)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, f"HEADERS opening stream {stream_id}, not a new client stream")
        self.last_stream = stream_id
        if self.goaway_sent or self.closed or len(self.streams) >= bounds.MAX_STREAMS:
            self.write(f.rst_stream(stream_id, f.REFUSED_STREAM))
            return
        self._opened += 1
        request = decoded.request if decoded.request is not None else parse_request(decoded, self.front)
        if request.refusal is not None:
            status, code, message = request.refusal
            block = status + trailers(code.value[0], message, ())
            end = b"" if flags & f.END_STREAM else f.rst_stream(stream_id, f.NO_ERROR)
            self.write(f.header_frames(stream_id, block, True, self.max_frame_out) + end)
            return
        assert request.method is not None
        stream = Stream(stream_id, request.method, request.gzip, self.loop.time())
        deadline = None if request.timeout is None else stream.opened + request.timeout
        stream.context = CallContext(self, stream, decoded, deadline)
        self.streams[stream_id] = stream
        if request.timeout is not None:
            stream.timer = self.loop.call_later(request.timeout, bounds.expire, self, stream)
        if request.method.request_streaming:
            stream.inbox = asyncio.Queue()
            stream.task = self.loop.create_task(run_call(self, stream))
        if flags & f.END_STREAM:
            stream.remote_closed = True
            self._request_ended(stream)

    def _rst_stream(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "RST_STREAM must carry 4 bytes")
        if stream_id == 0 or stream_id > self.last_stream:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, f"RST_STREAM on stream {stream_id}, never opened")
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.remote_closed = True
            if stream.ending is False:  # else the server has ended it (``_fail``, its deadline): charged once only
                self.end_call(stream, RESET)
                self.resets.charge(stream)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "WINDOW_UPDATE must carry 4 bytes")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > f.MAX_WINDOW:
                raise f.ConnectionError_(f.FLOW_CONTROL_ERROR, "the connection's window above 2^31-1")
            self.waits.shared(self.send_window)
        elif (stream := self.streams.get(stream_id)) is not None:
            if increment == 0:  # RFC 9113 §6.9: a stream error PROTOCOL_ERROR
                self._fail(stream, grpc.StatusCode.INTERNAL, "a WINDOW_UPDATE of 0", f.PROTOCOL_ERROR)
                return
            stream.window_delta += increment
            self.largest_delta = max(self.largest_delta, stream.window_delta)
            if self.initial_send_window + stream.window_delta > f.MAX_WINDOW:
                self._fail(stream, grpc.StatusCode.INTERNAL, "a stream's window above 2^31-1", f.FLOW_CONTROL_ERROR)
            self.waits.stream(stream_id)

    def _apply_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            if payload:
                raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "a SETTINGS acknowledgement with a payload")
            return
        if len(payload) % 6:
            raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, offset)
            if key == f.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise f.ConnectionError_(f.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                if value > self.initial_send_window:
                    self.largest_delta = bounds.largest_delta(value, self.largest_delta, self.streams.values())
                    self.waits.streams()
                self.initial_send_window = value  # every stream's window with it (``Stream.window_delta``)
            elif key == f.SETTINGS_MAX_FRAME_SIZE:
                if not f.DEFAULT_FRAME_SIZE <= value <= f.MAX_FRAME_SIZE_LIMIT:
                    raise f.ConnectionError_(f.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} out of range")
                self.max_frame_out = value
            elif key == f.SETTINGS_ENABLE_PUSH and value > 1:
                raise f.ConnectionError_(f.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH must be 0 or 1")
            # HEADER_TABLE_SIZE: the server never adds to the client's table; the rest concern a client
        self.write(f.frame(f.SETTINGS, f.ACK, 0))
        if not self._settings:
            self._settings = True
            self._timers[0].cancel()

    def _ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise f.ConnectionError_(f.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise f.ConnectionError_(f.FRAME_SIZE_ERROR, "PING must carry 8 bytes")
        if not flags & f.ACK:  # an acknowledgement is a read as any other (``keepalive``)
            self.write(f.frame(f.PING, f.ACK, 0, payload))

    # -- ending calls -------------------------------------------------------------------------------------

    def _fail(self, stream: Stream, code: grpc.StatusCode, message: str, reset: int = f.NO_ERROR) -> None:
        """End one call with ``code`` (its stream reset with ``reset`` unless the client has ended its side), for
        what the client sent: charged as the client's reset (``bounds``), unless the call had already ended."""
        ending = stream.ending
        self.end_call(stream, (code, message))
        if reset != f.NO_ERROR:
            self.write(f.rst_stream(stream.id, reset))
        if ending is False:  # else ended by the server (failed, expired: charged then) or reset by the client
            self.resets.charge(stream)

    def end_call(self, stream: Stream, ending: Any) -> None:
        if stream.ending is not False:
            return
        stream.ending = ending
        if stream.timer is not None:
            stream.timer.cancel()
        task = stream.task
        if task is not None and stream.started:
            task.cancel()  # run_call sends the ending's status
        elif task is None:
            if ending is not RESET:
                self.end(stream, ending[0].value[0], ending[1], ())
            self.closed_stream(stream)
        # a task not started yet sees the ending when it starts

    def call_ended(self, stream: Stream) -> None:
        """The call's task has ended."""
        if stream.ending is False:
            stream.ending = True
        if stream.timer is not None:
            stream.timer.cancel()
        self.closed_stream(stream)

    def closed_stream(self, stream: Stream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            if not self.streams and (self.goaway_sent or self.peer_goaway):
                self.close()
