"""The server's handle on one running instance process: how it is started, handed a batch, and ended.

Which child serves, and when a dead one is replaced, is ``ProcessInstance``'s business (``process``); this
module knows one child only, from its ``python -m`` start to its exit status.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from dhow.core import errors
from dhow.core.errors import DhowError, ModelFault, ModelLoadError
from dhow.core.model_config import ModelConfig
from dhow.runtimes.loading import threads_for
from dhow.scheduling.instances.messages import LOG_MARK
from dhow.scheduling.instances.shm_channel import Channel, Inbox, Outbox, region_size_for

__all__ = ["WORKER_MODULE", "Child", "ChildGone", "log_child_line"]

log = logging.getLogger("dhow.instances")

#: the module an instance process runs (``python -m``): a fresh interpreter, never a fork of this threaded one
WORKER_MODULE = "dhow.scheduling.instances.worker"
#: how long a child may take to unload and exit once its socket is closed, before it is killed
_EXIT_GRACE_S = 10.0
#: the thread counts the numeric libraries read at import: set per child so that instances share the cores
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: errors a child may name for a batch; any other name is reported as a ModelFault
_BATCH_ERRORS: dict[str, type[DhowError]] = {
    cls.__name__: cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, DhowError)
}


class ChildGone(Exception):
    """The child's socket closed; ``computed`` says whether it may have started on the batch."""

    def __init__(self, computed: bool) -> None:
        super().__init__()
        self.computed = computed


class Child:
    """One running instance process: its socket, the two shared-memory regions, and its log relay."""

    def __init__(self, process: subprocess.Popen[bytes], channel: Channel, label: str, inputs_size: int) -> None:
        self.process = process
        self.channel = channel
        self.inputs = Outbox(f"{label}-in", inputs_size)
        self.outputs = Inbox()
        self.gone = False
        #: it has served (or was ready to): its death is news, a failed load's is not
        self.serving = False
        self.relay: threading.Thread | None = None
        #: ends readable when the process does: its death is seen even if a process it started holds the socket
        self._pidfd = _pidfd(process.pid)
        self._socket_fd = channel.sock.fileno()
        self._ready = select.poll()
        self._ready.register(self._socket_fd, select.POLLIN)
        if self._pidfd is not None:
            self._ready.register(self._pidfd, select.POLLIN)

    @classmethod
    def spawn(cls, config: ModelConfig, label: str, what: str) -> Child:
        """Start an instance process for ``config``; ``what`` names the instance in the error if it cannot start."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                # the label is for ps and the operator: it names the model an instance process hosts
                [sys.executable, "-m", WORKER_MODULE, str(theirs.fileno()), label],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=_child_environment(config),
            )
        except OSError as exc:
            ours.close()
            raise ModelLoadError(f"{what}: cannot start its process: {exc}") from None
        finally:
            theirs.close()
        return cls(process, Channel(ours), label, region_size_for(config.inputs or (), config.max_batch_size))

    def receive(self) -> tuple[Any, int | None] | None:
        """The child's next message; ``None`` once its socket closed or its process ended without answering."""
        if not any(fd == self._socket_fd for fd, _ in self._ready.poll()):
            return None
        return self.channel.receive()

    def exchange(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        header, grown = self.inputs.pack(inputs)
        try:
            self.channel.send({"inputs": header, "outputs": list(outputs)}, grown.fd if grown is not None else None)
        except OSError:
            self.gone = True
            raise ChildGone(computed=False) from None
        try:
            received = self.receive()
        except OSError:
            received = None
        if received is None:
            self.gone = True
            raise ChildGone(computed=True)
        reply, fd = received
        if not isinstance(reply, dict) or "error" in reply:
            if fd is not None:
                os.close(fd)
            if grown is not None:
                self.inputs.close()  # the child may have failed to map it: the next batch sends a fresh one
            raise _batch_error(reply)
        try:
            # copied out: the region is rewritten by the next batch while these rows are still being answered
            return self.outputs.unpack(reply.get("outputs"), fd, copy=True)
        except ModelFault:
            if fd is not None:  # a region it sends once and this side could not map: replace the child
                self.gone = True
            raise

    def exit_status(self) -> str:
        """How the process ended ("signal 9 (SIGKILL)", "code 1"), waiting for it briefly if it is ending."""
        try:
            code = self.process.wait(_EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            return "its socket closed while it still runs"
        if code >= 0:
            return f"code {code}"
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:  # a real-time signal has no name
            return f"signal {-code}"

    def halt(self) -> None:
        """End a load without taking the lock: whoever waits for its answer wakes; a loading child has no state."""
        with contextlib.suppress(OSError):
            self.channel.sock.shutdown(socket.SHUT_RDWR)
        self.process.kill()

    def close(self, *, join_relay: bool = True) -> None:
        """Close the socket (the child unloads and exits), kill it if it lingers, release the regions; then wait
        for the relay to log its last lines, unless the caller holds the lock that relay may be waiting for."""
        self.channel.close()
        try:
            self.process.wait(_EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if join_relay and self.relay is not None:
            self.relay.join(_EXIT_GRACE_S)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self.inputs.close()
        self.outputs.close()


def _batch_error(reply: object) -> DhowError:
    if not isinstance(reply, dict):
        return ModelFault("instance channel: an answer that is not an object")
    kind = _BATCH_ERRORS.get(str(reply.get("kind")), ModelFault)
    if kind is ModelLoadError:
        kind = ModelFault
    error = kind(str(reply.get("error")))
    if isinstance(error, ModelFault):
        error.trace = str(reply.get("trace") or "")  # the model ran in the child: its traceback came as text
    return error


def _child_environment(config: ModelConfig) -> dict[str, str]:
    # DHOW_* settings stay here: they may hold secrets (DHOW_KEK) that model code has no business reading
    environment = {name: value for name, value in os.environ.items() if not name.startswith("DHOW_")}
    threads = str(threads_for(config))
    environment.update(dict.fromkeys(_THREAD_VARIABLES, threads))
    environment["PYTHONUNBUFFERED"] = "1"  # what a model prints reaches the log when printed
    return environment


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:  # before Linux 5.3, or refused by a sandbox: the socket's end alone tells
        return None


def log_child_line(line: bytes, tag: str) -> None:
    """Log one line a child wrote: its own log records as this server's, anything else as a warning."""
    if line.startswith(LOG_MARK):
        try:
            level, name, text = orjson.loads(line[len(LOG_MARK) :])
            logging.getLogger(str(name)).log(int(level), "%s %s", tag, str(text).rstrip())
            return
        except (orjson.JSONDecodeError, TypeError, ValueError):
            pass
    # not a log record: a print, a traceback, a library's own noise; an operator should see it
    log.warning("%s %s", tag, line.decode("utf-8", errors="replace").rstrip())
