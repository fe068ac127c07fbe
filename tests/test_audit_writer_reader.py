"""The audit writer's ``FrameReader`` over the channels the server gives it: a pipe (asyncio) and a socket pair
(uvloop). Its drain thread pauses between reads while the main thread is busy; these check that a pause never
keeps bytes in the channel from a main thread that waits for them."""

from __future__ import annotations

import fcntl
import os
import socket
import termios
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dhow.governance.audit_writer import FrameReader, encode_frame

#: a drain thread's pause no test outlives: a frame taken in this test was taken without waiting for it
LONG_PAUSE_S = 3600.0
#: how long a test waits for what should come at once (a hang fails it, it times nothing)
HANG_S = 10.0


class Channel:
    """A reader on the writer's end of a channel, a write to the server's end and its close (the server's exit)."""

    def __init__(self, kind: str) -> None:
        if kind == "pipe":
            self.fd, self._write_end = os.pipe()
            self.write: Callable[[bytes], None] = lambda data: _write_all(self._write_end, data)
            self._close_ours, self._close_theirs = (lambda: os.close(self.fd)), (lambda: os.close(self._write_end))
        else:
            ours, theirs = socket.socketpair()
            self.fd, self.write = ours.fileno(), theirs.sendall
            self._close_ours, self._close_theirs = ours.close, theirs.close
        self._open = True
        self.reader: FrameReader | None = None
        self._drain: threading.Thread | None = None

    def open_reader(self, pause_s: float) -> FrameReader:
        before = set(threading.enumerate())
        self.reader = FrameReader(self.fd, pause_s=pause_s)
        (self._drain,) = (t for t in threading.enumerate() if t not in before and t.name == "dhow-audit-drain")
        return self.reader

    def close(self) -> None:
        if self._open:
            self._open = False
            self._close_theirs()

    def finish(self) -> None:
        """Close both ends once the reader's drain thread has ended: one still running would read the next
        channel that reuses the fd's number."""
        self.close()
        if self.reader is not None:
            reader = self.reader

            def read_to_end() -> None:
                while reader.batch():  # (waiting, the main thread cuts the drain thread's pause short)
                    pass

            threading.Thread(target=read_to_end, daemon=True).start()
            assert self._drain is not None
            self._drain.join(HANG_S)
            if self._drain.is_alive():
                return  # the fd stays open (and leaks): a test failed already
        self._close_ours()


@pytest.fixture(params=["pipe", "socketpair"])
def channel(request: pytest.FixtureRequest) -> Iterator[Channel]:
    opened = Channel(request.param)
    yield opened
    opened.finish()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _unread(fd: int) -> int:
    """The bytes waiting in the channel (FIONREAD holds for pipes and sockets)."""
    buffer = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buffer)
    return int.from_bytes(buffer, "little")


def _drained_while_busy(reader: FrameReader, channel: Channel) -> None:
    """Send a frame while the main thread is busy (not in ``batch``): the drain thread reads it, then pauses."""
    channel.write(encode_frame([["busy"]]))
    while _unread(channel.fd):  # read by the drain thread, which saw no main thread waiting: it pauses now
        threading.Event().wait(0.001)
    assert reader.batch() == [[["busy"]]]  # taken from memory, without waiting


def _batch_in_thread(reader: FrameReader) -> tuple[threading.Thread, list[list[Any]]]:
    """``batch`` in a thread of its own, once it waits for a frame."""
    taken: list[list[Any]] = []
    thread = threading.Thread(target=lambda: taken.append(reader.batch()), daemon=True)
    thread.start()
    while not reader._waiting:  # it read the channel (empty) and waits: what comes next, the drain thread reads
        threading.Event().wait(0.001)
    return thread, taken


def test_an_urgent_frame_is_taken_while_the_drain_thread_pauses(channel: Channel) -> None:
    """The main thread waits for its next frame while the drain thread pauses after a read it made while the
    main thread was busy: the frame (an admin change whose caller waits for durability) is taken when it comes,
    not when the pause ends."""
    reader = channel.open_reader(LONG_PAUSE_S)
    _drained_while_busy(reader, channel)
    thread, taken = _batch_in_thread(reader)
    urgent = {"rows": [["admin"]], "now": True}
    channel.write(encode_frame(urgent))
    thread.join(HANG_S)
    assert taken == [[urgent]], "the frame waited in the channel for the drain thread's pause"


def test_the_end_of_the_channel_is_seen_while_the_drain_thread_pauses(channel: Channel) -> None:
    """The server dies while the main thread waits and the drain thread pauses: the writer sees the end (and
    exits) at once, with every frame sent before it."""
    reader = channel.open_reader(LONG_PAUSE_S)
    _drained_while_busy(reader, channel)
    thread, taken = _batch_in_thread(reader)
    channel.write(encode_frame([["last"]]))
    channel.close()
    thread.join(HANG_S)
    assert taken == [[[["last"]]]], "the last frame waited in the channel for the drain thread's pause"
    assert reader.batch() == [] and reader.closed


def test_frames_keep_their_order_when_both_threads_read(channel: Channel) -> None:
    """The drain thread (no pause) and the main thread (lingering, then taking what came) read the same channel:
    every frame arrives once, in order, also frames split across reads."""
    reader = channel.open_reader(0.0)
    sent = 20_000

    def send() -> None:
        for start in range(0, sent, 50):
            data = b"".join(encode_frame([[i, "x" * (i % 97)]]) for i in range(start, start + 50))
            channel.write(data[: len(data) // 3])  # a frame split across writes
            channel.write(data[len(data) // 3 :])
        channel.close()

    sender = threading.Thread(target=send)
    sender.start()
    received = []
    while frames := reader.batch(max_frames=333, linger_s=0.0005):
        received.extend(row[0] for frame in frames for row in frame)
    sender.join()
    assert received == list(range(sent))
