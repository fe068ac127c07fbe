"""The input of a batch job: a file, a folder of files or object storage (``s3://…`` through fsspec), read as a
stream of Arrow record batches: never the whole input in memory.

Every file is opened and its columns read before anything runs, so that an unreadable file or a missing
column fails the job at once, before any output. Parquet is read column by column (only the columns the job
needs) and a resumed run skips whole files and row groups it already scored; CSV and JSON Lines are read
from the top, their rows counted off.

CSV and JSON Lines columns that feed a model are read as text and converted by the mapping, so that one bad
value makes one bad row, not an unreadable file. A JSON line that does not parse is a row whose
``_dhow_unreadable`` column says why and where (the file, the line and the column); one that holds the ``NaN`` or
``Infinity`` Python's ``json.dumps`` writes also says that JSON has none and that Parquet holds them.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from collections.abc import Callable, Iterator
from typing import IO, Any

import fsspec
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem, make_path_posix

from dhow.core.errors import InvalidInput
from dhow.core.file_urls import local_path
from dhow.core.wire.json_refusals import json_refusal

__all__ = ["NON_FINITE", "UNREADABLE", "Source", "csv_refusal", "line_refusal"]

#: the column of a JSON Lines batch that says why a line could not be read (null: it could)
UNREADABLE = "_dhow_unreadable"

#: how a batch job takes the NaN and Infinity that JSON has not (a null makes the row an error, as any null)
NON_FINITE = "give non-finite values in a numeric or list column of a Parquet input"

_SUFFIXES = {"parquet": (".parquet", ".pq"), "csv": (".csv",), "jsonl": (".jsonl", ".ndjson", ".json")}


class Source:
    """The input files of one format, in a fixed order (the order rows are numbered and parts are cut in)."""

    def __init__(self, url: str, kind: str, batch_rows: int, option: str = "--input") -> None:
        self.url = url
        self.kind = kind
        self.batch_rows = batch_rows
        # the path of a file URL, decoded, not the URL: fsspec reads file://localhost/x as ./localhost/x, and
        # file:///my%20data as the folder my%20data; a local path is read by the local file system itself, as
        # fsspec would read /data/a::b as the URL b chained to /data/a
        path = local_path(url, option)
        try:
            if path != url or "://" not in url:
                self.fs, root = LocalFileSystem(), make_path_posix(path).rstrip("/") or "/"
            else:
                self.fs, root = fsspec.core.url_to_fs(path)
            self.files = _files(self.fs, root, kind)
        except (OSError, ValueError, ImportError) as exc:
            raise InvalidInput(f"cannot read the input {url}: {exc}") from None
        if not self.files:
            raise InvalidInput(f"the input {url} holds no {kind} file ({', '.join(_SUFFIXES[kind])})")
        self.local = "file" in _protocols(self.fs)
        self._rows: list[int] | None = None
        #: each file's columns, in its order (``check_same_header``)
        self._names: list[list[str]] = []
        self.schema = self._check_files()

    @property
    def total_rows(self) -> int | None:
        """The input's rows, when the format says without reading it (Parquet)."""
        return sum(self._rows) if self._rows is not None else None

    def named(self, path: str) -> str:
        """A file of the input as the user would name it: fsspec's ``bucket/key`` with the scheme of the URL given
        (``s3://bucket/key``), a local file by its path."""
        if self.local or "://" in path:
            return path
        scheme = self.url.rsplit("::", 1)[-1].split("://", 1)[0]  # (a chained URL's last link is the store's)
        return f"{scheme}://{path}"

    def _open(self, path: str) -> Any:
        return path if self.local else self.fs.open(path, "rb")

    def _check_files(self) -> pa.Schema:
        """Open every file and read its columns; the first file's are the input's."""
        schemas: list[pa.Schema] = []
        rows: list[int] = []
        for path in self.files:
            try:
                if self.kind == "parquet":
                    meta = pq.read_metadata(self._open(path))
                    schemas.append(meta.schema.to_arrow_schema())
                    rows.append(meta.num_rows)
                else:
                    schemas.append(self._text_schema(path))
            except (OSError, pa.ArrowException, ValueError) as exc:
                raise InvalidInput(f"cannot read input file {self.named(path)}: {exc}") from None
        first = schemas[0]
        for path, schema in zip(self.files[1:], schemas[1:], strict=True):
            missing = [name for name in first.names if name not in schema.names]
            if missing:
                lacks, first_file = ", ".join(missing), self.named(self.files[0])
                raise InvalidInput(f"input file {self.named(path)} lacks column(s) {lacks} of {first_file}")
        self._rows = rows if self.kind == "parquet" else None
        self._names = [schema.names for schema in schemas]
        return first

    def check_same_header(self, engine: str) -> None:
        """Refuse a CSV input whose files' headers are not all the first one's, names and order: ``engine`` (Spark)
        applies the first file's header to every file by position, so a file whose columns come in another order
        would have its values read under the wrong names (the local engine reads each file by its own header)."""
        if self.kind != "csv":
            return
        first = self._names[0]
        for path, names in zip(self.files[1:], self._names[1:], strict=True):
            if names != first:
                raise InvalidInput(
                    f"input file {self.named(path)} has the header {','.join(names)} and "
                    f"{self.named(self.files[0])} {','.join(first)}: {engine} applies the first file's header to "
                    "every CSV file by position; give every file the same columns in the same order, or use the "
                    "local engine, which reads each file by its own header"
                )

    def _text_schema(self, path: str) -> pa.Schema:
        with self.fs.open(path, "rb") as handle:
            if self.kind == "csv":  # (a row of another width is a bad row when read, not a bad file...)
                return _csv_schema(_LastLineEnded(handle))
            first = next(_json_batches(handle, 64, self.named(path)), None)
        if first is None:
            raise ValueError("no JSON line")
        reasons = first.column(UNREADABLE)
        if not reasons.null_count:  # no line read: no column to find, and the first line's reason is the one to fix
            raise ValueError(f"no line among the first {len(reasons)} of it could be read; {reasons[0]}")
        return first.schema

    def batches(self, columns: list[str], text: set[str], skip: int = 0) -> Iterator[pa.RecordBatch]:
        """The input's rows from row ``skip`` on, in batches of at most ``batch_rows``, with ``columns`` only;
        CSV and JSON Lines columns in ``text`` are read as text."""
        for index, path in enumerate(self.files):
            if self._rows is not None:
                if skip >= self._rows[index]:
                    skip -= self._rows[index]
                    continue
                parquet = pq.ParquetFile(self._open(path))
                groups, skipped = _row_groups_after(parquet.metadata, skip)
                skip -= skipped
                read = _row_group_batches(parquet, groups, columns, self.batch_rows)
            else:
                read = self._text_batches(path, columns, text)
            for batch in read:
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                yield batch.slice(skip) if skip else batch
                skip = 0

    def _text_batches(self, path: str, columns: list[str], text: set[str]) -> Iterator[pa.RecordBatch]:
        with self.fs.open(path, "rb") as handle:
            if self.kind == "csv":
                yield from _csv_batches(_LastLineEnded(handle), columns, text, self.batch_rows, self.named(path))
            else:
                for batch in _json_batches(handle, self.batch_rows, self.named(path)):
                    yield _select(batch, columns)

    def digest(self) -> str:
        """SHA-256 over the input files' bytes, in order (what the audit record names the input by)."""
        total = hashlib.sha256()
        for path in self.files:
            with self.fs.open(path, "rb") as handle:
                total.update(hashlib.file_digest(handle, "sha256").digest())
        return total.hexdigest()


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _files(fs: Any, root: str, kind: str) -> list[str]:
    if not fs.isdir(root):
        fs.info(root)  # a missing file is an OSError here, named with its path
        return [root]
    found = [
        path
        for path in fs.find(root)
        if path.lower().endswith(_SUFFIXES[kind])
        and not any(part.startswith(("_", ".")) for part in path[len(root) :].split("/") if part)
    ]
    return sorted(found)


