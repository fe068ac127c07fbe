"""`dhow batch run` reading `s3://` (through fsspec) from a local S3-compatible server started here (moto)."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.batch_data import features, read_output, run_batch, summary_of, tabular_table, write_parquet
from tests.conftest import IN_CI, free_port, wait_until
from tests.reference import run_directly


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:
        message = f"moto[server] and s3fs are needed for the S3 test ({exc}); pip install -e '.[dev]'"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 60, "the S3 server answering")
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def test_an_s3_folder_is_read_through_fsspec(demo_repository: Path, tmp_path: Path, s3_endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                             if k != "AWS_DEFAULT_REGION"},
                          region_name="us-east-1")  # fmt: skip
    client.create_bucket(Bucket="scoring")
    tables = [tabular_table(1500, seed=20 + i, first_id=5000 * i) for i in range(2)]
    for index, table in enumerate(tables):
        local = write_parquet(table, tmp_path / f"part-{index}.parquet", row_group_rows=400)
        client.upload_file(str(local), "scoring", f"nightly/2026-12-03/part-{index}.parquet")
    out = tmp_path / "out"
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    summary = summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--input",
                                   "s3://scoring/nightly/2026-12-03/", "--output", str(out), "--key", "id",
                                   env=env))  # fmt: skip
    assert summary["rows_in"] == summary["scored"] == 3000
    scored = read_output(out)
    whole = tables[0].to_pydict()["id"] + tables[1].to_pydict()["id"]
    assert scored.column("id").to_pylist() == whole
    x = np.concatenate([features(t) for t in tables])
    np.testing.assert_array_equal(scored.column("label").to_numpy(), run_directly(demo_repository, "tabular", 2,
                                                                                  {"input": x})["label"])  # fmt: skip
