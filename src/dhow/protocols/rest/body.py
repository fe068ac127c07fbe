"""Request and response bodies over ASGI: reading under a size limit, content encodings."""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from dhow.core.errors import CallCancelled, DhowError, ErrorCode, InvalidInput
from dhow.core.wire.json_refusals import json_refusal

__all__ = [
    "ClientDisconnected",
    "HttpError",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "compress",
    "decompress",
    "json_object",
    "read_body",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: responses smaller than this go uncompressed: compressing them costs more than it saves
MIN_COMPRESS_BYTES = 1024


class HttpError(DhowError):
    """An error of the HTTP framing itself (413, 415), with a status the error tree does not have."""

    def __init__(self, status: int, message: str, code: ErrorCode = ErrorCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def http_status(self) -> int:
        return self.status


class ClientDisconnected(CallCancelled):
    """The client went away before its request body arrived; there is nobody to answer."""


def too_large(size: int, limit: int, *, at_least: bool = False) -> HttpError:
    what = f"at least {size}" if at_least else str(size)
    return HttpError(
        413,
        f"request body of {what} bytes exceeds the limit of {limit} bytes (--max-request-bytes)",
        ErrorCode.RESOURCE_EXHAUSTED,
    )


async def read_body(receive: Receive, limit: int, content_length: int | None) -> bytes:
    """The whole request body; refused early when it announces or reaches more than ``limit`` bytes."""
    if content_length is not None and content_length > limit:
        raise too_large(content_length, limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise too_large(len(body), limit)
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


_WBITS = {b"gzip": zlib.MAX_WBITS | 16, b"x-gzip": zlib.MAX_WBITS | 16, b"deflate": zlib.MAX_WBITS}


def decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    """Undo a ``Content-Encoding``; the result may not exceed ``limit`` bytes (no decompression bombs)."""
    encoding = encoding.strip().lower()
    if encoding in (b"", b"identity"):
        return body
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise HttpError(415, f"Content-Encoding {encoding.decode('latin-1')!r} is not supported; use gzip or deflate")
    try:
        return _inflate(body, wbits, limit)
    except zlib.error:
        if encoding != b"deflate":
            raise InvalidInput(f"the request body is not valid {encoding.decode()} data") from None
    # "deflate" should be the zlib format, but some clients send a raw deflate stream
    try:
        return _inflate(body, -zlib.MAX_WBITS, limit)
    except zlib.error:
        raise InvalidInput("the request body is not valid deflate data") from None


def _inflate(body: bytes, wbits: int, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    data = inflater.decompress(body, limit + 1)
    if len(data) > limit:
        raise HttpError(
            413,
            f"request body exceeds the limit of {limit} bytes (--max-request-bytes) once decompressed",
            ErrorCode.RESOURCE_EXHAUSTED,
        )
    if not inflater.eof:
        raise InvalidInput("the compressed request body is truncated")
    return data


def compress(body: bytes, accept_encoding: bytes) -> tuple[bytes, bytes | None]:
    """Compress a response for a client that accepts gzip or deflate; returns the body and its encoding."""
    if len(body) < MIN_COMPRESS_BYTES:
        return body, None
    accepted = _accepted(accept_encoding)
    for name, wbits in ((b"gzip", zlib.MAX_WBITS | 16), (b"deflate", zlib.MAX_WBITS)):
        if name in accepted:
            # level 1: most of the gain for a fraction of the time; the event loop does this work
            compressor = zlib.compressobj(1, zlib.DEFLATED, wbits)
            return compressor.compress(body) + compressor.flush(), name
    return body, None


def _accepted(header: bytes) -> set[bytes]:
    names: set[bytes] = set()
    for item in header.lower().split(b","):
        name, _, params = item.partition(b";")
        if params.replace(b" ", b"") in (b"q=0", b"q=0.0", b"q=0.00", b"q=0.000"):
            continue
        names.add(name.strip())
    return names


def json_object(body: bytes, example: str = "", *, empty_means: dict[str, Any] | None = None) -> dict[str, Any]:
    """A body that must be one JSON object; ``empty_means`` is what an empty body stands for (None: refused)."""
    if not body.strip():
        if empty_means is not None:
            return empty_means
        raise InvalidInput("the request body is empty; expected a JSON object")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {json_refusal(exc)}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"the request body must be a JSON object{f', like {example}' if example else ''}")
    return document
