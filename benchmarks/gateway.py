"""What does the proxy `dhow gateway config` writes cost, and what do two replicas behind it give, on one host?

    .venv/bin/python benchmarks/gateway.py [--seconds 6] [--rounds 3]

Builds the demo models and starts two `dhow serve` processes with only the `tabular` model (ONNX), and one
HAProxy (Debian's, `make system-packages`) with two configurations written by `dhow gateway config`: one
replica behind it, and both. Drives, with the same closed-loop generator (benchmarks/loadgen.py, JSON over
REST, keep-alive, batch 1) at concurrency 16 and 1, the configurations alternated in rounds, in one run:
(a) one replica, direct (the baseline); (b) the same replica behind HAProxy (the proxy's own cost);
(c) both replicas behind HAProxy. Prints a Markdown table (for benchmarks/RESULTS-gateway.md) with each
configuration's median throughput and latencies over the rounds and its ratio to (a).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import servers

BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32",
                               "data": [0.1 * i for i in range(32)]}]}).encode()  # fmt: skip
CONCURRENCY = (16, 1)


@dataclass
class Config:
    label: str
    port: int
    results: dict[int, list[loadgen.Result]] = field(default_factory=dict)


def _haproxy(replicas: list[servers.Server], folder: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    """HAProxy in front of ``replicas``, configured by `dhow gateway config`; the process and its REST port."""
    port = servers.free_port()
    config = folder / f"{name}.cfg"
    backends = [f"--backend=127.0.0.1:{r.http_port}" for r in replicas]
    subprocess.run([sys.executable, "-m", "dhow.cli", "gateway", "config", *backends, "--listen", f"127.0.0.1:{port}",
                    "--grpc-listen", f"127.0.0.1:{servers.free_port()}", "--out", str(config)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    # the benchmark measures the proxy, not its log: one line per request would be written to stderr
    config.write_text(config.read_text().replace("    log stderr format raw local0\n", ""))
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if servers.post_json(port, "/v2/models/tabular/infer", BODY)[0] == 200:
                return process, port
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"HAProxy in front of {len(replicas)} replicas did not answer within 30 s")


def _table(configs: list[Config], rounds: int) -> str:
    base = configs[0]
    lines = [
        f"{platform.node()} · {platform.processor() or platform.machine()} · {len(base.results[16])} rounds of "
        f"the configurations alternated ({rounds} asked)",
        "",
        "| configuration | concurrency | throughput (req/s) | ratio to direct | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for concurrency in CONCURRENCY:
        reference = statistics.median(r.throughput for r in base.results[concurrency])
        for config in configs:
            runs = config.results[concurrency]
            throughput = statistics.median(r.throughput for r in runs)
            p50 = statistics.median(r.percentile(50) for r in runs)
            p99 = statistics.median(r.percentile(99) for r in runs)
            lines.append(f"| {config.label} | {concurrency} | {throughput:,.0f} | {throughput / reference:.2f} | "
                         f"{p50:.2f} | {p99:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per run (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the configurations (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dhow-gateway-bench-") as temporary:
        folder = Path(temporary)
        subprocess.run([sys.executable, "-m", "dhow.cli", "demo", "build", "--out", str(folder / "demo")],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        shutil.copytree(folder / "demo" / "tabular", folder / "models" / "tabular")
        replicas = [
            servers.start_dhow(folder / "models", folder / f"data-{i}", (), folder / f"dhow-{i}.log") for i in (1, 2)
        ]
        proxies: list[subprocess.Popen[bytes]] = []
        try:
            for replica in replicas:
                servers.wait_ready(replica, "tabular")
            one, one_port = _haproxy(replicas[:1], folder, "one")
            both, both_port = _haproxy(replicas, folder, "both")
            proxies += [one, both]
            configs = [
                Config("(a) one replica, direct", replicas[0].http_port),
                Config("(b) one replica behind HAProxy", one_port),
                Config("(c) two replicas behind HAProxy", both_port),
            ]
            request = [loadgen.http_post("127.0.0.1", "/v2/models/tabular/infer", BODY)]
            for round_number in range(args.rounds):
                for config in configs:
                    for concurrency in CONCURRENCY:
                        result = loadgen.run(
                            "127.0.0.1", config.port, request, concurrency=concurrency, seconds=args.seconds
                        )
                        if result.failures:
                            raise SystemExit(f"{config.label}: {result.failures} failed requests")
                        config.results.setdefault(concurrency, []).append(result)
                print(f"round {round_number + 1} of {args.rounds} done", file=sys.stderr)
            print(_table(configs, args.rounds))
        finally:
            for proxy in proxies:
                proxy.terminate()
                proxy.wait(10)
            for replica in replicas:
                replica.stop()


if __name__ == "__main__":
    main()
