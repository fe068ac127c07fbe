"""The batch door's pieces in one process: the commit protocol of the output folder, and the column mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dhow.batch.job import Job
from dhow.batch.mapping import convert, plan_inputs
from dhow.batch.parts import JOURNAL, OutputFolder, part_name
from dhow.batch.sources import Source, _csv_batches
from dhow.core.errors import Conflict, InvalidInput
from dhow.core.model_config import TensorSpec
from tests.batch_data import write_parquet

FINGERPRINT = {"model": "m", "input": "in.parquet", "key": "id"}


def _table(rows: int) -> pa.Table:
    return pa.table({"id": pa.array(np.arange(rows)), "score": pa.array(np.ones(rows))})


def test_a_torn_journal_line_and_its_part_are_not_committed(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path / "out")
    folder.open({"run_id": "r1", "fingerprint": FINGERPRINT}, None)
    for index in range(3):
        folder.commit(index, _table(10), None, {"rows": 10, "scored": 10, "errors": 0})
    folder.close()
    journal_path = tmp_path / "out" / JOURNAL
    # a kill after part 3's rename, in the middle of its journal line
    (tmp_path / "out" / part_name(3)).write_bytes(b"a renamed part whose line was never finished")
    journal_path.write_bytes(journal_path.read_bytes() + b'{"part": 3, "rows"')
    journal = OutputFolder(tmp_path / "out").check(FINGERPRINT, overwrite=False)
    assert journal is not None and [p["part"] for p in journal.parts] == [0, 1, 2] and journal.rows_done == 30
    again = OutputFolder(tmp_path / "out")
    again.open(journal.header, journal)
    assert not (tmp_path / "out" / part_name(3)).exists()  # written again from the same rows
    again.commit(3, _table(10), None, {"rows": 10, "scored": 10, "errors": 0})
    again.close()
    reread = OutputFolder(tmp_path / "out").read()
    assert reread is not None and [p["part"] for p in reread.parts] == [0, 1, 2, 3]


def test_an_output_of_other_arguments_or_of_no_run_is_refused(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path / "out")
    folder.open({"run_id": "r1", "fingerprint": FINGERPRINT}, None)
    folder.close()
    with pytest.raises(Conflict, match="key: 'id' then, 'ref' now"):
        OutputFolder(tmp_path / "out").check({**FINGERPRINT, "key": "ref"}, overwrite=False)
    assert OutputFolder(tmp_path / "out").check({**FINGERPRINT, "key": "ref"}, overwrite=True) is None
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"")
    with pytest.raises(Conflict, match="not a dhow batch output"):
        OutputFolder(other).check(FINGERPRINT, overwrite=False)


def test_a_second_run_cannot_write_the_same_output(tmp_path: Path) -> None:
    first = OutputFolder(tmp_path / "out")
    first.open({"run_id": "r1", "fingerprint": FINGERPRINT}, None)
    assert OutputFolder(tmp_path / "out").running()
    with pytest.raises(Conflict, match="another run"):
        OutputFolder(tmp_path / "out").open({"run_id": "r2", "fingerprint": FINGERPRINT}, None)
    first.close()
    assert not OutputFolder(tmp_path / "out").running()


SPECS = [TensorSpec("input", "FP32", (-1, 3))]


def test_globs_and_lists_stack_columns_in_the_files_order() -> None:
    schema = pa.schema([("b2", pa.float64()), ("id", pa.int64()), ("b0", pa.int32()), ("b1", pa.float32())])
    mapping = plan_inputs(SPECS, schema, [("input", "b*")], "id")
    assert mapping.inputs[0].columns == ("b2", "b0", "b1")
    assert plan_inputs(SPECS, schema, [], "id").inputs[0].columns == ("b2", "b0", "b1")  # numeric but the key
    with pytest.raises(InvalidInput, match="3 values per row"):
        plan_inputs(SPECS, schema, [("input", "b0,b1")], "id")
    with pytest.raises(InvalidInput, match="no column 'c\\*'"):
        plan_inputs(SPECS, schema, [("input", "c*")], "id")


def test_bad_values_make_bad_rows_and_the_rest_convert() -> None:
    batch = pa.record_batch({
        "a": pa.array(["1", "2", None, "x", "5"]),
        "b": pa.array([1.0, 2.0, 3.0, 4.0, 5.0]),
        "c": pa.array([1, 2, 3, 4, None]),
    })  # fmt: skip
    mapping = plan_inputs(SPECS, batch.schema, [("input", "a,b,c")], "")
    converted = convert(batch, mapping)
    assert converted.good.tolist() == [True, True, False, False, False]
    assert converted.reasons == [
        "null in column 'a'",
        "column 'a': 'x' is not a float32 value",
        "null in column 'c'",
    ]
    np.testing.assert_array_equal(converted.arrays["input"], np.array([[1, 1, 1], [2, 2, 2]], dtype=np.float32))


def test_list_columns_of_the_wrong_length_are_bad_rows() -> None:
    column = pa.array([[1.0, 2.0, 3.0], [1.0], None, [4.0, None, 6.0], [7.0, 8.0, 9.0]])
    batch = pa.record_batch({"input": column})
    converted = convert(batch, plan_inputs(SPECS, batch.schema, [], ""))
    assert converted.good.tolist() == [True, False, False, False, True]
    assert "holds 1 values" in converted.reasons[0] and "null" in converted.reasons[1]
    assert "a null in the list" in converted.reasons[2]
    np.testing.assert_array_equal(converted.arrays["input"], np.array([[1, 2, 3], [7, 8, 9]], dtype=np.float32))


def test_a_text_list_with_nan_is_a_bad_row_that_says_json_has_none() -> None:
    """A CSV cell of a JSON list, as Python's json.dumps writes it: JSON has no NaN, and the row says so."""
    batch = pa.record_batch({"input": pa.array(["[1, 2, 3]", "[1, NaN, 3]", "[1, 2]"])})
    converted = convert(batch, plan_inputs(SPECS, batch.schema, [], ""))
    assert converted.good.tolist() == [True, False, False]
    assert "'[1, NaN, 3]' is not a list of numbers" in converted.reasons[0]
    assert "JSON has no NaN or Infinity" in converted.reasons[0], converted.reasons[0]
    # the place in the cell, not read as a line of the file; and the Parquet column that holds them, not a string one
    assert "at character 5 of the cell" in converted.reasons[0] and "line 1" not in converted.reasons[0]
    assert "in a numeric or list column of a Parquet input" in converted.reasons[0], converted.reasons[0]
    assert "JSON has no NaN" not in converted.reasons[1]


