"""The audit writer process: chains and writes batches of audit records for the server.

``python -m dhow.governance.audit_writer`` reads the store's URL from its first frame, then batches; it
answers each batch with the last sequence number written, or the error. A frame is a 4-byte big-endian
length and a JSON document. The server talks to it over the child's stdin and stdout with asyncio, with no
thread of its own: hashing and the database's work never take the interpreter lock its event loop needs.
"""

from __future__ import annotations

import struct
import sys
from typing import IO, Any

import orjson

from dhow.core.errors import DhowError
from dhow.governance.audit import AuditRecord, AuditStore

__all__ = ["decode_frame_length", "encode_frame", "main"]

_LENGTH = struct.Struct(">I")
#: what a frame's JSON may hold that plain JSON does not (masked payload samples may carry numpy values)
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def encode_frame(document: Any) -> bytes:
    body = orjson.dumps(document, default=str, option=_JSON_OPTIONS)
    return _LENGTH.pack(len(body)) + body


def decode_frame_length(header: bytes) -> int:
    return int(_LENGTH.unpack(header)[0])


def _read_frame(stream: IO[bytes]) -> Any:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None  # the server closed the pipe: we are done
    return orjson.loads(stream.read(decode_frame_length(header)))


def main() -> int:
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    url = _read_frame(source)
    if not isinstance(url, str):
        return 2
    store: AuditStore | None = None
    while (rows := _read_frame(source)) is not None:
        try:
            if store is None:
                store = AuditStore.open(url)
            answer: dict[str, Any] = {"seq": store.append([AuditRecord(*row) for row in rows])}
        except DhowError as exc:
            answer = {"error": exc.message}
            if store is not None:
                store.close()
                store = None  # reconnect on the next batch
        except Exception as exc:  # a bad record or a database fault: the server keeps the batch and retries
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sink.write(encode_frame(answer))
        sink.flush()
    if store is not None:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
