"""The Apache Spark engine: the same job, scored by Spark's Python workers with ``mapInArrow``.

The driver admits the job exactly as the local engine does (``runner.admitted_job``: identity, permission,
model pinned, columns mapped, output checked, run audited). Each Python worker composes its own core from the
same settings at its first batch and keeps it (``_Worker``): the model is loaded once per worker, in the
worker, with no child model server, and every Arrow batch enters that core through the admission point as
the job's principal, like a batch of the local engine. On a cluster the executors reach the same registry and
audit stores (PostgreSQL URLs in the settings) and the same repository path.

The output is written by Spark (its file commit protocol: task outputs are committed once, the job's output
appears at job commit), so a job that failed is run again whole and each row is written once. The scored rows
and the bad rows come out of one ``mapInArrow`` pass, kept on disk, then written as ``OUTPUT`` and
``OUTPUT/errors``.
"""

from __future__ import annotations

import asyncio
import atexit
import csv
import functools
import hashlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa

from dhow.batch.job import Job
from dhow.batch.mapping import Mapping, convert
from dhow.batch.runner import Admitted, admitted_job, job_credentials
from dhow.batch.scoring import ORDINAL, Provenance, Scorer, result_tables
from dhow.batch.sources import UNREADABLE, csv_refusal, line_refusal
from dhow.core.errors import InvalidInput
from dhow.core.file_urls import local_path
from dhow.serving.composition import CorePolicies, compose_core, load_pinned
from dhow.serving.security import Security
from dhow.serving.service import ACTIONS
from dhow.settings import ServerSettings

__all__ = ["run_spark_job", "spark_session"]

REASON, INPUT = "_dhow_reason", "_dhow_input"
#: the file of an unreadable JSON line, as Spark names it (a URI): its reason names it
FILE = "_dhow_file"
_SPARK_TYPES = {
    "BOOL": "boolean", "INT8": "tinyint", "INT16": "smallint", "INT32": "int", "INT64": "bigint",
    "UINT8": "smallint", "UINT16": "int", "UINT32": "bigint", "UINT64": "bigint",
    "FP16": "float", "FP32": "float", "FP64": "double", "BYTES": "string",
}  # fmt: skip