@pytest.mark.parametrize("skip", [0, 1, 1499, 1500, 1600, 4000, 5600, 14999, 15000, 15999, 16000])
def test_a_resumed_read_starts_at_its_row_whatever_the_row_groups(tmp_path: Path, skip: int) -> None:
    # ten groups of 1,500 then one of 1,000: a smaller group after the resume point must not be skipped with the
    # groups before it (it was, for skips of 4,000 and more: the rerun read from 1,000 rows too early)
    ids = np.arange(16_000, dtype=np.int64)
    path = write_parquet(pa.table({"id": ids}), tmp_path / "in.parquet", row_group_rows=1500)
    source = Source(str(path), "parquet", batch_rows=200)
    read = [batch.column(0).to_numpy() for batch in source.batches(["id"], set(), skip)]
    got = np.concatenate(read) if read else np.array([], dtype=np.int64)
    np.testing.assert_array_equal(got, ids[skip:])


def test_file_urls_of_localhost_name_local_paths(tmp_path: Path) -> None:
    """``file://localhost/PATH`` is ``/PATH`` (RFC 8089), not ``./localhost/PATH``; another host is refused."""
    path = write_parquet(pa.table({"id": np.arange(3)}), tmp_path / "in.parquet")
    assert Source(f"file://localhost{path}", "parquet", batch_rows=2).files[0].endswith(str(path))
    job = Job(model="m", version=None, input=f"file://localhost{path}", output=f"file://localhost{tmp_path}/out")
    assert job.output_dir == str(tmp_path / "out")
    with pytest.raises(InvalidInput, match=f"write file:///walk{tmp_path}/out"):
        Job(model="m", version=None, input=str(path), output=f"file://walk{tmp_path}/out")


