"""An instance process: ``python -m dhow.scheduling.instances.worker FD LABEL`` hosts one runtime of one model
version.

The server (``process``) starts it with one end of a socket at descriptor FD (LABEL, e.g.
``dhow-fraud-1-0``, only names the model, version and instance in ``ps``). The first message is the
pickled ``WorkerStart`` (``messages``; from the server, which is trusted: it holds the config and the artifact
key); the process loads only that model and answers with its signature, or with why it cannot load. Then each
message is a batch (see ``shm_channel``), answered with the outputs or the error. When the socket closes (the
server unloads the model, or died) the process unloads and exits: it never outlives its server.

Log records go to the server as lines on stderr, which logs them through its own handlers (and their PII
masking); anything else the model prints reaches the server's log as plain lines.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import sys
import traceback

import orjson

from dhow.core import affinity
from dhow.core.artifacts import install_decryptor
from dhow.core.errors import DhowError, ModelFault, ModelLoadError
from dhow.core.heap import settle_heap
from dhow.runtimes.base import Runtime, create_runtime
from dhow.scheduling.instances.messages import LOG_MARK, WorkerStart, specs_to_wire
from dhow.scheduling.instances.shm_channel import Channel, Inbox, Outbox, region_size_for

__all__ = ["main"]

#: error messages are cut to this many characters: they travel in one message
_MESSAGE_CHARS = 8000


class _ServerLogHandler(logging.Handler):
    """Writes each record as one line the server parses and logs as its own."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            sys.stderr.buffer.write(LOG_MARK + orjson.dumps([record.levelno, record.name, text]) + b"\n")
            sys.stderr.buffer.flush()
        except Exception:
            self.handleError(record)


def main(argv: list[str]) -> int:
    # this process lives as long as its socket: a Ctrl-C or a SIGTERM sent to the whole group (a terminal,
    # systemd) stops the server, which finishes its batches and then closes the socket, ending this one
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    affinity.as_any()  # (started by the pinned event loop's thread: every CPU again, with ``--cpu-affinity auto``)
    os.environ.pop(affinity.PLAN_ENV, None)  # the server's plan, for its own children: not the model's
    fd = int(argv[1])
    # pass_fds left it inheritable: a process the model starts would hold it, and outlive this one unseen
    os.set_inheritable(fd, False)
    channel = Channel(socket.socket(fileno=fd))
    received = channel.receive_bytes()
    if received is None:
        return 0
    start: WorkerStart = pickle.loads(received[0])
    root = logging.getLogger()
    root.addHandler(_ServerLogHandler())
    root.setLevel(start.log_level)
    logging.captureWarnings(True)
    install_decryptor(start.decryptor)
    try:
        runtime = _load(start)
    except DhowError as exc:
        channel.send({"error": _cut(exc.message)})
        return 1
    settle_heap()
    inputs, outputs = runtime.signature()
    channel.send({"inputs": specs_to_wire(inputs), "outputs": specs_to_wire(outputs), "device": runtime.device})
    inbox = Inbox()
    outbox = Outbox(f"{start.label}-out", region_size_for(outputs, start.config.max_batch_size))
    try:
        while _serve_one(channel, runtime, inbox, outbox, start.config.name):
            pass
    except ConnectionError:
        pass  # the server went away while this answered: there is no one left to answer
    runtime.unload()
    return 0


def _load(start: WorkerStart) -> Runtime:
    runtime = create_runtime(start.runtime)
    try:
        runtime.load(start.version_dir, start.config)
    except DhowError:
        raise
    except Exception as exc:  # what a runtime did not turn into a ModelLoadError itself
        where = f"{start.config.name} version {start.version_dir.name}"
        raise ModelLoadError(f"{where}: loading failed: {type(exc).__name__}: {exc}") from None
    return runtime


def _serve_one(channel: Channel, runtime: Runtime, inbox: Inbox, outbox: Outbox, model: str) -> bool:
    """Compute one batch and answer it; ``False`` once the server has closed the socket."""
    received = channel.receive()
    if received is None:
        return False
    message, fd = received
    try:
        inputs = inbox.unpack(message.get("inputs"), fd, copy=False)
        produced = runtime.infer(inputs, message.get("outputs") or ())
        header, grown = outbox.pack(produced)
    except DhowError as exc:
        trace = _trace(exc) if isinstance(exc, ModelFault) else ""
        channel.send({"error": _cut(exc.message), "kind": type(exc).__name__, "trace": trace})
        return True
    except Exception as exc:  # a runtime's own fault, not turned into a ModelFault by it
        error = _cut(f"model {model} raised {type(exc).__name__}: {exc}")
        channel.send({"error": error, "kind": "ModelFault", "trace": _trace(exc)})
        return True
    channel.send({"outputs": header}, grown.fd if grown is not None else None)
    return True


def _trace(exc: BaseException) -> str:
    """Where the model failed, for the server's log (the client never sees it): the model's own exception."""
    return _cut("".join(traceback.format_exception(exc)))


def _cut(message: str) -> str:
    return message if len(message) <= _MESSAGE_CHARS else message[:_MESSAGE_CHARS] + "…"


if __name__ == "__main__":
    sys.exit(main(sys.argv))
