"""``dhow batch run`` and ``dhow batch status``: score a dataset with a model of the repository, offline.

The stores, the data folder, the region and the actor are found as ``dhow serve`` finds them
(``settings.resolve_settings``: option > ``DHOW_*`` > ``--config`` file > default), so a job is checked
against the same keys, residency policy and audit trail as the server of that data folder. Exit status: 0 when
the run ended (bad rows included: they are in ``OUTPUT/errors/``), 2 when it was refused or failed (run the
same command again to continue it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import orjson

from dhow.commands import add_command_with_actions
from dhow.commands.core_options import add_core_options, core_settings
from dhow.settings import ServerSettings

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dhow batch`` and its actions to the ``dhow`` command."""
    actions = add_command_with_actions(
        commands,
        "batch",
        "score a dataset offline (embedded engine or Apache Spark), resumably",
        "Score Parquet, CSV or JSON Lines files with a model of the repository, under the same access, residency "
        "and audit rules as the server.",
    )
    _add_run(actions)
    status = actions.add_parser(
        "status", help="show a run's summary", description="Show the summary of the run in OUTPUT, also of a "
        "run still going (state running) or killed (state interrupted).",
    )  # fmt: skip
    status.add_argument("output", metavar="OUTPUT", help="the run's output folder")
    status.add_argument("--json", action="store_true", help="print the summary as JSON")


def _add_run(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = actions.add_parser(
        "run",
        help="score a dataset",
        description="Score every row of the input; killed, the same command continues from the last "
        "committed part (no row lost, none written twice).",
    )
    add_core_options(run)
    add = run.add_argument
    add("--model", required=True, metavar="NAME[:VERSION]", help="the model (default version: the newest served)")
    add("--input", required=True, metavar="PATH", help="a file, a folder of files, or s3://bucket/prefix")
    add("--output", required=True, metavar="DIR", help="the output folder (Parquet parts, errors/, _summary.json)")
    add(
        "--format",
        choices=("parquet", "csv", "jsonl"),
        help="the input's format (default: from its name, else parquet)",
    )
    add("--key", default="", metavar="COLUMN", help="the row key carried to the output (default: the row's ordinal)")
    add("--map", action="append", default=[], metavar="INPUT=COLUMNS", help="columns stacked into an input: "
        "a comma list (f0,f1) or a glob (f*); repeatable")  # fmt: skip
    add("--engine", choices=("local", "spark"), default="local", help="local (embedded, default) or spark")
    add(
        "--spark-master",
        default="local[*]",
        metavar="URL",
        help="Spark's master with --engine spark (default local[*])",
    )
    add(
        "--server", default="", metavar="HOST:PORT",
        help="send the batches to a running dhow server over gRPC (its gRPC address; grpc://HOST:PORT also taken)",
    )  # fmt: skip
    add("--batch-rows", type=int, default=0, metavar="N", help="rows per call of the model (default 8192)")
    add("--part-rows", type=int, default=131_072, metavar="N", help="input rows per output part (default 131072)")
    add("--overwrite", action="store_true", help="replace an existing output instead of continuing it")
    add("--api-key", default=None, metavar="KEY", help="the job's identity (default $DHOW_KEY)")
    add("--data-region", default="", metavar="REGION", help="the data's region (default: the key's, else the model's)")
    add("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    if args.batch_command == "status":
        return _status(args)
    from dhow.batch import Job, parse_map, parse_model

    settings = core_settings(args)
    name, version = parse_model(args.model)
    job = Job(
        model=name, version=version, input=args.input, output=args.output, input_format=args.format or "",
        key=args.key, maps=tuple(parse_map(m) for m in args.map), engine=args.engine, batch_rows=args.batch_rows,
        part_rows=args.part_rows, data_region=args.data_region, overwrite=args.overwrite,
        spark_master=args.spark_master, server=args.server,
    )  # fmt: skip
    api_key = args.api_key if args.api_key is not None else os.environ.get("DHOW_KEY", "")
    summary = _run(job, settings, api_key, args.quiet)
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0


def _run(job: Any, settings: ServerSettings, api_key: str, quiet: bool) -> dict[str, Any]:
    from dhow.batch.runner import check_api_key, run_job

    if job.server:
        return asyncio.run(_remote(job, api_key, quiet))
    check_api_key(api_key, settings)
    if job.engine == "spark":
        from dhow.batch.spark import run_spark_job

        return run_spark_job(job, settings, api_key, quiet=quiet)
    summary: dict[str, Any] = asyncio.run(run_job(job, settings, api_key, quiet=quiet))
    return summary


async def _remote(job: Any, api_key: str, quiet: bool) -> dict[str, Any]:
    from dhow.batch.remote import run_remote_job
    from dhow.commands.batch_remote import GrpcModel

    model = GrpcModel(job.server, api_key)
    try:
        return await run_remote_job(job, model, quiet=quiet)
    finally:
        await model.close()


def _status(args: argparse.Namespace) -> int:
    from dhow.batch.parts import read_summary

    summary = read_summary(args.output)
    if args.json:
        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
        return 0
    for name in ("state", "engine", "model", "version", "run_id", "rows_in", "scored", "errors", "parts",
                 "duration_s", "rows_per_s", "input", "output", "error"):  # fmt: skip
        if name in summary:
            print(f"{name:<12} {summary[name]}")
    return 0 if summary.get("state") != "failed" else 1