def spark_session(master: str, app: str, batch_rows: int) -> Any:
    """A Spark session for a job; in a virtual environment, its workers run this interpreter."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise InvalidInput("--engine spark needs pyspark: pip install 'dhow[spark]'") from None
    builder = SparkSession.builder.master(master).appName(app)
    builder = builder.config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_rows))
    builder = builder.config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "8")
    if "PYTHONPATH" in os.environ:  # a source checkout: the workers import dhow from the same place
        builder = builder.config("spark.executorEnv.PYTHONPATH", os.environ["PYTHONPATH"])
    return builder.getOrCreate()


def run_spark_job(job: Job, settings: ServerSettings, api_key: str, *, quiet: bool = False) -> dict[str, Any]:
    if job.input.startswith("s3://"):
        raise InvalidInput("--engine spark reads s3a:// through Hadoop's S3A connector; give Spark an s3a:// URL")
    _hadoop_path(job.input)  # refused here, before any work, what Hadoop cannot be given
    _utf8(job.output_dir, job.output, "--output")

    async def main() -> dict[str, Any]:
        async with admitted_job(job, settings, api_key) as admitted:
            await asyncio.to_thread(_run, admitted, settings, api_key, quiet)
        return admitted.run.summary()

    return asyncio.run(main())


@dataclass(frozen=True, slots=True)
class _Task:
    """What every Python worker needs to score (sent with the function to each worker)."""

    settings: ServerSettings
    api_key: str
    model: str
    version: int
    batch_rows: int
    mapping: Mapping
    output_names: tuple[str, ...]
    provenance: Provenance
    data_region: str
    schema: pa.Schema
    #: a CSV input's number of columns (its header's), 0 for another format: what a bad line's reason says
    csv_fields: int = 0


def _run(admitted: Admitted, settings: ServerSettings, api_key: str, quiet: bool) -> None:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import to_arrow_schema

    run, job = admitted.run, admitted.run.job
    spark = spark_session(job.spark_master, f"dhow batch {job.model}", admitted.batch_rows)
    if quiet:
        spark.sparkContext.setLogLevel("ERROR")
    frame = _read(spark, job)
    csv_fields = len([c for c in frame.columns if c not in (UNREADABLE, FILE)]) if job.format == "csv" else 0
    mapping = admitted.mapping
    if not mapping.key:  # unique and in input order, not consecutive: give --key for a key of your own
        frame = frame.withColumn(ORDINAL, F.monotonically_increasing_id())
        mapping = Mapping(mapping.inputs, ORDINAL)
    frame = frame.select(*mapping.columns, *([UNREADABLE, FILE] if UNREADABLE in frame.columns else []))
    schema = _output_schema(admitted, frame.schema[mapping.key].dataType.simpleString())
    task = _Task(
        settings, api_key, job.model, admitted.pinned.version, admitted.batch_rows, mapping,
        tuple(admitted.output_names), Provenance(job.model, admitted.pinned.version, admitted.pinned.artifact_digest,
        run.run_id), job.data_region, to_arrow_schema(spark.createDataFrame([], schema).schema, timezone="UTC"),
        csv_fields,
    )  # fmt: skip
    scored = frame.mapInArrow(lambda batches: _score_batches(task, batches), schema)
    scored = scored.persist(StorageLevel.DISK_ONLY)
    try:
        out = admitted.folder.path
        scored.filter(F.col(REASON).isNull()).drop(REASON, INPUT).write.mode("overwrite").parquet(str(out))
        errors = scored.filter(F.col(REASON).isNotNull()).select(mapping.key, F.col(REASON).alias("reason"),
                                                                 F.col(INPUT).alias("input"))  # fmt: skip
        errors.write.mode("overwrite").parquet(str(out / "errors"))
        counts = {row[0]: row[1] for row in scored.groupBy(F.col(REASON).isNull()).count().collect()}
    finally:
        scored.unpersist()
    _finish(admitted, counts.get(True, 0), counts.get(False, 0))


def _read(spark: Any, job: Job) -> Any:
    path = _hadoop_path(job.input)
    if job.format == "parquet":
        return spark.read.parquet(path)
    from pyspark.sql import functions as F

    if job.format == "csv":  # every column as text: the mapping converts it, a bad value is a bad row
        # a row of more or fewer fields than the header is a bad row, as to the local engine (Spark would fill a
        # short one with nulls and score a long one cut to the header): its text in the corrupt-record column,
        # which Spark fills only while it parses every column (no pruning)
        from pyspark.sql.types import StringType, StructField, StructType

        spark.conf.set("spark.sql.csv.parser.columnPruning.enabled", "false")
        reader = spark.read.option("header", True)
        names = reader.csv(path).columns
        schema = StructType([StructField(name, StringType()) for name in [*names, UNREADABLE]])
        frame = reader.option("columnNameOfCorruptRecord", UNREADABLE).schema(schema).csv(path)
        return frame.withColumn(FILE, F.when(F.col(UNREADABLE).isNotNull(), F.col("_metadata.file_path")))

    # JSON has no NaN or Infinity, nor single-quoted strings, which Spark reads by default: a line holding one is a
    # bad row, as it is to the local engine (the same job, the same output); each worker words why
    # (``_explained``), as that engine does
    reader = spark.read.option("columnNameOfCorruptRecord", UNREADABLE).option("allowNonNumericNumbers", False)
    reader = reader.option("allowSingleQuotes", False)
    frame = reader.json(path)
    if UNREADABLE not in frame.columns:
        return frame
    return frame.withColumn(FILE, F.when(F.col(UNREADABLE).isNotNull(), F.col("_metadata.file_path")))


def _hadoop_path(location: str) -> str:
    """What Hadoop reads as ``location``: it takes a URL's path as written, escapes and all (``my%20data``), and
    ``file://localhost/`` as another file system than ``file:///``; a file URL is given as ``file://`` and its
    decoded path (Hadoop escapes ``#``, ``%`` and spaces itself), its glob characters escaped with ``\\``:
    Hadoop reads ``run?1`` as a glob that also matches ``runX1``, the local engine as the one folder. A plain path
    or another URL is Hadoop's to read as written, globs included."""
    path = local_path(location, "--input")
    if path != location and ":" in path:
        # (Hadoop rebuilds each part of a path it globs as a URI: a ':' in one fails the job after it started)
        raise InvalidInput(f"--input {location!r}: the Spark engine reads no local path holding ':'; rename it")
    hadoop = location if path == location else "file://" + path.translate(_HADOOP_GLOB)
    return _utf8(hadoop, location, "--input")


_HADOOP_GLOB = str.maketrans({char: "\\" + char for char in "\\?*[]{}"})


def _utf8(path: str, location: str, option: str) -> str:
    """``path``, refused when it is no UTF-8 (a name of bytes that are none, or a file URL's ``%FF``): Java takes
    UTF-8 names only, and Py4J, failing to encode one, would lose its gateway to the JVM."""
    try:
        path.encode()
    except UnicodeEncodeError:
        raise InvalidInput(
            f"{option} {location!r}: the Spark engine (Java) reads UTF-8 file names only, and this one is no "
            "UTF-8; rename it (the local engine reads CSV and JSON Lines at it)"
        ) from None
    return path


def _output_schema(admitted: Admitted, key_type: str) -> str:
    """The DDL of the rows ``mapInArrow`` answers: key, outputs, provenance, and the bad rows' reason and input."""
    fields = [f"`{admitted.mapping.key or ORDINAL}` {key_type}"]
    for spec in admitted.pinned.config.outputs or ():
        kind = _SPARK_TYPES[spec.datatype]
        wide = len(spec.shape) > 1 and (any(d < 0 for d in spec.shape[1:]) or _product(spec.shape[1:]) > 1)
        fields.append(f"`{spec.name}` {f'array<{kind}>' if wide else kind}")
    fields += ["dhow_model string", "dhow_version bigint", "dhow_artifact_digest string", "dhow_run_id string",
               "dhow_scored_at timestamp", f"{REASON} string", f"{INPUT} string"]  # fmt: skip
    return ", ".join(fields)


def _product(dims: tuple[int, ...]) -> int:
    total = 1
    for dim in dims:
        total *= dim
    return total


def _finish(admitted: Admitted, scored: int, errors: int) -> None:
    run, folder = admitted.run, admitted.folder
    digest = hashlib.sha256()
    parts = sorted(folder.path.glob("part-*.parquet")) + sorted((folder.path / "errors").glob("part-*.parquet"))
    for path in parts:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    run.output_digest = digest
    run.counts.rows, run.counts.scored, run.counts.errors = scored + errors, scored, errors
    run.counts.parts = len(sorted(folder.path.glob("part-*.parquet")))
    folder.open(
        admitted.header, None, written_by_spark=True
    )  # the journal's header: what a re-run over this output must agree with
    run.opened = True


# -- in each Python worker ---------------------------------------------------------------------------------


class _Worker:
    """One Python worker's core and model: made at its first batch, kept for the worker's life."""

    def __init__(self, task: _Task) -> None:
        self.task = task
        self.loop = asyncio.new_event_loop()
        self.security = Security(task.settings)
        self.core = self.loop.run_until_complete(self._open())
        atexit.register(self.close)

    async def _open(self) -> Any:
        task = self.task
        core = await compose_core(task.settings, self.security, CorePolicies.load(task.settings), first_key=False)
        who = await core.service.authenticate(job_credentials(task.settings, task.api_key), ACTIONS["batch.run"])
        await load_pinned(core.models, task.model, task.version, max_batch_size=task.batch_rows, python_processes=1)
        self.scorer = Scorer(core.service.invoker(who), task.model, task.version, task.mapping, task.data_region)
        return core

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        task = self.task
        batch = _explained(batch, task.csv_fields)
        converted = convert(batch, task.mapping)
        scores = self.loop.run_until_complete(self.scorer.score(converted))
        names = list(task.output_names)
        scored, errors = result_tables(batch, 0, converted, scores, task.mapping, names, task.provenance)
        tables = [scored] if errors is None else [scored, errors.rename_columns(_error_names(errors, task))]
        whole = pa.concat_tables(tables, promote_options="permissive")
        columns = [
            whole.column(f.name) if f.name in whole.column_names else pa.nulls(len(whole), f.type) for f in task.schema
        ]
        return pa.Table.from_arrays(columns, names=task.schema.names).cast(task.schema).combine_chunks().to_batches()[0]

    def close(self) -> None:
        async def closing() -> None:
            await self.core.models.close()
            self.core.service.guard.close()
            await self.security.close()

        self.loop.run_until_complete(closing())


def _explained(batch: pa.RecordBatch, csv_fields: int = 0) -> pa.RecordBatch:
    """A batch's unreadable JSON lines or CSV rows (Spark's raw text) given the local engine's reasons, each naming
    its file (not its line: Spark counts none; ``csv_fields``: a CSV input's header's number of fields, 0 for JSON
    Lines); the file's column dropped."""
    if FILE not in batch.schema.names:
        return batch
    lines, files = batch.column(UNREADABLE).to_pylist(), batch.column(FILE).to_pylist()
    explain = functools.partial(_csv_reason, header=csv_fields) if csv_fields else _line_reason
    reasons = [
        None if line is None else explain(line, _local_name(file or ""))
        for line, file in zip(lines, files, strict=True)
    ]
    names = [name for name in batch.schema.names if name not in (UNREADABLE, FILE)]
    columns = [batch.column(name) for name in names]
    return pa.record_batch([*columns, pa.array(reasons, pa.string())], names=[*names, UNREADABLE])


def _csv_reason(line: str, file: str, header: int) -> str:
    fields = len(next(csv.reader([line], escapechar="\\"), []))  # (Spark's CSV escape is a backslash)
    return csv_refusal(file, fields, header, line)


def _line_reason(line: str, file: str) -> str:
    # (a line the local engine would read as a row that Spark did not: said as Spark's, with its text)
    return line_refusal(line.encode(), file) or f"{file}: not a JSON line Spark reads: {line[:200]!r}"


def _local_name(uri: str) -> str:
    """Spark's URI of a file (``file:/data/in%20%231/a.jsonl``) as the local engine names it: a local file by its
    decoded path; a file of another store as Spark says it."""
    parts = urlsplit(uri)
    return unquote(parts.path) if parts.scheme == "file" else uri


def _error_names(errors: pa.Table, task: _Task) -> list[str]:
    renamed = {"reason": REASON, "input": INPUT}
    return [renamed.get(name, name) for name in errors.column_names]


_WORKERS: dict[str, _Worker] = {}


def _score_batches(task: _Task, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    worker = _WORKERS.get(task.provenance.run_id)
    if worker is None:
        worker = _WORKERS[task.provenance.run_id] = _Worker(task)
    for batch in batches:
        if batch.num_rows:
            yield worker.score(batch)
