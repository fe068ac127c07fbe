"""Instances in worker processes (``instances.kind: process``): each hosts one runtime of one model version.

For runtimes that hold the interpreter lock while they compute (scikit-learn, custom Python), threads share one
core; processes use them all. A ``ProcessInstance`` is what the batcher runs: its ``infer`` is called from the
instance's worker thread, copies the batch into shared memory, and blocks on the socket (the lock released)
while the child computes (see ``shm_channel`` for the wire, ``worker`` for the child).

The child is a fresh interpreter (``python -m``, never a fork of this threaded process) and loads only its own
model. A child that dies is restarted by the thread that relays its log: the batch it was computing fails
with a ``ModelFault`` that says so, and the next batch runs on the new child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from dhow.core import errors
from dhow.core.artifacts import installed_decryptor
from dhow.core.errors import DhowError, ModelFault, ModelLoadError, Unavailable
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.runtimes.loading import Signature, threads_for
from dhow.scheduling.instances.shm_channel import MAX_MESSAGE, Channel, Inbox, Outbox, region_size_for, supported
from dhow.scheduling.instances.worker import LOG_MARK, WorkerStart

__all__ = ["ProcessInstance", "load_process_instances"]

log = logging.getLogger("dhow.instances")

#: how long a child may take to unload and exit once its socket is closed, before it is killed
_EXIT_GRACE_S = 10.0
#: the thread counts the numeric libraries read at import: set per child so that instances share the cores
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: errors a child may name for a batch; any other name is reported as a ModelFault
_BATCH_ERRORS: dict[str, type[DhowError]] = {
    cls.__name__: cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, DhowError)
}


class _ChildGone(Exception):
    """The child's socket closed; ``computed`` says whether it may have started on the batch."""

    def __init__(self, computed: bool) -> None:
        super().__init__()
        self.computed = computed


class _Child:
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
            raise _ChildGone(computed=False) from None
        try:
            received = self.receive()
        except OSError:
            received = None
        if received is None:
            self.gone = True
            raise _ChildGone(computed=True)
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
    return kind(str(reply.get("error")))


