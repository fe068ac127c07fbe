"""`dhow batch run` on the embedded engine, end to end: real processes, generated files, the model run directly
as the reference, compared row by row by key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.batch_data import (
    features,
    read_errors,
    read_output,
    run_batch,
    summary_of,
    tabular_table,
    write_jsonl,
    write_parquet,
)
from tests.conftest import make_key
from tests.reference import run_directly

MILLION = 1_000_000


@pytest.fixture(scope="session")
def million_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1M rows x 32 features (and the id key), written once per session."""
    return write_parquet(tabular_table(MILLION, seed=1), tmp_path_factory.mktemp("batch") / "million.parquet")


def _by_key(table: pa.Table, key: str = "id") -> np.ndarray:
    return np.argsort(table.column(key).to_numpy())


def test_a_million_rows_match_the_model_run_directly(demo_repository: Path, million_rows: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    token = make_key(data, "nightly", ["invoker"])
    out = tmp_path / "out"
    summary = summary_of(
        run_batch(demo_repository, data, "--model", "tabular", "--input", str(million_rows), "--output", str(out),
                  "--key", "id", key=token)
    )  # fmt: skip
    assert summary["rows_in"] == summary["scored"] == MILLION and summary["errors"] == 0
    assert summary["version"] == 2 and summary["state"] == "succeeded"
    scored = read_output(out)
    source = pq.read_table(million_rows)
    expected = run_directly(demo_repository, "tabular", 2, {"input": features(source)})
    got, want = scored.take(_by_key(scored)), _by_key(source)
    np.testing.assert_array_equal(got.column("id").to_numpy(), source.column("id").to_numpy()[want])
    np.testing.assert_array_equal(got.column("label").to_numpy(), expected["label"][want])
    probabilities = np.stack(got.column("probabilities").to_numpy(zero_copy_only=False))
    # ONNX Runtime sums the trees in another order with another thread count than the reference
    np.testing.assert_allclose(probabilities, expected["probabilities"][want], rtol=1e-5, atol=1e-6)
    assert set(scored.column("dhow_run_id").unique().to_pylist()) == {summary["run_id"]}
    assert scored.column("dhow_model").unique().to_pylist() == ["tabular"]


def _tabular_inputs(rows: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    table = tabular_table(rows, seed=seed)
    return table, features(table)


@pytest.mark.parametrize(
    ("model", "version", "outputs"),
    [
        ("tabular", 1, ["label", "probabilities"]),
        ("tabular_sklearn", 1, ["predict", "predict_proba"]),
        ("tabular_xgboost", 1, ["predict"]),
        ("tabular_lightgbm", 1, ["predict"]),
    ],
)
def test_every_tabular_runtime_matches(
    demo_repository: Path, tmp_path: Path, model: str, version: int, outputs: list[str]
) -> None:
    table, x = _tabular_inputs(3000, seed=2)
    source = write_parquet(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    summary = summary_of(
        run_batch(demo_repository, tmp_path / "data", "--model", f"{model}:{version}", "--input", str(source),
                  "--output", str(out), "--map", "input=f*", "--batch-rows", "700")
    )  # fmt: skip
    assert summary["scored"] == 3000
    scored = read_output(out)
    np.testing.assert_array_equal(scored.column("row").to_numpy(), np.arange(3000))
    expected = run_directly(demo_repository, model, version, {"input": x})
    for name in outputs:
        column = scored.column(name).to_numpy(zero_copy_only=False)
        got = np.stack(column) if column.dtype == object else column
        np.testing.assert_allclose(got, expected[name].reshape(got.shape), rtol=1e-5, atol=1e-6)


def test_torch_and_the_wide_onnx_net_take_list_columns(demo_repository: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    small, wide = rng.standard_normal((500, 16)).astype(np.float32), rng.standard_normal((300, 512)).astype(np.float32)
    for model, x, output in (("torch_mlp", small, "scores"), ("mlp", wide, "logits")):
        column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        source = write_parquet(pa.table({"input": column}), tmp_path / f"{model}.parquet")
        out = tmp_path / f"{model}-out"
        summary_of(run_batch(demo_repository, tmp_path / "data", "--model", model, "--input", str(source),
                             "--output", str(out)))  # fmt: skip
        got = np.stack(read_output(out).column(output).to_numpy(zero_copy_only=False))
        expected = run_directly(demo_repository, model, 1, {"input": x})[output]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_python_models_on_text_bool_and_fp16(demo_repository: Path, tmp_path: Path) -> None:
    words = ["héllo", "dhow", "sail", "مرحبا", "x"] * 40
    source = write_jsonl([{"id": i, "text": w} for i, w in enumerate(words)], tmp_path / "text.jsonl")
    out = tmp_path / "text-out"
    summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "text_python", "--input", str(source),
                         "--output", str(out), "--key", "id"))  # fmt: skip
    scored = read_output(out).sort_by("id")
    assert scored.column("upper").to_pylist() == [w.upper() for w in words]
    assert scored.column("length").to_pylist() == [len(w.encode()) for w in words]
    rng = np.random.default_rng(4)
    mask, x = rng.integers(0, 2, (200, 4)).astype(bool), rng.standard_normal((200, 4)).astype(np.float16)
    flags = pa.table({
        "mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), 4),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4),
    })  # fmt: skip
    out = tmp_path / "flags-out"
    summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "flags", "--input",
                         str(write_parquet(flags, tmp_path / "flags.parquet")), "--output", str(out)))  # fmt: skip
    scored = read_output(out)
    expected = run_directly(demo_repository, "flags", 1, {"mask": mask, "x": x})
    np.testing.assert_array_equal(np.stack(scored.column("masked").to_numpy(zero_copy_only=False)), expected["masked"])
    np.testing.assert_array_equal(scored.column("count").to_numpy(), expected["count"])


