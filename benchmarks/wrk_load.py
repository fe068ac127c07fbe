"""The same closed-loop load as ``loadgen.py``, from wrk (C, one epoll thread): a cross-check that a ratio does not
come from the Python generator's own CPU on the cores it shares with the server.

``wrk -t1 -cN``: N keep-alive connections, each sending its next request when the last answers, the same body
each time. Its per-request CPU is a fraction of ``loadgen.py``'s, so what the server's background work (writers,
their wake-ups) takes from the two cores is no longer shared with a busy generator. Debian's ``wrk`` package
(``make bench-packages`` installs it).

wrk reports what was answered within the run; a request in flight when it stops is sent but not counted (at most
one per connection): ``Result.in_flight`` bounds them, for checks that count every request the server saw.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: the percentiles asked of wrk's histogram (its latencies are µs)
PERCENTILES = (50.0, 90.0, 99.0, 99.9)

_SCRIPT = """
wrk.method = "POST"
local file = io.open(os.getenv("DHOW_WRK_BODY"), "rb")
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
for name, value in string.gmatch(os.getenv("DHOW_WRK_HEADERS") or "", "([^\\n:]+): ([^\\n]+)") do
  wrk.headers[name] = value
end
done = function(summary, latency, requests)
  local e = summary.errors
  local tail = {}
  for _, q in ipairs({@PERCENTILES@}) do tail[#tail + 1] = string.format("%.1f", latency:percentile(q)) end
  io.write(string.format("DHOW_WRK {\\"answered\\": %d, \\"us\\": %d, \\"errors\\": %d, \\"status\\": %d, "
    .. "\\"latency_us\\": [%s]}\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, table.concat(tail, ", ")))
end
""".replace("@PERCENTILES@", ", ".join(f"{q:g}" for q in PERCENTILES))


@dataclass(frozen=True)
class Result:
    #: requests answered within the run (wrk's count), of them ``failures`` not 2xx/3xx
    requests: int
    failures: int
    seconds: float
    #: latency percentiles, ms (``PERCENTILES``)
    latencies: dict[float, float]
    #: the most requests that may have been sent and not counted answered: one per connection in flight when wrk
    #: stopped, and one per socket error (a read or write that failed may have carried one)
    in_flight: int
    #: socket errors (connect, read, write, timeout), apart from the answers
    errors: int

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return self.latencies[q]


def available() -> bool:
    return shutil.which("wrk") is not None


def run(
    host: str,
    port: int,
    path: str,
    body: bytes,
    *,
    concurrency: int,
    seconds: float,
    headers: dict[str, str] | None = None,
) -> Result:
    """Drive ``POST path`` with ``body`` at a fixed concurrency for ``seconds`` (whole seconds: wrk takes no
    fraction); raises when wrk fails."""
    if not available():
        raise RuntimeError("wrk is not installed: `make bench-packages` installs it (Debian's wrk package)")
    if seconds != int(seconds) or seconds < 1:
        raise ValueError(f"wrk runs for whole seconds, at least 1: not {seconds:g}")
    with tempfile.TemporaryDirectory(prefix="dhow-wrk-") as folder:
        script, payload = Path(folder) / "post.lua", Path(folder) / "body"
        script.write_text(_SCRIPT)
        payload.write_bytes(body)
        named = "\n".join(f"{name}: {value}" for name, value in (headers or {}).items())
        env = {**os.environ, "DHOW_WRK_BODY": str(payload), "DHOW_WRK_HEADERS": named}
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script),
                   f"http://{host}:{port}{path}"]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("DHOW_WRK ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    summary = json.loads(lines[-1].removeprefix("DHOW_WRK "))
    latencies = {q: us / 1000 for q, us in zip(PERCENTILES, summary["latency_us"], strict=True)}
    errors = summary["errors"]
    return Result(summary["answered"], summary["status"], summary["us"] / 1e6, latencies, concurrency + errors,
                  errors)  # fmt: skip