def _row_groups_after(meta: pq.FileMetaData, skip: int) -> tuple[list[int], int]:
    """The row groups that hold rows from ``skip`` on, and the rows of the groups left out."""
    skipped = 0
    for index in range(meta.num_row_groups):
        rows = meta.row_group(index).num_rows
        if skipped + rows > skip:  # the first group that holds a row to read: it and every one after it
            return list(range(index, meta.num_row_groups)), skipped
        skipped += rows
    return [], skipped


def _row_group_batches(
    parquet: pq.ParquetFile, groups: list[int], columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """One row group at a time: the reader pre-buffers (coalesces the reads of) what it is given, so given the
    whole file it would hold the whole file in memory."""
    for group in groups:
        yield from parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)


def _csv_batches(
    handle: IO[bytes] | io.RawIOBase,
    columns: list[str],
    text: set[str],
    batch_rows: int,
    path: str,
    block_size: int = 1 << 22,
) -> Iterator[pa.RecordBatch]:
    """The rows of a CSV file, with the unreadable-rows reasons column (``UNREADABLE``, as JSON Lines batches have
    it): a row whose number of fields is not its header's is a bad row in its place (its columns null), its reason
    naming its row and showing its text."""
    #: the bad rows read and not given yet: each row's index among the file's rows (-1: not known), and why
    refused: list[tuple[int, str]] = []

    def refuse(row: pacsv.InvalidRow) -> str:
        why = csv_refusal(_row_of(row, path), row.actual_columns, row.expected_columns, row.text)
        refused.append((row.number - 2 if row.number is not None and row.number >= 2 else -1, why))
        return "skip"

    convert = pacsv.ConvertOptions(
        include_columns=columns,
        column_types={name: pa.string() for name in text},
        strings_can_be_null=True,
    )
    reader = pacsv.open_csv(
        handle,
        # one thread: a block's bad rows are reported as it is read, not as blocks ahead of it are
        read_options=pacsv.ReadOptions(block_size=block_size, use_threads=False),
        parse_options=_csv_parsing(refuse),
        convert_options=convert,
    )
    names = [*reader.schema.names, UNREADABLE]
    given = 0
    for batch in reader:
        good = pa.record_batch([*batch.columns, pa.nulls(batch.num_rows, pa.string())], names=names)
        rows = _placed(good, refused, given, reader.schema)
        given += rows.num_rows
        yield from rows.to_batches(max_chunksize=batch_rows)
    if refused:  # (bad rows after the last good one, in their order)
        refused.sort(key=lambda entry: (entry[0] < 0, entry[0]))
        bad = _bad_rows([reason for _, reason in refused], reader.schema, names)
        yield from pa.Table.from_batches([bad]).to_batches(max_chunksize=batch_rows)


