"""Feedback with several server processes (README, "Feedback and the quality guard"): with ``--redis`` the
predictions awaiting their label are shared, so labels sent to whichever worker the kernel picks join every
request's prediction, whichever worker answered it; the accuracy is the one computed offline."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from redis import Redis
from sklearn.metrics import accuracy_score

from tests.conftest import REDIS_URL, DhowProcess, http_request, start_dhow, wait_until

MODEL = """
import numpy as np

class Threshold:
    def load(self):
        pass

    def predict(self, inputs):
        return {"label": (inputs["x"][:, 0] > 0.0).astype(np.int64)}
"""
MANIFEST = (
    "runtime: python\nmax_batch_size: 8\n"
    "inputs: [{name: x, datatype: FP32, shape: [-1, 3]}]\n"
    "outputs: [{name: label, datatype: INT64, shape: [-1]}]\n"
    "monitoring:\n  feedback: {task: classification}\n"
)


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[DhowProcess, str]]:
    root = tmp_path_factory.mktemp("shared-feedback")
    model = f"graded_{secrets.token_hex(3)}"  # (its keys in Redis are this test's own)
    (root / "models" / model / "1").mkdir(parents=True)
    (root / "models" / model / "model.yaml").write_text(MANIFEST)
    (root / "models" / model / "1" / "model.py").write_text(MODEL)
    server = start_dhow(root / "models", root, "--workers", "2", "--redis", redis_url)
    try:
        wait_until(lambda: "2 workers are ready" in server.log(), 120.0, "both workers")
        yield server, model
    finally:
        assert server.stop() == 0, server.log()
        with Redis.from_url(redis_url) as client:
            keys = list(client.scan_iter(f"dhow:feedback:{model}:*"))
            if keys:
                client.delete(*keys)


def _call(server: DhowProcess, method: str, path: str, body: Any = None) -> Any:
    """One call on a connection of its own (the kernel spreads connections over the workers): status, JSON."""
    status, answer = http_request(server.http_port, method, path, None if body is None else json.dumps(body).encode())
    return status, json.loads(answer or b"null")


def _written(server: DhowProcess) -> float:
    text = http_request(server.http_port, "GET", "/metrics")[1].decode()
    prefix = 'dhow_feedback_shared_total{outcome="written"} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_labels_join_the_predictions_of_every_worker(workers: tuple[DhowProcess, str]) -> None:
    server, model = workers
    rng = np.random.default_rng(5)
    predictions: dict[str, int] = {}
    truth: dict[str, int] = {}
    for index in range(60):
        x = rng.normal(0.0, 1.0, (1, 3)).astype(np.float32)
        request_id = f"{model}-{index}"
        body = {"id": request_id, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                              "data": x.ravel().tolist()}]}  # fmt: skip
        status, answer = _call(server, "POST", f"/v2/models/{model}/infer", body)
        assert status == 200, answer
        predictions[request_id] = answer["outputs"][0]["data"][0]
        truth[request_id] = int(x[0, 0] > 0.3)
    # each worker writes what it kept every quarter of a second: all of them, once written
    wait_until(lambda: _written(server) == 60, 10.0, "the predictions written")
    # both workers answered some of them (60 connections: one worker alone is a chance of 2^-59)
    with Redis.from_url(REDIS_URL) as client:
        owners = {key.decode().split(":")[-2] for key in client.zrange(f"dhow:feedback:{model}:index", 0, -1)}
    assert len(owners) == 2, owners

    status, result = _call(server, "POST", f"/v2/models/{model}/feedback", {"labels": {**truth, "never-seen": 1}})
    assert status == 200, result
    assert result["joined"] == 60 and result["unmatched_ids"] == ["never-seen"], result
    assert result["pending"] == 0, result
    ids = sorted(truth)
    expected = accuracy_score([truth[i] for i in ids], [predictions[i] for i in ids])
    assert result["quality"]["1"] == {"labels": 60, **result["quality"]["1"], "accuracy": round(expected, 6)}

    # a label sent again, to any worker, is told labelled already: never counted twice
    for _ in range(4):
        status, again = _call(server, "POST", f"/v2/models/{model}/feedback", {"labels": {ids[0]: 1}})
        assert status == 200 and again["joined"] == 0 and again["already_joined_ids"] == [ids[0]], again
