"""Graceful drain of a real `dhow serve` process: SIGTERM turns it not-ready, closes its ports, lets what is in
flight (REST, gRPC, queued batches) finish, and it exits 0.

The model waits on a gate file the test opens, so that requests are in flight exactly as long as the test needs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dhow.serving.drain import Drain
from tests.conftest import DhowProcess, http_request, start_dhow, wait_until, write_model

GATED_MODEL = """
import pathlib
import time

ROOT = pathlib.Path({root!r})


class Gated:
    def load(self):
        pass

    def predict(self, inputs):
        with (ROOT / "started").open("a") as marks:
            marks.write("x")
        while not (ROOT / "gate").exists():
            time.sleep(0.02)
        return {{"y": inputs["x"] * 2}}
"""
BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [3]}]}).encode()


def _repository(root: Path) -> Path:
    write_model(
        root / "models",
        "gated",
        "runtime: python\nmax_batch_size: 1\ninstances: {count: 4, kind: thread}\n"
        "inputs: [{name: x, datatype: FP32, shape: [-1, 1]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 1]}]\n",
        {"1/model.py": GATED_MODEL.format(root=str(root))},
    )
    return root / "models"


def _rest(server: DhowProcess, method: str, path: str, body: bytes | None = None) -> int:
    return http_request(server.http_port, method, path, body)[0]


def _grpc_health(server: DhowProcess) -> int:
    with grpc.insecure_channel(server.grpc_url) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(answer.status)


def _grpc_infer(server: DhowProcess) -> float:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("x", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[5]], dtype=np.float32))
    try:
        return float(client.infer("gated", [tensor], client_timeout=60).as_numpy("y")[0, 0])
    finally:
        client.close()


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_in_flight_requests_finish_after_sigterm_and_the_ports_close(tmp_path: Path) -> None:
    server = start_dhow(_repository(tmp_path), tmp_path, "--drain-seconds", "60")
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            rest = [pool.submit(_rest, server, "POST", "/v2/models/gated/infer", BODY) for _ in range(3)]
            remote = pool.submit(_grpc_infer, server)
            # each of the model's four instances computes one of them, held there by the gate
            wait_until(lambda: _started(tmp_path) == 4, 30, "four requests in the model")
            server.process.send_signal(signal.SIGTERM)
            wait_until(lambda: _refuses(server.http_port), 30, "the REST port closing")
            wait_until(lambda: _refuses(server.grpc_port), 30, "the gRPC port closing")
            assert server.process.poll() is None, "the server left before its requests were answered"
            (tmp_path / "gate").touch()
            assert [future.result() for future in rest] == [200, 200, 200]
            assert remote.result() == 10.0
        assert server.process.wait(30) == 0, server.log()
    finally:
        (tmp_path / "gate").touch()
        server.stop()
    assert "dhow is draining" in server.log()
    assert "did not finish" not in server.log()


def _started(root: Path) -> int:
    marks = root / "started"
    return len(marks.read_text()) if marks.exists() else 0


def test_during_the_drain_delay_it_says_not_ready_and_still_serves(tmp_path: Path) -> None:
    (tmp_path / "gate").touch()
    server = start_dhow(_repository(tmp_path), tmp_path, "--drain-delay", "600")
    try:
        assert _grpc_health(server) == health_pb2.HealthCheckResponse.SERVING
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: _rest(server, "GET", "/v2/health/ready") == 503, 30, "health/ready answering 503")
        assert _grpc_health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert _rest(server, "GET", "/v2/health/live") == 200
        # a client the load balancer has not yet moved away is still answered
        assert _rest(server, "POST", "/v2/models/gated/infer", BODY) == 200
        # a second signal does not wait out the delay
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0, server.log()
    finally:
        server.stop()
    assert "a second signal: stopping now" in server.log()


SLOW_LOAD = """
import pathlib
import time


class SlowLoad:
    def load(self):
        pathlib.Path({loading!r}).touch()
        while not pathlib.Path({gate!r}).exists():
            time.sleep(0.02)

    def predict(self, inputs):
        return {{"y": inputs["x"]}}
"""


def test_a_sigterm_while_models_load_never_turns_ready(tmp_path: Path) -> None:
    loading, gate = tmp_path / "loading", tmp_path / "gate"
    repository = tmp_path / "models"
    manifest = (
        "runtime: python\nmax_batch_size: 1\ninstances: {kind: thread}\n"
        "inputs: [{name: x, datatype: FP32, shape: [-1, 1]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 1]}]\n"
    )
    write_model(repository, "slow", manifest, {"1/model.py": SLOW_LOAD.format(loading=str(loading), gate=str(gate))})
    server = start_dhow(repository, tmp_path, wait=False)
    try:
        wait_until(loading.exists, 60, "the model loading")  # the signal handlers are in place by then
        server.process.send_signal(signal.SIGTERM)
        gate.touch()
        assert server.process.wait(30) == 0, server.log()
    finally:
        gate.touch()
        server.stop()
    assert "dhow is ready" not in server.log()
    assert "dhow is draining" in server.log()


def test_drain_hooks_run_together_and_those_past_the_deadline_are_named() -> None:
    finished: list[str] = []

    async def quick(seconds: float) -> None:
        assert seconds == 0.5
        finished.append("offsets committed")

    async def stuck(seconds: float) -> None:
        await asyncio.sleep(3600)

    async def broken(seconds: float) -> None:
        raise RuntimeError("broker gone")

    drain = Drain()
    for name, hook in (("kafka", quick), ("kinesis", stuck), ("other", broken)):
        drain.on_drain(name, hook)
    assert not drain.started.is_set()
    late = asyncio.run(drain.run(0.5))
    assert late == ["kinesis", "other"]
    assert finished == ["offsets committed"]
    assert drain.started.is_set()


@pytest.mark.parametrize(("option", "value"), [("--drain-seconds", "0"), ("--drain-delay", "-1")])
def test_a_drain_time_out_of_range_is_refused_naming_the_setting(tmp_path: Path, option: str, value: str) -> None:
    server = start_dhow(_repository(tmp_path), tmp_path, option, value, wait=False)
    assert server.process.wait(60) != 0
    assert option.removeprefix("--").replace("-", "_") in server.log()