class _LastLineEnded(io.RawIOBase):
    """A CSV file read as it is, but for a file of one line without a line break that fits in the first read (a
    header alone): given with one, which Arrow needs to read it as a header, a file of no rows (without it, in
    its first block, Arrow takes it for no header at all: "Empty CSV file"). A file of more lines, its last
    unended, Arrow reads as it is (a quoted field left open included: a line break added would be its data)."""

    def __init__(self, handle: IO[bytes]) -> None:
        super().__init__()
        self._handle = handle
        self._first = True
        #: the bytes given so far (none: the file is empty)
        self.given = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = len(buffer)
        if not self._first or size < 2:
            data: bytes | bytearray = self._handle.read(size)
        else:  # the first read filled (room left for the line break), or the whole file
            self._first = False
            data = bytearray()
            while len(data) < size - 1:
                more = self._handle.read(size - 1 - len(data))
                if not more:
                    if data and 10 not in data and 13 not in data:
                        data += b"\n"
                    break
                data += more
        buffer[: len(data)] = data
        self.given += len(data)
        return len(data)


def _csv_schema(handle: IO[bytes] | io.RawIOBase) -> pa.Schema:
    """A CSV file's columns, from its header; a file none of whose first ``_FIRST_ROWS`` rows (or none of its rows,
    when it has fewer) has the header's width is refused, with the first one's reason (as a JSON Lines file none of
    whose first lines is read): its header is the likelier mistake (a trailing comma)."""
    refused: list[pacsv.InvalidRow] = []  # (the first only: the rest are counted)
    count = 0

    def refuse(row: pacsv.InvalidRow) -> str:
        nonlocal count
        count += 1
        if not refused:
            refused.append(row)
        # every row so far refused (Arrow numbers them from the header's 1): stop reading, refuse the file
        return "error" if count >= _FIRST_ROWS and row.number == count + 1 else "skip"

    # (one thread, as the rows are read: Arrow numbers the rows it refuses only then)
    read = pacsv.ReadOptions(use_threads=False)
    try:
        reader = pacsv.open_csv(handle, read_options=read, parse_options=_csv_parsing(refuse))
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            if getattr(handle, "given", None) == 0:
                raise ValueError("it is empty: a CSV input starts with its header row (the columns' names)") from None
            raise ValueError(f"{exc}: its header row must end within its first MiB") from None
        if not refused:
            raise
        reader, first = None, None
    else:
        try:
            first = next(iter(reader), None)
        except pa.ArrowInvalid:
            if not refused:
                raise
            first = None
        finally:
            reader.close()
    if refused and (first is None or not first.num_rows):  # (...unless no row of its first ones is one)
        bad = refused[0]
        why = csv_refusal(_row_of(bad, ""), bad.actual_columns, bad.expected_columns, bad.text)
        raise ValueError(f"none of its first {count} rows has its header's width; {why}")
    assert reader is not None
    return reader.schema


#: rows of a CSV file read, at most, before it is refused when none has its header's width
_FIRST_ROWS = 64


def _row_of(row: pacsv.InvalidRow, path: str) -> str:
    """A refused CSV row as its reason names it: Arrow's row number (the header is row 1; blank lines are none)."""
    of = f" of {path}" if path else ""
    if row.number is None or row.number < 2:
        return f"a row{of}"
    return f"row {row.number}{of} (its header row 1)"


