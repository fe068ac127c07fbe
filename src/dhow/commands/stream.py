"""``dhow stream run`` and ``dhow stream status``: answer a topic's messages with a model, and see how it goes.

The data folder, region and residency policy are found as ``dhow serve`` finds them (option > ``DHOW_*`` >
``--config`` file > default). Exit status: 0 once stopped (SIGINT/SIGTERM) with everything answered committed,
1 when a consumer stopped on a fault (a reply the broker did not take: run it again, nothing unanswered was
committed), 2 when refused at start.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
from pathlib import Path
from typing import Any

import orjson

from dhow.commands import add_command_with_actions
from dhow.commands.core_options import add_core_options, core_settings
from dhow.settings import CONFIG_FILE_HELP, resolve_settings

__all__ = ["add_parser", "run"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dhow stream`` and its actions to the ``dhow`` command."""
    actions = add_command_with_actions(
        commands,
        "stream",
        "answer a Kafka topic's or Kinesis stream's messages with a model (groups, dead letters, at-least-once)",
        "Consume requests from a topic (or a Kinesis stream), score them with a model of the repository under the "
        "same access, residency and audit rules as the server, and produce the replies to another topic.",
    )
    _add_run(actions)
    status = actions.add_parser(
        "status", help="show the consumers' counters and lag",
        description="Show what each stream consumer that ran with this data folder reports (every 2 s while it runs).",
    )  # fmt: skip
    status.add_argument("name", nargs="?", default="", metavar="NAME", help="one stream (default: all)")
    status.add_argument("--data-dir", type=Path, metavar="DIR", help="dhow's data folder (default ./.dhow)")
    status.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_FILE_HELP)
    status.add_argument("--json", action="store_true", help="print the statuses as JSON")


def _add_run(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = actions.add_parser(
        "run", help="consume, score and produce until stopped",
        description="Replies are produced, acknowledged by the broker, and only then are the offsets committed: "
        "killed at any point, a restarted consumer answers every message (some twice, none never).",
    )  # fmt: skip
    add_core_options(run)
    add = run.add_argument
    add("--model", required=True, metavar="NAME[:VERSION]", help="the model (default version: the one served)")
    add(
        "--source",
        required=True,
        metavar="URL",
        help="the topic of requests: kafka://HOST:PORT/TOPIC or kinesis://STREAM?region=R[&endpoint=URL]",
    )
    add("--sink", required=True, metavar="URL", help="the topic (or Kinesis stream) of replies")
    add("--dead-letter", default="", metavar="URL",
        help="where messages that cannot be answered go, with why (required unless --on-error skip)")  # fmt: skip
    add("--on-error", choices=("dead-letter", "skip"), default="",
        help="skip: count and log messages that cannot be answered, instead of a dead-letter topic")  # fmt: skip
    add(
        "--group",
        default="",
        metavar="G",
        help="the consumer group (default dhow.<name>); for Kinesis, the "
        "name its shard checkpoints and leases are kept under in the registry (--registry)",
    )
    add("--name", default="", metavar="NAME", help="the stream's name in status, metrics and audit (default "
        "<model>.<source topic>)")  # fmt: skip
    add("--format", choices=("v2-json", "v2-binary", "json"), default="v2-json",
        help="v2-json (default), v2-binary (JSON header length in the message header "
        "inference-header-content-length), or json ({\"<input>\": <one row>})")  # fmt: skip
    add("--max-in-flight", type=int, default=1024, metavar="N", help="messages read and not yet answered, at most; "
        "past it the partitions are paused (default 1024)")  # fmt: skip
    add("--data-region", default="", metavar="REGION", help="the source's data region (default: the model's)")
    add("--exactly-once", action="store_true", help="Kafka transactions: each batch's replies, dead letters and "
        "consumed offsets committed together (the broker must support transactions; readers of the replies "
        "use isolation.level=read_committed)")  # fmt: skip
    add("--metrics-port", type=int, default=0, metavar="PORT", help="serve Prometheus metrics on this port")
    add("--workers", type=int, default=1, metavar="N", help="N consumer processes in the group, sharing its "
        "partitions (each with its own admission and commits; one that dies is restarted); worker i serves its "
        "metrics on --metrics-port + i - 1 (default 1)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.stream_command == "status":
        return _status(args)
    from dhow.streaming import StreamSpec
    from dhow.streaming.workers import run_workers, worker_number

    if args.workers < 1:
        print(f"dhow: --workers must be 1 or more, got {args.workers}", flush=True)
        return 2
    worker = worker_number()
    if args.workers > 1 and not worker:
        return run_workers(args.argv, args.workers)
    settings = core_settings(args)
    spec = StreamSpec.build(
        model=args.model, source=args.source, sink=args.sink, dead_letter=args.dead_letter, group=args.group,
        name=args.name, format=args.format, on_error=args.on_error, max_in_flight=args.max_in_flight,
        data_region=args.data_region, exactly_once=args.exactly_once,
    )  # fmt: skip
    port = args.metrics_port + worker - 1 if args.metrics_port and worker else args.metrics_port
    return asyncio.run(_run(spec, settings, port, worker))


async def _run(spec: Any, settings: Any, metrics_port: int, worker: int) -> int:
    from prometheus_client import start_http_server

    from dhow.monitoring.metrics import ServerMetrics
    from dhow.monitoring.streams import StreamMetrics
    from dhow.registry.checkpoints import CheckpointStore
    from dhow.server import configure_logging
    from dhow.streaming import DeliveryFailed, run_streams

    configure_logging(settings)
    metrics = ServerMetrics()
    meter = StreamMetrics(metrics.registry)
    if metrics_port:
        start_http_server(metrics_port, addr=settings.host, registry=metrics.registry)
    try:
        stores = functools.partial(CheckpointStore.open, settings.registry_url())
        return await run_streams((spec,), settings, metrics=metrics, meter=meter, shard_stores=stores, worker=worker)
    except DeliveryFailed as exc:
        print(f"dhow: {exc}; run the same command again: nothing unanswered was committed", flush=True)
        return 1


def _status(args: argparse.Namespace) -> int:
    from dhow.streaming import read_statuses

    settings = resolve_settings({"data_dir": args.data_dir}, config_file=args.config)
    statuses = read_statuses(settings.data_dir, args.name)
    for status in statuses:
        if status.get("state") in ("running", "starting", "stopping") and not _alive(int(status.get("pid", 0))):
            status["state"] = "interrupted"
    if args.json:
        print(orjson.dumps(statuses, option=orjson.OPT_INDENT_2).decode())
        return 0
    if not statuses:
        print(f"no stream has run with the data folder {settings.data_dir}")
    for status in statuses:
        worker = f" worker {status['worker']}" if status.get("worker") else ""
        print(f"{status['name']}{worker}: {status['state']} (pid {status['pid']}, since {status['started_at']})")
        for name in _SHOWN:
            if status.get(name) not in (None, ""):
                print(f"  {name:<15} {status[name]}")
        for partition, lag in sorted(status.get("lag", {}).items()):
            print(f"  lag {partition:<11} {lag}")
    return 0 if all(s.get("state") != "failed" for s in statuses) else 1


_SHOWN = (
    "model", "source", "sink", "dead_letter", "group", "received", "answered", "failed", "dead_lettered", "skipped",
    "in_flight", "paused", "answered_per_s", "total_lag", "error",
)  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0
