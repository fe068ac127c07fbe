"""A batch job is held to the server's policies: identity, permission, residency, audit; and a job that cannot
run fails before it writes any output."""

from __future__ import annotations

from pathlib import Path

import pytest

from dhow.governance.audit import AuditStore
from tests.batch_data import run_batch, summary_of, tabular_table, write_parquet
from tests.conftest import make_key


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_parquet(tabular_table(300), tmp_path / "in.parquet")


def _audit(data: Path) -> list[dict[str, object]]:
    store = AuditStore.open(f"sqlite:///{data / 'audit.sqlite3'}")
    try:
        return store.read(limit=1000)
    finally:
        store.close()


def _refused(result: object, out: Path, *words: str) -> None:
    assert getattr(result, "returncode", None) == 2, getattr(result, "stderr", "")
    stderr = str(getattr(result, "stderr", ""))
    for word in words:
        assert word in stderr, stderr
    assert not out.exists(), "a refused job wrote output"


def test_the_run_is_audited_with_its_identity_counts_and_digests(
    demo_repository: Path, source: Path, tmp_path: Path
) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    token = make_key(data, "nightly", ["invoker:tabular*"])
    summary = summary_of(run_batch(demo_repository, data, "--model", "tabular", "--input", str(source),
                                   "--output", str(out), "--key", "id", key=token))  # fmt: skip
    records = _audit(data)
    runs = [r for r in records if r["action"] == "batch.run"]
    assert [r["details"]["phase"] for r in runs] == ["start", "end"]  # type: ignore[index]
    end = runs[1]
    assert str(end["actor"]).startswith("key:nightly") and end["model"] == "tabular" and end["outcome"] == "success"
    details = end["details"]
    assert isinstance(details, dict)
    assert (details["rows_in"], details["scored"], details["errors"], details["version"]) == (300, 300, 0, 2)
    assert details["input_sha256"] == summary["input_digest"] and details["output_sha256"] == summary["output_digest"]
    assert details["run_id"] == summary["run_id"]
    batches = [r for r in records if r["action"] == "infer" and r["model"] == "tabular"]
    assert batches and all(r["actor"] == end["actor"] and r["version"] == "2" for r in batches)


def test_no_key_a_wrong_key_or_no_permission_is_refused_before_any_output(
    demo_repository: Path, source: Path, tmp_path: Path
) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    auditor = make_key(data, "looker", ["auditor"])
    other = make_key(data, "fraud-only", ["invoker:fraud-*"])
    args = ("--model", "tabular", "--input", str(source), "--output", str(out), "--key", "id")
    no_key = run_batch(demo_repository, data, *args, env={"DHOW_AUTH": "on"})
    _refused(no_key, out, "--api-key")
    _refused(run_batch(demo_repository, data, *args, key="dhow_not-a-key"), out, "dhow:")
    _refused(run_batch(demo_repository, data, *args, key=auditor), out, "permission")
    _refused(run_batch(demo_repository, data, *args, key=other), out, "tabular")
    denials = [r for r in _audit(data) if r["kind"] == "denial" and r["action"] == "batch.run"]
    assert {str(r["actor"]).split("#")[0] for r in denials} >= {"key:looker", "key:fraud-only"}


def test_residency_refuses_the_job_as_the_server_refuses_a_request(
    demo_repository: Path, source: Path, tmp_path: Path
) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    policy = tmp_path / "residency.yaml"
    policy.write_text("regions:\n  ae: [ae]\n  eu: [eu, ae]\n")
    args = ("--model", "tabular", "--input", str(source), "--output", str(out), "--key", "id",
            "--residency-policy", str(policy))  # fmt: skip
    refused = run_batch(demo_repository, data, *args, "--region", "eu", "--data-region", "ae")
    _refused(refused, out, "ae", "eu")
    allowed = summary_of(run_batch(demo_repository, data, *args, "--region", "ae", "--data-region", "eu"))
    assert allowed["scored"] == 300


def test_whole_input_problems_fail_at_once_before_any_output(
    demo_repository: Path, source: Path, tmp_path: Path
) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    cases = [
        (("--model", "tabular", "--input", str(source), "--map", "input=g*"), ["g*", "f0"]),
        (("--model", "tabular", "--input", str(source), "--key", "identifier"), ["identifier"]),
        (("--model", "no_such_model", "--input", str(source), "--key", "id"), ["no_such_model"]),
        (("--model", "tabular:9", "--input", str(source), "--key", "id"), ["version 9"]),
        (("--model", "tabular", "--input", str(broken), "--key", "id"), ["broken.parquet"]),
        (("--model", "tabular", "--input", str(tmp_path / "missing.parquet")), ["missing.parquet"]),
        (("--model", "tabular", "--input", str(source), "--map", "input=f0,f1"), ["32 values", "2 column"]),
    ]
    for args, words in cases:
        _refused(run_batch(demo_repository, data, *args, "--output", str(out)), out, *words)