def test_a_local_path_with_two_colons_is_read_as_a_path_not_as_chained_urls(tmp_path: Path) -> None:
    """fsspec reads ``a::b`` as the URL ``b`` chained to ``a``: the folder ``a``, not ``a::b``."""
    write_parquet(pa.table({"id": np.arange(3)}), tmp_path / "a::b" / "in.parquet")
    write_parquet(pa.table({"id": np.arange(5)}), tmp_path / "a" / "decoy.parquet")
    for location in (f"file://{tmp_path}/a::b", str(tmp_path / "a::b"), f"file://{tmp_path}/a%3A%3Ab/"):
        source = Source(location, "parquet", batch_rows=10)
        assert source.files == [str(tmp_path / "a::b" / "in.parquet")] and source.total_rows == 3


def _csv_with_bad_widths(path: Path, rows: int) -> Path:
    """``id,x,y`` rows, ~34 bytes each (past the reader's 4 MiB block from ~125,000 rows): a field too many at
    rows 3, 150,000 and the last, one too few at row 150,001."""
    with path.open("w") as out:
        out.write("id,x,y\n")
        for row in range(rows):
            if row in (3, 150_000, rows - 1):
                out.write(f"{row},{row}.500000,{row}.250000,extra\n")
            elif row == 150_001:
                out.write(f"{row},{row}.500000\n")
            else:
                out.write(f"{row},{row}.500000,{row}.250000\n")
    return path


def test_a_csv_row_of_another_width_is_a_bad_row_in_its_place_wherever_it_is(tmp_path: Path) -> None:
    """Not a file refused at start (a bad row in the first block), nor a job stopped half-way by an exception (one
    in a later block): each such row is a bad row in its place (every row keeps its ordinal: the key of a job
    without --key), naming its row; the others are read; a resumed read skips the same rows as the first read."""
    rows = 160_000
    path = _csv_with_bad_widths(tmp_path / "in.csv", rows)
    assert path.stat().st_size > 5_000_000  # the later bad rows in a later block
    source = Source(str(path), "csv", batch_rows=4096)
    assert source.schema.names == ["id", "x", "y"]

    def read(skip: int) -> tuple[list[int | None], list[str | None]]:
        ids: list[int | None] = []
        reasons: list[str | None] = []
        for batch in source.batches(["id", "x"], {"x"}, skip):
            ids += batch.column("id").to_pylist()
            reasons += batch.column("_dhow_unreadable").to_pylist()
        return ids, reasons

    ids, reasons = read(0)
    bad = (3, 150_000, 150_001, rows - 1)
    assert ids == [None if i in bad else i for i in range(rows)]
    assert [i for i, reason in enumerate(reasons) if reason is not None] == list(bad)
    where = [reasons[i] or "" for i in bad]
    assert where[0].startswith(f"row 5 of {path} (its header row 1): 4 field(s) where the header has 3: '3,3.5"), where
    assert where[1].startswith(f"row 150002 of {path} (its header row 1): 4 field(s)"), where
    assert where[2].startswith(f"row 150003 of {path} (its header row 1): 2 field(s) where the header has 3"), where
    assert where[3].startswith(f"row {rows + 1} of {path} (its header row 1): 4 field(s)"), where
    for skip in (1, 4095, 4, 149_999, 150_000, 150_001, rows - 1):
        assert read(skip) == (ids[skip:], reasons[skip:]), skip


