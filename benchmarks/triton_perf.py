"""Triton's perf_analyzer on dhow: the cross-check of our generators, and Triton's server-side breakdown.

perf_analyzer cannot drive MLServer 1.7.1 (it first reads ``/v2/models/{m}/config`` over REST or the
``ModelConfig`` RPC over gRPC, which MLServer lacks: "failed to get model config"), so it runs on dhow
only, with the requests our generators send: the same rows (``--input-data`` JSON file) and, over REST,
JSON tensors both ways (``--input-tensor-format json --output-tensor-format json``).
"""

from __future__ import annotations

import csv
import json
import re
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from peers import PerfAnalyzer


@dataclass(frozen=True)
class PerfPoint:
    command: str
    throughput: float
    p50_ms: float
    p99_ms: float
    #: Triton's server-side averages per request, in µs, read from dhow's /stats by perf_analyzer
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float
    average_batch: float
    #: perf_analyzer's own CPU time over its run, in cores (1.0 = one core busy all the time)
    generator_cores: float


def write_input_data(path: Path, rows: list[np.ndarray]) -> None:
    """perf_analyzer's ``--input-data`` file: one entry per request, shapes without the batch dimension."""
    entries = [{"input": {"content": row.ravel().tolist(), "shape": list(row.shape[1:])}} for row in rows]
    path.write_text(json.dumps({"data": entries}), encoding="utf-8")


def measure(
    analyzer: PerfAnalyzer,
    model: str,
    address: str,
    protocol: str,
    concurrency: int,
    input_data: Path,
    outputs: tuple[str, ...],
    window_ms: int,
    report: Path,
) -> PerfPoint | str:
    """One point; answers perf_analyzer's figures, or why there are none."""
    args = ["-m", model, "-u", address, "-i", protocol, "--concurrency-range", str(concurrency)]
    # on a shared 2-core machine three windows rarely agree within the default 10%: a loose check, more tries
    args += ["--input-data", str(input_data), "-p", str(window_ms), "-s", "50", "-r", "8", "-f", str(report)]
    if protocol == "http":
        args += ["--input-tensor-format", "json", "--output-tensor-format", "json"]
    command = analyzer.command(*args)
    shown = "perf_analyzer " + " ".join(args).replace(str(input_data), input_data.name).replace(str(report), "out.csv")
    if outputs:
        shown += f"  (asks for every output; our generators ask for {', '.join(outputs)} only)"
    cpu_before, start = _children_cpu(), time.perf_counter()
    done = subprocess.run(command, env=analyzer.env, capture_output=True, text=True, timeout=300)
    cores = (_children_cpu() - cpu_before) / (time.perf_counter() - start)
    if done.returncode != 0 or not report.exists():
        return f"perf_analyzer failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-300:]}"
    with report.open(newline="") as file:
        row = next(csv.DictReader(file))
    inferences = re.search(r"Inference count: (\d+)", done.stdout)
    executions = re.search(r"Execution count: (\d+)", done.stdout)
    batch = (
        int(inferences[1]) / int(executions[1]) if inferences and executions and int(executions[1]) else float("nan")
    )
    return PerfPoint(
        shown,
        float(row["Inferences/Second"]),
        float(row["p50 latency"]) / 1000,
        float(row["p99 latency"]) / 1000,
        float(row["Server Queue"]),
        float(row["Server Compute Input"]),
        float(row["Server Compute Infer"]),
        float(row["Server Compute Output"]),
        batch,
        cores,
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