def test_csv_with_bad_rows_scores_the_rest_and_reports_each(demo_repository: Path, tmp_path: Path) -> None:
    table, x = _tabular_inputs(1000, seed=5)
    text = table.cast(pa.schema([(name, pa.string()) for name in table.column_names]))
    rows = text.to_pylist()
    rows[10]["f3"] = None
    rows[20]["f7"] = "not-a-number"
    rows[999]["f31"] = ""
    source = tmp_path / "in.csv"
    pacsv.write_csv(pa.Table.from_pylist(rows, schema=text.schema), source)
    out = tmp_path / "out"
    summary = summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--input", str(source),
                                   "--output", str(out), "--key", "id", "--map", "input=f0,f1,f2,f3,f4,f5,f6,f7,f8,f9,"
                                   "f10,f11,f12,f13,f14,f15,f16,f17,f18,f19,f20,f21,f22,f23,f24,f25,f26,f27,f28,f29,"
                                   "f30,f31"))  # fmt: skip
    assert (summary["rows_in"], summary["scored"], summary["errors"]) == (1000, 997, 3)
    errors = _by_number(read_errors(out), "id")
    ids = table.column("id").to_numpy()
    assert errors.column("id").to_pylist() == [str(ids[10]), str(ids[20]), str(ids[999])], "a CSV key is its text"
    reasons = errors.column("reason").to_pylist()
    assert "null in column 'f3'" in reasons[0] and "not-a-number" in reasons[1] and "f31" in reasons[2]
    assert orjson.loads(errors.column("input").to_pylist()[1])["f7"] == "not-a-number"
    scored = _by_number(read_output(out), "id")
    keep = np.setdiff1d(np.arange(1000), [10, 20, 999])
    expected = run_directly(demo_repository, "tabular", 2, {"input": x[keep]})
    np.testing.assert_array_equal(scored.column("label").to_numpy(), expected["label"])


def _by_number(table: pa.Table, key: str) -> pa.Table:
    """The rows in the order of their key's number (a CSV key is text: "143" sorts before "73")."""
    return table.take(np.argsort(np.array(table.column(key).to_pylist(), dtype=np.int64), kind="stable"))


