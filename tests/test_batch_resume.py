"""A batch job killed with SIGKILL at several points, then run again: no row lost, none written twice."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from tests.batch_data import batch_command, read_output, run_batch, summary_of, write_parquet
from tests.conftest import wait_until

ROWS = 16_000


def _committed(out: Path) -> int:
    """Parts the journal records (a torn last line does not count)."""
    try:
        lines = (out / "_dhow_journal.jsonl").read_bytes().split(b"\n")[1:]
    except FileNotFoundError:
        return 0
    count = 0
    for line in lines:
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            break
        count += 1
    return count


def _running_until(process: subprocess.Popen[bytes], out: Path, parts: int) -> Callable[[], bool]:
    """Whether the job ended, or its journal records ``parts`` parts."""
    return lambda: process.poll() is not None or _committed(out) >= parts


def test_killed_at_several_points_the_rerun_loses_and_repeats_nothing(demo_repository: Path, tmp_path: Path) -> None:
    # the wide ONNX net: slow enough per row that the job is still running when it is killed
    x = np.random.default_rng(8).standard_normal((ROWS, 512)).astype(np.float32)
    ids = np.random.default_rng(9).permutation(ROWS * 3)[:ROWS]
    table = pa.table({"id": pa.array(ids), "input": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 512)})
    source = write_parquet(table, tmp_path / "in.parquet", row_group_rows=1500)
    out, data = tmp_path / "out", tmp_path / "data"
    args = ("--model", "mlp", "--input", str(source), "--output", str(out), "--key", "id",
            "--part-rows", "800", "--batch-rows", "200")  # fmt: skip
    env = {**os.environ, "DHOW_AUTH": "none"}
    env.pop("DHOW_KEY", None)
    killed_at = []
    for parts in (0, 2, 4, 7):  # at most 13 of the 20 parts: room left for a fast machine before the last kill
        process = subprocess.Popen(batch_command(demo_repository, data, *args), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        wait_until(_running_until(process, out, _committed(out) + parts), 120, "parts committed")
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_at.append(_committed(out))
        if killed_at[-1]:
            status = orjson.loads((out / "_summary.json").read_bytes())
            assert status["state"] == "running"  # what it said when killed; `status` tells it was interrupted
    assert killed_at[-1] < ROWS // 800, "the job finished before the last kill: the test needs a slower job"
    shown = subprocess.run([*batch_command(demo_repository, data)[:4], "status", str(out), "--json"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert orjson.loads(shown.stdout)["state"] == "interrupted"
    summary = summary_of(run_batch(demo_repository, data, *args))
    assert (summary["rows_in"], summary["scored"], summary["errors"]) == (ROWS, ROWS, 0)
    assert summary["resumed_at_row"] == killed_at[-1] * 800
    scored = read_output(out)
    got = scored.column("id").to_numpy()
    assert len(got) == ROWS and len(np.unique(got)) == ROWS, "a row was lost or written twice"
    assert set(got.tolist()) == set(ids.tolist())
    np.testing.assert_array_equal(got, ids)  # in input order, part after part
    assert len(set(scored.column("dhow_run_id").to_pylist())) == 1  # one run, however many attempts
    parts = [orjson.loads(line)["part"] for line in (out / "_dhow_journal.jsonl").read_bytes().splitlines()[1:]]
    assert parts == list(range(ROWS // 800))


def test_other_arguments_over_an_output_are_refused_and_overwrite_starts_afresh(
    demo_repository: Path, tmp_path: Path
) -> None:
    from tests.batch_data import tabular_table

    source = write_parquet(tabular_table(500), tmp_path / "in.parquet")
    out, data = tmp_path / "out", tmp_path / "data"
    first = summary_of(run_batch(demo_repository, data, "--model", "tabular", "--input", str(source), "--output",
                                 str(out), "--key", "id"))  # fmt: skip
    again = run_batch(demo_repository, data, "--model", "tabular:1", "--input", str(source), "--output", str(out),
                      "--key", "id")  # fmt: skip
    assert again.returncode == 2
    assert "other arguments" in again.stderr and "version: None then, 1 now" in again.stderr
    same = summary_of(run_batch(demo_repository, data, "--model", "tabular", "--input", str(source), "--output",
                                str(out), "--key", "id"))  # fmt: skip
    assert same["run_id"] == first["run_id"] and same["resumed_at_row"] == 500  # nothing left to do
    assert len(read_output(out)) == 500
    fresh = summary_of(run_batch(demo_repository, data, "--model", "tabular:1", "--input", str(source), "--output",
                                 str(out), "--key", "id", "--overwrite"))  # fmt: skip
    assert fresh["run_id"] != first["run_id"] and fresh["version"] == 1
    assert set(read_output(out).column("dhow_version").to_pylist()) == {1}
