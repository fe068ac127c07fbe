"""ONNX Runtime's CPU time per row alone, and with a process busy on another core: what the event loop's work,
running beside a batch's computation, costs the model's side of the server in CPU time.

    python benchmarks/ort_neighbour.py demo-models/mlp/1/model.onnx --batch 32 --rounds 3

Each round measures ``session.run`` (1 thread, dhow's session options) for ``--seconds`` with nothing else in this
process, then again while a neighbour process runs on the other core: a Python loop making dicts (like the event
loop's per-request work), a Python loop adding to an integer (no memory beyond the interpreter's), or numpy
summing a 64 MB array (memory bandwidth). The instructions a row costs are the same in each case; only the time
they take changes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from limits import onnx_session

NEIGHBOURS = {
    "python dicts": "while True:\n    d = {i: str(i) for i in range(2000)}",
    "python x += 1": "x = 0\nwhile True:\n    x += 1",
    "numpy 64 MB sums": "import numpy as np\na = np.ones(16 << 20, np.float32)\nwhile True:\n    a.sum()",
}


def cpu_per_row(session: Any, batch: np.ndarray, seconds: float) -> float:
    feeds = {"input": batch}
    session.run(None, feeds)
    rows, cpu, start = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, feeds)
        rows += len(batch)
    return (time.process_time() - cpu) / rows * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an ONNX model with one float input named 'input'")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="rounds over every neighbour")
    args = parser.parse_args()
    session = onnx_session(args.model, 1, spinning=False)
    batch = np.random.default_rng(0).standard_normal((args.batch, args.features)).astype(np.float32)
    for _ in range(args.rounds):
        for label, code in NEIGHBOURS.items():
            alone = cpu_per_row(session, batch, args.seconds)
            neighbour = subprocess.Popen([sys.executable, "-c", code])
            try:
                time.sleep(0.2)  # started and busy
                beside = cpu_per_row(session, batch, args.seconds)
            finally:
                neighbour.kill()
                neighbour.wait()
            print(f"batch {args.batch}: alone {alone:.0f} µs CPU per row, beside {label} {beside:.0f} µs", flush=True)


if __name__ == "__main__":
    main()