class ProcessInstance:
    """One instance of a model version in its own process, behind the ``Runtime`` interface."""

    #: the batcher hands it a batch's requests unconcatenated; their rows are copied once, into shared memory
    takes_row_parts = True

    def __init__(self, runtime: str, index: int) -> None:
        self.runtime = runtime
        self.index = index
        self.device = "cpu"
        self._config: ModelConfig | None = None
        self._version_dir = Path()
        self._signature: Signature = ((), ())
        self._child: _Child | None = None
        self._starting: _Child | None = None
        #: held while a batch runs and while the child is replaced: a batch never meets a half-started child
        self._lock = threading.Lock()
        self._closing = False

    def __repr__(self) -> str:
        return f"<ProcessInstance {self._what}>"

    @property
    def _what(self) -> str:
        name = self._config.name if self._config is not None else "?"
        return f"instance process {self.index} of model {name} version {self._version_dir.name}"

    # -- the Runtime interface ------------------------------------------------------------

    def load(self, version_dir: Path, config: ModelConfig) -> None:
        self.start(version_dir, config)
        self.wait_ready()

    def signature(self) -> Signature:
        return self._signature

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        with self._lock:
            child = self._current()
            try:
                return child.exchange(inputs, outputs)
            except _ChildGone as gone:
                if gone.computed:
                    raise self._lost(child) from None
            # it died before the batch reached it: nothing was computed, so the batch runs on a new child
            child = self._current()
            try:
                return child.exchange(inputs, outputs)
            except _ChildGone:
                raise self._lost(child) from None

    def _lost(self, child: _Child) -> Unavailable:
        # the relay thread sees the same exit and restarts the child once the lock is free; inference has no
        # side effects to undo, so the client may simply send the request again
        return Unavailable(f"{self._what} exited with {child.exit_status()}; restarting; retry")

    def unload(self) -> None:
        self._closing = True
        starting = self._starting
        if starting is not None:
            starting.halt()  # a restart waits for this load holding the lock: end the load, not wait for it
        with self._lock:
            children = [child for child in (self._child, self._starting) if child is not None]
            self._child = self._starting = None
        for child in children:
            child.close()

    # -- starting and restarting ----------------------------------------------------------

    def start(self, version_dir: Path, config: ModelConfig) -> None:
        """Start the child and hand it the model; ``wait_ready`` waits for its load (start all, then wait)."""
        reason = supported()
        if reason:
            raise ModelLoadError(f"{config.name}/model.yaml: {reason}")
        self._config, self._version_dir = config, version_dir
        self._starting = self._launch(config, version_dir)

    def wait_ready(self) -> None:
        child, self._starting = self._starting, None
        if child is None:
            raise ModelLoadError(f"{self._what} was not started")
        self._signature = self._await_ready(child)
        child.serving = True
        self._child = child

    def _current(self) -> _Child:
        """The live child; a dead one is replaced first (under the lock, by the caller), unless unloading."""
        if self._closing:
            raise Unavailable(f"{self._what} is being unloaded; retry")
        child = self._child
        if child is not None and not child.gone and child.process.poll() is None:
            return child
        self._child = None
        if child is not None:
            child.close(join_relay=False)  # its relay may be waiting for the lock this caller holds
        fresh = self._restart()
        fresh.serving = True
        self._child = fresh
        log.info("%s restarted (pid %d)", self._what, fresh.process.pid)
        return fresh

    def _restart(self) -> _Child:
        config = self._config
        if config is None:
            raise ModelFault(f"{self._what} was never loaded")
        try:
            return self._replacement(config)
        except ModelLoadError as exc:
            # "instance process 0 of model m version 1 exited with ... while loading" names the instance already
            reason = exc.message if exc.message.startswith(self._what) else f"{self._what}: {exc.message}"
            raise ModelFault(f"{reason} (restarting it failed)") from None

    def _replacement(self, config: ModelConfig) -> _Child:
        """A new child with this version's signature; in ``_starting`` while it loads, where unload can halt it."""
        child = self._starting = self._launch(config, self._version_dir)
        try:
            if self._closing:
                child.halt()  # unload may have looked for a starting child before this one was there
            signature = self._await_ready(child)
        finally:
            self._starting = None
        if signature != self._signature:
            child.close()
            # the files changed under a loaded version: serving a different model under this one's name is wrong
            raise ModelLoadError("the model it loaded now has another signature; reload the model")
        return child

    def _launch(self, config: ModelConfig, version_dir: Path) -> _Child:
        label = f"dhow-{config.name}-{version_dir.name}-{self.index}"
        record = self._start_record(config, version_dir, label)
        process, ours = self._spawn(config, label)
        child = _Child(process, Channel(ours), label, region_size_for(config.inputs or (), config.max_batch_size))
        tag = f"[{config.name} v{version_dir.name} instance {self.index} pid {process.pid}]"
        assert process.stdout is not None  # stdout=PIPE
        child.relay = threading.Thread(
            target=self._relay, args=(child, process.stdout, tag), name=f"{label}-log", daemon=True
        )
        child.relay.start()
        # the key travels here, over the socket: never in the environment, the arguments or a file
        try:
            child.channel.send_bytes(record)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a child that died at once: _await_ready says how
        except OSError as exc:  # EMSGSIZE, ENOBUFS: the child would wait for its record forever
            child.close()
            raise ModelLoadError(f"{self._what}: cannot hand the model's settings to its process: {exc}") from None
        return child

    def _start_record(self, config: ModelConfig, version_dir: Path, label: str) -> bytes:
        level = logging.getLogger().getEffectiveLevel()
        start = WorkerStart(self.runtime, version_dir, config, installed_decryptor(), level, label)
        try:
            record = pickle.dumps(start)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{self._what}: cannot hand the model's settings to its process: {exc}") from None
        if len(record) > MAX_MESSAGE:
            raise ModelLoadError(f"{config.name}/model.yaml is too large to hand to an instance process")
        return record

    def _spawn(self, config: ModelConfig, label: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                # the label is for ps and the operator: it names the model an instance process hosts
                [sys.executable, "-m", "dhow.scheduling.instances.worker", str(theirs.fileno()), label],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=_child_environment(config),
            )
        except OSError as exc:
            ours.close()
            raise ModelLoadError(f"{self._what}: cannot start its process: {exc}") from None
        finally:
            theirs.close()
        return process, ours

    def _await_ready(self, child: _Child) -> Signature:
        try:
            received = child.receive()
        except (OSError, ModelFault):
            received = None
        if received is None:
            child.close()
            raise ModelLoadError(f"{self._what} exited with {child.exit_status()} while loading; see the server log")
        reply, _ = received
        if not isinstance(reply, dict) or "error" in reply:
            child.close()
            raise ModelLoadError(str(reply.get("error")) if isinstance(reply, dict) else "a malformed answer")
        self.device = str(reply.get("device", "cpu"))
        try:
            return _signature(reply)
        except ModelLoadError:
            child.close()
            raise

    def _relay(self, child: _Child, stream: IO[bytes], tag: str) -> None:
        """Log what the child writes, as this server's records; when it ends, restart the child if it died."""
        for line in stream:
            _log_line(line, tag)
        stream.close()
        status = child.exit_status()
        if self._closing or not child.serving:
            return  # unloaded, or a load that failed (which its caller reports)
        log.warning("%s (pid %d) exited with %s; restarting it", self._what, child.process.pid, status)
        with self._lock:
            if self._closing or self._child is not child:
                return  # a batch found it dead and has replaced it already
            try:
                self._current()
            except DhowError as exc:
                if not self._closing:  # an unload halted the restart
                    log.error("%s; the next batch will try again", exc.message)


def load_process_instances(config: ModelConfig, version_dir: Path) -> list[ProcessInstance]:
    """Start every instance's process, then wait for each to load: the children load side by side."""
    instances = [ProcessInstance(config.runtime, index) for index in range(config.instances.count)]
    try:
        for instance in instances:
            instance.start(version_dir, config)
        for instance in instances:
            instance.wait_ready()
    except BaseException:
        for instance in instances:
            instance.unload()
        raise
    return instances


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


def _signature(reply: dict[str, Any]) -> Signature:
    try:
        inputs = tuple(TensorSpec(n, d, tuple(s), bool(o)) for n, d, s, o in reply["inputs"])
        outputs = tuple(TensorSpec(n, d, tuple(s), bool(o)) for n, d, s, o in reply["outputs"])
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError("an instance process answered its load with a malformed signature") from None
    return inputs, outputs


def _log_line(line: bytes, tag: str) -> None:
    if line.startswith(LOG_MARK):
        try:
            level, name, text = orjson.loads(line[len(LOG_MARK) :])
            logging.getLogger(str(name)).log(int(level), "%s %s", tag, str(text).rstrip())
            return
        except (orjson.JSONDecodeError, TypeError, ValueError):
            pass
    # not a log record: a print, a traceback, a library's own noise; an operator should see it
    log.warning("%s %s", tag, line.decode("utf-8", errors="replace").rstrip())
