"""`dhow batch run` reading `s3://` (through fsspec) from a local S3-compatible server started here (moto)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dhow.batch.sources import UNREADABLE, Source
from tests.batch_data import features, read_output, run_batch, summary_of, tabular_table, write_parquet
from tests.conftest import CREDENTIALS
from tests.reference import run_directly


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


def test_an_s3_lines_reason_names_the_url_given(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec names an object ``bucket/key``; a bad line's reason names it as the user wrote it, ``s3://bucket/key``,
    so it can be found again."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                             if k != "AWS_DEFAULT_REGION"},
                          region_name="us-east-1")  # fmt: skip
    client.create_bucket(Bucket="lines")
    client.put_object(Bucket="lines", Key="day/a.jsonl", Body=b'{"x": [1.0]}\n{"x": [NaN]}\n')
    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    source = Source("s3://lines/day/", "jsonl", 100)
    reasons = next(source.batches(["x"], {"x"})).column(UNREADABLE).to_pylist()
    assert reasons[0] is None and "line 2 of s3://lines/day/a.jsonl: not a JSON line" in reasons[1], reasons
    assert "JSON has no NaN or Infinity" in reasons[1], reasons
