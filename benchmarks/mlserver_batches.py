"""What MLServer's adaptive batcher hands its models, counted where they compute: the peer's average batch size.

MLServer reports no batch sizes: its one batching metric, ``batch_request_queue``, is the queue's length when a
request arrives, and it is served by the metrics server the benchmark turns off. With adaptive batching MLServer
merges the queued requests into one ``InferenceRequest`` and calls the model's ``predict`` once for all of them
(without it, once per request). So the model counts: each process that runs one (a parallel worker, or the
server itself with ``parallel_workers: 0``) adds its ``predict`` calls and the requests in them to a file of its own,
``<pid>.counts`` (two int64) in the folder ``$DHOW_BENCH_BATCHES`` names; run.py reads the files at the start and the
end of each point. Every request of the benchmark is one row, so the rows of a call are its requests. Two adds
to a mapped file per batch: nothing the server would notice.

``SKLearnModel`` is MLServer's own scikit-learn runtime with the count added; ``mlserver_onnx.OnnxModel`` counts
likewise. This file runs inside MLServer's virtualenv.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver_sklearn import SKLearnModel as _SKLearnModel

_counts: np.ndarray | None = None
_pid = 0


def count_batch(payload: InferenceRequest) -> None:
    """One batch of the requests merged into ``payload``: its rows are its requests."""
    global _counts, _pid
    if _pid != os.getpid():  # a worker forked after import counts in a file of its own
        _pid, _counts = os.getpid(), _open(os.getpid())
    if _counts is not None and payload.inputs:
        _counts[0] += 1
        _counts[1] += payload.inputs[0].shape[0] if payload.inputs[0].shape else 1


def _open(pid: int) -> np.ndarray | None:
    folder = os.environ.get("DHOW_BENCH_BATCHES")
    if not folder:
        return None
    path = Path(folder) / f"{pid}.counts"
    path.write_bytes(bytes(16))
    with path.open("r+b") as file:
        mapped = mmap.mmap(file.fileno(), 16)
    return np.frombuffer(mapped, dtype=np.int64)


class SKLearnModel(_SKLearnModel):
    """``mlserver_sklearn.SKLearnModel``, counting the batches it computes."""

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        count_batch(payload)
        response: InferenceResponse = await super().predict(payload)
        return response
