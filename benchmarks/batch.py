"""Batch scoring: dhow's engines against the bare loop and Spark's own way, on the same files, in one run.

    .venv/bin/python benchmarks/batch.py [--rows 1000000] [--spark-rows 1000000] [--rounds 2] [--no-spark]

Builds the demo models and writes two Parquet files of the tabular model's 32 features plus an id key:
ROWS rows, and 5 x ROWS rows. Then, in alternating rounds:

(a) `dhow batch run` (local engine, authentication on with an invoker key, every batch admitted and audited,
    output committed in parts with the journal) over the ROWS file, against
(b) the bare loop: `pyarrow.parquet.ParquetFile.iter_batches` -> numpy -> one `onnxruntime.InferenceSession`
    -> the same output columns written to one Parquet file: what a person writes by hand.
(c) `dhow batch run` over the 5 x ROWS file: its peak memory against (a)'s (flat: the input is streamed).
(d) `dhow batch run --engine spark` (local[*]) over the SPARK_ROWS file, against
(e) the same model scored by Spark's own `pyspark.ml.functions.predict_batch_udf` (ONNX Runtime inside,
    batch 8192) and written by Spark, in a fresh Spark session.

Rates are rows over the process's whole run, start-up included, measured as a separate process each time (so a
peak RSS of that process is its own); ratios compare medians over the rounds. Writes benchmarks/RESULTS-batch.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
FEATURES = 32

BARE_LOOP = """
import sys, time, numpy as np, onnxruntime, pyarrow as pa, pyarrow.parquet as pq
model, source, target = sys.argv[1:4]
start = time.perf_counter()
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
names = [f"f{j}" for j in range(32)]
with pq.ParquetWriter(target, pa.schema([("id", pa.int64()), ("label", pa.int64()),
                      ("probabilities", pa.list_(pa.float32(), 2))]), compression="zstd") as writer:
    for batch in pq.ParquetFile(source).iter_batches(batch_size=8192, columns=["id", *names]):
        x = np.empty((batch.num_rows, 32), dtype=np.float32)
        for j, name in enumerate(names):
            x[:, j] = batch.column(name).to_numpy()
        label, probabilities = session.run(["label", "probabilities"], {"input": x})
        writer.write_table(pa.table({"id": batch.column("id"), "label": label,
            "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probabilities.reshape(-1)), 2)}))
print('{"duration_s": %f}' % (time.perf_counter() - start))
"""

SPARK_PEER = """
import os, sys
model, source, target = sys.argv[1:4]
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
from pyspark.sql import SparkSession, functions as F
from pyspark.sql.types import ArrayType, FloatType, LongType, StructField, StructType
from pyspark.ml.functions import predict_batch_udf
spark = (SparkSession.builder.master("local[*]").appName("predict_batch_udf peer")
         .config("spark.ui.enabled", "false").config("spark.sql.execution.arrow.maxRecordsPerBatch", "8192")
         .getOrCreate())
spark.sparkContext.setLogLevel("ERROR")

def make_predict():
    import numpy as np, onnxruntime
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    def predict(x):
        label, probabilities = session.run(["label", "probabilities"], {"input": x.astype(np.float32)})
        return {"label": label, "probabilities": probabilities}
    return predict

udf = predict_batch_udf(make_predict, return_type=StructType([StructField("label", LongType()),
                        StructField("probabilities", ArrayType(FloatType()))]), batch_size=8192,
                        input_tensor_shapes=[[32]])
frame = spark.read.parquet(source)
features = F.array(*[F.col(f"f{j}") for j in range(32)])
scored = frame.select("id", udf(features).alias("p")).select("id", "p.label", "p.probabilities")
scored.write.mode("overwrite").parquet(target)
spark.stop()
"""


@dataclass(frozen=True)
class Measured:
    rows: int
    seconds: float
    peak_mb: float
    #: the time the job itself reports (from before the model loads to the end), start-up of Python left out
    job_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.rows / self.seconds

    @property
    def job_rate(self) -> float:
        return self.rows / self.job_seconds if self.job_seconds else 0.0


def _measure(command: list[str], rows: int, env: dict[str, str]) -> Measured:
    """Run a command as a process of its own: its wall time and its peak RSS (VmHWM, read from /proc while it
    runs: the main process, where a job reads, converts and writes; the audit writer and Spark's JVM and
    Python workers are processes of their own and not counted)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        peak_kb = 0
        while process.poll() is None:
            peak_kb = max(peak_kb, _high_water_kb(process.pid))
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(command[:6])} failed:\n{err.read().decode(errors='replace')[-3000:]}")
        out.seek(0)
        text = out.read().decode()
    job_seconds = json.loads(text[text.index("{") :])["duration_s"] if "{" in text else 0.0
    return Measured(rows, seconds, peak_kb / 1024, job_seconds)


def _high_water_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _write_inputs(folder: Path, rows: int, larger: bool = True) -> tuple[Path, ...]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = (folder / "small.parquet", folder / "large.parquet")
    rng = np.random.default_rng(0)
    for path, total in zip(paths, (rows, 5 * rows) if larger else (rows,), strict=False):
        with pq.ParquetWriter(
            path, pa.schema([("id", pa.int64())] + [(f"f{j}", pa.float32()) for j in range(FEATURES)])
        ) as writer:
            for start in range(0, total, 500_000):
                n = min(500_000, total - start)
                x = rng.standard_normal((n, FEATURES)).astype(np.float32)
                columns = {"id": pa.array(np.arange(start, start + n, dtype=np.int64))}
                columns.update({f"f{j}": pa.array(x[:, j]) for j in range(FEATURES)})
                writer.write_table(pa.table(columns), row_group_size=131_072)
    return paths


def _dhow(repository: Path, data: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dhow.cli", "batch", "run", "--repository", str(repository), "--data-dir", str(data),
        "--model", "tabular:2", "--input", str(source), "--output", str(out), "--key", "id", "--map", "input=f*",
        "--overwrite", "--quiet", *extra,
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--spark-rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-spark", action="store_true")
    args = parser.parse_args()
    from dhow.access.store import AccessStore
    from dhow.demo import build_demo_repository

    work = Path(tempfile.mkdtemp(prefix="dhow-bench-batch-"))
    repository, data = work / "models", work / "data"
    build_demo_repository(repository)
    data.mkdir()
    store = AccessStore.open(f"sqlite:///{data / 'registry.sqlite3'}")
    made = store.create_key("bench", tenant="default", roles=["invoker"], actor="bench")
    store.close()
    assert made is not None
    env = {**os.environ, "DHOW_KEY": made[1], "DHOW_AUTH": "on"}
    small, large = _write_inputs(work, args.rows)
    spark_source = small
    if args.spark_rows != args.rows:
        (work / "spark").mkdir()
        spark_source = _write_inputs(work / "spark", args.spark_rows, larger=False)[0]
    model = repository / "tabular" / "2" / "model.onnx"
    results: dict[str, list[Measured]] = {k: [] for k in ("dhow", "bare", "dhow_large", "bare_large", "spark", "peer")}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
        results["bare"].append(
            _measure(
                [sys.executable, "-c", BARE_LOOP, str(model), str(small), str(work / "bare.parquet")], args.rows, env
            )
        )
        results["dhow"].append(_measure(_dhow(repository, data, small, work / "out"), args.rows, env))
        results["dhow_large"].append(_measure(_dhow(repository, data, large, work / "out-large"), 5 * args.rows, env))
        bare_large = [sys.executable, "-c", BARE_LOOP, str(model), str(large), str(work / "bare-large.parquet")]
        results["bare_large"].append(_measure(bare_large, 5 * args.rows, env))
        if not args.no_spark:
            results["peer"].append(
                _measure(
                    [sys.executable, "-c", SPARK_PEER, str(model), str(spark_source), str(work / "peer")],
                    args.spark_rows,
                    env,
                )
            )
            results["spark"].append(
                _measure(
                    _dhow(repository, data, spark_source, work / "out-spark", "--engine", "spark"), args.spark_rows, env
                )
            )
        for name, runs in results.items():
            if runs:
                print(f"  {name}: {runs[-1].rate:,.0f} rows/s, peak {runs[-1].peak_mb:,.0f} MB", file=sys.stderr)
    _report(results, args)


def _median_rate(runs: list[Measured]) -> float:
    return statistics.median(run.rate for run in runs)


def _median_job_rate(runs: list[Measured]) -> float:
    return statistics.median(run.job_rate for run in runs)


def _report(results: dict[str, list[Measured]], args: argparse.Namespace) -> None:
    small_mb = max(run.peak_mb for run in results["dhow"])
    large_mb = max(run.peak_mb for run in results["dhow_large"])
    lines = [
        "# Batch scoring: dhow's engines against the bare loop and Spark's predict_batch_udf",
        "",
        f"`benchmarks/batch.py --rows {args.rows} --spark-rows {args.spark_rows} --rounds {args.rounds}`, "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), Python {platform.python_version()}. "
        "The demo `tabular` model (ONNX, 100 trees) on 32 float features; every figure is a whole process "
        "(start-up, model load, reading, scoring, writing), the median of the rounds.",
        "",
        "| run | rows | rows/s, whole process | rows/s, the job (start-up left out) | peak RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {
        "dhow": "dhow batch run (local engine, key checked, every batch admitted and audited, parts + journal)",
        "bare": "bare loop: pyarrow iter_batches -> onnxruntime -> one Parquet file",
        "dhow_large": "dhow batch run on the 5x larger file",
        "bare_large": "bare loop on the 5x larger file",
        "spark": "dhow batch run --engine spark (local[*], mapInArrow)",
        "peer": "Spark's predict_batch_udf (local[*], same model, ONNX Runtime)",
    }
    for name, runs in results.items():
        if runs:
            rate = _median_rate(runs)
            peak = max(run.peak_mb for run in runs)
            job = statistics.median(run.job_rate for run in runs)
            lines.append(f"| {labels[name]} | {runs[0].rows:,} | {rate:,.0f} | {job:,.0f} | {peak:,.0f} MB |")
    lines.append("")
    for ours, theirs, size in (("dhow", "bare", args.rows), ("dhow_large", "bare_large", 5 * args.rows)):
        whole = _median_rate(results[ours]) / _median_rate(results[theirs])
        job = _median_job_rate(results[ours]) / _median_job_rate(results[theirs])
        lines.append(
            f"- local engine / bare loop, {size:,} rows: **{whole:.2f}** whole process, **{job:.2f}** the job "
            "alone (goal >= 0.9)"
        )
    if results["spark"]:
        ratio = _median_rate(results["spark"]) / _median_rate(results["peer"])  # both: Spark's start-up included
        lines.append(f"- Spark engine / predict_batch_udf: **{ratio:.2f}** (goal >= 1.0)")
    lines.append(
        f"- peak memory, 5x the rows: {large_mb:,.0f} MB against {small_mb:,.0f} MB "
        f"(**{large_mb / small_mb:.2f}x**; goal: flat)"
    )
    text = "\n".join(lines) + "\n"
    (HERE / "RESULTS-batch.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
