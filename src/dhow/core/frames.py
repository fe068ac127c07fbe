"""Length-prefixed JSON frames: how the server talks to its writer processes (the payload log's, tracing's) over
their pipes, and how the audit writer answers (the server's frames to it are lines of JSON: ``audit_writer``). A
frame is a 4-byte big-endian length, then that many bytes of JSON; what goes into the JSON (numpy values, masking
specs) is each writer's own choice, the framing is one."""

from __future__ import annotations

import contextlib
import fcntl
import struct
from typing import Any

import orjson

__all__ = ["HEADER_SIZE", "PIPE_BYTES", "decode_frame_length", "decode_frames", "frame", "split_frames", "widen_pipe"]

_LENGTH = struct.Struct(">I")
HEADER_SIZE = _LENGTH.size
#: the room a pipe to a writer process is asked for (Linux, at most fs.pipe-max-size, 1 MiB by default): the 64 KiB
#: of a default pipe fill within a few tens of milliseconds under load, and then the server's writes wait or split
PIPE_BYTES = 1 << 20


def widen_pipe(fd: int) -> None:
    """Ask for ``PIPE_BYTES`` of room in the pipe ``fd``; where the system says no (not Linux, or over the user's
    pipe quota) it keeps the room it has."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def frame(body: bytes) -> bytes:
    """``body`` (JSON) with its length in front."""
    return _LENGTH.pack(len(body)) + body


def decode_frame_length(header: bytes) -> int:
    return int(_LENGTH.unpack(header)[0])


def decode_frames(buffer: bytearray, limit: int | None = None) -> list[Any]:
    """The whole frames at the start of ``buffer`` (the first ``limit`` of them), decoded and removed from it; a
    partial frame, and those past the limit, stay."""
    return [orjson.loads(body) for body in split_frames(buffer, limit)]


def split_frames(buffer: bytearray, limit: int | None = None) -> list[bytes]:
    """The bodies of the whole frames at the start of ``buffer`` (the first ``limit`` of them), removed from it; a
    partial frame, and those past the limit, stay."""
    bodies: list[bytes] = []
    offset = 0
    with memoryview(buffer) as view:  # a body copied once (a slice of the bytearray would be a copy more)
        while len(buffer) - offset >= HEADER_SIZE and (limit is None or len(bodies) < limit):
            end = offset + HEADER_SIZE + _LENGTH.unpack_from(buffer, offset)[0]
            if len(buffer) < end:
                break
            bodies.append(bytes(view[offset + HEADER_SIZE : end]))
            offset = end
    del buffer[:offset]  # once per read: deleting frame by frame would move the rest each time
    return bodies
