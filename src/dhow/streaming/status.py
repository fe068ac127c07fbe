"""What a running consumer reports: its counters, written every few seconds to ``<data-dir>/streams/<name>.json``
(``<name>@<worker>.json`` for each worker of ``dhow stream run --workers N``; read by ``dhow stream status``), and
the same figures given to a ``Meter`` (the server's Prometheus metrics).
"""

from __future__ import annotations

import datetime
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from dhow.core.errors import InvalidInput

__all__ = ["Meter", "StreamStatus", "read_statuses", "status_folder"]


class Meter(Protocol):
    """Where a consumer's figures go besides its status file (``monitoring.streams.StreamMetrics``)."""

    def received(self, stream: str, count: int) -> None: ...

    def answered(self, stream: str, seconds: npt.NDArray[np.float64]) -> None:
        """Replies acknowledged (a batch's); ``seconds``: each one's time from its message's timestamp to then
        (end-to-end latency)."""
        ...

    def failed(self, stream: str, code: str, dead_lettered: bool) -> None: ...

    def batch(self, stream: str, size: int) -> None: ...

    def lag(self, stream: str, lags: dict[str, int]) -> None: ...


@dataclass(slots=True)
class StreamStatus:
    """A consumer's counters since it started (plain data, written as JSON)."""

    name: str
    model: str
    source: str
    sink: str
    dead_letter: str
    group: str
    state: str = "starting"
    received: int = 0
    answered: int = 0
    failed: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    batches: int = 0
    in_flight: int = 0
    paused: bool = False
    failures: Counter[str] = field(default_factory=Counter)
    lag: dict[str, int] = field(default_factory=dict)
    assignment: list[str] = field(default_factory=list)
    error: str = ""
    pid: int = field(default_factory=os.getpid)
    started_at: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat())
    started: float = field(default_factory=time.monotonic)
    #: which of ``--workers N`` processes this is (1 to N; 0: the stream's only process)
    worker: int = 0

    def as_dict(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        return {
            "name": self.name, "state": self.state, "model": self.model, "source": self.source, "sink": self.sink,
            "dead_letter": self.dead_letter, "group": self.group, "pid": self.pid, "started_at": self.started_at,
            "received": self.received, "answered": self.answered, "failed": self.failed,
            "dead_lettered": self.dead_lettered, "skipped": self.skipped, "failures": dict(self.failures),
            "batches": self.batches, "in_flight": self.in_flight, "paused": self.paused,
            "assignment": self.assignment, "lag": self.lag, "total_lag": sum(self.lag.values()),
            "answered_per_s": round(self.answered / elapsed, 1) if elapsed > 0 else 0.0,
            "updated_at": datetime.datetime.now(datetime.UTC).isoformat(),
            **({"error": self.error} if self.error else {}), **({"worker": self.worker} if self.worker else {}),
        }  # fmt: skip

    def write(self, folder: Path) -> None:
        """Replace the status file in one rename: a reader never sees half of it."""
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{self.name}.{self.pid}.tmp"
        temporary.write_bytes(orjson.dumps(self.as_dict(), option=orjson.OPT_INDENT_2))
        # '@' is in no stream's name: a worker's file is never another stream's
        os.replace(temporary, folder / (f"{self.name}@{self.worker}.json" if self.worker else f"{self.name}.json"))


def status_folder(data_dir: Path) -> Path:
    return data_dir / "streams"


def read_statuses(data_dir: Path, name: str = "") -> list[dict[str, Any]]:
    """The status of every consumer that ran with this data folder (or the one named)."""
    folder = status_folder(data_dir)
    if name:
        workers = sorted(folder.glob(f"{name}@*.json"))
        paths = workers if workers and not (folder / f"{name}.json").exists() else [folder / f"{name}.json", *workers]
    else:
        paths = sorted(folder.glob("*.json"))
    statuses = []
    for path in paths:
        try:
            statuses.append(orjson.loads(path.read_bytes()))
        except FileNotFoundError:
            known = ", ".join(sorted({p.stem.partition("@")[0] for p in folder.glob("*.json")})) or "none"
            raise InvalidInput(
                f"no stream {name!r} has run with the data folder {data_dir} (streams: {known})"
            ) from None
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"{path}: not a stream status ({exc})") from None
    return statuses
