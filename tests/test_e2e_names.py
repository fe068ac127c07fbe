"""Model names are checked once where they enter, before any file or log line sees them (a real server).

What a security review found: a deployer's upload to the model ``..`` removed the data folder; a name over
255 bytes, or with a NUL, answered 500 before authentication; a newline in a name forged log lines.
"""

from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from dhow.governance.audit import AuditStore
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import DhowProcess, start_dhow

CONFIG = json.dumps(
    {
        "runtime": "onnx",
        "max_batch_size": 8,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 32]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 1]}],
    }
)


def _post(server: DhowProcess, path: str, body: dict[str, Any], key: str = "") -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    try:
        connection.request("POST", path, body=json.dumps(body), headers=headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        connection.close()


@pytest.fixture
def upload_server(repository_copy: Path, tmp_path: Path) -> Any:
    server = start_dhow(repository_copy, tmp_path, "--model-control", "explicit", "--allow-model-upload")
    yield server, tmp_path / "data"
    assert server.stop() == 0, server.log()


def test_an_upload_to_dot_dot_is_refused_and_the_data_folder_survives(upload_server: Any) -> None:
    server, data = upload_server
    before = sorted(p.name for p in data.iterdir())
    assert "registry.sqlite3" in before and "audit.sqlite3" in before
    files = {"file:1/model.onnx": base64.b64encode(b"not a model").decode()}
    for path in ("/v2/repository/models/%2e%2e/load", "/v2/repository/models/../load"):
        status, answer = _post(server, path, {"parameters": {"config": CONFIG, **files}})
        assert status in (400, 404), answer
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.RepositoryModelLoadRequest(model_name="..")
        request.parameters["config"].string_param = CONFIG
        request.parameters["file:1/model.onnx"].bytes_param = b"not a model"
        with pytest.raises(grpc.RpcError) as refused:
            stub.RepositoryModelLoad(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "starts with '.'" in str(refused.value.details())
    assert sorted(p.name for p in data.iterdir()) == before
    assert _post(server, "/v2/repository/index", {})[0] == 200  # the registry is still there


@pytest.mark.parametrize(
    ("name", "why"),
    [("m" * 300, "300 bytes long"), ("bad\nname", "holds '\\n'"), ("nul\x00", "holds '\\x00'"), (".hidden", "'.'")],
    ids=["long", "newline", "nul", "dot"],
)
def test_bad_names_get_400_and_invalid_argument_before_authentication(
    demo_repository: Path, tmp_path_factory: pytest.TempPathFactory, name: str, why: str
) -> None:
    server = _secured(demo_repository, tmp_path_factory)
    status, answer = _post(server, f"/v2/models/{_quote(name)}/infer", {"inputs": []})
    assert status == 400 and why in answer["error"] and "letters, digits" in answer["error"], answer
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(pb.ModelInferRequest(model_name=name), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "\nname" not in server.log()  # no forged line


_SECURED: dict[str, DhowProcess] = {}


def _secured(repository: Path, factory: pytest.TempPathFactory) -> DhowProcess:
    """One server with authentication on, shared by the parametrized cases (stopped at exit by its process)."""
    if "server" not in _SECURED or _SECURED["server"].process.poll() is not None:
        _SECURED["server"] = start_dhow(repository, factory.mktemp("names"), "--auth", "on")
    return _SECURED["server"]


@pytest.fixture(scope="module", autouse=True)
def _stop_secured() -> Any:
    yield
    for server in _SECURED.values():
        server.stop()


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


# -- a flood of callers nobody knows ---------------------------------------------------------------


def test_an_unauthenticated_flood_is_counted_not_recorded_one_by_one(demo_repository: Path, tmp_path: Path) -> None:
    """2,000 refused requests from one address make a handful of audit records whose counts add up to 2,000,
    and past the address's budget of failures the answer is 429 with Retry-After instead of 401."""
    server = start_dhow(demo_repository, tmp_path, "--auth", "on")
    statuses: dict[int, int] = {}
    retry_after = set()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
        for _ in range(2000):
            connection.request("GET", "/v2/models/tabular/config", headers={"authorization": "Bearer nope"})
            answer = connection.getresponse()
            answer.read()
            statuses[answer.status] = statuses.get(answer.status, 0) + 1
            if answer.status == 429:
                retry_after.add(answer.getheader("retry-after"))
        connection.close()
    finally:
        assert server.stop() == 0, server.log()  # shutdown writes the window's counts
    assert set(statuses) == {401, 429} and statuses[401] >= 1 and statuses[429] > 1000, statuses
    assert retry_after and all(value and int(value) >= 1 for value in retry_after)
    store = AuditStore.open(f"sqlite:///{tmp_path / 'data' / 'audit.sqlite3'}")
    try:
        refused = [r for r in store.read(limit=10_000, kind="denial") if r["actor"] == "unauthenticated"]
        assert store.verify().ok
    finally:
        store.close()
    assert 1 <= len(refused) <= 10, refused
    assert sum(r["details"].get("count", 1) for r in refused) == 2000
    assert {r["details"]["source"] for r in refused} == {"127.0.0.1"}
