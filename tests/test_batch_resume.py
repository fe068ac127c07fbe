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
from tests.conftest import wait_until, write_model

ROWS = 16_000

#: a model that answers y = 2 * row only for the rows before the number in the file GATE: a batch holding a later
#: row waits (and says so, in the file ``blocked-at-<gate>`` beside it), so a job goes exactly as far as the test
#: lets it, on a machine of any speed; a waiting instance whose job was killed exits (its parent is gone)
GATED = """
import os
import time
from pathlib import Path

GATE = Path({gate!r})


class Gated:
    def load(self, version_dir):
        self.parent = os.getppid()

    def predict(self, inputs):
        last = int(inputs["row"].max())
        while last >= (allowed := int(GATE.read_text())):
            (GATE.parent / f"blocked-at-{{allowed}}").touch()
            if os.getppid() != self.parent:
                os._exit(0)
            time.sleep(0.01)
        return {{"y": inputs["row"] * 2}}
"""


def _gated(tmp_path: Path) -> tuple[Path, Path]:
    """A repository with the model ``gated``, and its gate file (0: no row may pass)."""
    gate = tmp_path / "gate" / "allowed"
    gate.parent.mkdir()
    gate.write_text("0")
    manifest = (
        "runtime: python\ninputs:\n  - {name: row, datatype: FP32, shape: [-1, 1]}\n"
        "outputs:\n  - {name: y, datatype: FP32, shape: [-1, 1]}\nmax_batch_size: 200\n"
    )
    repository = tmp_path / "models"
    write_model(repository, "gated", manifest, {"1/model.py": GATED.format(gate=str(gate))})
    return repository, gate


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


def _held_at(process: subprocess.Popen[bytes], waiting: Path, out: Path, parts: int) -> Callable[[], bool]:
    """Whether the job ended, or waits at its gate (``waiting`` exists) with ``parts`` parts committed."""
    return lambda: process.poll() is not None or (waiting.exists() and _committed(out) >= parts)


def test_killed_at_several_points_the_rerun_loses_and_repeats_nothing(tmp_path: Path) -> None:
    repository, gate = _gated(tmp_path)
    ids = np.random.default_rng(9).permutation(ROWS * 3)[:ROWS]
    table = pa.table({"id": pa.array(ids), "row": pa.array(np.arange(ROWS, dtype=np.float32))})
    source = write_parquet(table, tmp_path / "in.parquet", row_group_rows=1500)
    out, data = tmp_path / "out", tmp_path / "data"
    args = ("--model", "gated", "--input", str(source), "--output", str(out), "--key", "id",
            "--part-rows", "800", "--batch-rows", "200")  # fmt: skip
    env = {**os.environ, "DHOW_AUTH": "none"}
    env.pop("DHOW_KEY", None)
    killed_at = []
    # each attempt may score the rows before ``allowed``: held at its first batch (nothing written, the output
    # not yet taken), then in parts 2, 6 and 13 of 20 (a part is committed once the next one's first batch is
    # scored); it is killed once it waits at the gate, its parts before it committed
    for allowed, parts in ((0, 0), (1800, 2), (5000, 6), (11000, 13)):
        gate.write_text(str(allowed))
        log = tmp_path / f"attempt-{allowed}.log"
        with log.open("wb") as stderr:
            process = subprocess.Popen(batch_command(repository, data, *args), env=env, stdout=subprocess.DEVNULL,
                                       stderr=stderr)  # fmt: skip
        held = _held_at(process, gate.parent / f"blocked-at-{allowed}", out, parts)
        try:
            wait_until(held, 120, f"the job waiting at row {allowed}, {parts} parts committed")
            assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        finally:  # (also when the wait failed: a job held at its gate would wait there for ever)
            process.send_signal(signal.SIGKILL)
            process.wait()
        killed_at.append(_committed(out))
        if killed_at[-1]:
            status = orjson.loads((out / "_summary.json").read_bytes())
            assert status["state"] == "running"  # what it said when killed; `status` tells it was interrupted
    assert killed_at == [0, 2, 6, 13]
    shown = subprocess.run([*batch_command(repository, data)[:4], "status", str(out), "--json"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert orjson.loads(shown.stdout)["state"] == "interrupted"
    gate.write_text(str(ROWS))
    summary = summary_of(run_batch(repository, data, *args))
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
