"""Per-version statistics in the shape of Triton's statistics extension.

Updated only from the event loop thread (workers hand their timings back), so no locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchTimings:
    """What one executed batch cost, measured in the thread that ran it."""

    size: int
    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass(slots=True)
class _BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    #: requests that completed (Triton counts inferences, i.e. rows, in inference_count)
    inference_count: int = 0
    execution_count: int = 0
    #: milliseconds since the epoch of the last completed request
    last_inference: int = 0
    batches: dict[int, _BatchStat] = field(default_factory=dict)

    def record_batch(self, timings: BatchTimings, requests: int) -> None:
        """One executed batch: per-request compute shares go to the totals, the batch to its size."""
        self.execution_count += 1
        self.compute_input.add(timings.input_ns * requests, requests)
        self.compute_infer.add(timings.infer_ns * requests, requests)
        self.compute_output.add(timings.output_ns * requests, requests)
        stat = self.batches.get(timings.size)
        if stat is None:
            stat = self.batches[timings.size] = _BatchStat()
        stat.compute_input.add(timings.input_ns)
        stat.compute_infer.add(timings.infer_ns)
        stat.compute_output.add(timings.output_ns)

    def record_request(self, ok: bool, total_ns: int, rows: int) -> None:
        if ok:
            self.success.add(total_ns)
            self.inference_count += rows
            self.last_inference = time.time_ns() // 1_000_000
        else:
            self.fail.add(total_ns)

    def as_dict(self, name: str, version: str) -> dict[str, Any]:
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": self.cache_hit.as_dict(),
                "cache_miss": self.cache_miss.as_dict(),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": stat.compute_input.as_dict(),
                    "compute_infer": stat.compute_infer.as_dict(),
                    "compute_output": stat.compute_output.as_dict(),
                }
                for size, stat in sorted(self.batches.items())
            ],
        }
