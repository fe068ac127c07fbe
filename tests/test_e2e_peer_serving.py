"""The peers' doors against a real server, continued: TorchServe-style requests (raw bodies, JSON instances, its
error shape); the peers' requests counted in statistics and metrics and batched with v2 requests; and the
README's "Coming from TF Serving, KServe or TorchServe" examples, run as written."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DhowProcess, start_dhow
from tests.test_e2e_peer_protocols import ROWS, TABULAR_VERSION, _direct, _kserve, http_call

# -- TorchServe --------------------------------------------------------------------------------------


def test_torchserve_raw_bodies_and_json(dhow_server: DhowProcess, demo_repository: Path) -> None:
    text = "héllo wörld".encode()
    expected = _direct(demo_repository, "text_python", {"text": np.array([[text]], dtype=np.object_)})
    for method in ("POST", "PUT"):  # TorchServe's own example, curl -T file, sends a PUT
        for headers in ({}, {"Content-Type": "application/octet-stream"}):
            status, answer = http_call(dhow_server, method, "/predictions/text_python", text, headers)
            assert status == 200, answer
            assert answer == {"length": expected["length"][0].tolist(), "upper": ["HÉLLO WÖRLD"]}
    # JSON: one instance answered unwrapped, a list of instances as a list
    table = _direct(demo_repository, "tabular", {"input": ROWS}, TABULAR_VERSION)
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular", ROWS[0].tolist())
    assert status == 200 and answer["label"] == table["label"][0], answer
    np.testing.assert_allclose(answer["probabilities"], table["probabilities"][0], rtol=1e-6)
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular/2", ROWS.tolist())
    assert status == 200 and [a["label"] for a in answer] == table["label"].tolist(), answer
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular", {"input": ROWS[0].tolist()})
    assert status == 200 and answer["label"] == table["label"][0], answer
    headers = {"Content-Type": "application/json"}
    status, answer = http_call(dhow_server, "POST", "/predictions/text_python", b'["a", "bb"]', headers)
    assert status == 200 and answer == [{"length": [1], "upper": ["A"]}, {"length": [2], "upper": ["BB"]}]


def test_torchserve_errors_answer_its_shape(dhow_server: DhowProcess) -> None:
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular", b"not json")
    assert status == 400 and answer["code"] == 400 and answer["type"] == "BadRequestException"
    assert "not JSON" in answer["message"] and answer["error"] == answer["message"]
    status, answer = http_call(dhow_server, "POST", "/predictions/no_such_model", [1.0])
    assert status == 404 and answer["type"] == "ModelNotFoundException" and "unknown model" in answer["message"]
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular", {"x": [1.0]})
    assert status == 400 and "keys are input names" in answer["message"]
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular", [[[0.0] * 32]])
    assert status == 400 and "nests 3 lists deep" in answer["message"]


# -- counted like any inference ------------------------------------------------------------------------


def _inference_count(server: DhowProcess, model: str) -> int:
    status, answer = http_call(server, "GET", f"/v2/models/{model}/stats")
    assert status == 200, answer
    return sum(stat["inference_count"] for stat in answer["model_stats"])


def _requests_metric(server: DhowProcess, model: str) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    prefix = f'dhow_inference_requests_total{{model="{model}",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_every_door_is_counted_in_statistics_and_metrics(dhow_server: DhowProcess) -> None:
    model = "tabular_lightgbm"
    rows_before, requests_before = _inference_count(dhow_server, model), _requests_metric(dhow_server, model)
    calls = [
        ("POST", f"/v1/models/{model}:predict", {"instances": ROWS.tolist()}),  # 3 rows
        ("POST", f"/v1/models/{model}:predict", {"inputs": ROWS[:2].tolist()}),  # 2 rows
        ("POST", f"/predictions/{model}", ROWS[0].tolist()),  # 1 row
    ]
    for method, path, body in calls:
        status, answer = http_call(dhow_server, method, path, body)
        assert status == 200, answer
    assert _inference_count(dhow_server, model) - rows_before == 6
    assert _requests_metric(dhow_server, model) - requests_before == len(calls)


# -- batched like any inference ------------------------------------------------------------------------

ECHO_MODEL = """
import numpy as np