def test_a_csv_key_is_its_text_leading_zeros_and_letters_kept(demo_repository: Path, tmp_path: Path) -> None:
    """As Spark reads it: an id "00123" is not the number 123 (which no longer names the input's row), and a key of
    letters in a later block of the file is a key, not a conversion error that fails the job half-way (Arrow would
    type the column by the file's first block)."""
    table, _ = _tabular_inputs(40_000, seed=8)
    rows = table.cast(pa.schema([(name, pa.string()) for name in table.column_names])).to_pylist()
    for n, row in enumerate(rows):
        row["id"] = f"{n:07d}" if n < 39_990 else f"late-{n}"
    source = tmp_path / "in.csv"
    pacsv.write_csv(pa.Table.from_pylist(rows), source)
    assert source.stat().st_size > 4 << 20, "the letters past the first block"
    out = tmp_path / "out"
    summary = summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--input", str(source),
                                   "--output", str(out), "--key", "id", "--map", "input=f*"))  # fmt: skip
    assert (summary["scored"], summary["errors"]) == (40_000, 0), summary
    keys = read_output(out).column("id").to_pylist()
    assert sorted(keys) == sorted(row["id"] for row in rows) and "0000123" in keys and "late-39999" in keys


def test_jsonl_with_wrong_widths_types_and_broken_lines(demo_repository: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((120, 16)).astype(np.float32)
    lines = [orjson.dumps({"key": f"r{i}", "input": x[i].tolist()}) for i in range(120)]
    lines[5] = orjson.dumps({"key": "r5", "input": x[5, :15].tolist()})  # wrong width
    lines[6] = orjson.dumps({"key": "r6", "input": "sixteen numbers"})  # wrong type
    lines[7] = b'{"key": "r7", "input": [1, 2'  # not JSON
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    pytest.importorskip("torch")
    summary = summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "torch_mlp", "--input",
                                   str(source), "--output", str(out), "--key", "key"))  # fmt: skip
    assert (summary["scored"], summary["errors"]) == (117, 3)
    errors = {row["row"]: row for row in read_errors(out).to_pylist()}
    assert errors[5]["key"] == "r5" and "holds 15 values" in str(errors[5]["reason"])
    assert "not a list" in str(errors[6]["reason"])
    assert (
        errors[7]["key"] is None
        and "not a JSON line" in str(errors[7]["reason"])
        and "[1, 2" in str(errors[7]["reason"])
    )
    good = [i for i in range(120) if i not in (5, 6, 7)]
    scored = read_output(out)
    order = np.argsort([int(k[1:]) for k in scored.column("key").to_pylist()])
    expected = run_directly(demo_repository, "torch_mlp", 1, {"input": x[good]})["scores"]
    got = np.stack(scored.column("scores").to_numpy(zero_copy_only=False))[order]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_folder_of_files_is_one_input_in_name_order(demo_repository: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    tables = [tabular_table(800 + 100 * i, seed=10 + i, first_id=10_000 * i) for i in range(3)]
    for index, table in enumerate(tables):
        write_parquet(table, folder / f"day={index}" / f"part-{index}.parquet", row_group_rows=300)
    (folder / "_SUCCESS").write_text("")
    out = tmp_path / "out"
    summary = summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--input",
                                   str(folder), "--output", str(out), "--key", "id", "--part-rows", "500"))  # fmt: skip
    whole = pa.concat_tables(tables)
    assert summary["rows_in"] == whole.num_rows and summary["parts"] == -(-whole.num_rows // 500)
    scored = read_output(out)
    assert scored.column("id").to_pylist() == whole.column("id").to_pylist()
    expected = run_directly(demo_repository, "tabular", 2, {"input": features(whole)})
    np.testing.assert_array_equal(scored.column("label").to_numpy(), expected["label"])


def test_status_reads_the_summary(demo_repository: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    source = write_parquet(tabular_table(100), tmp_path / "in.parquet")
    out = tmp_path / "out"
    summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--input", str(source),
                         "--output", str(out), "--map", "input=f*"))  # fmt: skip
    shown = subprocess.run(
        [sys.executable, "-m", "dhow.cli", "batch", "status", str(out), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    status = orjson.loads(shown.stdout)
    assert (status["state"], status["rows_in"], status["engine"]) == ("succeeded", 100, "local")
    assert orjson.loads((out / "_summary.json").read_bytes())["run_id"] == status["run_id"]


def test_file_urls_are_percent_decoded_and_plain_paths_taken_as_written(demo_repository: Path, tmp_path: Path) -> None:
    """``file:///…/my%20data`` is the folder ``my data`` (RFC 8089 file URLs percent-encode, ``#`` as ``%23``); a
    plain path is the name as written, ``%20`` and ``#`` included."""
    tables = [tabular_table(300, seed=40 + i, first_id=1000 * i) for i in range(2)]
    for index, table in enumerate(tables):
        write_parquet(table, tmp_path / "my data" / f"day #{index}.parquet")
    whole = pa.concat_tables(tables)
    summary = summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--input",
                                   f"file://{tmp_path}/my%20data", "--output", f"file://localhost{tmp_path}/my%20out%231",
                                   "--key", "id"))  # fmt: skip
    assert (summary["rows_in"], summary["scored"], summary["errors"]) == (whole.num_rows, whole.num_rows, 0)
    scored = read_output(tmp_path / "my out#1")
    assert scored.column("id").to_pylist() == whole.column("id").to_pylist()
    plain = tmp_path / "run #2 100%20"
    (tmp_path / "my data").rename(plain)
    summary = summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--input", str(plain),
                                   "--output", str(tmp_path / "out%20#3"), "--key", "id"))  # fmt: skip
    assert summary["rows_in"] == whole.num_rows
    assert read_output(tmp_path / "out%20#3").column("id").to_pylist() == whole.column("id").to_pylist()


