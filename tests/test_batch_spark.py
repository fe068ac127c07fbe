"""`dhow batch run --engine spark` in Spark's local mode: the same output and errors as the model run directly.

One Spark job for the module (a JVM start is the slow part); it runs as a real `dhow` process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dhow.batch.spark import _hadoop_path
from dhow.core.errors import InvalidInput
from tests.batch_data import features, run_batch, summary_of, tabular_table, write_parquet
from tests.conftest import make_key, unavailable
from tests.reference import run_directly

ROWS = 20_000
BAD = (17, 4242, 19_999)


@pytest.fixture(scope="module")
def spark_available() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError as exc:
        unavailable(f"pyspark is needed for the Spark tests ({exc}); pip install -e '.[spark]'")
    if shutil.which("java") is None:
        unavailable("Spark needs a Java runtime (17 or later) on PATH")


def test_spark_local_scores_like_the_model_and_reports_bad_rows(
    spark_available: None, demo_repository: Path, tmp_path: Path
) -> None:
    table = tabular_table(ROWS, seed=30)
    f5 = table.column("f5").to_numpy().copy()
    valid = np.ones(ROWS, dtype=bool)
    valid[list(BAD)] = False
    table = table.set_column(5 + 1, "f5", pa.array(f5, mask=~valid))
    write_parquet(table, tmp_path / "in #[1]?" / "data.parquet", row_group_rows=4000)
    # Hadoop reads a URL's path as written (decoded for it) and as a glob (escaped for it): not the folder in #1X
    write_parquet(tabular_table(10, seed=31, first_id=10 * ROWS), tmp_path / "in #1X" / "data.parquet")
    source = f"file://{tmp_path}/in%20%23%5B1%5D%3F/data.parquet"
    data, out = tmp_path / "data", tmp_path / "out"
    token = make_key(data, "spark-job", ["invoker"])
    summary = summary_of(run_batch(demo_repository, data, "--model", "tabular", "--engine", "spark", "--input",
                                   source, "--output", str(out), "--key", "id", "--map", "input=f*",
                                   "--batch-rows", "2048", key=token))  # fmt: skip
    assert (summary["engine"], summary["rows_in"], summary["scored"], summary["errors"]) == ("spark", ROWS, ROWS - 3, 3)
    scored = pq.read_table(out, partitioning=None, ignore_prefixes=["_", ".", "errors"])
    scored = scored.take(pc.sort_indices(scored.column("id")))
    ids = table.column("id").to_numpy()
    np.testing.assert_array_equal(scored.column("id").to_numpy(), ids[valid])
    expected = run_directly(demo_repository, "tabular", 2, {"input": features(table.filter(pa.array(valid)))})
    np.testing.assert_array_equal(scored.column("label").to_numpy(), expected["label"])
    probabilities = np.stack(scored.column("probabilities").to_numpy(zero_copy_only=False))
    # ONNX Runtime sums the trees in another order with another thread count than the reference
    np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=1e-5, atol=1e-6)
    assert set(scored.column("dhow_run_id").to_pylist()) == {summary["run_id"]}
    errors = pq.read_table(out / "errors", ignore_prefixes=["_", "."])
    assert sorted(errors.column("id").to_pylist()) == sorted(ids[list(BAD)].tolist())
    assert all("null in column 'f5'" in reason for reason in errors.column("reason").to_pylist())
    again = run_batch(demo_repository, data, "--model", "tabular", "--engine", "spark", "--input", source,
                      "--output", str(out), "--key", "id", key=token)  # fmt: skip
    assert again.returncode == 2 and "other arguments" in again.stderr  # --map and --batch-rows differ


def test_a_file_urls_path_is_given_to_hadoop_decoded_and_escaped_from_its_globs() -> None:
    """Hadoop reads ``?*[]{}`` and ``\\`` as a glob: ``run?1`` would also read ``runX1``, as the local engine never
    does; another URL or a plain path is Hadoop's to read as written, globs included."""
    assert _hadoop_path("file:///d/run%3F1/a%20%23b") == "file:///d/run\\?1/a #b"
    assert _hadoop_path("file://localhost/d/*[x]{a,b}%5C") == "file:///d/\\*\\[x\\]\\{a,b\\}\\\\"
    assert _hadoop_path("/d/day=*") == "/d/day=*" and _hadoop_path("s3a://b/d[12]") == "s3a://b/d[12]"


