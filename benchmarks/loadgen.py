"""A closed-loop HTTP/1.1 load generator: N connections, each sends its next request when the last answers.

Small on purpose (asyncio streams, requests encoded once), so that on a 2-core machine it takes
as little CPU as possible from the server it measures. Used for ratios measured in one run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Result:
    requests: int
    failures: int
    seconds: float
    latencies_ms: np.ndarray

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms.size else float("nan")


def http_post(host: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """One encoded keep-alive POST request."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _connection(
    host: str, port: int, requests: Sequence[bytes], stop_at: float, measure_from: float, out: list[float]
) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    failures = 0
    index = 0
    try:
        while (now := time.perf_counter()) < stop_at:
            writer.write(requests[index % len(requests)])
            index += 1
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.perf_counter()
            if now >= measure_from:
                if status_line.split(b" ", 2)[1] != b"200":
                    failures += 1
                out.append((done - now) * 1000)
    finally:
        writer.close()
    return failures


async def _run(
    host: str, port: int, requests: Sequence[bytes], concurrency: int, warmup: float, seconds: float
) -> Result:
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    latencies: list[float] = []
    failures = await asyncio.gather(
        *(
            _connection(host, port, requests[i:] + requests[:i], stop_at, measure_from, latencies)
            for i in range(concurrency)
        )
    )
    return Result(len(latencies), sum(failures), seconds, np.asarray(latencies))


def run(
    host: str, port: int, requests: Sequence[bytes], *, concurrency: int, warmup: float = 2, seconds: float = 10
) -> Result:
    """Drive ``requests`` (cycled) at a fixed concurrency; measure after ``warmup`` seconds for ``seconds``."""
    return asyncio.run(_run(host, port, list(requests), concurrency, warmup, seconds))
