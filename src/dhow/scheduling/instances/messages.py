"""What the server and an instance process tell each other besides a batch's arrays: the start record, the
signature in the answer to it, and the mark of a log line.

Both sides import this module and neither imports the other: the server never imports the child's entry
point (``worker``), so ``python -m`` finds that module unimported when it runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dhow.core.artifacts import Decryptor
from dhow.core.errors import ModelLoadError
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.runtimes.loading import Signature

__all__ = ["LOG_MARK", "WorkerStart", "signature_from_wire", "specs_to_wire"]

#: starts a log record's line on stderr: ``LOG_MARK`` + JSON ``[levelno, logger name, text]``
LOG_MARK = b"\x1edhow-log "


@dataclass(frozen=True, slots=True)
class WorkerStart:
    """The first message: pickled, as it comes from the server, which is trusted (it holds the artifact key)."""

    runtime: str
    version_dir: Path
    config: ModelConfig
    #: the server's artifact decryptor (its keyring), so that ``*.enc`` artifacts load here too
    decryptor: Decryptor | None
    log_level: int
    #: names this process's memory regions (``memfd:<label>-out``)
    label: str


def specs_to_wire(specs: tuple[TensorSpec, ...]) -> list[list[Any]]:
    return [[spec.name, spec.datatype, list(spec.shape), spec.optional] for spec in specs]


def signature_from_wire(reply: dict[str, Any]) -> Signature:
    """The signature in a child's answer to its start record (``specs_to_wire`` of its inputs and outputs)."""
    try:
        inputs = tuple(TensorSpec(n, d, tuple(s), bool(o)) for n, d, s, o in reply["inputs"])
        outputs = tuple(TensorSpec(n, d, tuple(s), bool(o)) for n, d, s, o in reply["outputs"])
    except (KeyError, TypeError, ValueError):
        raise ModelLoadError("an instance process answered its load with a malformed signature") from None
    return inputs, outputs
