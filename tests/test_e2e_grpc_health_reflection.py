"""The standard gRPC health service and server reflection, with real grpc clients against a real server.

The server (auth on) serves one Python model whose load waits for a file the test writes, so that "loading"
lasts exactly as long as the test needs: health must say NOT_SERVING until then, SERVING after.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import DhowProcess, start_dhow, write_model

GATED_MODEL = """
import pathlib
import time

import numpy as np

GATE = pathlib.Path({gate!r})


class Gated:
    def load(self):
        while not GATE.exists():  # the test opens the gate once it has seen the server not ready
            time.sleep(0.05)

    def predict(self, inputs):
        return {{"y": inputs["x"]}}
"""


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DhowProcess, Path]]:
    root = tmp_path_factory.mktemp("health")
    gate = root / "gate"
    write_model(
        root / "models",
        "gated",
        "runtime: python\nmax_batch_size: 2\n"
        "inputs: [{name: x, datatype: FP32, shape: [-1, 1]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 1]}]\n",
        {"1/model.py": GATED_MODEL.format(gate=str(gate))},
    )
    server = start_dhow(root / "models", root, "--auth", "on", wait=False)
    yield server, gate
    gate.touch()
    assert server.stop() == 0, server.log()


def _channel(server: DhowProcess) -> grpc.Channel:
    channel = grpc.insecure_channel(server.grpc_url)
    grpc.channel_ready_future(channel).result(timeout=60)
    return channel


def _admin_key(server: DhowProcess) -> str:
    found = re.search(r"dhow_[0-9a-f]{12}_[A-Za-z0-9_-]+", server.log())
    assert found, server.log()
    return found.group(0)


def test_health_follows_readiness_without_credentials(gated: tuple[DhowProcess, Path]) -> None:
    server, gate = gated
    with _channel(server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        # the model is still loading: the port answers, and says it is not ready
        for service in ("", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == not_serving
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == not_serving
        gate.touch()
        assert next(watch).status == serving  # the next change a watcher sees is readiness
        watch.cancel()
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == serving
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="gated"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown service 'gated'; known: '', 'inference.GRPCInferenceService'" in str(caught.value.details())
        unknown = health.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        unknown.cancel()


def _reflect(channel: grpc.Channel, key: str | None, *requests: reflection_pb2.ServerReflectionRequest) -> list[Any]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    metadata = [("authorization", f"Bearer {key}")] if key else None
    return list(stub.ServerReflectionInfo(iter(requests), metadata=metadata, timeout=30))


def test_reflection_lists_the_services_to_callers_who_may_read_the_server(gated: tuple[DhowProcess, Path]) -> None:
    server, _ = gated
    with _channel(server) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            _reflect(channel, None, reflection_pb2.ServerReflectionRequest(list_services=""))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        key = _admin_key(server)
        listed, described = _reflect(
            channel,
            key,
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
        )
    names = {service.name for service in listed.list_services_response.service}
    assert names == {
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service if s.name == "GRPCInferenceService" for m in s.method}
    assert {"ModelInfer", "ModelStreamInfer", "ServerReady"} <= methods