def test_jsonl_lines_with_nan_or_infinity_are_bad_rows_that_say_json_has_none(
    demo_repository: Path, tmp_path: Path
) -> None:
    """Python's json.dumps writes NaN and Infinity, which JSON has not: each such line is a bad row saying so, where
    it stopped and how to send the value; a file of nothing else is refused with the same words."""
    _, x = _tabular_inputs(100, seed=7)
    rows: list[dict[str, object]] = [{"id": i, "input": x[i].tolist()} for i in range(100)]
    rows[3]["input"] = [1.0, float("nan"), *x[3, 2:].tolist()]
    rows[50]["input"] = [float("-inf"), *x[50, 1:].tolist()]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    summary = summary_of(run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--input", str(source),
                                   "--output", str(out), "--key", "id"))  # fmt: skip
    assert (summary["scored"], summary["errors"]) == (98, 2)
    errors = {row["row"]: row for row in read_errors(out).to_pylist()}
    assert sorted(errors) == [3, 50]
    for row, token in ((3, "NaN"), (50, "-Infinity")):
        reason = str(errors[row]["reason"])
        assert f"line {row + 1} of {source}" in reason and token in reason, reason
        assert "JSON has no NaN or Infinity" in reason and "Parquet" in reason, reason
    scored = read_output(out).sort_by("id")
    good = [i for i in range(100) if i not in (3, 50)]
    assert scored.column("id").to_pylist() == good
    expected = run_directly(demo_repository, "tabular", 2, {"input": x[good]})
    np.testing.assert_array_equal(scored.column("label").to_numpy(), expected["label"])

    every = tmp_path / "all-nan.jsonl"
    every.write_text("".join(json.dumps({"id": i, "input": [float("nan")] * 32}) + "\n" for i in range(3)))
    refused = run_batch(demo_repository, tmp_path / "data", "--model", "tabular", "--input", str(every),
                        "--output", str(tmp_path / "out-2"), "--key", "id")  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert f"line 1 of {every}" in refused.stderr and "JSON has no NaN or Infinity" in refused.stderr, refused.stderr
