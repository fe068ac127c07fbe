"""What the frameworks do in-process, with no server: the ceiling a server's throughput is compared with."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Limit:
    model: str
    framework: str
    batch: int
    threads: int
    rows_per_second: float
    #: "before" or "after" the servers of the model ran: the machine is shared, so the limit is taken twice
    when: str


def onnx_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _rows_per_second(run: Callable[[], object], batch: int, seconds: float) -> float:
    run()  # first call: allocations, thread pool start-up
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        run()
        calls += 1
    return calls * batch / elapsed


def onnx_limit(model: str, path: Path, features: int, batch: int, threads: int, seconds: float, when: str) -> Limit:
    session = onnx_session(path, threads)
    feeds = {"input": np.random.default_rng(0).standard_normal((batch, features)).astype(np.float32)}
    rate = _rows_per_second(lambda: session.run(None, feeds), batch, seconds)
    return Limit(model, "ONNX Runtime", batch, threads, rate, when)


def sklearn_limit(model: str, path: Path, features: int, batch: int, seconds: float, when: str) -> Limit:
    import joblib

    estimator = joblib.load(path)
    rows = np.random.default_rng(0).standard_normal((batch, features)).astype(np.float32)
    rate = _rows_per_second(lambda: estimator.predict(rows), batch, seconds)
    return Limit(model, "scikit-learn predict", batch, 1, rate, when)


def reference_outputs(path: Path, row: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """What the model answers for ``row`` in-process: the servers' answers are checked against it."""
    if path.suffix == ".onnx":
        session = onnx_session(path, 1)
        names = [output.name for output in session.get_outputs()]
        return dict(zip(names, session.run(names, {"input": row}), strict=True))
    import joblib

    estimator = joblib.load(path)
    return {name: np.asarray(getattr(estimator, name)(row)) for name in outputs}
