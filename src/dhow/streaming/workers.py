"""``dhow stream run --workers N``: N consumer processes of one group, and a supervisor that keeps them running.

One consumer process does its Python (the messages' decode, the replies, the client's callbacks) under one
interpreter lock: one core's worth. N processes in the stream's consumer group share its partitions (the broker
assigns them, as to any members of a group), so they use N cores; each is a full consumer with its own admission,
its own in-flight bound and its own commits: at-least-once holds per worker, and across them, because a worker
commits only what it answered and a partition moves only through the group's rebalance.

The supervisor (the ``dhow stream run`` process) consumes nothing itself; it

- starts each worker as the same command line in a fresh interpreter, told its number (1 to N) in
  ``DHOW_STREAM_WORKER`` (its status file is ``<name>@<number>.json``; with ``--metrics-port P`` it serves its
  metrics on P + number - 1);
- restarts one that dies, after a back-off that doubles while it keeps dying soon after its start (the group
  gives its partitions to the others meanwhile; its uncommitted messages are read again: at-least-once);
- gives up, stopping the others, when a worker is refused at start (exit status 2: the same for every worker)
  or dies ``START_ATTEMPTS`` times in a row within ``STABLE_S`` of its start;
- on SIGTERM or SIGINT passes SIGTERM on: each worker finishes what it has in flight, commits it and exits; one
  still there after ``DRAIN_S`` is killed (it committed only what was answered).

Its exit status follows the CLI's: 2 when a worker was refused at start (as ``dhow stream run`` alone exits 2 on
a refusal), 1 when it gave up on a worker that kept dying or a worker had to be killed at the stop, 0 when it
was stopped and every worker ended well. The reason it gave up decides, whatever the others said while they were
stopped (they were likely refused too, or were told to stop before they could take SIGTERM themselves).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

__all__ = ["WORKER_ENV", "run_workers", "worker_number"]

log = logging.getLogger("dhow.streaming")

#: the environment variable that tells a worker its number
WORKER_ENV = "DHOW_STREAM_WORKER"
#: exit status of a worker refused at start (its settings, the broker, the model: the same for every worker)
REFUSED = 2
START_ATTEMPTS = 3
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 30.0
#: a worker that ran this long before it died starts a new back-off sequence
STABLE_S = 60.0
#: how long a stopping worker may take to finish its messages in flight (the consumer's own drain is 30 s)
DRAIN_S = 45.0
_PR_SET_PDEATHSIG = 1


def worker_number() -> int:
    """This process's number among ``--workers N`` (0: not a worker)."""
    try:
        return max(int(os.environ.get(WORKER_ENV, "0")), 0)
    except ValueError:
        return 0


@dataclass
class _Place:
    number: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    #: when to start it again (0: not waiting)
    restart_at: float = 0.0


class _Supervisor:
    def __init__(self, argv: Sequence[str], count: int) -> None:
        self.command = [sys.executable, "-m", "dhow.cli", *argv]
        self.places = [_Place(number) for number in range(1, count + 1)]
        self.stopping = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        for place in self.places:
            self._start(place)
        status = self._watch()
        stopped = self._stop()
        return status or stopped

    def _start(self, place: _Place) -> None:
        environment = {**os.environ, WORKER_ENV: str(place.number)}
        die_with_us = functools.partial(_die_with_parent, os.getpid())
        place.process = subprocess.Popen(self.command, env=environment, preexec_fn=die_with_us)
        place.started, place.restart_at = time.monotonic(), 0.0
        log.info("stream worker %d started (pid %d)", place.number, place.process.pid)

    def _watch(self) -> int:
        """Until stopped (0) or given up (the status to exit with)."""
        while not self.stopping:
            now = time.monotonic()
            for place in self.places:
                if place.process is None:
                    if place.restart_at and now >= place.restart_at:
                        self._start(place)
                    continue
                code = place.process.poll()
                if code is None:
                    continue
                place.process = None
                if self.stopping:
                    break
                if code == REFUSED:
                    log.error("stream worker %d was refused at start (exit status %d): stopping", place.number, REFUSED)
                    return REFUSED
                place.failures = place.failures + 1 if now - place.started < STABLE_S else 1
                if place.failures >= START_ATTEMPTS:
                    log.error("stream worker %d died %d times in a row soon after its start: stopping",
                              place.number, place.failures)  # fmt: skip
                    return 1
                backoff = min(FIRST_BACKOFF_S * 2 ** (place.failures - 1), MAX_BACKOFF_S)
                log.warning("stream worker %d exited with status %d; restarting it in %.1f s",
                            place.number, code, backoff)  # fmt: skip
                place.restart_at = now + backoff
            time.sleep(0.1)
        return 0

    def _stop(self) -> int:
        """SIGTERM to every worker, then wait for each (killing one that takes too long): 0 when all ended well.

        Ending by the SIGTERM itself is ending well: a worker still starting has no handler yet, and nothing in
        flight to commit."""
        running = [place.process for place in self.places if place.process is not None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_S
        status = 0
        for process in running:
            try:
                code = process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("stream worker (pid %d) did not stop within %.0f s: killed", process.pid, DRAIN_S)
                process.kill()
                code = process.wait()
            if code not in (0, -signal.SIGTERM):
                status = 1
        return status


def _die_with_parent(parent: int) -> None:
    """In a worker before it starts: SIGTERM when the supervisor (pid ``parent``) dies, so no worker outlives it.

    The death signal is armed only from the ``prctl`` on: a supervisor that died between the fork and then left
    an orphan that would never get it. Its parent then is no longer ``parent`` (init or a subreaper took it):
    it exits at once, as the signal would have made it (Linux; elsewhere nothing is armed nor checked)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(128 + signal.SIGTERM)


def run_workers(argv: Sequence[str], count: int) -> int:
    """Run ``dhow <argv>`` as ``count`` workers until SIGTERM/SIGINT; the exit status of ``dhow stream run``."""
    return _Supervisor(argv, count).run()
