"""Loads and reloads against a real server: what the repository API answers when a load is wrong, what the
index says when a reload fails, and that a failed reload leaves the previous copy serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import DhowProcess, start_dhow, wait_until


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


def _call(server: DhowProcess, method: str, path: str, document: object = None) -> Answer:
    data = None if document is None else json.dumps(document).encode()
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            raw, status, headers = answer.read(), answer.status, answer.headers
    except urllib.error.HTTPError as error:
        raw, status, headers = error.read(), error.code, error.headers
    return Answer(status, {k.lower(): v for k, v in headers.items()}, json.loads(raw) if raw else None)


def _load(server: DhowProcess, name: str, **parameters: str) -> Answer:
    return _call(server, "POST", f"/v2/repository/models/{name}/load", {"parameters": parameters})


def _index(server: DhowProcess) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = _call(server, "POST", "/v2/repository/index", {}).body
    return rows


def _infer(server: DhowProcess, name: str, version: str = "") -> Answer:
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/infer"
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 32], "data": [0.25] * 32}
    return _call(server, "POST", path, {"inputs": [tensor]})


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    wait_until(condition, timeout)


@pytest.fixture
def tabular_only(repository_copy: Path) -> Path:
    for folder in repository_copy.iterdir():
        if folder.name != "tabular":
            shutil.rmtree(folder)
    return repository_copy


def test_a_load_of_an_unknown_model_is_404_and_leaves_no_entry(tabular_only: Path, tmp_path: Path) -> None:
    server = start_dhow(tabular_only, tmp_path, "--model-control", "explicit", "--load-model", "tabular")
    try:
        answer = _load(server, "no_such_model")
        assert answer.status == 404 and "no_such_model" in answer.body["error"], answer
        assert [row["name"] for row in _index(server)] == ["tabular"]
        assert _infer(server, "no_such_model").status == 404
    finally:
        assert server.stop() == 0


def test_an_invalid_config_is_a_bad_request(tabular_only: Path, tmp_path: Path) -> None:
    server = start_dhow(tabular_only, tmp_path, "--model-control", "explicit", "--load-model", "tabular")
    try:
        for config, fragment in (
            (json.dumps({"runtime": "onnx", "max_batch_size": "x"}), "max_batch_size"),
            (json.dumps(["runtime", "onnx"]), "JSON object"),
            ("{not json", "not valid JSON"),
        ):
            answer = _load(server, "tabular", config=config)
            assert answer.status == 400 and fragment in answer.body["error"], answer
            assert "retry-after" not in answer.headers, "retrying the same config cannot succeed"
        assert _infer(server, "tabular").status == 200, "a refused load must leave the model serving"
    finally:
        assert server.stop() == 0


def test_a_manifest_broken_under_poll_is_unavailable_in_the_index_while_the_old_version_serves(
    tabular_only: Path, tmp_path: Path
) -> None:
    server = start_dhow(tabular_only, tmp_path, "--model-control", "poll", "--poll-interval", "0.2")
    try:
        assert _infer(server, "tabular").status == 200
        (tabular_only / "tabular" / "model.yaml").write_text("runtime: onnx\nmax_batch_size: many\n")

        def unavailable() -> list[dict[str, str]]:
            return [r for r in _index(server) if r["name"] == "tabular" and r["state"] == "UNAVAILABLE"]

        _wait_for(lambda: bool(unavailable()))
        reason = unavailable()[0]["reason"]
        assert "max_batch_size" in reason and "still serving" in reason, reason
        answer = _infer(server, "tabular")
        assert answer.status == 200 and answer.body["model_version"] == "2", answer
    finally:
        assert server.stop() == 0


def test_a_config_overrides_the_fields_it_names_over_model_yaml(tabular_only: Path, tmp_path: Path) -> None:
    server = start_dhow(tabular_only, tmp_path, "--model-control", "explicit", "--load-model", "tabular")
    try:
        answer = _load(server, "tabular", config=json.dumps({"max_batch_size": 8, "version_policy": {"all": True}}))
        assert answer.status == 200, answer
        assert _call(server, "GET", "/v2/models/tabular/config").body["max_batch_size"] == 8
        metadata = _call(server, "GET", "/v2/models/tabular").body
        assert metadata["versions"] == ["1", "2"]
        # inputs and outputs come from model.yaml, which the config did not name
        assert [o["name"] for o in metadata["outputs"]] == ["label", "probabilities"]
        assert _infer(server, "tabular", "1").status == 200
    finally:
        assert server.stop() == 0


PROTECTED = {"tenant": "acme", "region": "eu", "pii": None, "payload_sample_rate": 0}


def test_under_require_digests_a_config_may_not_change_what_the_digests_protect(
    tabular_only: Path, tmp_path: Path
) -> None:
    manifest_path = tabular_only / "tabular" / "model.yaml"
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest.update(region="ae", pii={"action": "hash"}, payload_sample_rate=0.5)
    manifest_path.write_text(yaml.safe_dump(manifest))
    trust = [sys.executable, "-m", "dhow.cli", "models", "trust", str(tabular_only), "tabular"]
    done = subprocess.run([*trust, "--data-dir", str(tmp_path / "data")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    server = start_dhow(
        tabular_only, tmp_path, "--require-digests", "--region", "ae", "--model-control", "explicit",
        "--load-model", "tabular",
    )  # fmt: skip
    try:
        for field, value in PROTECTED.items():
            # the whole manifest with one protected field changed, as a deployer moving the model would send it
            answer = _load(server, "tabular", config=json.dumps({**manifest, field: value}))
            assert answer.status == 403, (field, answer)
            assert field in answer.body["error"] and "--require-digests" in answer.body["error"], answer
            assert "dhow models trust" in answer.body["error"], answer
        # what the digests do not protect may change
        answer = _load(server, "tabular", config=json.dumps({**manifest, "max_batch_size": 8}))
        assert answer.status == 200, answer
        assert _call(server, "GET", "/v2/models/tabular/config").body["max_batch_size"] == 8
        assert _infer(server, "tabular").status == 200
    finally:
        assert server.stop() == 0


def test_a_failed_reload_of_one_version_keeps_its_previous_copy_serving(tabular_only: Path, tmp_path: Path) -> None:
    manifest_path = tabular_only / "tabular" / "model.yaml"
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest_path.write_text(yaml.safe_dump({**manifest, "version_policy": {"all": True}}))
    server = start_dhow(tabular_only, tmp_path, "--model-control", "explicit", "--load-model", "tabular")
    try:
        before = {version: _infer(server, "tabular", version).body for version in ("", "1", "2")}
        assert before[""]["model_version"] == "2" and before[""]["outputs"] == before["2"]["outputs"]
        assert before["1"]["outputs"] != before["2"]["outputs"], "the versions must answer differently"
        (tabular_only / "tabular" / "2" / "model.onnx").write_bytes(b"not an onnx model")
        answer = _load(server, "tabular")
        assert answer.status == 503 and "version 2" in answer.body["error"], answer

        # version 2's previous copy answers what it answered before, unversioned requests included
        for version in ("", "1", "2"):
            after = _infer(server, "tabular", version)
            assert after.status == 200, (version, after)
            assert after.body["outputs"] == before[version]["outputs"], version
        assert _infer(server, "tabular").body["model_version"] == "2"
        rows = [r for r in _index(server) if r["name"] == "tabular"]
        assert {(r["version"], r["state"]) for r in rows} == {("1", "READY"), ("2", "READY"), ("2", "UNAVAILABLE")}
        failed = next(r for r in rows if r["state"] == "UNAVAILABLE")
        assert "still serving the previous copy" in failed["reason"], failed
    finally:
        assert server.stop() == 0


def test_load_errors_name_files_relative_to_the_repository(tabular_only: Path, tmp_path: Path) -> None:
    server = start_dhow(tabular_only, tmp_path, "--model-control", "explicit", "--load-model", "tabular")
    roots = {str(tabular_only), str(tabular_only.resolve())}
    model = tabular_only / "tabular"
    manifest = (model / "model.yaml").read_text()
    try:
        shutil.copytree(model / "2", model / "3")
        (model / "3" / "model.onnx").write_bytes(b"not an onnx model")  # a runtime's own error
        answers = [_load(server, "tabular")]
        shutil.rmtree(model / "3")
        (model / "model.yaml").write_text("runtime: onnx\nmax_batch_size: many\n")  # the manifest parser's
        answers.append(_load(server, "tabular"))
        (model / "model.yaml").write_text("runtime: [onnx\n")  # read before a config is merged over it
        answers.append(_load(server, "tabular", config=json.dumps({"max_batch_size": 4})))
        (model / "model.yaml").write_text(manifest)
        for version in ("1", "2"):
            shutil.move(model / version, tmp_path / version)  # no version folder left
        answers.append(_load(server, "tabular"))
        for answer in answers:
            assert answer.status == 503 and "tabular" in answer.body["error"], answer
        assert "tabular/model.yaml" in answers[1].body["error"] and "tabular/model.yaml" in answers[2].body["error"]
        shown = json.dumps([a.body for a in answers] + _index(server))
        assert not [root for root in roots if root in shown], shown
    finally:
        assert server.stop() == 0
