"""What a browser and an operator see of a real server: CORS, the access log, model faults in the log."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DhowProcess, start_dhow

SAFETY_S = 60.0

FAILING_MODEL = """
class Failing:
    def load(self):
        pass

    def predict(self, inputs):
        return {"y": check_sign(inputs["x"])}


def check_sign(x):
    if float(x.reshape(-1)[0]) < 0:
        raise RuntimeError("a negative input from bob@example.com")
    return x
"""
MANIFEST = (
    "runtime: python\nmax_batch_size: 4\n{instances}"
    "inputs: [{{name: x, datatype: FP32, shape: [-1, 2]}}]\noutputs: [{{name: y, datatype: FP32, shape: [-1, 2]}}]\n"
)
NEGATIVE = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [-1.0, 2.0]}]})
POSITIVE = NEGATIVE.replace("-1.0", "1.0")


def _failing_models(repository: Path) -> Path:
    for name, instances in (("failing", ""), ("failing_process", "instances: {count: 1, kind: process}\n")):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "1" / "model.py").write_text(FAILING_MODEL)
        (repository / name / "model.yaml").write_text(MANIFEST.format(instances=instances))
    return repository


def _call(
    server: DhowProcess, method: str, path: str, body: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=SAFETY_S)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def _wait_for_log(server: DhowProcess, text: str) -> str:
    deadline = time.monotonic() + SAFETY_S
    while time.monotonic() < deadline:
        log = server.log()
        if text in log:
            return log
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} did not appear in the log:\n{server.log()}")


@pytest.fixture(scope="module")
def failing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DhowProcess]:
    folder = tmp_path_factory.mktemp("observability")
    server = start_dhow(_failing_models(folder / "models"), folder)
    yield server
    assert server.stop() == 0, server.log()


@pytest.mark.parametrize("model", ["failing", "failing_process"])
def test_a_model_fault_is_logged_with_its_traceback_masked(failing_server: DhowProcess, model: str) -> None:
    status, _, body = _call(failing_server, "POST", f"/v2/models/{model}/infer", NEGATIVE)
    assert status == 500
    error_id = json.loads(body)["error"].split("error id ")[1].split(";")[0]
    assert "Traceback" not in body.decode() and "check_sign" not in body.decode()
    log = _wait_for_log(failing_server, f"(error id {error_id})")
    entry = log[log.index(f"(error id {error_id})") :]
    # the model's own frames, and its message masked like every log line
    assert "Traceback (most recent call last)" in entry
    assert "in check_sign" in entry and 'raise RuntimeError("a negative input from' in entry
    assert "bob@example.com" not in log
    assert _call(failing_server, "POST", f"/v2/models/{model}/infer", POSITIVE)[0] == 200


# -- CORS -----------------------------------------------------------------------------------------------

APP = "https://app.example.com"


def _preflight(
    server: DhowProcess, origin: str, method: str = "POST", headers: str = "authorization, content-type"
) -> tuple[int, dict[str, str], bytes]:
    return _call(
        server,
        "OPTIONS",
        "/v2/models/failing/infer",
        headers={"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers},
    )


def test_cors_is_off_by_default(failing_server: DhowProcess) -> None:
    status, headers, _ = _preflight(failing_server, APP)
    assert status == 405 and not any(name.startswith("access-control-") for name in headers)
    status, headers, _ = _call(failing_server, "POST", "/v2/models/failing/infer", POSITIVE, {"Origin": APP})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_answers_preflights_for_allowed_origins_only(tmp_path: Path) -> None:
    server = start_dhow(_failing_models(tmp_path / "models"), tmp_path, "--cors-origin", APP)
    try:
        status, headers, _ = _preflight(server, APP)
        assert status == 204
        assert headers["access-control-allow-origin"] == APP
        assert "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"]
        assert headers["vary"] == "origin"
        status, headers, body = _call(server, "POST", "/v2/models/failing/infer", POSITIVE, {"Origin": APP})
        assert status == 200 and headers["access-control-allow-origin"] == APP
        assert "x-request-id" in headers["access-control-expose-headers"]

        status, headers, body = _preflight(server, "https://evil.example.net")
        assert status == 403 and "access-control-allow-origin" not in headers
        assert "origin 'https://evil.example.net' may not call this server" in json.loads(body)["error"]
        status, _, body = _preflight(server, APP, method="PATCH")
        assert status == 403 and "method 'PATCH' is not allowed" in json.loads(body)["error"]
        status, _, body = _preflight(server, APP, headers="x-secret")
        assert status == 403 and "header 'x-secret' is not allowed" in json.loads(body)["error"]
        status, headers, _ = _call(server, "GET", "/v2", headers={"Origin": "https://evil.example.net"})
        assert status == 200 and "access-control-allow-origin" not in headers
    finally:
        assert server.stop() == 0, server.log()


def test_a_cors_origin_that_is_not_an_origin_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    server = start_dhow(tmp_path / "models", tmp_path, "--cors-origin", "app.example.com/path", wait=False)
    assert server.process.wait(60) == 2
    assert "is not a web origin: give scheme://host[:port]" in server.log()


# -- the access log -----------------------------------------------------------------------------------


def test_every_request_gets_one_masked_access_log_line(failing_server: DhowProcess) -> None:
    _call(failing_server, "POST", "/v2/models/failing/infer", POSITIVE, {"x-request-id": "checkout-42"})
    log = _wait_for_log(failing_server, "request_id=checkout-42")
    line = next(line for line in log.splitlines() if "request_id=checkout-42" in line)
    assert " dhow.http: POST /v2/models/failing/infer 200 " in line and "ms principal=anonymous " in line
    # PII in the path: the line is masked like every line
    _call(failing_server, "GET", "/v2/models/bob@example.com/ready", headers={"x-request-id": "pii-1"})
    line = next(line for line in _wait_for_log(failing_server, "request_id=pii-1").splitlines() if "pii-1" in line)
    assert "/v2/models/[REDACTED:email]/ready 404 " in line and "bob@example.com" not in line
    # a request id that is not a plain token is replaced, never written as sent
    _call(failing_server, "GET", "/v2/health/live", headers={"x-request-id": "a b"})
    assert "request_id=a b" not in failing_server.log()


def test_the_access_log_can_be_turned_off(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    server = start_dhow(tmp_path / "models", tmp_path, "--no-access-log")
    try:
        assert _call(server, "GET", "/v2/health/live", headers={"x-request-id": "quiet-1"})[0] == 200
    finally:
        assert server.stop() == 0
    assert "dhow.http" not in server.log()
