"""`--repository s3://bucket/prefix` against a local S3-compatible server (moto): two real replicas with no shared
volume each mirror the bucket into their own cache, serve a version pushed later without a restart, keep
encrypted artifacts encrypted in the cache, and refuse a version whose files do not match its digest list."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from dhow.repository.encryption import MAGIC, Keyring, encrypt_repository, generate_key
from tests.batch_data import run_batch, summary_of, tabular_table, write_parquet
from tests.conftest import CREDENTIALS, DhowProcess, start_dhow, wait_until

BUCKET_URL = "s3://models/prod"
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}).encode()


def _answering_version(server: DhowProcess) -> str:
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/tabular/infer", data=BODY,
                                     headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as answer:
        return str(json.loads(answer.read())["model_version"])


def _push(local: Path, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "dhow.cli", "models", "push", str(local), BUCKET_URL],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _version(demo_repository: Path, local: Path, number: int, keyring: Keyring) -> None:
    """Version ``number`` of the demo's tabular model into the local repository, encrypted."""
    shutil.copytree(demo_repository / "tabular" / str(number), local / "tabular" / str(number))
    encrypt_repository(local, keyring, model="tabular")


def test_replicas_follow_the_bucket_without_a_shared_volume(
    demo_repository: Path, tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    kek = f"k1:{generate_key()}"
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint, "DHOW_KEK": kek}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the replicas started below inherit them
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="models")
    keyring = Keyring.parse(kek, "DHOW_KEK")
    local = tmp_path / "local"
    (local / "tabular").mkdir(parents=True)
    shutil.copy(demo_repository / "tabular" / "model.yaml", local / "tabular" / "model.yaml")
    _version(demo_repository, local, 1, keyring)
    assert "tabular version 1" in _push(local, {**os.environ, **env})

    replicas = []
    for index in (1, 2):
        (tmp_path / f"r{index}").mkdir()
        replicas.append(start_dhow(BUCKET_URL, tmp_path / f"r{index}", "--model-control", "poll",
                                   "--poll-interval", "0.5"))  # fmt: skip
    try:
        assert [_answering_version(r) for r in replicas] == ["1", "1"]
        pids = [r.process.pid for r in replicas]

        # version 2 uploaded: every replica serves it, without a restart
        _version(demo_repository, local, 2, keyring)
        assert "tabular version 2" in _push(local, dict(os.environ))
        for replica in replicas:
            wait_until(lambda r=replica: _answering_version(r) == "2", 60, "version 2 served")
        assert [r.process.pid for r in replicas] == pids

        # each replica's own cache holds the artifacts as the bucket does: encrypted
        for index in (1, 2):
            (cache,) = (tmp_path / f"r{index}" / "data" / "repository-cache").iterdir()
            artifact = cache / "tabular" / "2" / "model.onnx.enc"
            assert artifact.read_bytes().startswith(MAGIC)
            assert not (cache / "tabular" / "2" / "model.onnx").exists()

        # a version whose file does not match its digest list is refused, and version 2 keeps serving
        client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        client.put_object(Bucket="models", Key="prod/tabular/3/model.onnx.enc", Body=b"DHOWENC1 damaged")
        client.put_object(Bucket="models", Key="prod/tabular/3.sha256", Body=f"{'0' * 64}  model.onnx.enc\n".encode())
        for replica in replicas:
            wait_until(lambda r=replica: "version 3 of tabular not mirrored" in r.log(), 30, "the refusal logged")
            assert "tabular/3/model.onnx.enc does not match its digest" in replica.log()
            assert _answering_version(replica) == "2"
    finally:
        for replica in replicas:
            assert replica.stop() == 0, replica.log()


def test_a_version_without_its_digest_list_is_not_served_yet(
    demo_repository: Path, tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files arrive before their digest list: until it is there the version is still being uploaded."""
    import boto3

    from dhow.repository.remote import MirroredRepository

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="partial")
    tabular = demo_repository / "tabular"
    client.put_object(Bucket="partial", Key="m/tabular/model.yaml", Body=(tabular / "model.yaml").read_bytes())
    client.put_object(Bucket="partial", Key="m/tabular/1/model.onnx", Body=(tabular / "1" / "model.onnx").read_bytes())
    mirror = MirroredRepository("s3://partial/m", tmp_path / "cache")
    mirror.refresh()
    assert mirror.source("tabular").versions == ()
    digest = subprocess.run(["sha256sum", "model.onnx"], cwd=tabular / "1", capture_output=True, text=True).stdout
    client.put_object(Bucket="partial", Key="m/tabular/1.sha256", Body=digest.encode())
    assert mirror.refresh() == ["tabular version 1 mirrored"]
    assert mirror.source("tabular").versions == (1,)
    assert mirror.refresh() == []  # nothing changed: nothing downloaded again

    # a batch job takes the same repository: its own cache in its data folder
    table = write_parquet(tabular_table(200), tmp_path / "in.parquet")
    job = summary_of(run_batch("s3://partial/m", tmp_path / "job", "--model", "tabular:1", "--input", str(table),
                               "--output", str(tmp_path / "out"), "--map", "input=f*"))  # fmt: skip
    assert job["scored"] == 200
    assert any((tmp_path / "job" / "repository-cache").glob("*/tabular/1/model.onnx"))
