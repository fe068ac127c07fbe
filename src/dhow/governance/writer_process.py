"""The channel to an audit writer process (``audit_writer``), one per store, from the event loop: frames of
records written to its pipe, its answers read in order, a dead writer restarted and sent again what it had not
acknowledged; and what the requests whose records wait in this process await before they are answered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections import deque

import orjson

from dhow.core.errors import Unavailable
from dhow.core.frames import decode_frame_length, widen_pipe
from dhow.governance.audit import AuditRow, _text, writable
from dhow.governance.audit_refusals import RefusingAll
from dhow.governance.audit_writer import COMMIT_S, encode_frame

log = logging.getLogger("dhow.audit")
#: the room asked for in the channel to a writer process: a pipe's (at most fs.pipe-max-size, 1 MiB by default;
#: some 7,000 records) and a socket pair's (at most net.core.wmem_max; it counts some 750 bytes a record)
SOCKET_BYTES = 4 << 20


class WriterProcess:
    """A writer process for one store (see ``audit_writer``), spoken to over its pipes from the event loop.

    ``send`` writes a frame to the pipe at once. When the pipe is full (the writer is behind), what did not fit
    waits in this process, where a SIGKILL would lose it: ``held`` says so, and ``handed_over`` waits until the
    pipe took it, so that a record leaves this process before the request it describes is answered. So it is
    while no writer runs (one died, and the next starts after the audit trail's backoff, up to 5 s): ``held``,
    and ``handed_over`` waits until the next writer was sent the frames.
    ``acknowledged`` reads the writer's answers in order. Frames not yet acknowledged are kept, and sent again
    to a new writer if this one dies (at least once).
    """

    def __init__(self, url: str, commit_s: float = COMMIT_S) -> None:
        self._url = url
        #: how long the writer gathers records before a commit (``--audit-commit-ms``)
        self._commit_s = commit_s
        self._process: asyncio.subprocess.Process | None = None
        #: frames sent and not yet acknowledged, oldest first: their records
        self._unacknowledged: deque[list[AuditRow]] = deque()
        #: started and not closed: while no writer runs, records wait in this process for the next one
        self._started = False
        #: what ``handed_over`` awaits while no writer runs: done once ``start`` sent the frames to a new one
        self._restarted: asyncio.Future[None] | None = None
        #: (seq, the store's error) of each record the writer found refused and wrote as ``audit.unwritable`` at
        #: that seq, as its answers told, until the trail takes them
        self.refusals: list[tuple[int, str]] = []

    @property
    def unacknowledged(self) -> int:
        return len(self._unacknowledged)

    @property
    def running(self) -> bool:
        return self._alive() is not None

    def _alive(self) -> asyncio.subprocess.Process | None:
        process = self._process
        if process is None or process.returncode is not None or process.stdin is None:
            return None
        return None if process.stdin.is_closing() else process

    async def start(self) -> None:
        """Start a writer (if none runs) and send it every frame not yet acknowledged."""
        if self._alive() is not None:
            return
        process = self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dhow.governance.audit_writer", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdin is not None
        # the pipe's writer pauses as soon as anything waits here, so that ``handed_over`` waits until it is gone
        process.stdin.transport.set_write_buffer_limits(high=0)
        _widen(process.stdin.transport)
        process.stdin.write(encode_frame([self._url, self._commit_s]))
        for records in self._unacknowledged:
            process.stdin.write(_frame(records, urgent=True))  # some caller may be waiting for these
        self._started = True
        restarted, self._restarted = self._restarted, None
        if restarted is not None and not restarted.done():
            restarted.set_result(None)

    def send(self, records: list[AuditRow], *, urgent: bool = False) -> None:
        """Write the records' frame now (no waiting); if no writer runs, ``start`` sends it. An urgent frame
        (someone waits for it to be durable) is written at once; others may wait for a batch."""
        encoded = _frame(records, urgent=urgent)  # before it counts as sent: a frame kept must be one that encodes
        self._unacknowledged.append(records)
        process = self._alive()
        if process is not None:
            assert process.stdin is not None
            process.stdin.write(encoded)

    @property
    def held(self) -> bool:
        """Whether records sent wait in this process: for room in the pipe (the writer is behind), or for a writer
        (the last one died, the next is not started yet)."""
        process = self._process
        if process is None or process.returncode is not None or process.stdin is None:
            return self._started and bool(self._unacknowledged)
        transport = process.stdin.transport
        return transport.get_write_buffer_size() > 0 or (
            transport.is_closing() and self._started and bool(self._unacknowledged)
        )

    async def handed_over(self) -> None:
        """Wait until the pipe took what waits in this process (at once if nothing does); while no writer runs,
        until the next one was sent it (``start``), also when the writer dies during the wait. ``Unavailable``
        when no next writer could be started, or the trail closed first; a waiting request can be cancelled."""
        while True:
            process = self._alive()
            if process is None:
                if not self._started or not self._unacknowledged:  # nothing waits in this process for a writer
                    return
                restarted = self._restarted
                if restarted is None:
                    restarted = self._restarted = asyncio.get_running_loop().create_future()
                # shared by every waiting request: each one's cancellation cancels its own wait, not the others'
                await asyncio.shield(restarted)
                continue
            assert process.stdin is not None
            with contextlib.suppress(ConnectionError):
                await process.stdin.drain()
            if self._alive() is process or not self._started:
                return
            # the writer died while the pipe held what this request waited for: its records are in this process
            # only (kept unacknowledged), until the next writer is sent them

    def not_started(self, err: Exception) -> None:
        """No next writer could be started: the requests waiting for one fail (503) rather than wait for ever;
        those that come later wait for the next try."""
        self._fail_restart(Unavailable(f"the audit writer process could not be started ({err}); retry shortly"))

    def _fail_restart(self, err: Unavailable) -> None:
        restarted, self._restarted = self._restarted, None
        if restarted is not None and not restarted.done():
            restarted.set_exception(err)
            restarted.exception()  # read: a future no request waits for any more is not logged as unretrieved

    async def acknowledged(self) -> int:
        """The number of records the writer made durable with its next answer (those the store refused count: each
        is written as an ``audit.unwritable`` record, added to ``refusals``); ``Unavailable`` when it says the store
        fails (it retries by itself) or when it died (``start`` again)."""
        process = self._alive()
        if process is None or process.stdout is None:
            raise Unavailable("the audit writer process is not running; starting another")
        try:
            header = await process.stdout.readexactly(4)
            answer = orjson.loads(await process.stdout.readexactly(decode_frame_length(header)))
        except (OSError, asyncio.IncompleteReadError) as exc:
            self._process = None
            raise Unavailable(f"the audit writer process stopped ({type(exc).__name__}); starting another") from None
        if "error" in answer:
            raise (RefusingAll if answer.get("refusing_all") else Unavailable)(str(answer["error"]))
        self.refusals += [(int(seq), str(error)) for seq, error in answer.get("refused", ())]
        return sum(len(self._unacknowledged.popleft()) for _ in range(int(answer["frames"])))

    async def close(self) -> None:
        process, self._process = self._process, None
        self._started = False
        # no writer will take them: their requests fail rather than wait for ever
        self._fail_restart(Unavailable("the audit trail stopped before the records left this process"))
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


def _widen(transport: asyncio.WriteTransport) -> None:
    """Let the channel to the writer hold ``PIPE_BYTES`` or ``SOCKET_BYTES`` where the system allows. By default
    it holds a few hundred records (a 64 KiB pipe; uvloop's socket pair, some 280), which fill at 10,000 records a
    second while the writer is in a transaction, and then every answer waits in ``handed_over`` until it ends."""
    pipe = transport.get_extra_info("pipe")  # asyncio's event loop: a pipe (Linux lets it grow)
    if pipe is not None:
        widen_pipe(pipe.fileno())
        return
    sock = transport.get_extra_info("socket")  # uvloop's: a socket pair, its room counted with every write's overhead
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BYTES)  # up to net.core.wmem_max


async def _depart(process: WriterProcess, departure: Departure) -> None:
    """Done with the departure once the pipe took what waits in this process (the writer is behind)."""
    try:
        await process.handed_over()
    except Exception as err:  # no writer could be started, or the trail closed: its requests get the cause (503)
        _fail(departure, err if isinstance(err, Unavailable) else Unavailable(f"the audit trail failed: {err!r}"))
        return
    except BaseException:
        _fail(departure, Unavailable("the audit trail stopped before the records left this process"))
        raise
    departure.set_result(None)


def _fail(departure: Departure, err: Unavailable) -> None:
    departure.set_exception(err)
    departure.exception()  # read: not logged as unretrieved when every request that awaited it was cancelled


def _frame(rows: list[AuditRow], *, urgent: bool = False) -> bytes:
    try:
        return encode_frame({"rows": rows, "now": True} if urgent else rows)
    except (TypeError, ValueError):  # a record JSON cannot hold: the frame carries the others, and that one repaired
        rows = [_encodable(row) for row in rows]
        return encode_frame({"rows": rows, "now": True} if urgent else rows)


def _encodable(row: tuple[object, ...]) -> tuple[object, ...]:
    """A record's fields as a frame can carry them, as the store writes them (``audit.writable``): a lone surrogate
    as its escape, an integer past 64 bits in details as its digits; details that still cannot be encoded (a cycle)
    kept as their ``repr``, as the store keeps them."""
    try:
        encode_frame(row)
        return row
    except (TypeError, ValueError):
        pass
    texts = tuple(_text(value) for value in row[:9])
    details = writable(row[10])
    try:
        encode_frame(details)
    except (TypeError, ValueError):
        details = {"unencodable_details": _text(repr(row[10]))[:2000]}
    return (*texts, writable(row[9]), details, _text(row[11]), writable(row[12]))


class Departure(asyncio.Future[None]):
    """What the requests whose records wait in one outbox await before they are answered: done once their frame
    is in the writer's pipe. Shared by them all, so it cannot be cancelled: a request cancelled while it waits is
    cancelled alone when it wakes (its task's own cancellation), the others' answers still go."""

    def cancel(self, msg: object = None) -> bool:
        return False