@pytest.mark.parametrize("location", ["file:///data/caf%E9", "/data/caf\udce9"])
def test_a_path_that_is_no_utf8_is_refused_for_spark(demo_repository: Path, tmp_path: Path, location: str) -> None:
    """Java takes UTF-8 names only: Py4J cannot send ``caf\\xe9`` (its gateway would be lost). Refused before any
    work, naming the option; the local engine reads such a name."""
    with pytest.raises(InvalidInput, match=r"--input .*UTF-8"):
        _hadoop_path(location)
    run = run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--engine", "spark", "--input",
                    location, "--output", str(tmp_path / "out"))  # fmt: skip
    assert run.returncode == 2 and "UTF-8" in run.stderr and not (tmp_path / "out").exists()


def test_spark_json_lines_with_nan_or_infinity_are_bad_rows_as_in_the_local_engine(
    spark_available: None, demo_repository: Path, tmp_path: Path
) -> None:
    """Spark's JSON reader takes NaN and Infinity unless told not to: such a line is a bad row here too (the same
    job, the same output), its reason the local engine's, naming the file (Spark counts no lines)."""
    x = features(tabular_table(40, seed=32))
    rows: list[dict[str, object]] = [{"id": i, "input": x[i].tolist()} for i in range(40)]
    rows[3]["input"] = [1.0, float("nan"), *x[3, 2:].tolist()]
    rows[30]["input"] = [float("-inf"), *x[30, 1:].tolist()]
    source = tmp_path / "in 2" / "a.jsonl"
    source.parent.mkdir()
    lines = [json.dumps(row) for row in rows]
    lines[12] = lines[12].replace('"id"', "'id'")  # single quotes: no JSON either, which Spark reads by default
    source.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out"
    summary = summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--engine", "spark",
                                   "--input", str(source), "--output", str(out), "--key", "id"))  # fmt: skip
    assert (summary["scored"], summary["errors"]) == (37, 3)
    reasons = sorted(pq.read_table(out / "errors", ignore_prefixes=["_", "."]).column("reason").to_pylist())
    (quoted,) = [reason for reason in reasons if "NaN" not in reason and "Infinity" not in reason]
    assert quoted.startswith(f"{source}: not a JSON line (") and "{\\'id\\': 12" in quoted, quoted
    reasons.remove(quoted)
    for reason, token in zip(reasons, ("-Infinity", "NaN"), strict=True):
        assert reason.startswith(f"{source}: not a JSON line (") and token in reason, reason
        assert "JSON has no NaN or Infinity: give non-finite values in a numeric or list column of a Parquet" in reason
    scored = pq.read_table(out, partitioning=None, ignore_prefixes=["_", ".", "errors"]).sort_by("id")
    good = [i for i in range(40) if i not in (3, 12, 30)]
    assert scored.column("id").to_pylist() == good
    expected = run_directly(demo_repository, "tabular", 2, {"input": x[good]})
    np.testing.assert_array_equal(scored.column("label").to_numpy(), expected["label"])


