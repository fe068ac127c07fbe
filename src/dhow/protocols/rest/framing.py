"""The request framings both HTTP/1.1 fronts refuse (RFC 9112 §6), and their answers in dhow's error shape.

httptools (llhttp) refuses most of them itself, as a parse error: a request with both ``Content-Length`` and
``Transfer-Encoding`` (its length is ambiguous: the request smuggling of two servers that disagree on it), and
most ``Transfer-Encoding`` values that do not end with ``chunked``. Each front then answers ``parse_refusal``
of that error. llhttp lets two through to the headers' end: ``gzip`` alone (it refuses it only at the body)
and codings before a final ``chunked`` (``gzip, chunked``): the front asks ``coding_refusal`` there, before the
app is started, so that no app reads a body it cannot decode as if it were plain.
"""

from __future__ import annotations

import orjson

__all__ = ["AMBIGUOUS_LENGTH", "UNFRAMED", "UNSUPPORTED_CODING", "coding_refusal", "parse_refusal"]


def _answer(status: bytes, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n" % status
    return head + b"content-length: %d\r\n\r\n%s" % (len(body), body)


#: both lengths: RFC 9112 §6.3 says to treat it as an error and close the connection
AMBIGUOUS_LENGTH = _answer(
    b"400 Bad Request",
    "the request has both Content-Length and Transfer-Encoding, so its length is ambiguous (RFC 9112 section 6.3); "
    "send one of them; the connection is closed",
)
#: chunked not last: its length cannot be known (RFC 9112 §6.3: 400, then close)
UNFRAMED = _answer(
    b"400 Bad Request",
    "the request's Transfer-Encoding does not end with chunked, so its length cannot be known (RFC 9112 section "
    "6.3); send Content-Length, or Transfer-Encoding: chunked alone; the connection is closed",
)
#: a coding before chunked that the server does not decode (RFC 9112 §6.1: 501)
UNSUPPORTED_CODING = _answer(
    b"501 Not Implemented",
    "the request's Transfer-Encoding names a coding other than chunked; only chunked is understood (RFC 9112 "
    "section 6.1); send the body uncoded, with Content-Length or Transfer-Encoding: chunked; the connection is "
    "closed",
)


def coding_refusal(transfer_encoding: bytes) -> bytes:
    """The answer to a request with this ``Transfer-Encoding`` (its headers' values joined by commas), or b""."""
    # empty list elements are ignored (RFC 9110 §5.6.1: ", chunked" is chunked)
    codings = [c for c in (part.partition(b";")[0].strip().lower() for part in transfer_encoding.split(b",")) if c]
    if not codings or codings[-1] != b"chunked":
        return UNFRAMED
    return UNSUPPORTED_CODING if len(codings) > 1 else b""


def parse_refusal(error: BaseException | None) -> bytes:
    """The answer to a request that httptools refused for its framing, or b"" (another error: the front's own).

    llhttp says which in its reason only ("Content-Length can't be present with Transfer-Encoding", "Invalid
    `Transfer-Encoding` header value", ...); a reason it rewords falls back to the front's plain 400."""
    reason = str(error)
    if "Transfer-Encoding" not in reason:
        return b""
    return AMBIGUOUS_LENGTH if "Content-Length" in reason else UNFRAMED
