"""Instances in worker processes (``instances.kind: process``): each hosts one runtime of one model version.

For runtimes that hold the interpreter lock while they compute (scikit-learn, custom Python), threads share one
core; processes use them all. A ``ProcessInstance`` is what the batcher runs: its ``infer`` is called from the
instance's worker thread, copies the batch into shared memory, and blocks on the socket (the lock released)
while the child computes (see ``child`` for the server's handle on one child, ``shm_channel`` for the wire,
``worker`` for the child itself).

The child is a fresh interpreter (``python -m``, never a fork of this threaded process) and loads only its own
model. A child that dies is restarted by the thread that relays its log: the batch it was computing fails
with an ``Unavailable`` that says so (the client may retry), and the next batch runs on the new child.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np

from dhow.core import affinity
from dhow.core.artifacts import installed_decryptor
from dhow.core.errors import DhowError, ModelFault, ModelLoadError, Unavailable
from dhow.core.model_config import ModelConfig
from dhow.runtimes.loading import Signature
from dhow.scheduling.instances.child import Child, ChildGone, log_child_line
from dhow.scheduling.instances.messages import WorkerStart, signature_from_wire
from dhow.scheduling.instances.shm_channel import MAX_MESSAGE, supported

__all__ = ["ProcessInstance", "load_process_instances"]

log = logging.getLogger("dhow.instances")


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
        self._child: Child | None = None
        self._starting: Child | None = None
        #: held while a batch runs and while the child is replaced: a batch never meets a half-started child
        self._lock = threading.Lock()
        self._closing = False

    def __repr__(self) -> str:
        return f"<ProcessInstance {self._what}>"

    @property
    def pid(self) -> int | None:
        """The live process's id (None while none runs): what resource metrics read."""
        child = self._child
        return child.process.pid if child is not None and child.process.poll() is None else None

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
            except ChildGone as gone:
                if gone.computed:
                    raise self._lost(child) from None
            # it died before the batch reached it: nothing was computed, so the batch runs on a new child
            child = self._current()
            try:
                return child.exchange(inputs, outputs)
            except ChildGone:
                raise self._lost(child) from None

    def _lost(self, child: Child) -> Unavailable:
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

    def _current(self) -> Child:
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

    def _restart(self) -> Child:
        config = self._config
        if config is None:
            raise ModelFault(f"{self._what} was never loaded")
        try:
            return self._replacement(config)
        except ModelLoadError as exc:
            # "instance process 0 of model m version 1 exited with ... while loading" names the instance already
            reason = exc.message if exc.message.startswith(self._what) else f"{self._what}: {exc.message}"
            raise ModelFault(f"{reason} (restarting it failed)") from None

    def _replacement(self, config: ModelConfig) -> Child:
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

    def _launch(self, config: ModelConfig, version_dir: Path) -> Child:
        label = f"dhow-{config.name}-{version_dir.name}-{self.index}"
        record = self._start_record(config, version_dir, label)
        child = Child.spawn(config, label, self._what)
        process = child.process
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

    def _await_ready(self, child: Child) -> Signature:
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
            return signature_from_wire(reply)
        except ModelLoadError:
            child.close()
            raise

    def _relay(self, child: Child, stream: IO[bytes], tag: str) -> None:
        """Log what the child writes, as this server's records; when it ends, restart the child if it died."""
        affinity.as_helper()  # (background work, off the event loop's CPU, with ``--cpu-affinity auto``)
        for line in stream:
            log_child_line(line, tag)
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