def test_spark_csv_rows_of_another_width_are_bad_rows_as_in_the_local_engine(
    spark_available: None, demo_repository: Path, tmp_path: Path
) -> None:
    """A row with a field too many or too few is a bad row to either engine, none scored cut to the header or
    filled with nulls (Spark's CSV reader would do both, and only looks at the widths of rows when it parses every
    column); the reasons say the same, the local engine's naming the line too (Spark counts none)."""
    table = tabular_table(60, seed=33)
    lines = [",".join(table.column_names)]
    for i, row in enumerate(table.to_pylist()):
        values = [str(row[name]) for name in table.column_names]
        if i == 7:
            values.append("1.5")  # a field too many: Spark would drop it and score the row
        elif i == 40:
            values = values[:20]  # too few
        lines.append(",".join(values))
    source = tmp_path / "in.csv"
    source.write_text("\n".join(lines) + "\n")
    ids = table.column("id").to_pylist()
    reasons = {}
    for engine in ("local", "spark"):
        out = tmp_path / f"out-{engine}"
        summary = summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--engine", engine,
                                       "--input", str(source), "--output", str(out), "--key", "id", "--map",
                                       "input=f*"))  # fmt: skip
        assert (summary["scored"], summary["errors"]) == (58, 2), (engine, summary)
        errors = pq.read_table(out / "errors", ignore_prefixes=["_", "."])
        reasons[engine] = sorted(errors.column("reason").to_pylist(), key=lambda reason: "34 " not in reason)
        scored = pq.read_table(out, partitioning=None, ignore_prefixes=["_", ".", "errors"])
        keys = sorted(int(key) for key in scored.column("id").to_pylist())  # (Spark reads CSV columns as text)
        assert keys == [ids[i] for i in range(60) if i not in (7, 40)], engine
    header = len(table.column_names)
    assert reasons["spark"][0].startswith(f"{source}: {header + 1} field(s) where the header has {header}: '"), reasons
    assert reasons["spark"][1].startswith(f"{source}: 20 field(s) where the header has {header}: '"), reasons
    local = [f"row {n} of {source} (its header row 1): " for n in (9, 42)]
    assert reasons["local"] == [
        f"{at}{reason.removeprefix(f'{source}: ')}" for at, reason in zip(local, reasons["spark"], strict=True)
    ]


def test_csv_files_whose_columns_come_in_another_order_are_refused_for_spark_and_read_by_name_locally(
    demo_repository: Path, tmp_path: Path
) -> None:
    """Spark applies the first CSV file's header to every file by position: a file whose columns come in another
    order would be scored on the wrong features. The Spark engine refuses such an input at admission (no Spark
    started, nothing written), naming both headers; the local engine reads each file by its own header."""
    table = tabular_table(20, seed=35)
    folder = tmp_path / "in"
    folder.mkdir()
    names = table.column_names
    for part, columns in (("a", names), ("b", [*names[1:], names[0]])):  # the second's id column last
        rows = table.slice(0 if part == "a" else 10, 10).select(columns).to_pylist()
        lines = [",".join(columns)] + [",".join(str(row[name]) for name in columns) for row in rows]
        (folder / f"{part}.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out-spark"
    refused = run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--engine", "spark", "--input",
                        str(folder), "--format", "csv", "--output", str(out), "--key", "id", "--map",
                        "input=f*")  # fmt: skip
    assert refused.returncode != 0
    assert f"input file {folder / 'b.csv'} has the header {','.join([*names[1:], names[0]])} and " in refused.stderr
    assert "the Spark engine applies the first file's header to every CSV file by position" in refused.stderr
    assert not out.exists() or not any(out.iterdir())
    summary = summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--input", str(folder),
                                   "--format", "csv", "--output", str(tmp_path / "out-local"), "--key", "id", "--map",
                                   "input=f*"))  # fmt: skip
    assert (summary["scored"], summary["errors"]) == (20, 0), summary
    scored = pq.read_table(tmp_path / "out-local", partitioning=None, ignore_prefixes=["_", ".", "errors"])
    order = np.argsort(np.array(scored.column("id").to_pylist(), dtype=np.int64))  # (a CSV key is its text)
    x = np.stack([table.column(name).to_numpy() for name in names if name.startswith("f")], axis=1)
    expected = run_directly(demo_repository, "tabular", 2, {"input": x.astype(np.float32)})
    np.testing.assert_array_equal(scored.column("label").to_numpy()[order], expected["label"])
