"""``dhow serve --workers N``: a supervisor process and N server processes sharing the ports.

When one core's worth of Python is the bottleneck, N workers each run a full ``Server`` (REST and gRPC on
their own event loop, their own copy of every model) on the same ports, opened with SO_REUSEPORT, and the
kernel spreads new connections over them. The supervisor (the ``dhow serve`` process) serves nothing
itself; it

- checks the ports are free, binding them without SO_REUSEPORT, then holds them bound (not listening) with
  SO_REUSEPORT, so that a busy port fails loudly and no other program takes one while a worker restarts;
- does the first start's one-time work (store migrations, the first admin key, printed once) before any
  worker starts;
- gives the workers a run folder, cleaned at start: ``stats/`` (Triton statistics, see
  ``scheduling/stats.py``) and ``metrics/`` (prometheus_client's multi-process files), so that whichever
  worker answers, statistics and metrics are the server's;
- starts the workers with the *spawn* start method (a fresh interpreter: no forked event loop, threads or
  grpc state), restarts one that dies (with a back-off), and gives up when one keeps failing at start-up;
- on SIGTERM or SIGINT, passes SIGTERM on: each worker drains (``serving/drain.py``) and exits; one still
  there ``drain_delay + drain_seconds + GRACE_MARGIN_S`` seconds later is killed;
- on SIGHUP, passes it on: each worker reads its certificates, keys and live settings again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from dhow.core.errors import DhowError
from dhow.serving.drain import GRACE_MARGIN_S
from dhow.settings import ServerSettings, SettingsSource

__all__ = ["reuse_port_socket", "serve_workers"]

log = logging.getLogger("dhow.supervisor")

#: a worker that exits before it is ready this many times in a row makes the supervisor give up
START_ATTEMPTS = 3
#: exit status of a worker refused by its settings (the same for every worker: no use restarting)
SETTINGS_ERROR = 2
#: seconds before a dead worker is restarted, doubling while it keeps dying, up to the second figure
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 30.0
#: a worker that served this long before it died starts a new back-off sequence
STABLE_S = 60.0


def _family(host: str) -> socket.AddressFamily:
    # as uvicorn decides it: an address with a colon is IPv6
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT, as every worker of a supervisor binds its ports."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def check_port(host: str, port: int, door: str) -> int:
    """Raise a ``DhowError`` naming the door if something is bound to the port; the port (port 0: a free one).

    The check binds without SO_REUSEPORT, which fails while any other socket listens there, whatever its
    options (grpc's servers share ports by default, so a second one would otherwise bind silently).
    """
    probe = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        # like uvicorn: connections of an earlier server still in TIME_WAIT do not make the port busy
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = int(probe.getsockname()[1])
    except OSError as exc:
        raise DhowError(f"cannot serve {door} on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    return port


def _hold_port(host: str, port: int, door: str) -> socket.socket:
    """Check that nothing is bound to the port, then hold it for the workers (port 0: a free one): the hold
    binds with SO_REUSEPORT, which only sockets that also ask for it (the workers) may then share."""
    port = check_port(host, port, door)
    try:
        return reuse_port_socket(host, port)
    except OSError as exc:
        raise DhowError(f"cannot serve {door} on {host}:{port}: {exc.strerror or exc}") from None


def _stop_without_supervisor(pipe: Connection) -> None:
    """Stop this worker as SIGTERM does when the supervisor is gone (its end of the pipe closed): no orphans."""
    with contextlib.suppress(EOFError, OSError):
        while True:
            pipe.recv_bytes()
    os.kill(os.getpid(), signal.SIGTERM)


def _say_ready(pipe: Connection) -> None:
    with contextlib.suppress(OSError):  # the supervisor is gone: this worker is stopping already
        pipe.send_bytes(b"ready")


def _worker(
    settings: ServerSettings,
    index: int,
    run_dir: Path,
    pipe: Connection,
    replacing: bool,
    source: SettingsSource | None,
) -> None:
    """A worker process's life: one ``Server`` on the shared ports, telling the supervisor when it is ready.

    A worker ``replacing`` one that died loads its models before it listens: the others serve meanwhile.
    """
    from dhow.monitoring.payload_sinks import worker_sink_url
    from dhow.scheduling.stats import share_statistics
    from dhow.server import run_server

    # a terminal's Ctrl-C reaches the supervisor too, which stops the workers; until the server handles the
    # signal itself, it must not kill a worker half-started (nor must a SIGHUP passed on, whose default kills)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    share_statistics(run_dir / "stats", index)
    settings = dataclasses.replace(settings, payload_log=worker_sink_url(settings.payload_log, index))
    threading.Thread(target=_stop_without_supervisor, args=(pipe,), name="dhow-supervisor", daemon=True).start()
    try:
        http_socket = reuse_port_socket(settings.host, settings.http_port)
    except OSError as exc:
        sys.exit(f"dhow: cannot serve REST on {settings.host}:{settings.http_port}: {exc.strerror or exc}")
    try:
        run_server(
            settings,
            http_socket=http_socket,
            on_ready=lambda: _say_ready(pipe),
            load_first=replacing,
            source=source,
            worker_index=index - 1,
        )
    except DhowError as exc:
        print(f"dhow: {exc.message}", file=sys.stderr, flush=True)
        sys.exit(SETTINGS_ERROR)


@dataclass(eq=False)
class _Place:
    """One of the N places a worker runs in; its successor takes the same place (and statistics file)."""

    index: int
    process: BaseProcess | None = None
    #: the supervisor's end of the pipe the worker says it is ready on, and that closes when the supervisor dies
    pipe: Connection | None = None
    is_ready: bool = False
    started_at: float = 0.0
    #: exits before ready in a row (start-up failures) and deaths in a row (back-off)
    failed_starts: int = 0
    deaths: int = 0
    restart_at: float | None = None


class Supervisor:
    def __init__(self, settings: ServerSettings, run_dir: Path, source: SettingsSource | None = None) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.source = source
        self._context = multiprocessing.get_context("spawn")
        self._places = [_Place(index) for index in range(1, settings.workers + 1)]
        self._stopping = False
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _on_hangup(self, signum: int, frame: FrameType | None) -> None:
        """SIGHUP: every worker reloads (a worker started later reads the files as they are then)."""
        running = [p.process for p in self._places if p.process is not None and p.process.pid is not None]
        log.info("SIGHUP: passing it on to %d workers", len(running))
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGHUP)  # type: ignore[arg-type]  # checked above

    def run(self) -> int:
        """Start the workers and keep them running until a signal; the exit status."""
        previous = signal.set_wakeup_fd(self._wake_write)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        try:
            try:
                for place in self._places:
                    self._start(place)
                status = self._watch()
            except BaseException:
                # a worker that cannot be started (EAGAIN, EMFILE) must not leave the others serving unwatched
                self._stop()
                raise
            return self._stop() or status
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous)
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _start(self, place: _Place) -> None:
        pipe, worker_end = self._context.Pipe()
        process = self._context.Process(
            target=_worker,
            args=(self.settings, place.index, self.run_dir, worker_end, place.restart_at is not None, self.source),
            name=f"dhow-worker-{place.index}",
        )
        process.start()
        worker_end.close()  # the worker holds it: its death closes the pipe
        place.process, place.pipe, place.is_ready = process, pipe, False
        place.started_at, place.restart_at = time.monotonic(), None
        log.info("worker %d started (pid %d)", place.index, process.pid)

    def _watch(self) -> int:
        """Wait for signals, readiness and deaths; 0, or the exit status after giving up on a worker."""
        while not self._stopping:
            waiting: dict[Any, tuple[_Place, str]] = {}  # pipes and sentinels (file descriptors)
            for place in self._places:
                if place.process is not None:
                    waiting[place.process.sentinel] = (place, "exit")
                if place.pipe is not None and not place.is_ready:
                    waiting[place.pipe] = (place, "ready")
            due = [p.restart_at for p in self._places if p.restart_at is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            for event in wait([self._wake_read, *waiting], timeout):
                if event == self._wake_read:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, 512)
                    continue
                place, what = waiting[event]
                # an exit handled just before may have closed this place's pipe (and the other way round)
                if what == "ready" and place.pipe is event:
                    self._on_ready(place)
                elif what == "exit" and place.process is not None:
                    give_up = self._on_exit(place)
                    if give_up is not None:
                        return give_up
            now = time.monotonic()
            for place in self._places:
                if place.restart_at is not None and place.restart_at <= now and not self._stopping:
                    self._start(place)
        return 0

    def _on_ready(self, place: _Place) -> None:
        assert place.pipe is not None
        try:
            place.pipe.recv_bytes()
        except EOFError:  # it died before it was ready; its exit says the rest
            place.pipe.close()
            place.pipe = None
            return
        place.is_ready, place.failed_starts = True, 0
        if all(p.is_ready for p in self._places):
            log.info("all %d workers are ready", len(self._places))

    def _on_exit(self, place: _Place) -> int | None:
        """A worker died: schedule its restart, or give the exit status to give up with (settings errors: 2)."""
        process = place.process
        assert process is not None
        process.join()
        self._forget(place, process)
        code = process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        if not place.is_ready:
            place.failed_starts += 1
            if code == SETTINGS_ERROR or place.failed_starts >= START_ATTEMPTS:
                tries = "" if code == SETTINGS_ERROR else f" {place.failed_starts} times in a row"
                log.error("worker %d %s before it was ready%s; giving up (see above)", place.index, how, tries)
                return SETTINGS_ERROR if code == SETTINGS_ERROR else 1
        ran_s = time.monotonic() - place.started_at
        place.deaths = 1 if ran_s >= STABLE_S else place.deaths + 1
        delay = min(FIRST_BACKOFF_S * 2 ** (place.deaths - 1), MAX_BACKOFF_S)
        log.error("worker %d (pid %d) %s; restarting it in %g s", place.index, process.pid, how, delay)
        place.restart_at = time.monotonic() + delay
        return None

    def _forget(self, place: _Place, process: BaseProcess) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        # its live gauges (dhow_workers, dhow_models_loaded) stop counting; its counters stay in the sums
        mark_process_dead(process.pid, str(self.run_dir / "metrics"))  # type: ignore[no-untyped-call]
        if place.pipe is not None:
            place.pipe.close()
        place.process, place.pipe, place.is_ready = None, None, False

    def _stop(self) -> int:
        """SIGTERM to every worker, which finishes what it was given; those still there after the grace: killed."""
        running = [(p, p.process) for p in self._places if p.process is not None]
        log.info("stopping %d workers", len(running))
        for _, process in running:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        grace_s = self.settings.drain_delay + self.settings.drain_seconds + GRACE_MARGIN_S
        deadline = time.monotonic() + grace_s
        status = 0
        for place, process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("worker %d did not stop in %g s; killing it", place.index, grace_s)
                process.kill()
                process.join()
                status = 1
            self._forget(place, process)
        return status


def serve_workers(settings: ServerSettings, source: SettingsSource | None = None) -> int:
    """``dhow serve`` with ``--workers`` above 1: the supervisor's life; its exit status."""
    from dhow.server import configure_logging

    configure_logging(settings)
    holders = [_hold_port(settings.host, settings.http_port, "REST")]
    try:
        holders.append(_hold_port(settings.host, settings.grpc_port, "gRPC"))
        http_port, grpc_port = (int(holder.getsockname()[1]) for holder in holders)
        settings = dataclasses.replace(settings, http_port=http_port, grpc_port=grpc_port)
        # one run folder per REST port: only the server holding the port writes there
        run_dir = (settings.data_dir / "run" / str(http_port)).resolve()
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            return _supervise(settings, run_dir, source)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        for holder in holders:
            holder.close()


def _supervise(settings: ServerSettings, run_dir: Path, source: SettingsSource | None) -> int:
    """Prepare the run folder and the stores, then run the workers."""
    from dhow.rollouts.store import RegistryStore
    from dhow.serving.security import Security

    (run_dir / "metrics").mkdir(parents=True)
    (run_dir / "stats").mkdir()
    # read by prometheus_client when a worker first imports it (spawn: a fresh interpreter)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run_dir / "metrics")
    asyncio.run(Security(settings).prepare())
    RegistryStore.open(settings.registry_url()).close()
    log.info(
        "starting %d workers serving %s: REST on %s:%d, gRPC on %s:%d",
        settings.workers,
        settings.repository,
        settings.host,
        settings.http_port,
        settings.host,
        settings.grpc_port,
    )
    return Supervisor(settings, run_dir, source).run()
