"""The audit writer process: chains and writes the server's audit records.

``python -m dhow.governance.audit_writer`` reads the store's URL and how long to gather records before a commit
(``[url, seconds]``, or the URL alone: ``COMMIT_S``) from its first frame, then frames of records.
The server writes each record's frame as the record is made, before the request it describes is answered, so
a record has left the server's process when its answer does: a server killed with SIGKILL loses no record of
an answered request (this process reads what is in the pipe, writes it, and exits when the pipe closes). A
thread drains the pipe as records come, so that it does not fill (and the server's answers wait) while a
transaction runs.
It writes the frames it has received (waiting that long for more, unless one is urgent: a change whose caller waits
for it to be durable) in one transaction, then answers ``{"frames": n, "seq": last}`` (and ``"refused": [[seq,
error], …]``: records the store refused, each written at that seq as an ``audit.unwritable`` record, see
``audit_refusals.py``); when the store is down it answers ``{"error": …, "refusing_all": false}`` (true: the
store is up but refused a record and every stand-in for it), again whenever ``refusing_all`` changes, and retries
with backoff until the write succeeds (records are never dropped). The server's frames are lines of JSON (JSON as
orjson writes it holds no newline byte), so that what a read gathered is decoded as one JSON array, not frame by
frame; the answers are the length-prefixed frames of ``core/frames.py``. The server talks to it over the child's
stdin and stdout with asyncio: hashing and the database's work never take its interpreter lock.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from typing import IO, Any

import orjson

from dhow.core import affinity
from dhow.core.frames import frame
from dhow.governance.audit import AuditStore
from dhow.governance.audit_refusals import Appending, RefusingAll, describe

__all__ = ["encode_frame", "main"]

#: what a frame's JSON may hold that plain JSON does not (masked payload samples may carry numpy values)
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def encode_frame(document: Any) -> bytes:
    """A frame to the writer: the document's JSON and a newline."""
    return orjson.dumps(document, default=str, option=_JSON_OPTIONS) + b"\n"


def decode_lines(buffer: bytearray, limit: int) -> list[Any]:
    """The whole frames at the start of ``buffer`` (the first ``limit`` of them), decoded (as one JSON array: one
    call, not one a frame) and removed from it; a partial frame, and those past the limit, stay."""
    assert limit >= 1, limit
    end = buffer.rfind(b"\n")
    if end < 0:
        return []
    if buffer.count(b"\n", 0, end) >= limit:  # a backlog: the first ``limit`` frames
        end = -1
        for _ in range(limit):
            end = buffer.index(b"\n", end + 1)
    body = buffer[:end].replace(b"\n", b",")
    del buffer[: end + 1]
    return list(orjson.loads(b"[" + body + b"]"))


#: how long the writer gathers records before a transaction, unless a frame asks for durability now
#: (``--audit-commit-ms``). Its cost is the commits: on a small machine, where the writer shares a core with the
#: load and the model, a commit costs ~0.5-1 ms of CPU (the wake-up with cold caches, SQLite, the sync), so at
#: 5,000 records a second the writer cost ~27 µs of CPU a record at 10 ms, ~19 at 25 ms, ~17 at 50 ms
#: (RESULTS-security.md). A machine's crash can lose the records of answered requests of that long.
COMMIT_S = 0.025


#: how long the thread that drains the pipe pauses after each read. It only keeps the pipe from filling while the
#: main thread is busy (a long transaction, a store that is down): the main thread reads what the pipe holds itself
#: when it takes a batch, and wakes this thread when it waits, so a record waits no longer for this pause. Each of
#: its wake-ups costs the writer some 0.2-0.3 ms of CPU (cold caches), so it wakes rarely, yet the pipe must hold
#: this long's records with room to spare: a pipe of 1 MiB does, and so does the server's socket pair (uvloop) at
#: the usual net.core.wmem_max of 208 KiB, ~50 ms of records sent one a frame at 10,000 a second
DRAIN_PAUSE_S = 0.025