def _placed(good: pa.RecordBatch, refused: list[tuple[int, str]], given: int, schema: pa.Schema) -> pa.Table:
    """A block's good rows with its bad rows (taken from ``refused``) in their places (``given``: the rows of the
    file before the block): a bad row at index ``i`` of the file is the block's row ``i - given``, unless a bad row
    is past the block's rows, then it is the next block's (the same place either way). A bad row of no known place
    goes at the block's end."""
    known = sorted(entry for entry in refused if entry[0] >= given)
    inside: list[tuple[int, str]] = []
    for index, reason in known:
        if index - given > good.num_rows + len(inside):
            break
        inside.append((index - given, reason))
    unplaced = [reason for index, reason in refused if index < given]
    refused[:] = known[len(inside) :]
    reasons = [reason for _, reason in inside] + unplaced
    if not reasons:
        return pa.Table.from_batches([good])
    total = good.num_rows + len(reasons)
    bad_at = np.array([at for at, _ in inside] + list(range(total - len(unplaced), total)), dtype=np.int64)
    is_bad = np.zeros(total, dtype=bool)
    is_bad[bad_at] = True
    order = np.empty(total, dtype=np.int64)
    order[~is_bad] = np.arange(good.num_rows)
    order[bad_at] = good.num_rows + np.arange(len(reasons))
    bad = _bad_rows(reasons, schema, good.schema.names)
    return pa.Table.from_batches([good, bad]).take(order).combine_chunks()


def _bad_rows(reasons: list[str], schema: pa.Schema, names: list[str]) -> pa.RecordBatch:
    nulls = [pa.nulls(len(reasons), field.type) for field in schema]
    return pa.record_batch([*nulls, pa.array(reasons, pa.string())], names=names)


def _csv_parsing(refuse: Callable[[pacsv.InvalidRow], str]) -> pacsv.ParseOptions:
    """How CSV is read: a quoted field may hold line breaks (a block is never cut inside one, which would make two
    wrong rows of it), and a row of another width than the header is handed to ``refuse``."""
    return pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=refuse)


def csv_refusal(where: str, fields: int, header: int, text: str) -> str:
    """Why a CSV row is no row, ``where`` naming it (its line and file; the Spark engine, which counts no lines,
    its file): its number of fields against its header's, and its text."""
    if fields == header:  # (Spark's reader refuses a row for its quoting too)
        return f"{where}: a CSV row that cannot be read: {text[:200]!r}"
    return f"{where}: {fields} field(s) where the header has {header}: {text[:200]!r}"


def _json_batches(handle: IO[bytes], batch_rows: int, path: str) -> Iterator[pa.RecordBatch]:
    lines = ((number, line) for number, line in enumerate(handle, 1) if line.strip())
    while chunk := list(itertools.islice(lines, batch_rows)):
        rows: list[dict[str, Any]] = []
        unreadable: list[str | None] = []
        for number, line in chunk:
            why: str | None = None
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                row, why = {}, line_refusal(line, f"line {number} of {path}")
            rows.append(row)
            unreadable.append(why)
        names = list(dict.fromkeys(name for row in rows for name in row))
        arrays = {name: _json_column([row.get(name) for row in rows]) for name in names}
        arrays[UNREADABLE] = pa.array(unreadable, pa.string())
        yield pa.record_batch(arrays)


def line_refusal(line: bytes, where: str) -> str:
    """Why a JSON Lines line is no row, ``where`` naming it (its line and file; the Spark engine, which counts no
    lines, its file): where the parser stopped in it and, at a ``NaN`` or ``Infinity``, how to give those instead;
    "" for a JSON object (a row)."""
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        refusal = json_refusal(exc, NON_FINITE, f"{exc.msg} at column {exc.colno}")
        return f"{where}: not a JSON line ({refusal}): {line[:200].decode(errors='replace')!r}"
    return "" if isinstance(row, dict) else f"{where}: not a JSON object"


def _json_column(values: list[Any]) -> pa.Array:
    """A column of JSON values: typed when they agree, else their JSON text (the mapping converts it)."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return pa.array([v if v is None or isinstance(v, str) else orjson.dumps(v).decode() for v in values])


def _select(batch: pa.RecordBatch, columns: list[str]) -> pa.RecordBatch:
    """The columns asked for (a column no line of this batch had is all null), and the unreadable-line reasons."""
    arrays = [batch.column(name) if name in batch.schema.names else pa.nulls(batch.num_rows) for name in columns]
    return pa.record_batch([*arrays, batch.column(UNREADABLE)], names=[*columns, UNREADABLE])
