"""What a batch job is asked to do: the model, the input, the output, how columns become inputs.

A ``Job`` is plain data, built once from the command line. Its ``fingerprint`` is what a resumed run must
agree on with the run that wrote the output: a run with other arguments over an existing output is refused,
saying which argument differs, because mixing them would mix two jobs' rows in one output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from dhow.core.errors import InvalidInput
from dhow.core.file_urls import local_path
from dhow.core.names import check_model_name

__all__ = ["ENGINES", "FORMATS", "Job", "parse_map", "parse_model"]

FORMATS = ("parquet", "csv", "jsonl")
ENGINES = ("local", "spark")
#: rows in one output part: what a re-run after a kill redoes at most
DEFAULT_PART_ROWS = 131_072


def parse_model(text: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:VERSION``."""
    name, sep, version = text.partition(":")
    check_model_name(name)
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise InvalidInput(f"--model expects NAME or NAME:VERSION with a version number of at least 1, got {text!r}")
    return name, int(version)


def parse_map(text: str) -> tuple[str, str]:
    """``INPUT=COLUMNS``: COLUMNS is a comma list (``f0,f1``) or a glob (``f*``)."""
    name, sep, columns = text.partition("=")
    if not sep or not name.strip() or not columns.strip():
        raise InvalidInput(f"--map expects INPUT=COLUMNS (e.g. input=f0,f1,f2 or input=f*), got {text!r}")
    return name.strip(), columns.strip()


def input_format(path: str, given: str = "") -> str:
    """An input's format: ``given`` (``--format``), else the input's extension, else Parquet."""
    if given:
        if given not in FORMATS:
            raise InvalidInput(f"--format must be one of {', '.join(FORMATS)}, got {given!r}")
        return given
    lowered = path.lower().rstrip("/")
    for suffix, kind in ((".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl")):
        if lowered.endswith(suffix):
            return kind
    return "parquet"


@dataclass(frozen=True, slots=True)
class Job:
    """One batch job as asked for."""

    model: str
    version: int | None
    input: str
    output: str
    input_format: str = ""
    key: str = ""
    maps: tuple[tuple[str, str], ...] = ()
    engine: str = "local"
    #: rows in one call of the model (0: sized for its runtime)
    batch_rows: int = 0
    part_rows: int = DEFAULT_PART_ROWS
    #: the data's region (residency); "" takes the caller's default or the model's ``region:``
    data_region: str = ""
    overwrite: bool = False
    spark_master: str = "local[*]"
    #: a running server to send the batches to (gRPC), instead of loading the model here
    server: str = ""

    def __post_init__(self) -> None:
        if self.input_format and self.input_format not in FORMATS:
            raise InvalidInput(f"--format must be one of {', '.join(FORMATS)}, got {self.input_format!r}")
        if self.engine not in ENGINES:
            raise InvalidInput(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.server and self.engine == "spark":
            raise InvalidInput("--server sends the batches to a server: it takes the local engine, not --engine spark")
        if self.batch_rows < 0 or self.part_rows < 1:
            raise InvalidInput("--batch-rows must be 0 (sized for the runtime) or more, --part-rows at least 1")
        if "://" in self.output and not self.output.startswith("file://"):
            raise InvalidInput(
                f"--output must be a local folder (object storage output is not supported yet): {self.output}"
            )
        local_path(self.input, "--input")  # refused here, before any engine reads another folder than meant
        local_path(self.output, "--output")

    @property
    def output_dir(self) -> str:
        return os.path.abspath(local_path(self.output, "--output"))

    @property
    def format(self) -> str:
        """The input's format: ``--format``, else the input's extension, else Parquet."""
        return input_format(local_path(self.input, "--input"), self.input_format)

    def fingerprint(self, batch_rows: int) -> dict[str, Any]:
        """What must be the same for a run to continue another's output."""
        return {
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "format": self.format,
            "key": self.key,
            "map": [list(pair) for pair in self.maps],
            "engine": self.engine,
            "batch_rows": batch_rows,
            "part_rows": self.part_rows,
            "data_region": self.data_region,
            "server": self.server,
            # a CSV key is written as its text (2026-12-08; a number before): an output begun with numbers must not
            # go on with text
            **({"csv_key": "text"} if self.key and self.format == "csv" else {}),
        }
