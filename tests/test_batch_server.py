"""`dhow batch run --server`: the same job sent to a running `dhow serve` over gRPC (raw contents), admitted and
audited by the server, with the same output as the model run directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dhow.governance.audit import AuditStore
from tests.batch_data import features, read_output, run_batch, summary_of, tabular_table, write_parquet
from tests.conftest import make_key, start_dhow
from tests.reference import run_directly


def test_a_job_sent_to_a_server_is_admitted_and_audited_there(demo_repository: Path, tmp_path: Path) -> None:
    server_dir = tmp_path / "server"
    invoker = make_key(server_dir / "data", "nightly", ["invoker"])
    auditor = make_key(server_dir / "data", "looker", ["auditor"])
    server = start_dhow(
        demo_repository, server_dir, "--auth", "on", "--model-control", "explicit", "--load-model", "tabular"
    )
    try:
        table = tabular_table(2000, seed=40)
        source = write_parquet(table, tmp_path / "in.parquet")
        out, client_data = tmp_path / "out", tmp_path / "client"
        args = ("--server", server.grpc_url, "--model", "tabular", "--input", str(source), "--key", "id")
        # the URL form reaches the same server (its refusal comes from there)
        as_url = ("--server", f"grpc://{server.grpc_url}", *args[2:])
        refused = run_batch(demo_repository, client_data, *as_url, "--output", str(tmp_path / "refused"), key=auditor)
        assert refused.returncode == 2 and "PERMISSION_DENIED" in refused.stderr
        assert not (tmp_path / "refused").exists()
        summary = summary_of(run_batch(demo_repository, client_data, *args, "--output", str(out), key=invoker))
        assert (summary["rows_in"], summary["scored"], summary["version"]) == (2000, 2000, 2)
    finally:
        assert server.stop() == 0, server.log()
    scored = read_output(out)
    assert scored.column("id").to_pylist() == table.column("id").to_pylist()
    expected = run_directly(demo_repository, "tabular", 2, {"input": features(pq.read_table(source))})
    np.testing.assert_array_equal(scored.column("label").to_numpy(), expected["label"])
    store = AuditStore.open(f"sqlite:///{server_dir / 'data' / 'audit.sqlite3'}")
    try:
        records = store.read(limit=5000)
    finally:
        store.close()
    batches = [r for r in records if r["action"] == "infer" and str(r["actor"]).startswith("key:nightly")]
    # the server's max_batch_size for tabular is 64: 2000 rows are 32 admitted, audited requests
    assert len(batches) == -(-2000 // 64)
