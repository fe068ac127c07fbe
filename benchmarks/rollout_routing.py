"""What does routing by a deployment policy cost? Throughput with no policy, pinned, canary and A/B.

    .venv/bin/python benchmarks/rollout_routing.py [--seconds 8] [--concurrency 16] [--rounds 3]

Builds the demo models, starts one `dhow serve` with only the `tabular` model (ONNX, versions 1
and 2), and drives it with the same closed-loop generator (benchmarks/loadgen.py, JSON over REST,
keep-alive) under each policy in turn, in one run. Writes benchmarks/RESULTS-rollouts.md with
throughput, p50 and p99 and each policy's ratio to the pinned one.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen

HERE = Path(__file__).resolve().parent
ROW = [0.1 * i for i in range(32)]

POLICIES: list[tuple[str, dict[str, Any] | None]] = [
    ("no deployment (newest version)", None),
    ("pinned to version 2", {"kind": "pinned", "version": 2}),
    (
        "canary 5% (version 1 over 2; a first step)",
        {"kind": "canary", "primary": 2, "canary": 1, "steps": [5, 100], "guards": {"min_requests": 10**9}},
    ),
    (
        "canary 50% (version 2 over 1)",
        {"kind": "canary", "primary": 1, "canary": 2, "steps": [50, 100], "guards": {"min_requests": 10**9}},
    ),
    (
        "A/B 100/0, sticky by user_id (routing runs, one version serves)",
        {
            "kind": "ab",
            "variants": [{"name": "a", "version": 2, "weight": 100}, {"name": "b", "version": 1, "weight": 0}],
        },
    ),
    (
        "A/B 50/50, sticky by user_id",
        {
            "kind": "ab",
            "variants": [{"name": "a", "version": 1, "weight": 50}, {"name": "b", "version": 2, "weight": 50}],
        },
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(url: str, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        text = answer.read()
    return json.loads(text) if text else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all policies; the median is reported")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-rollouts.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dhow-bench-"))
    models = work / "models"
    subprocess.run([sys.executable, "-m", "dhow.cli", "demo", "build", "--out", str(models)], check=True)
    for folder in models.iterdir():
        if folder.is_dir() and folder.name != "tabular":
            shutil.rmtree(folder)
    port, grpc_port = free_port(), free_port()
    log = (work / "dhow.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "dhow.cli", "serve", "--repository", str(models), "--http-port", str(port),
         "--grpc-port", str(grpc_port), "--data-dir", str(work / "data"), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        runs: dict[str, list[loadgen.Result]] = {label: [] for label, _ in POLICIES}
        revision = 0
        for round_ in range(args.rounds):
            for label, policy in POLICIES:
                if policy is None and revision:
                    call(f"{base}/v2/admin/deployments/tabular", "DELETE", {"revision": revision})
                    revision = 0
                elif policy is not None:
                    url = f"{base}/v2/admin/deployments/tabular"
                    revision = call(url, "PUT", {"policy": policy, "revision": revision})["revision"]
                requests = []
                for user in range(64):
                    body: dict[str, Any] = {
                        "inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": ROW}]
                    }
                    if policy is not None and policy["kind"] == "ab":
                        body["parameters"] = {"user_id": f"user-{user}"}
                    encoded = json.dumps(body).encode()
                    requests.append(loadgen.http_post(f"127.0.0.1:{port}", "/v2/models/tabular/infer", encoded))
                result = loadgen.run("127.0.0.1", port, requests, concurrency=args.concurrency, seconds=args.seconds)
                runs[label].append(result)
                print(f"round {round_ + 1} {label}: {result.throughput:,.0f} infer/s, "
                      f"p50 {result.percentile(50):.2f} ms, p99 {result.percentile(99):.2f} ms, "
                      f"{result.failures} failures", flush=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    # the median round of each policy (by throughput), so that one noisy round does not decide
    rows = [(label, sorted(results, key=lambda r: r.throughput)[len(results) // 2]) for label, results in runs.items()]
    pinned = rows[1][1].throughput
    lines = [
        "# Rollout routing cost",
        "",
        f"`{' '.join(['python', *sys.argv])}` on {platform.node()} ({platform.processor() or platform.machine()}), "
        f"{time.strftime('%Y-%m-%d')}: dhow serving `tabular` (ONNX), JSON over REST, closed loop, "
        f"concurrency {args.concurrency}, {args.seconds:.0f} s per policy after 2 s warm-up, {args.rounds} rounds "
        "interleaved in one run, the median round shown; "
        "the load generator shares the machine's cores with the server.",
        "",
        "| policy | infer/s | p50 ms | p99 ms | failures | throughput ratio to pinned |",
        "|---|---|---|---|---|---|",
    ]
    for label, result in rows:
        lines.append(
            f"| {label} | {result.throughput:,.0f} | {result.percentile(50):.2f} | {result.percentile(99):.2f} "
            f"| {result.failures} | {result.throughput / pinned:.3f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
