"""10,000 malformed requests against a real server: every one is answered with a client error and a message
that says what is wrong (REST 4xx with ``{"error": …}``; gRPC INVALID_ARGUMENT and its family), never a 5xx,
INTERNAL or UNKNOWN, and the server is alive after. The cases are generated from a fixed seed, so a failure
names a case that can be run again.
"""

from __future__ import annotations

import http.client
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import pytest

from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from tests.conftest import DhowProcess, make_key, start_dhow

SEED = 20261203
REST_CASES = 5000
GRPC_CASES = 5000
#: gRPC codes a client error may carry
CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
    }
)
MODELS = ("tabular", "text_python", "mlp", "nope", "", "..", "a" * 300, "bad\nname", "x\x00y", "ümlaut", "%2e%2e")
DATATYPES = ("FP32", "FP64", "INT64", "INT8", "BOOL", "BYTES", "FP16", "UINT8", "fp32", "", "FP99", "INT128")


@pytest.fixture(scope="module")
def fuzzed(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DhowProcess, str]]:
    root = tmp_path_factory.mktemp("fuzz")
    key = make_key(root / "data", "fuzz", ["admin"], tenant="*")
    server = start_dhow(demo_repository, root, "--auth", "on", "--auth-failure-burst", "100000")
    yield server, key
    assert server.stop() == 0, server.log()


# -- REST ---------------------------------------------------------------------------------------------


def _shape(rng: random.Random) -> Any:
    return rng.choice([[1, 32], [], [-1, 32], [0, 32], [1, 33], [2**40, 32], [1], "1,32", None, [1.5, 32], [True]])


def _data(rng: random.Random) -> Any:
    return rng.choice(
        [[0.5] * 32, [], [[0.5] * 32], ["x"] * 32, [True] * 32, None, {"a": 1}, [None] * 32, [1e400], "AAAA", [2**70]]
    )


def _tensor(rng: random.Random) -> Any:
    tensor: dict[str, Any] = {
        "name": rng.choice(["input", "text", "x", "", 5, None]),
        "datatype": rng.choice(DATATYPES),
        "shape": _shape(rng),
        "data": _data(rng),
    }
    if rng.random() < 0.3:
        tensor["parameters"] = rng.choice([{"binary_data_size": rng.choice([-1, 0, 128, 2**40])}, [], "x", None])
    for key in rng.sample(list(tensor), k=rng.randint(0, 2)):
        del tensor[key]
    return tensor


def _infer_body(rng: random.Random) -> bytes:
    document: Any = {
        "inputs": [_tensor(rng) for _ in range(rng.randint(0, 3))],
        "outputs": rng.choice(
            [None, [], [{"name": "nope"}], [{"name": 5}], "x", [{"parameters": {"classification": -1}}]]
        ),
        "parameters": rng.choice([{}, {"timeout": -5}, {"timeout": "soon"}, {"data_region": 7}, [], None]),
        "id": rng.choice(["a", 5, None, "x" * 10_000]),
    }
    if rng.random() < 0.5:
        document = {k: v for k, v in document.items() if v is not None}
    raw = json.dumps(document).encode()
    return _mangle(rng, raw)


def _mangle(rng: random.Random, raw: bytes) -> bytes:
    choice = rng.random()
    if choice < 0.15:
        return raw[: rng.randint(0, len(raw))]
    if choice < 0.25:
        position = rng.randint(0, max(0, len(raw) - 1))
        return raw[:position] + bytes([rng.randint(0, 255)]) + raw[position + 1 :]
    if choice < 0.3:
        return rng.randbytes(rng.randint(0, 200))
    return raw


def _rest_case(rng: random.Random, key: str) -> tuple[str, str, bytes, dict[str, str]]:
    model = rng.choice(MODELS)
    quoted = quote(model, safe="%")  # "%2e%2e" stays encoded: the server decodes it to ".."
    version = rng.choice(["", "/versions/1", "/versions/x", "/versions/-1", "/versions/99999999999999999999"])
    path = rng.choice(
        [
            f"/v2/models/{quoted}{version}/infer",
            f"/v2/models/{quoted}{version}",
            f"/v2/models/{quoted}{version}/ready",
            f"/v2/models/{quoted}{version}/config",
            f"/v2/models/{quoted}{version}/stats",
            f"/v2/repository/models/{quoted}/load",
            f"/v2/repository/models/{quoted}/unload",
            "/v2/repository/index",
            f"/v2/admin/deployments/{quoted}",
            f"/v2/admin/deployments/{quoted}/promote",
            "/v2/admin/keys",
            "/v2/admin/audit?since=x&limit=-1",
            "/v2/admin/audit/verify?region=%00",
            f"/v2/admin/keys/{quoted}/rotate",
        ]
    )
    method = rng.choice(["POST", "POST", "POST", "GET", "PUT", "DELETE"])
    body = _infer_body(rng) if "infer" in path or rng.random() < 0.5 else _mangle(rng, b'{"policy": {"kind": "x"}}')
    headers = {"content-type": "application/json"}
    if rng.random() < 0.9:
        headers["authorization"] = f"Bearer {key}"
    if rng.random() < 0.1:
        headers["inference-header-content-length"] = rng.choice(["-1", "abc", "999999", "0", str(len(body) + 1)])
    if rng.random() < 0.05:
        headers["content-encoding"] = rng.choice(["gzip", "br", "deflate"])
    if rng.random() < 0.05:
        headers["x-dhow-data-region"] = rng.choice(["eu", "", "eu;drop", "a" * 500])
    return method, path, body, headers


