"""The chart's pod, run for real: the command, settings file and environment the chart renders start a dhow server.

What Kubernetes would do with the rendered Deployment is done here by hand: the ConfigMap's settings file is written
to disk (only the address, ports and folders changed to this machine's), the container's arguments and environment
are passed to ``dhow`` as they are. The probes' paths answer without credentials, the pod serves the models placed on
its pool and no other, and its metrics carry the scaling signals the ScaledObject queries.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import DhowProcess, free_port
from tests.test_helm_chart import container, one, render

MODEL = """
class Echo:
    def load(self):
        pass

    def predict(self, inputs):
        return {"y": inputs["x"]}
"""
MANIFEST = (
    "runtime: python\nmax_batch_size: 4\n"
    "inputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 2]}]\n"
)
FIRST_KEY = re.compile(r"^\s+(dhow_[0-9a-f]{12}_[A-Za-z0-9_-]+)\s*$", re.MULTILINE)
BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}).encode()


def _repository(root: Path) -> Path:
    for name in ("placed", "elsewhere"):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.py").write_text(MODEL)
        (root / name / "model.yaml").write_text(MANIFEST)
    return root


def _call(server: DhowProcess, path: str, key: str = "", body: bytes | None = None) -> tuple[int, bytes]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DhowProcess, str]]:
    folder = tmp_path_factory.mktemp("pod")
    manifests = render({"models": [{"name": "placed", "pool": "cpu"}]})
    settings: dict[str, Any] = yaml.safe_load(one(manifests, "ConfigMap", "dhow")["data"]["settings.yaml"])
    http_port, grpc_port = free_port(), free_port()
    settings |= {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "repository": str(_repository(folder / "models")),
        "data_dir": str(folder / "data"),
    }
    (folder / "settings.yaml").write_text(yaml.safe_dump(settings))
    main = container(one(manifests, "Deployment", "dhow-cpu"))
    args = [str(folder / "settings.yaml") if arg == "/etc/dhow/settings.yaml" else arg for arg in main["args"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHOW_")}
    env |= {variable["name"]: variable["value"] for variable in main["env"]}
    log_path = folder / "dhow.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "dhow.cli", *args], stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
    server = DhowProcess(folder / "models", http_port, grpc_port, log_path, process, args)
    try:
        server.wait_ready()
        found = FIRST_KEY.search(server.log())
        assert found, server.log()
        yield server, found.group(1)
    finally:
        assert server.stop() == 0, server.log()


def test_the_probes_answer_without_credentials(pod: tuple[DhowProcess, str]) -> None:
    server, _ = pod
    manifests = render({"models": [{"name": "placed", "pool": "cpu"}]})
    main = container(one(manifests, "Deployment", "dhow-cpu"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert _call(server, main[probe]["httpGet"]["path"])[0] == 200, probe
    assert _call(server, "/v2/models/placed/ready")[0] == 401  # the chart keeps authentication on


def test_the_pod_serves_its_pool_s_models_and_exports_the_scaling_signals(pod: tuple[DhowProcess, str]) -> None:
    server, key = pod
    status, answer = _call(server, "/v2/models/placed/infer", key, BODY)
    assert status == 200, answer
    status, answer = _call(server, "/v2/models/elsewhere/infer", key, BODY)
    assert status in (404, 503), answer  # in the repository, but placed on no pool of this pod: not loaded
    status, metrics = _call(server, "/metrics", key)
    assert status == 200
    text = metrics.decode()
    for gauge in ("dhow_queue_depth", "dhow_inflight_requests"):
        assert f'{gauge}{{model="placed",version="1"}}' in text
    assert 'model="elsewhere"' not in text
