"""HTTP/2 as the native gRPC front speaks it: frame types, flags, error codes, and HPACK.

Header blocks are decoded by ``hpack`` (python-hyper), behind a cache keyed by the block's bytes: a client
sending the same call again sends the same block (grpc's clients index every header on first use, then send
only indexes), and a block that neither adds to the dynamic table nor resizes it decodes to the same headers
for as long as the table stays as it is, so the cache is emptied whenever a block changes it. The server's own
header blocks use literals without indexing only (never the dynamic table), so they are built once per value
and are valid whatever table size the client allows.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import hpack

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY_FLAG: Final = 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM: Final = 0xB

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW: Final = 65_535
DEFAULT_FRAME_SIZE: Final = 16_384
MAX_WINDOW: Final = (1 << 31) - 1
MAX_FRAME_SIZE_LIMIT: Final = (1 << 24) - 1

#: a frame's header: length (24 bits, as a byte and a short), type, flags, stream id
FRAME_HEADER = struct.Struct(">BHBBL")


class ConnectionError_(Exception):  # not the builtin ConnectionError
    """The connection cannot go on: the server sends GOAWAY with ``code`` and ``reason``, then closes it."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(len(payload) >> 16, len(payload) & 0xFFFF, kind, flags, stream) + payload


def goaway(last_stream: int, code: int, reason: str = "") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">LL", last_stream, code) + reason.encode("utf-8", "replace"))


def rst_stream(stream: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream, code.to_bytes(4, "big"))


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, increment.to_bytes(4, "big"))


def settings(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", key, value) for key, value in values.items()))


def header_frames(stream: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """A header block as HEADERS (and CONTINUATION frames when it exceeds the peer's frame size)."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return frame(HEADERS, flags | END_HEADERS, stream, block)
    parts = [block[start : start + max_frame] for start in range(0, len(block), max_frame)]
    frames = [frame(HEADERS, flags, stream, parts[0])]
    frames += [frame(CONTINUATION, 0, stream, part) for part in parts[1:-1]]
    frames.append(frame(CONTINUATION, END_HEADERS, stream, parts[-1]))
    return b"".join(frames)


def unpadded(payload: bytes) -> bytes:
    if not payload:
        raise ConnectionError_(PROTOCOL_ERROR, "a padded frame without its pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - pad]


def _integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out, value = bytearray((first | limit,)), value - limit
    while value >= 0x80:
        out.append(0x80 | value & 0x7F)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """One header field as a literal without indexing, with a literal name (no dynamic table, no Huffman)."""
    return b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value


#: ``:status: 200`` (static index 8) and ``content-type: application/grpc`` (name at static index 31)
RESPONSE_HEADERS: Final = b"\x88" + _integer(31, 4) + _integer(16, 7) + b"application/grpc"
#: ``:status: 415``: a request that is not gRPC (static index 13 is ``:status``'s name)
NOT_GRPC_HEADERS: Final = _integer(8, 4) + _integer(3, 7) + b"415"
OK_TRAILERS: Final = literal(b"grpc-status", b"0")


def _changes_table(block: bytes) -> bool:
    """Whether a header block adds to HPACK's dynamic table or resizes it (else it only reads it)."""
    position, end = 0, len(block)
    while position < end:
        first = block[position]
        if first & 0x80:  # indexed field
            position = _skip_integer(block, position, 7)
            continue
        if first & 0xC0 == 0x40 or first & 0xE0 == 0x20:  # literal with incremental indexing, size update
            return True
        index_start = position
        position = _skip_integer(block, position, 4)
        if block[index_start] & 0x0F == 0:  # a literal name
            position = _skip_string(block, position)
        position = _skip_string(block, position)
    return False


def _skip_integer(block: bytes, position: int, prefix_bits: int) -> int:
    limit = (1 << prefix_bits) - 1
    if block[position] & limit != limit:
        return position + 1
    position += 1
    while block[position] & 0x80:
        position += 1
    return position + 1


def _skip_string(block: bytes, position: int) -> int:
    length, used = hpack.hpack.decode_integer(block[position:], 7)
    return position + used + length


class Block:
    """A decoded header block; ``request``, ``metadata``, ``headers`` and ``credentials`` are what the connection
    and the call read from it, kept with a cached block so that a call sent again is read once."""

    __slots__ = ("credentials", "fields", "headers", "metadata", "request")

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        self.fields = fields
        self.request: Any = None
        self.metadata: Any = None
        self.headers: Any = None
        self.credentials: Any = None


#: the largest block the cache keeps: a call sent again is a few indexes, or literals as long as a bearer token;
#: a larger block kept would let a client make the connection hold 256 of them, up to 64 KiB each, for its life
_CACHED_BLOCK = 8 * 1024


class HeaderDecoder:
    """HPACK decoding with a cache of the blocks that leave the dynamic table as it is (see the module)."""

    __slots__ = ("_cache", "_decoder")

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._cache: dict[bytes, Block] = {}

    def decode(self, block: bytes) -> Block:
        """The block's fields as bytes pairs; raises ``ConnectionError_`` (COMPRESSION_ERROR) on a bad block."""
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        try:
            headers = Block(self._decoder.decode(block, raw=True))  # type: ignore[arg-type]
            changes = _changes_table(block)
        except (hpack.HPACKError, IndexError, ValueError) as exc:
            raise ConnectionError_(COMPRESSION_ERROR, f"cannot decode a header block: {exc}") from None
        if changes:
            self._cache.clear()
        elif len(self._cache) < 256 and len(block) <= _CACHED_BLOCK:
            self._cache[block] = headers
        return headers
