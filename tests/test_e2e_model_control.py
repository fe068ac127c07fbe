"""Model control against a real server: explicit load/unload over REST and gRPC, polling the
repository, refusals, and a version swap under continuous requests with zero failures."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import DhowProcess, start_dhow, wait_until

KEEP = ("tabular", "mlp", "text_python")


def _trim(repository: Path) -> Path:
    for folder in repository.iterdir():
        if folder.name not in KEEP:
            shutil.rmtree(folder)
    return repository


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    wait_until(condition, timeout)


def _tabular_input(module: object = httpclient) -> list[object]:
    tensor = module.InferInput("input", [1, 32], "FP32")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(np.full((1, 32), 0.25, np.float32))
    return [tensor]


def test_explicit_control(repository_copy: Path, tmp_path: Path) -> None:
    server = start_dhow(_trim(repository_copy), tmp_path, "--model-control", "explicit", "--load-model", "tabular")
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        index = {row["name"]: row for row in http.get_model_repository_index()}
        assert index["tabular"]["state"] == "READY"
        assert index["mlp"]["state"] == "UNAVAILABLE" and index["mlp"]["reason"] == "unloaded"
        assert not http.is_model_ready("mlp")
        mlp_input = httpclient.InferInput("input", [1, 512], "FP32")
        mlp_input.set_data_from_numpy(np.zeros((1, 512), np.float32))
        with pytest.raises(InferenceServerException) as caught:
            http.infer("mlp", [mlp_input])
        assert caught.value.status() == "503" and "not loaded" in caught.value.message()

        http.load_model("mlp")
        assert http.is_model_ready("mlp")
        grpc.unload_model("mlp")
        assert not grpc.is_model_ready("mlp")
        grpc.load_model("text_python")
        assert grpc.is_model_ready("text_python")
        ready = {row.name for row in grpc.get_model_repository_index().models if row.state == "READY"}
        assert ready == {"tabular", "text_python"}

        # a config override (model.yaml fields as JSON) reloads with new settings
        override = {
            "runtime": "onnx",
            "max_batch_size": 8,
            "version_policy": {"all": True},
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 32]}],
        }
        http.load_model("tabular", config=json.dumps(override))
        assert http.get_model_config("tabular")["max_batch_size"] == 8
        assert http.get_model_metadata("tabular")["versions"] == ["1", "2"]
        assert http.infer("tabular", _tabular_input(), model_version="1").as_numpy("probabilities").shape == (1, 2)

        for bad, fragment in (
            (lambda: http.load_model("no_such_model"), "no_such_model"),
            (lambda: http.load_model("tabular", config="{not json"), "not valid JSON"),
            (
                lambda: http.load_model("tabular", config=json.dumps({"runtime": "onnx", "max_batch_size": "x"})),
                "max_batch_size",
            ),
            (
                lambda: http.load_model("tabular", files={"file:1/model.onnx": b"x"}, config="{}"),
                "--allow-model-upload",
            ),
            (lambda: http.unload_model("mlp"), "not loaded"),
        ):
            with pytest.raises(InferenceServerException) as caught:
                bad()
            assert fragment in caught.value.message(), caught.value.message()
        assert http.is_model_ready("tabular"), "a refused load must leave the model serving"
    finally:
        http.close()
        grpc.close()
        assert server.stop() == 0


def test_model_upload_when_allowed(repository_copy: Path, tmp_path: Path) -> None:
    server = start_dhow(_trim(repository_copy), tmp_path, "--model-control", "explicit", "--allow-model-upload")
    http = httpclient.InferenceServerClient(server.http_url)
    try:
        onnx_bytes = (repository_copy / "tabular" / "1" / "model.onnx").read_bytes()
        config = json.dumps({"runtime": "onnx", "max_batch_size": 16})
        http.load_model("uploaded", config=config, files={"file:1/model.onnx": onnx_bytes})
        assert http.is_model_ready("uploaded")
        assert http.infer("uploaded", _tabular_input()).as_numpy("label").shape == (1,)
        with pytest.raises(InferenceServerException, match="version"):
            http.load_model(
                "sneaky", config=config, files={"file:../../etc/x": base64.b64decode(base64.b64encode(b"x"))}
            )
    finally:
        http.close()
        assert server.stop() == 0


def test_api_load_is_refused_unless_explicit(dhow_server: DhowProcess) -> None:
    http = httpclient.InferenceServerClient(dhow_server.http_url)
    try:
        with pytest.raises(InferenceServerException) as caught:
            http.unload_model("tabular")
        assert caught.value.status() == "403" and "--model-control explicit" in caught.value.message()
        assert http.is_model_ready("tabular")
    finally:
        http.close()


def test_poll_follows_the_repository_and_swaps_with_no_failed_request(repository_copy: Path, tmp_path: Path) -> None:
    repository = _trim(repository_copy)
    server = start_dhow(repository, tmp_path, "--model-control", "poll", "--poll-interval", "0.2")
    http = httpclient.InferenceServerClient(server.http_url)
    failures: list[str] = []
    answered: list[str] = []  # the version of each answer, in their order
    stop = threading.Event()

    def hammer() -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            while not stop.is_set():
                try:
                    result = client.infer("tabular", _tabular_input())
                    answered.append(result.get_response()["model_version"])
                except Exception as exc:
                    failures.append(repr(exc))
        finally:
            client.close()

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    try:
        for worker in workers:
            worker.start()
        # each swap comes under traffic, and traffic runs on each version after it, however slow the machine (a
        # failure ends the wait: the checks below say what it was)
        _wait_for(lambda: "2" in answered or bool(failures))
        staging = repository / "tabular" / ".staging-3"
        shutil.copytree(repository / "tabular" / "1", staging)
        staging.rename(repository / "tabular" / "3")  # appears whole
        _wait_for(lambda: http.get_model_metadata("tabular")["versions"] == ["3"])
        _wait_for(lambda: "3" in answered or bool(failures))
        shutil.rmtree(repository / "tabular" / "3")
        _wait_for(lambda: http.get_model_metadata("tabular")["versions"] == ["2"])
        since = len(answered)
        _wait_for(lambda: "2" in answered[since:] or bool(failures))
        stop.set()
        for worker in workers:
            worker.join()
        assert failures == [], failures[:5]
        assert {"2", "3"} <= set(answered)

        # a new model appears, a broken one is reported, a removed one is unloaded
        shutil.copytree(repository / "mlp", repository / "mlp_copy")
        _wait_for(lambda: http.is_model_ready("mlp_copy"))
        (repository / "bad" / "1").mkdir(parents=True)
        (repository / "bad" / "model.yaml").write_text("runtime: onnx\nmax_batch_size: many\n")
        _wait_for(  # "unloaded" until the poller has tried it
            lambda: any(
                r["name"] == "bad" and r["state"] == "UNAVAILABLE" and r["reason"] != "unloaded"
                for r in http.get_model_repository_index()
            )
        )
        reason = next(r["reason"] for r in http.get_model_repository_index() if r["name"] == "bad")
        assert "max_batch_size" in reason and "model.yaml" in reason
        shutil.rmtree(repository / "mlp")
        _wait_for(lambda: not any(r["name"] == "mlp" for r in http.get_model_repository_index()))
        assert http.is_model_ready("tabular")
    finally:
        stop.set()
        http.close()
        assert server.stop() == 0
