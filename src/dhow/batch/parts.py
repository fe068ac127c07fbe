"""The output folder of a batch job, and the protocol that makes a killed job resumable exactly once.

    OUTPUT/part-00000.parquet …        the scored rows, one part per ``part_rows`` input rows, in input order
    OUTPUT/errors/part-00000.parquet … the bad rows of that part (only when it has some)
    OUTPUT/_dhow_journal.jsonl         the run's arguments, then one line per committed part
    OUTPUT/_summary.json               what ``dhow batch status`` reads (rewritten after every part)
    OUTPUT/_dhow.lock                  held while a run writes here

A part is committed in four steps: written to a temporary name, fsynced, renamed into place (atomic: a reader
sees the whole part or none), then recorded by one appended, fsynced journal line. The journal is the truth: a
part file without its line (a kill between the rename and the line) is not committed, and the re-run writes it
again under the same name, from the same input rows. So a run killed at any moment and run again loses no row
and writes none twice. Names starting with ``_`` are left out by Parquet readers (pyarrow, Spark).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from dhow.core.errors import Conflict, InvalidInput

__all__ = ["JOURNAL", "SUMMARY", "Journal", "OutputFolder", "part_name", "read_summary"]

JOURNAL = "_dhow_journal.jsonl"
SUMMARY = "_summary.json"
LOCK = "_dhow.lock"
_TEMP = "_dhow_temp"


@dataclass(slots=True)
class Journal:
    """What a journal says: the run's header (arguments, version, run id) and its committed parts, in order."""

    header: dict[str, Any]
    parts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rows_done(self) -> int:
        return sum(int(part["rows"]) for part in self.parts)


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


class OutputFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: int | None = None

    def read(self) -> Journal | None:
        """The journal, without its last line if a kill tore it; None when there is none."""
        try:
            data = (self.path / JOURNAL).read_bytes()
        except FileNotFoundError:
            return None
        lines = data.split(b"\n")
        try:
            header = orjson.loads(lines[0])
        except orjson.JSONDecodeError:
            return None  # killed while writing the header: nothing was committed
        journal = Journal(header)
        for line in lines[1:]:
            try:
                journal.parts.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                break  # a torn last line: that part was not committed
        return journal

    def check(self, fingerprint: dict[str, Any], overwrite: bool) -> Journal | None:
        """The journal to continue (None: start afresh); refuses an output another job wrote, saying why."""
        if overwrite or not self.path.exists():
            return None
        journal = self.read()
        if journal is None:
            # a run killed before its first line leaves only the lock (and perhaps its temporary folder)
            if any(not entry.name.startswith("_dhow") for entry in self.path.iterdir()):
                raise Conflict(
                    f"the output {self.path} exists and is not a dhow batch output (no {JOURNAL}); "
                    "choose another folder, or add --overwrite to replace it"
                )
            return None
        was = journal.header.get("fingerprint", {})
        differ = [name for name in sorted(set(was) | set(fingerprint)) if was.get(name) != fingerprint.get(name)]
        if differ:
            what = "; ".join(f"{name}: {was.get(name)!r} then, {fingerprint.get(name)!r} now" for name in differ)
            raise Conflict(
                f"the output {self.path} holds a run with other arguments ({what}); run it with the same "
                "arguments to continue it, or add --overwrite to start afresh"
            )
        return journal

    def open(self, header: dict[str, Any], journal: Journal | None, *, written_by_spark: bool = False) -> None:
        """Take the folder for this run: lock it, start afresh (``journal`` None) or continue ``journal``;
        ``written_by_spark``: Spark committed the output itself, only the journal's header is added."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"another run is writing {self.path}; wait for it, or stop it first") from None
        if written_by_spark:
            self._write_line(header, create=True)
            return
        if journal is None:
            self._clear()
            self._write_line(header, create=True)
        else:
            self._rewrite(journal)
        self._drop_uncommitted(len(journal.parts) if journal is not None else 0)

    def _clear(self) -> None:
        for entry in self.path.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _rewrite(self, journal: Journal) -> None:
        """The journal without a torn last line, so that the next line starts on its own."""
        lines = [journal.header, *journal.parts]
        temp = self.path / f"{JOURNAL}.tmp"
        temp.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        _fsync_file(temp)
        os.replace(temp, self.path / JOURNAL)
        _fsync_dir(self.path)

    def _drop_uncommitted(self, committed: int) -> None:
        shutil.rmtree(self.path / _TEMP, ignore_errors=True)
        for folder in (self.path, self.path / "errors"):
            for entry in folder.glob("part-*.parquet"):
                if int(entry.name[5:10]) >= committed:
                    entry.unlink()

    def commit(self, index: int, scored: pa.Table, errors: pa.Table | None, line: dict[str, Any]) -> dict[str, Any]:
        """Write part ``index`` (and its errors), then record it in the journal; the line as written."""
        digests = {}
        if errors is not None and errors.num_rows:
            digests["errors_digest"] = self._place(errors, self.path / "errors" / part_name(index))
        digests["digest"] = self._place(scored, self.path / part_name(index))
        entry = {"part": index, **line, **digests}
        self._write_line(entry)
        return entry

    def _place(self, table: pa.Table, target: Path) -> str:
        """Write a table to a temporary file, fsync it, rename it to ``target``; its SHA-256."""
        temp_dir = self.path / _TEMP
        temp_dir.mkdir(exist_ok=True)
        target.parent.mkdir(exist_ok=True)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue()
        temp = temp_dir / target.name
        with temp.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
        _fsync_dir(target.parent)
        return hashlib.sha256(data).hexdigest()

    def _write_line(self, entry: dict[str, Any], create: bool = False) -> None:
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(self.path / JOURNAL, flags, 0o644)
        try:
            os.write(fd, orjson.dumps(entry) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if create:
            _fsync_dir(self.path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        temp = self.path / f"{SUMMARY}.tmp"
        temp.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
        os.replace(temp, self.path / SUMMARY)

    def close(self) -> None:
        if self._lock is not None:
            shutil.rmtree(self.path / _TEMP, ignore_errors=True)
            os.close(self._lock)
            self._lock = None

    def running(self) -> bool:
        """Whether a run holds the folder now (what tells a run still going from an interrupted one)."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def read_summary(path: str | Path) -> dict[str, Any]:
    """The summary of the run in ``path``, as ``dhow batch status`` shows it."""
    folder = OutputFolder(path)
    try:
        summary: dict[str, Any] = orjson.loads((folder.path / SUMMARY).read_bytes())
    except FileNotFoundError:
        raise InvalidInput(f"{path} holds no batch run (no {SUMMARY})") from None
    if summary.get("state") == "running" and not folder.running():
        summary["state"] = "interrupted"
    return summary


def _fsync_file(path: Path) -> None:
    with path.open("rb") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)
