"""The channel between the server and an instance process: small messages on a socket, arrays in shared memory.

Each side writes the arrays it sends into a shared-memory region of its own (the server: a batch's inputs; the
instance process: its outputs) and sends a header over a Unix ``SOCK_SEQPACKET`` socket, one entry per tensor::

    [name, dtype, shape, offset, nbytes]      dtype: numpy's dtype.str ("<f4"), or "BYTES"

The receiver maps the same memory and reads each array with ``np.ndarray(buffer=...)``: array bytes never go
through the socket and nothing is pickled (headers are JSON). BYTES tensors (numpy object arrays) are written in
the v2 binary form, a 4-byte length then the bytes of each element, as the doors encode them.

A region is an anonymous ``memfd``, not a named ``/dev/shm`` segment: it has no name to leak, the kernel frees it
when the last descriptor and mapping go (whichever process dies first), and Python 3.11's ``SharedMemory`` would
have the instance process's resource tracker unlink the server's segments when that process exits. A region that
is too small is replaced by a larger one whose descriptor travels with the message (``SCM_RIGHTS``). Regions are
sealed against shrinking, so a process cannot truncate memory the other has mapped (which would be a SIGBUS).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import math
import mmap
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from dhow.core.datatypes import NUMPY_DTYPE, array_from_buffer, array_to_bytes, element_count
from dhow.core.errors import InvalidInput, ModelFault
from dhow.core.model_config import TensorSpec
from dhow.scheduling.execution import RowParts

__all__ = ["MAX_MESSAGE", "Channel", "Inbox", "Outbox", "SharedRegion", "region_size_for", "supported"]

#: the largest message (a header, an error, the start record): what one SOCK_SEQPACKET record safely holds
MAX_MESSAGE = 128 * 1024
#: where each tensor starts in a region: aligned for vector loads
_ALIGN = 64
#: the smallest region made: a few rows of a small model fit without growing
_MINIMUM_REGION = 64 * 1024
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_FD = array.array("i", [0]).itemsize
_ANCILLARY = socket.CMSG_SPACE(_FD)

Header = list[list[Any]]


def supported() -> str:
    """Why process instances cannot run on this platform, or "" when they can."""
    if not hasattr(os, "memfd_create") or not hasattr(socket, "SOCK_SEQPACKET"):
        return "instances.kind 'process' needs Linux (memfd_create and SOCK_SEQPACKET); use kind: thread here"
    return ""


def region_size_for(specs: Sequence[TensorSpec], max_batch_size: int) -> int:
    """A first region size: the declared tensors at max_batch_size rows (those with unknown dims or BYTES: 0)."""
    rows = max(1, max_batch_size)
    total = 0
    for spec in specs:
        dims = spec.shape[1:] if max_batch_size > 0 else spec.shape
        if spec.datatype == "BYTES" or spec.datatype not in NUMPY_DTYPE or any(dim < 0 for dim in dims):
            continue
        total += _aligned(rows * math.prod(dims) * NUMPY_DTYPE[spec.datatype].itemsize)
    return total


class SharedRegion:
    """A sealed memfd of ``size`` bytes, mapped here; ``fd`` is what the other process maps."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.map = mmap.mmap(fd, self.size)

    @classmethod
    def create(cls, size: int, label: str) -> SharedRegion:
        size = max(_MINIMUM_REGION, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        # the name shows in /proc/<pid>/fd and /proc/<pid>/maps as memfd:<label>; it owns nothing
        # at most 249 bytes (not characters) are allowed; a character cut in two is dropped
        name = os.fsencode(label)[:200].decode(errors="ignore")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> SharedRegion:
        """Map a region the other process made; refuse one that could still shrink under this mapping."""
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if not seals & fcntl.F_SEAL_SHRINK:
                raise ModelFault("instance channel: a shared-memory region came without its seals")
            return cls(fd)
        except OSError as exc:
            os.close(fd)
            raise ModelFault(f"instance channel: cannot map a shared-memory region: {exc.strerror or exc}") from None
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        # arrays still viewing the map keep it alive (BufferError); it is unmapped when the last one goes
        with contextlib.suppress(BufferError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(slots=True)
class _Planned:
    name: str
    dtype: str
    shape: list[int]
    data: np.ndarray | bytes
    offset: int
    nbytes: int
    #: the requests' arrays whose rows make ``shape`` (``data`` is then the first), written in place of a concatenation
    parts: list[np.ndarray] | None = None


class Outbox:
    """The arrays one side sends, written into its own region (replaced by a larger one when they do not fit)."""

    def __init__(self, label: str, minimum: int = 0) -> None:
        self._label = label
        self._minimum = minimum
        self.region: SharedRegion | None = None

    def pack(self, arrays: Mapping[str, Any]) -> tuple[Header, SharedRegion | None]:
        """Write ``arrays``; returns their header, and the new region when it was replaced (send its fd along).

        ``RowParts`` (a batch of several requests) are written request by request, each into its rows' place.
        """
        planned, end = _plan(arrays)
        grown = None
        region = self.region
        if region is None or region.size < end:
            wanted = max(end, self._minimum, 2 * region.size if region is not None else 0)
            grown = SharedRegion.create(wanted, self._label)
            if region is not None:
                region.close()
            self.region = region = grown
        for item in planned:
            if isinstance(item.data, bytes):
                region.map[item.offset : item.offset + item.nbytes] = item.data
            elif item.nbytes:
                target = np.ndarray(tuple(item.shape), item.data.dtype, buffer=region.map, offset=item.offset)
                if item.parts is None:
                    np.copyto(target, item.data)
                else:
                    row = 0
                    for part in item.parts:
                        target[row : row + len(part)] = part
                        row += len(part)
        return [[p.name, p.dtype, p.shape, p.offset, p.nbytes] for p in planned], grown

    def close(self) -> None:
        if self.region is not None:
            self.region.close()
            self.region = None


def _plan(arrays: Mapping[str, Any]) -> tuple[list[_Planned], int]:
    planned: list[_Planned] = []
    end = 0
    parts_of = arrays.parts if isinstance(arrays, RowParts) else {}
    for name in arrays:
        parts = parts_of.get(name)
        if parts is not None and _same_rows(parts):
            first = parts[0]
            shape = [sum(len(part) for part in parts), *first.shape[1:]]
            nbytes = first.dtype.itemsize * int(np.prod(shape))
            planned.append(_Planned(name, first.dtype.str, shape, first, end, nbytes, parts))
            end += _aligned(nbytes)
            continue
        data = np.asarray(arrays[name])
        if data.dtype.hasobject:
            encoded = array_to_bytes(data, "BYTES")
            planned.append(_Planned(name, "BYTES", list(data.shape), encoded, end, len(encoded)))
        elif data.dtype.kind == "V":
            raise ModelFault(f"tensor '{name}' has dtype {data.dtype}, which has no v2 datatype")
        else:
            planned.append(_Planned(name, data.dtype.str, list(data.shape), data, end, data.nbytes))
        end += _aligned(planned[-1].nbytes)
    return planned, end


def _same_rows(parts: list[np.ndarray]) -> bool:
    """Parts that can be written row by row: plain numbers of one dtype and one row shape (the batcher's key)."""
    first = parts[0]
    return (
        first.ndim > 0
        and first.dtype.kind not in "OV"
        and all(part.dtype == first.dtype and part.shape[1:] == first.shape[1:] for part in parts)
    )


class Inbox:
    """The arrays the other side sent: views of its region, mapped here."""

    def __init__(self) -> None:
        self.region: SharedRegion | None = None

    def unpack(self, header: object, fd: int | None, *, copy: bool) -> dict[str, np.ndarray]:
        """The arrays of ``header``; ``copy=False`` gives read-only views, valid until the next message."""
        if fd is not None:
            try:
                region = SharedRegion.attach(fd)
            except ModelFault:
                # the sender writes into the new region from now on: reading the old one would give stale arrays
                self.close()
                raise
            if self.region is not None:
                self.region.close()
            self.region = region
        if not isinstance(header, list):
            raise ModelFault("instance channel: a message without its tensor list")
        arrays: dict[str, np.ndarray] = {}
        for entry in header:
            name, array = self._read(entry, copy)
            arrays[name] = array
        return arrays

    def _read(self, entry: object, copy: bool) -> tuple[str, np.ndarray]:
        if not (isinstance(entry, list) and len(entry) == 5):
            raise ModelFault(f"instance channel: malformed tensor entry {str(entry)[:200]}")
        name, code, shape, offset, nbytes = entry
        if not (isinstance(name, str) and isinstance(code, str) and _ints(shape) and _ints([offset, nbytes])):
            raise ModelFault(f"instance channel: malformed tensor entry {str(entry)[:200]}")
        try:
            if code == "BYTES":
                data = memoryview(self._memory(name, offset, nbytes))[offset : offset + nbytes] if nbytes else b""
                return name, array_from_buffer(data, "BYTES", shape)
            dtype = np.dtype(code)
        except (InvalidInput, TypeError, ValueError) as exc:
            raise ModelFault(f"instance channel: tensor '{name}' ({code}) cannot be read: {exc}") from None
        if dtype.hasobject or dtype.kind == "V" or element_count(shape) * dtype.itemsize != nbytes:
            raise ModelFault(f"instance channel: tensor '{name}' of {code} {shape} does not fit {nbytes} bytes")
        if nbytes:
            view = np.ndarray(shape, dtype, buffer=self._memory(name, offset, nbytes), offset=offset)
        else:
            view = np.empty(shape, dtype)  # an empty tensor: no bytes, perhaps no region yet
        if copy:
            return name, view.copy()
        view.flags.writeable = False  # as the doors' frombuffer arrays are: inputs belong to the request
        return name, view

    def _memory(self, name: str, offset: int, nbytes: int) -> mmap.mmap:
        region = self.region
        if region is None or offset + nbytes > region.size:
            raise ModelFault(f"instance channel: tensor '{name}' lies outside the shared-memory region")
        return region.map

    def close(self) -> None:
        if self.region is not None:
            self.region.close()
            self.region = None


def _ints(values: object) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


class Channel:
    """One end of an instance socket: one message per record, each with at most one file descriptor."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # one buffer for every message received: the hot path allocates nothing to read a header
        self._buffer = bytearray(MAX_MESSAGE)

    def send(self, message: object, fd: int | None = None) -> None:
        self.send_bytes(orjson.dumps(message), fd)

    def send_bytes(self, data: bytes, fd: int | None = None) -> None:
        if len(data) > MAX_MESSAGE:
            raise ModelFault(f"instance channel: a message of {len(data)} bytes exceeds {MAX_MESSAGE}")
        if fd is None:
            self.sock.sendmsg([data])
        else:
            fds = array.array("i", [fd])
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])

    def receive(self) -> tuple[Any, int | None] | None:
        """The next message (JSON) and the descriptor sent with it; ``None`` when the other end closed."""
        received = self.receive_bytes()
        if received is None:
            return None
        data, fd = received
        try:
            return orjson.loads(data), fd
        except orjson.JSONDecodeError:
            if fd is not None:
                os.close(fd)
            raise ModelFault("instance channel: a message that is not JSON") from None

    def receive_bytes(self) -> tuple[memoryview, int | None] | None:
        size, ancillary, flags, _ = self.sock.recvmsg_into([self._buffer], _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % _FD])
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) > 1:
            for fd in fds:
                os.close(fd)
            raise ModelFault("instance channel: a message was cut short (too long, or too many descriptors)")
        if size == 0:
            return None
        return memoryview(self._buffer)[:size], fds[0] if fds else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