class FrameReader:
    """Frames from a pipe: waits for the first, then gathers more for up to ``linger_s`` (a batch).

    The main thread reads the pipe when it takes a batch; a thread of its own also drains the pipe into this
    process's memory every ``pause_s`` while the main thread is busy (in a transaction, or retrying a store that
    is down): the pipe the server writes to then never fills (a full one would make the server's answers wait for
    room in it). A record in this memory is as safe from the server's SIGKILL as one in the pipe: this process
    writes what it has, then exits. Both threads read under one lock (the pipe is non-blocking; the drain thread
    waits for bytes with ``poll``, outside it), so the bytes stay in order."""

    def __init__(self, fd: int, pause_s: float = DRAIN_PAUSE_S) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        #: the main thread's bytes: whole frames not parsed yet, then a partial one
        self.buffer = bytearray()
        #: the pipe has closed and every byte it carried is in ``buffer``
        self.closed = False
        self._pause_s = pause_s
        lock = threading.Lock()
        self._ready = threading.Condition(lock)  # the main thread waits for bytes
        #: the drain thread's pause, cut short when the main thread starts to wait: it reads the pipe only when it
        #: takes a batch, so bytes that come while it waits would otherwise wait for the pause's end
        self._wanted = threading.Condition(lock)
        self._incoming = bytearray()  # read by either thread, under ``_ready``
        self._ended = False
        #: the main thread waits for bytes (the drain thread then does not pause: an urgent record goes at once)
        self._waiting = False
        threading.Thread(target=self._drain, name="dhow-audit-drain", daemon=True).start()

    def _read_available(self) -> None:
        """What the pipe holds now, into ``_incoming``, and whether it ended; under ``_ready``."""
        while not self._ended:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._ended = True
                return
            self._incoming += chunk

    def _drain(self) -> None:
        readable = select.poll()
        readable.register(self.fd, select.POLLIN)
        try:
            while True:
                readable.poll()  # bytes, or the end of the pipe (outside the lock: the main thread may read meanwhile)
                with self._ready:
                    self._read_available()
                    self._ready.notify()
                    if self._ended:
                        return
                    # the main thread is busy: gather more, until it waits (then hand it the next read at once)
                    self._wanted.wait_for(lambda: self._waiting, self._pause_s)
        finally:  # the end of the pipe, or this thread failed (say, out of memory): the main thread must not wait on
            with self._ready:
                self._ended = True
                self._ready.notify()

    def _take(self, *, wait: bool) -> None:
        """Read what the pipe holds and move it, with what the drain thread read, into ``buffer``; ``wait``: until
        there is something, or the end."""
        with self._ready:
            self._read_available()
            while wait and not self._incoming and not self._ended:
                self._waiting = True
                self._wanted.notify()
                self._ready.wait()
                self._waiting = False
            self.buffer += self._incoming
            self._incoming.clear()
            self.closed = self._ended

    def batch(self, max_frames: int = 10_000, linger_s: float = 0.0) -> list[Any]:
        """At least one frame, unless the pipe closed (then what is left, maybe none); then, ``linger_s`` later
        (at once when one of them is urgent: ``record_now``'s caller waits), every frame that came meanwhile."""
        frames = decode_lines(self.buffer, max_frames)
        while not frames and not self.closed:
            self._take(wait=True)
            frames = decode_lines(self.buffer, max_frames)
        if linger_s and not self.closed and not _urgent(frames):
            # sleep, then take what came meanwhile: a transaction per frame would cost a commit per record
            time.sleep(linger_s)
        if len(frames) < max_frames:
            # (a backlog the drain thread gathered meanwhile waits in ``buffer``: one transaction stays bounded)
            self._take(wait=False)
            frames += decode_lines(self.buffer, max_frames - len(frames))
        return frames


def _urgent(frames: list[Any]) -> bool:
    return any(isinstance(frame, dict) for frame in frames)


def _write(store: AuditStore | None, url: str, frames: list[Any], sink: IO[bytes]) -> AuditStore:
    """Write the frames' records in one transaction, retrying until it works; answer how many frames, and the
    records the store refused (``audit_refusals``: each written in its place as an ``audit.unwritable`` record)."""
    rows = [row for frame in frames for row in (frame["rows"] if isinstance(frame, dict) else frame)]
    job = Appending(rows)
    backoff = 0.1
    told: bool | None = None  # the ``refusing_all`` of the last error answer (None: none sent for this batch)
    while True:
        try:
            store = store or AuditStore.open(url)
            job.run(store)
            break
        except Exception as exc:  # the store is down (or refuses even a stand-in): say so, retry the rest
            if store is not None:
                store.close()
                store = None
            # said once, and again when it turns from down to refusing everything (or back): an outage first (the
            # store unreachable, read-only) must not hide that, back, it refuses a record and its smallest stand-in
            refusing_all = isinstance(exc, RefusingAll)
            if told is not refusing_all:
                _answer(sink, {"error": describe(exc), "refusing_all": refusing_all})
                told = refusing_all
            time.sleep(backoff)
            backoff = min(5.0, backoff * 2)
    answer: dict[str, Any] = {"frames": len(frames), "seq": job.seq}
    if job.refusals:
        answer["refused"] = job.refusals
    _answer(sink, answer)
    return store


def _answer(sink: IO[bytes], document: Any) -> None:
    """Tell the server; a server that is gone (killed) hears nothing, and what it sent is written all the same."""
    try:
        sink.write(frame(orjson.dumps(document)))
        sink.flush()
    except OSError:
        pass


def main() -> int:
    affinity.as_helper()  # (off the event loop's CPU, with ``--cpu-affinity auto``)
    reader, sink = FrameReader(sys.stdin.fileno()), sys.stdout.buffer
    first = reader.batch(max_frames=1)
    if not first:
        return 2
    settings, pending = first[0], first[1:]
    url, commit_s = (settings, COMMIT_S) if isinstance(settings, str) else (settings[0], float(settings[1]))
    if not isinstance(url, str):
        return 2
    store: AuditStore | None = None
    while frames := pending or reader.batch(linger_s=commit_s):
        pending = []
        store = _write(store, url, frames, sink)
    if store is not None:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
