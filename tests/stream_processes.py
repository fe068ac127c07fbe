"""`dhow stream run` as a real process, and what the stream tests read back (replies by key, statuses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tests.kafka_broker import Broker

N_FEATURES = 32


def stream_command(repository: Path, data_dir: Path, broker: Broker, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "dhow.cli", "stream", "run", "--repository", str(repository), "--data-dir",
        str(data_dir), "--model", "tabular", "--format", "json", *args,
    ]  # fmt: skip


def start_stream(repository: Path, data_dir: Path, broker: Broker, *args: str) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True)
    log = (data_dir / "stream.log").open("ab")
    command = stream_command(repository, data_dir, broker, *args)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_environment())


def run_stream(repository: Path, data_dir: Path, broker: Broker, *args: str) -> subprocess.CompletedProcess[str]:
    command = stream_command(repository, data_dir, broker, *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=_environment(), check=False)


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["DHOW_AUTH"] = "on"  # a stream is a service identity: it needs no key, with authentication on
    return environment


def features(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, N_FEATURES)).astype(np.float32)


def row_messages(x: np.ndarray, first: int = 0) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    """One json message per row: key = the row's number, an x-request-id header."""
    return [
        (
            str(first + i).encode(),
            json.dumps({"input": row.tolist()}).encode(),
            [("x-request-id", f"r{first + i}".encode())],
        )
        for i, row in enumerate(x)
    ]


def replies_by_key(messages: list[Any]) -> dict[int, list[Any]]:
    found: dict[int, list[Any]] = {}
    for message in messages:
        found.setdefault(int(message.key()), []).append(message)
    return found


def headers_of(message: Any) -> dict[str, bytes]:
    return {name: value for name, value in message.headers() or []}


def status_of(data_dir: Path) -> dict[str, Any]:
    """The stream's status file ({} until its consumer wrote one)."""
    paths = list((data_dir / "streams").glob("*.json"))
    if not paths:
        return {}
    (path,) = paths
    status: dict[str, Any] = orjson.loads(path.read_bytes())
    return status


def slow_doubler(seconds: float) -> str:
    """The source of a Python model answering ``y = 2x`` after sleeping ``seconds`` a batch (slow on purpose)."""
    return f"""
import time


class Slow:
    def load(self, version_dir):
        pass

    def predict(self, inputs):
        time.sleep({seconds})
        return {{"y": inputs["x"] * 2}}
"""
