"""Per-version statistics in the shape of Triton's statistics extension.

The counters are slots: a list of ints in a server of one process, or, when several worker processes share
the ports (``share_statistics``), int64 slots in a file per worker, model and version mapped into memory, so
that any worker can answer with the server-wide sums. They are updated only from the event loop thread
(workers hand their timings back): one writer per buffer, so no locks, and aligned 8-byte stores, which a
reader in another process sees whole. Both are indexed alike, so there is one code path; only where the slots
live differs. A list's item costs ~0.6k instructions less to update than a mapped int64's (memoryview packs
and unpacks it): ~2.4k a request, which records four.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

__all__ = ["BatchTimings", "Duration", "ModelStats", "StatsFolder", "share_statistics"]

log = logging.getLogger("dhow.stats")

#: the (count, ns) pairs of Triton's inference_stats, in slot order
_DURATIONS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)
_SUCCESS, _FAIL, _QUEUE, _INPUT, _INFER, _OUTPUT, _CACHE_HIT, _CACHE_MISS = range(0, 2 * len(_DURATIONS), 2)
_INFERENCE_COUNT = 2 * len(_DURATIONS)
_EXECUTION_COUNT = _INFERENCE_COUNT + 1
_LAST_INFERENCE = _INFERENCE_COUNT + 2
#: a private list, or a worker's mapped file (``StatsFolder.slots``)
Slots = list[int] | memoryview
#: slots before the per-batch-size ones
_HEADER = _INFERENCE_COUNT + 3
#: per batch size: compute input, infer and output, each (count, ns)
_PER_SIZE = 6
#: batch sizes counted when none is given (models give their max_batch_size)
DEFAULT_BATCH_SIZES = 256


class Duration:
    """A (count, nanoseconds) pair of slots."""

    __slots__ = ("_at", "_slots")

    def __init__(self, slots: Slots, at: int) -> None:
        self._slots = slots
        self._at = at

    @property
    def count(self) -> int:
        return int(self._slots[self._at])

    @property
    def ns(self) -> int:
        return int(self._slots[self._at + 1])

    def add(self, ns: int, count: int = 1) -> None:
        slots, at = self._slots, self._at
        slots[at] += count
        slots[at + 1] += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchTimings:
    """What one executed batch cost, measured in the thread that ran it."""

    size: int
    input_ns: int
    infer_ns: int
    output_ns: int


class StatsFolder:
    """The statistics files of the workers sharing one server's ports: ``<root>/<model>.<version>/worker-<n>``.

    A worker's file outlives the worker: its successor in the same place opens it again and counts on, and a
    reload of the model in a worker counts on too, so the sums never go down while the server runs (load
    generators read them before and after a window and subtract).
    """

    def __init__(self, root: Path, worker: int) -> None:
        self.root = root
        self.worker = worker

    def _folder(self, name: str, version: int) -> Path:
        # quoted: a model name never makes a path; the version suffix keeps "." and ".." out
        quoted = quote(name, safe="")
        if len(quoted) > 128:  # a file name holds 255 bytes; a long (or non-ASCII) name quotes to more
            quoted = f"{quoted[:64]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
        return self.root / f"{quoted}.{version}"

    def slots(self, name: str, version: int, count: int) -> memoryview:
        """This worker's slots of a version (made, or grown, to ``count``), mapped into memory."""
        folder = self._folder(name, version)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"worker-{self.worker}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = max(os.fstat(fd).st_size, 8 * count)
            os.ftruncate(fd, size)  # new slots read zero
            mapped = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return memoryview(mapped).cast("q")

    def totals(self, name: str, version: int) -> list[int]:
        """Every worker's slots of a version, summed (the last inference: the latest)."""
        sums = np.zeros(_HEADER, dtype=np.int64)
        last = 0
        folder = self._folder(name, version)
        for entry in sorted(os.listdir(folder)):
            # mapped, not read(): read() copies bytes, and could see a slot half old, half new; loads from the
            # mapping take each aligned 8-byte slot whole, as its writer stores it
            with open(folder / entry, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size < 8 * _HEADER:  # being made by its worker: nothing counted yet
                    continue
                mapped = mmap.mmap(file.fileno(), size - size % 8, access=mmap.ACCESS_READ)
            try:
                slots = np.frombuffer(mapped, dtype=np.int64)
                if slots.size > sums.size:
                    sums = np.concatenate([sums, np.zeros(slots.size - sums.size, dtype=np.int64)])
                sums[: slots.size] += slots
                last = max(last, int(slots[_LAST_INFERENCE]))
                del slots  # the mapping cannot close while an array views it
            finally:
                mapped.close()
        sums[_LAST_INFERENCE] = last
        return [int(value) for value in sums]


_shared: StatsFolder | None = None


def share_statistics(root: Path, worker: int) -> None:
    """Keep this process's statistics in files under ``root`` as worker ``worker``, summed with the others'.

    Called once by a worker process before it loads a model.
    """
    global _shared
    _shared = StatsFolder(root, worker)


class ModelStats:
    def __init__(
        self, max_batch_size: int = DEFAULT_BATCH_SIZES, *, shared: tuple[StatsFolder, str, int] | None = None
    ) -> None:
        #: batches of 1 to this many rows are counted per size (no batching: batches of 1)
        self.batch_sizes = max(max_batch_size, 1)
        count = _HEADER + _PER_SIZE * self.batch_sizes
        if shared is None:
            self._slots: Slots = [0] * count
        else:
            folder, name, version = shared
            self._slots = folder.slots(name, version, count)
        self._shared = shared
        slots = self._slots
        self.success, self.fail, self.queue = Duration(slots, _SUCCESS), Duration(slots, _FAIL), Duration(slots, _QUEUE)
        self.compute_input, self.compute_infer = Duration(slots, _INPUT), Duration(slots, _INFER)
        self.compute_output = Duration(slots, _OUTPUT)
        self.cache_hit, self.cache_miss = Duration(slots, _CACHE_HIT), Duration(slots, _CACHE_MISS)
        self._oversize_logged = False

    @classmethod
    def for_version(cls, name: str, version: int, max_batch_size: int) -> ModelStats:
        """The statistics of a version being loaded: private, or in this worker's file when they are shared."""
        return cls(max_batch_size, shared=None if _shared is None else (_shared, name, version))

    @property
    def inference_count(self) -> int:
        """Requests that completed (Triton counts inferences, i.e. rows, in inference_count)."""
        return int(self._slots[_INFERENCE_COUNT])

    @property
    def execution_count(self) -> int:
        return int(self._slots[_EXECUTION_COUNT])

    @property
    def last_inference(self) -> int:
        """Milliseconds since the epoch of the last completed request."""
        return int(self._slots[_LAST_INFERENCE])

    def record_batch(self, timings: BatchTimings, requests: int) -> None:
        """One executed batch: per-request compute shares go to the totals, the batch to its size."""
        slots, size = self._slots, timings.size
        input_ns, infer_ns, output_ns = timings.input_ns, timings.infer_ns, timings.output_ns
        slots[_EXECUTION_COUNT] += 1
        slots[_INPUT] += requests
        slots[_INPUT + 1] += input_ns * requests
        slots[_INFER] += requests
        slots[_INFER + 1] += infer_ns * requests
        slots[_OUTPUT] += requests
        slots[_OUTPUT + 1] += output_ns * requests
        if not 1 <= size <= self.batch_sizes:
            # the data plane and the batcher keep batches within max_batch_size: this is a bug, say so once
            if not self._oversize_logged:
                log.error("a batch of %d rows is beyond the %d sizes counted", size, self.batch_sizes)
                self._oversize_logged = True
            return
        at = _HEADER + _PER_SIZE * (size - 1)
        slots[at] += 1
        slots[at + 1] += input_ns
        slots[at + 2] += 1
        slots[at + 3] += infer_ns
        slots[at + 4] += 1
        slots[at + 5] += output_ns

    def record_request(self, ok: bool, total_ns: int, rows: int) -> None:
        slots = self._slots
        if ok:
            slots[_SUCCESS] += 1
            slots[_SUCCESS + 1] += total_ns
            slots[_INFERENCE_COUNT] += rows
            slots[_LAST_INFERENCE] = time.time_ns() // 1_000_000
        else:
            slots[_FAIL] += 1
            slots[_FAIL + 1] += total_ns

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        """Triton's form; with shared statistics, the sums of every worker of the server."""
        if self._shared is None:
            values = list(self._slots)
        else:
            folder, shared_name, number = self._shared
            values = folder.totals(shared_name, number)

        def duration(at: int) -> dict[str, int]:
            return {"count": values[at], "ns": values[at + 1]}

        batch_stats = []
        for index in range((len(values) - _HEADER) // _PER_SIZE):
            at = _HEADER + _PER_SIZE * index
            if values[at] or values[at + 2] or values[at + 4]:
                batch_stats.append(
                    {
                        "batch_size": index + 1,
                        "compute_input": duration(at),
                        "compute_infer": duration(at + 2),
                        "compute_output": duration(at + 4),
                    }
                )
        return {
            "name": name,
            "version": version,
            "last_inference": values[_LAST_INFERENCE],
            "inference_count": values[_INFERENCE_COUNT],
            "execution_count": values[_EXECUTION_COUNT],
            "inference_stats": {key: duration(2 * index) for index, key in enumerate(_DURATIONS)},
            "batch_stats": batch_stats,
        }