def test_malformed_rest_requests_get_client_errors(fuzzed: tuple[DhowProcess, str]) -> None:
    server, key = fuzzed
    rng = random.Random(SEED)
    bad: list[str] = []
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    for case in range(REST_CASES):
        method, path, body, headers = _rest_case(rng, key)
        try:
            connection.request(method, path, body=body, headers=headers)
            answer = connection.getresponse()
            raw = answer.read()
        except (OSError, http.client.HTTPException) as exc:
            bad.append(f"case {case}: {method} {path!r}: connection failed: {exc!r}")
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
            continue
        if answer.status >= 500 or (answer.status >= 400 and not _message(raw)):
            bad.append(f"case {case}: {method} {path!r} {headers} {body[:60]!r} -> {answer.status} {raw[:200]!r}")
    connection.close()
    assert not bad, f"{len(bad)} of {REST_CASES} malformed requests got no clear client error:\n" + "\n".join(bad[:20])
    _alive(server)


def _message(raw: bytes) -> str:
    try:
        return str(json.loads(raw).get("error") or "")
    except (ValueError, AttributeError):
        return ""


# -- gRPC ---------------------------------------------------------------------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def _grpc_case(rng: random.Random) -> tuple[str, bytes]:
    method = rng.choice([m for m in SERVICE.methods if not m.client_streaming])
    request = getattr(pb, method.input_type.name)()
    if rng.random() < 0.4:
        return method.name, rng.randbytes(rng.randint(0, 64))
    for field in ("name", "model_name"):
        if field in request.DESCRIPTOR.fields_by_name:
            setattr(request, field, rng.choice(MODELS))
    if isinstance(request, pb.ModelInferRequest):
        _fill_infer(rng, request)
    raw = request.SerializeToString()
    return method.name, _mangle(rng, raw) if rng.random() < 0.3 else raw


def _fill_infer(rng: random.Random, request: pb.ModelInferRequest) -> None:
    for _ in range(rng.randint(0, 3)):
        tensor = request.inputs.add(name=rng.choice(["input", "text", "x", ""]), datatype=rng.choice(DATATYPES))
        tensor.shape.extend(rng.choice([[1, 32], [], [-1, 32], [0], [1, 33], [2**40, 32]]))
        if rng.random() < 0.5:
            tensor.contents.fp32_contents.extend([0.5] * rng.choice([0, 31, 32, 64]))
        elif rng.random() < 0.5:
            tensor.contents.bytes_contents.extend([b"x"] * rng.choice([0, 1, 32]))
    for _ in range(rng.randint(0, 3)):
        request.raw_input_contents.append(rng.randbytes(rng.choice([0, 4, 127, 128, 256])))
    if rng.random() < 0.3:
        request.outputs.add(name=rng.choice(["nope", "", "output"]))
    if rng.random() < 0.3:
        request.parameters["timeout"].int64_param = rng.choice([-1, 0, 2**62])
    if rng.random() < 0.2:
        request.parameters["data_region"].bool_param = True


def test_malformed_grpc_requests_get_client_errors(fuzzed: tuple[DhowProcess, str]) -> None:
    server, key = fuzzed
    rng = random.Random(SEED + 1)
    bad: list[str] = []
    metadata = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(server.grpc_url) as channel:
        calls: dict[str, Callable[..., Any]] = {
            m.name: channel.unary_unary(f"/{SERVICE.full_name}/{m.name}", _raw, _raw) for m in SERVICE.methods
        }
        for case in range(GRPC_CASES):
            name, raw = _grpc_case(rng)
            try:
                calls[name](raw, metadata=metadata if rng.random() < 0.9 else (), timeout=30)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code not in CLIENT_CODES or not details:
                    bad.append(f"case {case}: {name} {raw[:80]!r} -> {code} {details[:200]!r}")
    assert not bad, f"{len(bad)} of {GRPC_CASES} malformed calls got no clear client error:\n" + "\n".join(bad[:20])
    _alive(server)


def _raw(value: bytes) -> bytes:
    return value


def _alive(server: DhowProcess) -> None:
    assert server.process.poll() is None, server.log()
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    connection.request("GET", "/v2/health/ready")
    assert connection.getresponse().status == 200
    connection.close()
