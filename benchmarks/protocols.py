"""What do the peers' doors cost next to the Open Inference Protocol? One server, one model, one run.

    .venv/bin/python benchmarks/protocols.py [--seconds 5] [--warmup 1] [--rounds 6] [--concurrency 16]

Builds the demo models, starts one `dhow serve` with only the `tabular` model (ONNX, batch-1 requests of 32
features), checks that every door answers the same numbers, then drives it with the closed-loop generator
(benchmarks/loadgen.py, keep-alive HTTP/1.1) at the given concurrency, the doors alternated in rounds:
(a) v2 JSON `POST /v2/models/tabular/infer`, (b) KServe v1 / TF Serving `POST /v1/models/tabular:predict` with
`{"instances": [[...]]}`, (c) TorchServe `POST /predictions/tabular` with the row as JSON. The goal: (b)/(a) >= 0.95
in throughput. Writes benchmarks/RESULTS-protocols.md (its "Reading" section is kept from the file, written by hand).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import servers

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS-protocols.md"
ROW = [round(0.1 * i - 1.5, 3) for i in range(32)]
GOAL = 0.95


@dataclass(frozen=True)
class Door:
    name: str
    path: str
    body: bytes


DOORS = (
    Door("v2 JSON", "/v2/models/tabular/infer",
         json.dumps({"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": ROW}]}).encode()),
    Door("v1 :predict", "/v1/models/tabular:predict", json.dumps({"instances": [ROW]}).encode()),
    Door("TorchServe", "/predictions/tabular", json.dumps(ROW).encode()),
)  # fmt: skip


@dataclass(frozen=True)
class Run:
    door: str
    result: loadgen.Result
    cpu_ms: float  # the server's CPU time per request


def probabilities(answer: object, door: str) -> list[float]:
    """The probabilities of the one row, from each door's answer shape."""
    assert isinstance(answer, dict | list), answer
    if door == "v2 JSON":
        return next(o["data"] for o in answer["outputs"] if o["name"] == "probabilities")  # type: ignore[index]
    if door == "v1 :predict":
        return answer["predictions"][0]["probabilities"]  # type: ignore[index,no-any-return]
    return answer["probabilities"]  # type: ignore[index,call-overload,no-any-return]


def check_doors(server: servers.Server) -> None:
    answers = {}
    for door in DOORS:
        status, answer = servers.post_json(server.http_port, door.path, door.body)
        if status != 200:
            raise SystemExit(f"{door.name} answered {status}: {answer}")
        answers[door.name] = probabilities(answer, door.name)
    reference = answers["v2 JSON"]
    for name, values in answers.items():
        if not np.allclose(values, reference, rtol=1e-6):
            raise SystemExit(f"{name} answers {values}, v2 {reference}")


def measure(server: servers.Server, door: Door, args: argparse.Namespace) -> Run:
    request = loadgen.http_post(f"127.0.0.1:{server.http_port}", door.path, door.body)
    cpu = server.cpu_seconds()
    result = loadgen.run(
        "127.0.0.1", server.http_port, [request], concurrency=args.concurrency, warmup=args.warmup, seconds=args.seconds
    )
    if result.failures:
        raise SystemExit(f"{door.name}: {result.failures} requests failed")
    # CPU over warm-up and measurement, per request measured: the same bias for every door
    spent = server.cpu_seconds() - cpu
    return Run(door.name, result, 1000 * spent * args.seconds / (args.seconds + args.warmup) / result.requests)


def median_throughput(runs: list[Run], door: str) -> float:
    return statistics.median(r.result.throughput for r in runs if r.door == door)


def table(runs: list[Run], concurrency: int) -> list[str]:
    by_door: dict[str, list[Run]] = {}
    for run in runs:
        by_door.setdefault(run.door, []).append(run)
    base = statistics.median(r.result.throughput for r in by_door["v2 JSON"])
    lines = [
        f"| door (c={concurrency}, batch 1) | throughput (req/s, median) | vs v2 JSON | p50 ms | p99 ms "
        "| server CPU ms/request | throughput per round |",
        "|---|---|---|---|---|---|---|",
    ]
    for door in DOORS:
        done = by_door[door.name]
        throughput = statistics.median(r.result.throughput for r in done)
        p50 = statistics.median(r.result.percentile(50) for r in done)
        p99 = statistics.median(r.result.percentile(99) for r in done)
        cpu = statistics.median(r.cpu_ms for r in done)
        rounds = ", ".join(f"{r.result.throughput:,.0f}" for r in done)
        lines.append(
            f"| {door.name} `{door.path}` | {throughput:,.0f} | {throughput / base:.3f} | {p50:.2f} | {p99:.2f} "
            f"| {cpu:.3f} | {rounds} |"
        )
    return lines


def reading() -> list[str]:
    """The hand-written "Reading" section of the results file, kept across runs."""
    if not RESULTS.exists():
        return ["## Reading", "", "(to be written by hand after a run)"]
    text = RESULTS.read_text(encoding="utf-8")
    start = text.find("## Reading")
    return text[start:].rstrip().splitlines() if start >= 0 else ["## Reading", "", "(to be written by hand)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dhow-protocols-") as scratch:
        work = Path(scratch)
        dhow = Path(sys.executable).parent / "dhow"
        subprocess.run([str(dhow), "demo", "build", "--out", str(work / "demo")], check=True, capture_output=True)
        models = work / "models"
        models.mkdir()
        (work / "demo" / "tabular").rename(models / "tabular")
        server = servers.start_dhow(models, work / "data", (), work / "dhow.log")
        try:
            servers.wait_ready(server, "tabular")
            check_doors(server)
            # each round starts with another door, so that no door always follows the same one
            order = [DOORS[(r + i) % len(DOORS)] for r in range(args.rounds) for i in range(len(DOORS))]
            runs = [measure(server, door, args) for door in order]
        finally:
            server.stop()
    lines = table(runs, args.concurrency)
    ratio = median_throughput(runs, "v1 :predict") / median_throughput(runs, "v2 JSON")
    verdict = "met" if ratio >= GOAL else "NOT met"
    text = [
        "# The peers' doors next to the Open Inference Protocol",
        "",
        f"`{' '.join(['benchmarks/protocols.py', *sys.argv[1:]])}`: one `dhow serve` (the demo `tabular` ONNX "
        "model, `--auth none`), the doors alternated in "
        f"{args.rounds} rounds of {args.seconds:g} s (after {args.warmup:g} s of warm-up each) by the closed-loop "
        f"generator of `benchmarks/loadgen.py` at concurrency {args.concurrency}, on {platform.machine()} with "
        f"{platform.python_implementation()} {platform.python_version()}. Every door's answer was first checked "
        "against the v2 answer.",
        "",
        *lines,
        "",
        f"Goal: v1 `:predict` throughput >= {GOAL} x v2 JSON, same run: **{ratio:.3f}, {verdict}**.",
        "",
        *reading(),
        "",
    ]
    RESULTS.write_text("\n".join(text), encoding="utf-8")
    print("\n".join(lines))
    print(f"v1 :predict / v2 JSON = {ratio:.3f} (goal {GOAL}: {verdict})")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
