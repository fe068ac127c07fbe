"""Start, check, watch and stop the servers under test: dhow and Seldon MLServer, one at a time.

Each server runs in its own session (process group), so that stopping it also stops MLServer's worker
processes; its CPU time is read from /proc for the whole process tree.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_loadgen import MODEL_INFER

from dhow.protocols.grpc.generated import grpc_service_pb2 as pb

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: the environment variable that tells mlserver_batches.py where to count
BATCHES_FOLDER = "DHOW_BENCH_BATCHES"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_cpu_seconds(root: int) -> float:
    """User + system time so far of a process and every process below it (all their threads), from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    tree, total = [root], 0.0
    while tree:
        pid = tree.pop()
        total += times.get(pid, 0.0)
        tree += children.get(pid, [])
    return total


@dataclass
class Server:
    kind: str
    command: list[str]
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log: Path
    #: where MLServer's workers count the batches their model computes (mlserver_batches.py); None for dhow
    batches: Path | None = None

    def main_thread_seconds(self) -> float:
        """User + system time of the server process's first thread: dhow's event loop (both doors' Python)."""
        try:
            stat = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/stat").read_text()
        except OSError:
            return float("nan")
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def batch_counts(self) -> tuple[int, int]:
        """MLServer: (batches computed, requests in them) so far, over its worker processes."""
        calls = requests = 0
        for path in self.batches.glob("*.counts") if self.batches else ():
            counts = np.fromfile(path, dtype=np.int64)
            if counts.size == 2:
                calls, requests = calls + int(counts[0]), requests + int(counts[1])
        return calls, requests

    def cpu_seconds(self) -> float:
        """User + system time of the server and every process below it (MLServer's workers, dhow's writers)."""
        return tree_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_dhow(repository: Path, data_dir: Path, args: tuple[str, ...], log: Path) -> Server:
    http_port, grpc_port = free_port(), free_port()
    dhow = Path(sys.executable).parent / "dhow"
    command = [str(dhow), "serve", "--auth", "none", "--repository", str(repository), "--host", "127.0.0.1"]
    command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port), "--data-dir", str(data_dir)]
    command += ["--log-level", "warning", *args]
    return _start("dhow", command, http_port, grpc_port, log, os.environ.copy())


def start_mlserver(folder: Path, mlserver_bin: Path, http_port: int, grpc_port: int, log: Path) -> Server:
    command = [str(mlserver_bin / "mlserver"), "start", str(folder)]
    batches = log.with_suffix(".batches")
    shutil.rmtree(batches, ignore_errors=True)
    batches.mkdir(parents=True)
    # our runtimes (mlserver_onnx.py, mlserver_batches.py) are imported from this folder, in every worker process
    environment = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent), BATCHES_FOLDER: str(batches)}
    return _start("mlserver", command, http_port, grpc_port, log, environment, batches)


def _start(
    kind: str,
    command: list[str],
    http_port: int,
    grpc_port: int,
    log: Path,
    env: dict[str, str],
    batches: Path | None = None,
) -> Server:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Server(kind, command, process, http_port, grpc_port, log, batches)


def wait_ready(server: Server, model: str, timeout: float = 120) -> None:
    url = f"http://127.0.0.1:{server.http_port}/v2/models/{model}/ready"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    server.stop()
    tail = server.log.read_text(errors="replace")[-2000:]
    raise SystemExit(f"{server.kind} did not get {model} ready within {timeout:.0f} s; its log ends:\n{tail}")


def post_json(port: int, path: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", body, {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def check_answers(server: Server, model: str, body: bytes, message: bytes, expected: dict[str, np.ndarray]) -> None:
    """One request over each protocol must answer the outputs ``expected`` (values over REST's JSON)."""
    status, answer = post_json(server.http_port, f"/v2/models/{model}/infer", body)
    if status != 200:
        raise SystemExit(f"{server.kind} answered {status} to a REST request for {model}: {answer}")
    outputs = {output["name"]: np.asarray(output["data"]).ravel() for output in answer["outputs"]}
    _check(server.kind, "REST", model, outputs, expected)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        reply = pb.ModelInferResponse.FromString(call(message, timeout=30))
    names = {output.name for output in reply.outputs}
    if names != set(expected):
        raise SystemExit(
            f"{server.kind} answered outputs {sorted(names)} over gRPC for {model}, not {sorted(expected)}"
        )


def _check(
    kind: str, protocol: str, model: str, outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> None:
    if set(outputs) != set(expected):
        raise SystemExit(
            f"{kind} answered outputs {sorted(outputs)} over {protocol} for {model}, not {sorted(expected)}"
        )
    for name, value in expected.items():
        if not np.allclose(outputs[name].astype(np.float64), value.ravel().astype(np.float64), rtol=1e-4, atol=1e-5):
            raise SystemExit(f"{kind} answered {name}={outputs[name][:4]} for {model}, in-process gives {value[:4]}")


@dataclass(frozen=True)
class Breakdown:
    """dhow's own statistics over one measured point, per request (Triton's ``/stats`` fields)."""

    requests: int
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float
    average_batch: float
    largest_batch: int


def model_stats(server: Server, model: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{server.http_port}/v2/models/{model}/stats"
    with urllib.request.urlopen(url, timeout=10) as answer:
        stats: dict[str, Any] = json.loads(answer.read())["model_stats"][0]
    return stats


def breakdown(before: dict[str, Any], after: dict[str, Any]) -> Breakdown:
    def per_request(key: str) -> float:
        count = after["inference_stats"][key]["count"] - before["inference_stats"][key]["count"]
        nanoseconds = after["inference_stats"][key]["ns"] - before["inference_stats"][key]["ns"]
        return nanoseconds / count / 1000 if count else float("nan")

    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    counts_before = {stat["batch_size"]: stat["compute_infer"]["count"] for stat in before["batch_stats"]}
    sizes = [
        s["batch_size"]
        for s in after["batch_stats"]
        if s["compute_infer"]["count"] > counts_before.get(s["batch_size"], 0)
    ]
    return Breakdown(
        inferences,
        per_request("queue"),
        per_request("compute_input"),
        per_request("compute_infer"),
        per_request("compute_output"),
        inferences / executions if executions else float("nan"),
        max(sizes, default=0),
    )
