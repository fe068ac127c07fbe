"""What a call's request headers ask: the method, the deadline, the encoding, or why the call is refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.h2.calls import Method

if TYPE_CHECKING:
    from dhow.protocols.grpc.h2.server import Front

#: seconds per unit of ``grpc-timeout`` (hours, minutes, seconds, milli-, micro-, nanoseconds)
_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}
_ENCODINGS = (b"identity", b"gzip")


@dataclass(frozen=True, slots=True)
class Request:
    method: Method | None
    #: the status headers, code and message a refused call is answered with at once
    refusal: tuple[bytes, grpc.StatusCode, str] | None = None
    timeout: float | None = None
    gzip: bool = False


def parse_request(block: f.Block, front: Front) -> Request:
    """The request the header block opens (kept with the block, which the decoder may cache)."""
    path = http_method = content_type = timeout = None
    encoding = b"identity"
    for name, value in block.fields:
        if name == b":path":
            path = value
        elif name == b":method":
            http_method = value
        elif name == b"content-type":
            content_type = value
        elif name == b"grpc-timeout":
            timeout = value
        elif name == b"grpc-encoding":
            encoding = value
    request = _request(path, http_method, content_type, timeout, encoding, front)
    block.request = request
    return request


def _request(
    path: bytes | None,
    http_method: bytes | None,
    content_type: bytes | None,
    timeout: bytes | None,
    encoding: bytes,
    front: Front,
) -> Request:
    if http_method != b"POST" or content_type is None or not content_type.startswith(b"application/grpc"):
        found = (content_type or b"none").decode("latin-1")[:100]
        message = f"not a gRPC request: it must be a POST with content-type application/grpc (got {found})"
        return Request(None, (f.NOT_GRPC_HEADERS, grpc.StatusCode.INTERNAL, message))
    seconds = None
    if timeout is not None:
        seconds = _seconds(timeout)
        if seconds is None:
            message = (
                f"grpc-timeout {timeout.decode('latin-1')[:20]!r} is not a timeout (digits then H, M, S, m, u or n)"
            )
            return Request(None, (f.RESPONSE_HEADERS, grpc.StatusCode.INTERNAL, message))
    if encoding not in _ENCODINGS:
        message = (
            f"grpc-encoding {encoding.decode('latin-1')[:40]!r} is not supported: this server reads identity or gzip"
        )
        return Request(None, (f.RESPONSE_HEADERS, grpc.StatusCode.UNIMPLEMENTED, message))
    name = (path or b"").decode("utf-8", "replace")
    method = front.method(name)
    if method is None:
        return Request(None, (f.RESPONSE_HEADERS, grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {name[:200]}"))
    return Request(method, None, seconds, encoding == b"gzip")


def _seconds(text: bytes) -> float | None:
    if not 2 <= len(text) <= 9 or not text[:-1].isdigit() or text[-1] not in _UNITS:
        return None
    return int(text[:-1]) * _UNITS[text[-1]]
