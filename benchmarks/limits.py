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


@dataclass(frozen=True)
class CpuPerRow:
    """ONNX Runtime alone: the CPU time (every thread of the process) it takes per row, at one batch size."""

    model: str
    batch: int
    threads: int
    cpu_us: float
    when: str


def onnx_session(path: Path, threads: int, spinning: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:  # as dhow runs its sessions: an idle thread waits without burning CPU time
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_cpu_per_row(
    model: str, path: Path, features: int, batch: int, threads: int, seconds: float, when: str
) -> CpuPerRow:
    """CPU µs per row of ``session.run`` on batches of ``batch`` rows, with dhow's session options (no spinning):
    what the server's CPU per inference is set against. The process does nothing else meanwhile."""
    session = onnx_session(path, threads, spinning=False)
    feeds = {"input": np.random.default_rng(0).standard_normal((batch, features)).astype(np.float32)}
    session.run(None, feeds)
    rows, cpu, start = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, feeds)
        rows += batch
    return CpuPerRow(model, batch, threads, (time.process_time() - cpu) / rows * 1e6, when)


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
