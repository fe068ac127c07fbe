"""Datasets for the batch tests, generated here (seeded), and a way to run `dhow batch` as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

FEATURES = 32


def tabular_table(rows: int, seed: int = 0, first_id: int = 0) -> pa.Table:
    """``id`` (a key that is not the ordinal: 7 * row + 3) and the 32 features f0..f31 of the tabular models."""
    x = np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)
    columns = {"id": pa.array((np.arange(rows, dtype=np.int64) + first_id) * 7 + 3)}
    columns.update({f"f{j}": pa.array(x[:, j]) for j in range(FEATURES)})
    return pa.table(columns)


def write_parquet(table: pa.Table, path: Path, row_group_rows: int = 65_536) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_rows)
    return path


def features(table: pa.Table) -> np.ndarray:
    return np.column_stack([table.column(f"f{j}").to_numpy() for j in range(FEATURES)]).astype(np.float32)


def read_output(folder: Path) -> pa.Table:
    """The scored rows of a batch output (the parts, not errors/)."""
    parts = sorted(folder.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else pa.table({})


def read_errors(folder: Path) -> pa.Table:
    parts = sorted((folder / "errors").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else pa.table({})


def write_jsonl(rows: list[dict[str, object]], path: Path) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def batch_command(repository: Path | str, data_dir: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "dhow.cli", "batch", "run", "--repository", str(repository),
        "--data-dir", str(data_dir), "--quiet", *args,
    ]  # fmt: skip


def run_batch(
    repository: Path | str, data_dir: Path, *args: str, key: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`dhow batch run` as a real process; ``key`` "" runs it with authentication off."""
    environment = dict(os.environ)
    environment.pop("DHOW_KEY", None)
    if key:
        environment["DHOW_KEY"] = key
    else:
        environment["DHOW_AUTH"] = "none"
    environment.update(env or {})
    command = batch_command(repository, data_dir, *args)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600, check=False)


def summary_of(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result.stderr[-3000:]
    summary: dict[str, object] = orjson.loads(result.stdout)
    return summary
