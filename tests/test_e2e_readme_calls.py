"""README's "Calling a model" and "Security", walked as a new user does, against a real server with keys on.

What a first walk through them found: the tritonclient example failed over gRPC when its import was swapped as
its comment says; an expired key was told to use "the key that replaced it" when none had; a key's name given
to ``dhow keys revoke`` was "no API key with id" without the id it names; JSON's ``NaN`` and TorchServe's
multipart forms, which the README says are not taken, were refused with a parser's message (and a multipart
body sent to a BYTES model was taken as its data); ``dhow audit verify`` printed its head in another form than
the ``SEQ:HASH`` that ``--expect-head`` takes; a server whose models failed to load (``--require-digests``)
answered health/ready "not ready" without a word on why; the README's key rotation for encrypted models lacked
the key file.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import dhow
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import DhowProcess, start_dhow, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"
FIRST_KEY = re.compile(r"^\s+(dhow_[0-9a-f]{12}_[A-Za-z0-9_-]+)\s*$", re.MULTILINE)
ROW = np.linspace(-1, 1, 32, dtype=np.float32)
INFER_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": ROW.tolist()}]}


@pytest.fixture(scope="module")
def world(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("readme-calls")
    repository = root / "models"
    for name in ("tabular", "text_python"):
        shutil.copytree(demo_repository / name, repository / name)
    server = start_dhow(repository, root, "--auth", "on", "--registry-poll", "0.3")
    found = FIRST_KEY.search(server.log())
    assert found, f"the server printed no first-start key:\n{server.log()}"
    yield {"server": server, "key": found.group(1), "data": root / "data", "root": root}
    assert server.stop() == 0, server.log()


def call(server: DhowProcess, path: str, body: bytes, key: str, **headers: str) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        connection.request("POST", path, body=body, headers={"authorization": f"Bearer {key}", **sent})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def grpc_infer(server: DhowProcess, key: str) -> grpc.RpcError | None:
    request = pb.ModelInferRequest(
        model_name="tabular",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 32])],
        raw_input_contents=[ROW.tobytes()],
    )
    with grpc.insecure_channel(server.grpc_url) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=[("authorization", f"Bearer {key}")], timeout=20
            )
        except grpc.RpcError as exc:
            return exc
    return None


def dhow_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dhow.cli", *args], capture_output=True, text=True, timeout=60)


def _python_block_after(readme: str, lead: str) -> str:
    _, found, section = readme.partition(lead)
    assert found, f"README.md has no {lead!r}"
    _, fence, rest = section.partition("```python\n")
    block, closed, _ = rest.partition("\n```")
    assert fence and closed, f"no closed ```python block after {lead!r}"
    return block


def test_the_tritonclient_example_runs_as_written_over_rest_and_over_grpc(world: dict[str, Any]) -> None:
    pytest.importorskip("tritonclient.grpc")
    pytest.importorskip("tritonclient.http")
    server = world["server"]
    block = _python_block_after(README.read_text(encoding="utf-8"), "With `tritonclient`")
    # the block's own comments say what changes for gRPC: the import and the port
    imports = re.findall(
        r"^(import tritonclient\.http as (\w+))\s+# gRPC: (import tritonclient\.grpc as \2)", block, re.M
    )
    assert len(imports) == 1, "the example should name, beside its import, the one to use for gRPC"
    rest_import, _, grpc_import = imports[0]
    assert block.count('"127.0.0.1:8080"') == 1 and '"127.0.0.1:8081"' in block
    doors = {
        "REST": block.replace('"127.0.0.1:8080"', f'"{server.http_url}"'),
        "gRPC": block.replace(rest_import, grpc_import).replace('"127.0.0.1:8080"', f'"{server.grpc_url}"'),
    }
    environment = {
        **os.environ,
        "DHOW_KEY": world["key"],
        "PYTHONPATH": str(Path(dhow.__file__).resolve().parent.parent),
    }
    for door, script in doors.items():
        done = subprocess.run(
            [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"over {door}:\n{done.stderr}"
        assert done.stdout.count("[") >= 5 and "tabular" in done.stdout, f"over {door}:\n{done.stdout}"


def test_an_expired_key_is_told_what_to_do_over_rest_and_grpc(world: dict[str, Any]) -> None:
    server, data = world["server"], world["data"]
    made = dhow_cli("keys", "create", "short-lived", "--role", "invoker", "--expires-in", "1", "--data-dir", str(data))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    wait_until(lambda: "expired" in json.dumps(call(server, "/v2/models/tabular/infer", b"{}", token)[1]), 20)
    status, answer = call(server, "/v2/models/tabular/infer", json.dumps(INFER_BODY).encode(), token)
    assert status == 401
    # nothing replaced this key: a new one is what its holder needs
    assert "replaced" not in answer["error"] and "dhow keys create" in answer["error"], answer
    refused = grpc_infer(server, token)
    assert refused is not None and refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.details() == answer["error"]


def test_a_rotated_key_past_its_grace_is_told_to_use_the_new_one(world: dict[str, Any]) -> None:
    server, data = world["server"], world["data"]
    made = dhow_cli("keys", "create", "rotating", "--role", "invoker", "--data-dir", str(data))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    rotated = dhow_cli("keys", "rotate", token.split("_")[1], "--grace", "1", "--data-dir", str(data))
    assert rotated.returncode == 0, rotated.stderr
    wait_until(lambda: "expired" in json.dumps(call(server, "/v2/models/tabular/infer", b"{}", token)[1]), 20)
    answer = call(server, "/v2/models/tabular/infer", b"{}", token)[1]
    assert "rotated" in answer["error"] and "use the key that replaced it" in answer["error"], answer


def test_a_key_named_by_its_name_is_answered_with_its_id(world: dict[str, Any]) -> None:
    data = world["data"]
    made = dhow_cli("keys", "create", "ci-bot", "--role", "invoker", "--data-dir", str(data))
    key_id = made.stdout.strip().splitlines()[-1].split("_")[1]
    for action in (("revoke",), ("rotate", "--grace", "60")):
        refused = dhow_cli("keys", action[0], "ci-bot", *action[1:], "--data-dir", str(data))
        assert refused.returncode == 2, refused.stdout
        assert f"'ci-bot' is the name of key {key_id}" in refused.stderr, refused.stderr
        assert f"dhow keys {action[0]} {key_id}" in refused.stderr, refused.stderr


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v2/models/tabular/infer",
            b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [NaN]}]}',
        ),
        ("/v1/models/tabular:predict", b'{"instances": [[Infinity, 0]]}'),
        ("/predictions/tabular", b"[-Infinity, 1]"),
    ],
)
def test_json_nan_and_infinity_are_refused_saying_so(world: dict[str, Any], path: str, body: bytes) -> None:
    status, answer = call(world["server"], path, body, world["key"], content_type="application/json")
    assert status == 400
    assert "JSON has no NaN or Infinity" in answer["error"] and "binary" in answer["error"], answer


@pytest.mark.parametrize("model", ["tabular", "text_python"])
def test_a_multipart_form_is_refused_saying_to_send_the_file_as_the_body(world: dict[str, Any], model: str) -> None:
    boundary = "x1234"
    body = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="data"; filename="a.txt"\r\n\r\n'
        f"hello\r\n--{boundary}--\r\n"
    ).encode()
    status, answer = call(
        world["server"],
        f"/predictions/{model}",
        body,
        world["key"],
        content_type=f"multipart/form-data; boundary={boundary}",
    )
    # text_python's one input is BYTES: the form must not be taken as its element
    assert status == 400, answer
    assert "multipart" in answer["error"] and "as the body" in answer["error"], answer
    assert answer["type"] == "BadRequestException"


def test_audit_verify_prints_the_head_that_expect_head_takes(world: dict[str, Any]) -> None:
    data = world["data"]
    call(world["server"], "/v2/models/tabular/infer", json.dumps(INFER_BODY).encode(), world["key"])
    verified = dhow_cli("audit", "verify", "--data-dir", str(data))
    assert verified.returncode == 0, verified.stderr
    head = re.search(r"head (\d+:[0-9a-f]{64})\b", verified.stdout)
    assert head, verified.stdout
    anchored = dhow_cli("audit", "verify", "--data-dir", str(data), "--expect-head", head.group(1))
    assert anchored.returncode == 0, anchored.stdout + anchored.stderr


def test_a_server_whose_models_fail_to_load_says_why_it_is_not_ready(demo_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    shutil.copytree(demo_repository / "tabular", repository / "tabular")
    # "--require-digests then loads nothing else": nothing is trusted here, so tabular does not load
    server = start_dhow(
        repository, tmp_path, "--require-digests", wait=False, started=lambda s: "dhow is ready" in s.log()
    )
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        connection.request("GET", "/v2/health/ready")
        answer = connection.getresponse()
        body = json.loads(answer.read())
        connection.close()
        assert answer.status == 503 and body["ready"] is False
        assert "POST /v2/repository/index" in body["error"] and "tabular" not in body["error"], body
        assert "not ready while model(s) tabular have no version loaded" in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_the_encryption_at_rest_commands_run_as_written_and_the_server_serves_the_result(
    demo_repository: Path, tmp_path: Path
) -> None:
    readme = README.read_text(encoding="utf-8")
    _, found, section = readme.partition("- **[Encryption at rest]")
    assert found
    bullet = section.split("\n- **[", 1)[0]
    commands = re.findall(r"`(dhow models [^`]+)`", bullet)
    assert [c.split()[2] for c in commands] == ["keygen", "encrypt", "keygen", "rewrap"], commands
    shutil.copytree(demo_repository / "tabular", tmp_path / "models" / "tabular")
    environment = {**os.environ, "PYTHONPATH": str(Path(dhow.__file__).resolve().parent.parent)}
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-m", "dhow.cli", *command.split()[1:]],
            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, f"{command}:\n{done.stdout}{done.stderr}"
    assert list((tmp_path / "models" / "tabular" / "2").glob("*.enc"))
    server = start_dhow(tmp_path / "models", tmp_path, "--kek-file", str(tmp_path / "kek.txt"))
    try:
        status, answer = call(server, "/v2/models/tabular/infer", json.dumps(INFER_BODY).encode(), "-")
        assert status == 200 and answer["model_version"] == "2", answer
    finally:
        assert server.stop() == 0, server.log()


def test_grpc_contents_in_the_wrong_field_are_refused_naming_the_right_one(world: dict[str, Any]) -> None:
    server = world["server"]
    sent = {
        "int_contents": pb.InferTensorContents(int_contents=[0] * 32),
        "nothing": None,
    }
    answers = {}
    for what, contents in sent.items():
        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 32])
        if contents is not None:
            tensor.contents.CopyFrom(contents)
        with grpc.insecure_channel(server.grpc_url) as channel, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                pb.ModelInferRequest(model_name="tabular", inputs=[tensor]),
                metadata=[("authorization", f"Bearer {world['key']}")],
                timeout=20,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        answers[what] = refused.value.details()
    assert "needs 32 element(s) in contents.fp32_contents" in answers["int_contents"]
    assert "filled contents.int_contents" in answers["int_contents"], answers
    assert "raw_input_contents" in answers["nothing"], answers


def test_a_batch_over_max_batch_size_is_told_to_split_over_rest_and_grpc(world: dict[str, Any]) -> None:
    server, key = world["server"], world["key"]
    rows = np.zeros((100, 32), dtype=np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [100, 32], "data": rows.ravel().tolist()}]}
    status, answer = call(server, "/v2/models/tabular/infer", json.dumps(body).encode(), key)
    assert status == 400
    assert answer["error"] == (
        "model 'tabular' takes at most 64 rows a request (its max_batch_size), got 100: split them into requests "
        "of at most 64 rows"
    )
    request = pb.ModelInferRequest(
        model_name="tabular",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[100, 32])],
        raw_input_contents=[rows.tobytes()],
    )
    with grpc.insecure_channel(server.grpc_url) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=[("authorization", f"Bearer {key}")], timeout=20
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.value.details() == answer["error"]


def test_a_missing_permission_names_the_roles_that_grant_it_over_rest_and_grpc(world: dict[str, Any]) -> None:
    server, data = world["server"], world["data"]
    made = dhow_cli("keys", "create", "scoped", "--role", "invoker:text*", "--data-dir", str(data))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    wait_until(lambda: call(server, "/v2/models/tabular/infer", b"{}", token)[0] == 403, 20)
    status, answer = call(server, "/v2/models/tabular/infer", json.dumps(INFER_BODY).encode(), token)
    assert status == 403
    assert answer["error"].endswith(
        "lacks permission 'infer' on model 'tabular' (its roles: invoker:text*); "
        "roles that grant it: admin, invoker (e.g. 'invoker:tabular')"
    ), answer
    refused = grpc_infer(server, token)
    assert refused is not None and refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.details() == answer["error"]