class Echo:
    def load(self):
        pass

    def predict(self, inputs):
        x = inputs["x"]
        # every row says how many rows its batch had
        return {"y": x * 2 + 1, "batch": np.full((x.shape[0], 1), x.shape[0], dtype=np.int64)}
"""
ECHO_YAML = """runtime: python
max_batch_size: 16
batching: {max_queue_delay_ms: 20}
inputs: [{name: x, datatype: INT64, shape: [-1, 2]}]
outputs: [{name: y, datatype: INT64, shape: [-1, 2]}, {name: batch, datatype: INT64, shape: [-1, 1]}]
"""


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DhowProcess]:
    root = tmp_path_factory.mktemp("peer-batching")
    (root / "models" / "echo" / "1").mkdir(parents=True)
    (root / "models" / "echo" / "model.yaml").write_text(ECHO_YAML, encoding="utf-8")
    (root / "models" / "echo" / "1" / "model.py").write_text(ECHO_MODEL, encoding="utf-8")
    server = start_dhow(root / "models", root)
    yield server
    assert server.stop() == 0, server.log()


def test_the_peers_requests_share_batches_with_v2_requests(echo_server: DhowProcess) -> None:
    """Each door's requests queue for the same batcher: every request gets its own row back, from batches that
    held several requests."""

    def send(i: int) -> tuple[list[int], int]:
        row = [i, -i]
        door = i % 3
        if door == 0:
            status, answer = http_call(echo_server, "POST", "/v1/models/echo:predict", {"instances": [row]})
            assert status == 200, answer
            (prediction,) = answer["predictions"]
        elif door == 1:
            status, prediction = http_call(echo_server, "POST", "/predictions/echo", row)
            assert status == 200, prediction
        else:
            body = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 2], "data": row}]}
            status, answer = http_call(echo_server, "POST", "/v2/models/echo/infer", body)
            assert status == 200, answer
            outputs = {o["name"]: o["data"] for o in answer["outputs"]}
            prediction = {"y": outputs["y"], "batch": outputs["batch"]}
        return prediction["y"], prediction["batch"][0]

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(send, range(120)))
    for i, (y, _) in enumerate(answers):
        assert y == [2 * i + 1, -2 * i + 1], i
    for door in range(3):
        assert max(batch for i, (_, batch) in enumerate(answers) if i % 3 == door) > 1, f"door {door} never batched"


# -- the README's examples, run as written ----------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_block(heading: str, fence: str) -> str:
    """The first ``fence`` code block after ``heading`` in the README."""
    _, found, section = README.read_text(encoding="utf-8").partition(f"\n{heading}\n")
    assert found, f"README.md has no {heading!r}"
    _, opened, rest = section.partition(f"```{fence}\n")
    block, closed, _ = rest.partition("\n```")
    assert opened and closed, f"no ```{fence} block after {heading!r}"
    return block


def test_the_readme_sends_the_same_request_to_every_door(dhow_server: DhowProcess) -> None:
    script = _readme_block("### The same request at every door", "sh").replace("127.0.0.1:8080", dhow_server.http_url)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, "DHOW_KEY": "unused-without-auth"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    v2, row, columnar, torchserve = (json.loads(line) for line in done.stdout.splitlines() if line.strip())
    probabilities = next(o["data"] for o in v2["outputs"] if o["name"] == "probabilities")
    assert row["predictions"][0]["probabilities"] == probabilities
    assert columnar["outputs"]["probabilities"] == [probabilities]
    assert torchserve["probabilities"] == probabilities


def test_the_readme_kserve_sdk_example_runs(dhow_server: DhowProcess) -> None:
    _kserve()
    script = _readme_block(
        "With KServe's SDK (`pip install kserve`), the same over its v1, v2 and gRPC clients:", "python"
    )
    script = script.replace("127.0.0.1:8080", dhow_server.http_url).replace("127.0.0.1:8081", dhow_server.grpc_url)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "DHOW_KEY": "unused-without-auth"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True\n") and "predictions" in done.stdout, done.stdout