def test_a_quoted_line_break_across_a_block_and_a_file_of_no_good_row(tmp_path: Path) -> None:
    """A line break inside a quoted field never cuts its row in two where a block ends (two wrong rows, one of them
    scored); a CSV file none of whose first 64 rows (or rows) has its header's width is refused at start, with why,
    reading no further."""
    text = "id,note,x\n" + "".join(f'{i},"line one\nline two, {i}",{i}.5\n' for i in range(40))
    path = tmp_path / "notes.csv"
    path.write_text(text)
    with path.open("rb") as handle:
        batches = list(_csv_batches(handle, ["id", "note", "x"], {"note"}, 1000, str(path), block_size=64))
    read = pa.Table.from_batches(batches)
    assert read.column("id").to_pylist() == list(range(40))
    assert read.column("note").to_pylist() == [f"line one\nline two, {i}" for i in range(40)]
    assert read.column("_dhow_unreadable").null_count == 40
    (tmp_path / "shifted.csv").write_text("id,x,\n1,2\n3,4\n")  # a trailing comma in the header: 3 columns
    with pytest.raises(InvalidInput, match=r"none of its first 2 rows has its header's width; row 2 \(its header row"):
        Source(str(tmp_path / "shifted.csv"), "csv", batch_rows=10)
    # a large one: refused at its 64th row, its bad rows not all read and kept
    (tmp_path / "long.csv").write_text("id,x,\n" + "1,2\n" * 2_000_000)
    with pytest.raises(InvalidInput, match=r"none of its first 64 rows has its header's width; row 2 "):
        Source(str(tmp_path / "long.csv"), "csv", batch_rows=10)
    # 63 bad rows, then a good one: read (a bad row is a row's fault, not the file's)
    (tmp_path / "late.csv").write_text("id,x\n" + "1\n" * 63 + "1,2\n")
    assert Source(str(tmp_path / "late.csv"), "csv", batch_rows=10).schema.names == ["id", "x"]


@pytest.mark.parametrize("header", [b"id,x", b"id,x\n", b"id,x\r\n", b"id,x\r"])
def test_a_csv_file_of_its_header_alone_is_a_file_of_no_rows_its_last_line_ended_or_not(
    tmp_path: Path, header: bytes
) -> None:
    """Arrow takes a header alone with no line break after it for no header ("Empty CSV file"); it is a file of
    no rows, as with one, and read beside another file; a file of nothing at all is refused, saying why."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a-head.csv").write_bytes(header)
    (tmp_path / "in" / "b-rows.csv").write_bytes(b"id,x\n1,2.5\n3,4")  # (its last row's line unended too)
    source = Source(str(tmp_path / "in"), "csv", batch_rows=10)
    assert source.schema.names == ["id", "x"]
    read = pa.Table.from_batches(list(source.batches(["id", "x"], set())))
    assert read.column("id").to_pylist() == [1, 3] and read.column("_dhow_unreadable").null_count == 2
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(InvalidInput, match=r"empty.csv: it is empty: a CSV input starts with its header row"):
        Source(str(tmp_path / "empty.csv"), "csv", batch_rows=10)


def test_a_csv_files_last_quoted_field_left_open_is_read_as_it_was_and_a_long_header_is_not_called_empty(
    tmp_path: Path,
) -> None:
    """The line break added to a header alone is never added to a file of rows (it would be a quoted field's
    data); a header longer than the reader's first block is refused for that, not as an empty file."""
    (tmp_path / "open.csv").write_bytes(b'id,x\n1,2\n3,"4')
    source = Source(str(tmp_path / "open.csv"), "csv", batch_rows=10)
    read = pa.Table.from_batches(list(source.batches(["id", "x"], {"x"})))
    assert read.column("x").to_pylist() == ["2", "4"]
    wide = ",".join(f"column_{n}" for n in range(100_000))
    (tmp_path / "wide.csv").write_text(wide + "\n" + ",".join("1" * 100_000) + "\n")
    with pytest.raises(InvalidInput) as refused:
        Source(str(tmp_path / "wide.csv"), "csv", batch_rows=10)
    assert "it is empty" not in str(refused.value) and "its header row must end within its first MiB" in str(
        refused.value
    )
