"""What do drift sampling, the payload log and tracing cost on the inference path?

    .venv/bin/python benchmarks/monitoring_overhead.py [--seconds 8] [--warmup 2] [--rounds 3] [--concurrency 16]
        [--only LETTERS --out PATH] [--generator wrk] [--fresh-servers]

Builds the demo models and starts five `dhow serve` processes with only `tabular` (ONNX), in one run: (a) all
monitoring off; (b) the payload log to a file (`--payload-log file://…`, every request masked and written as a
CloudEvent); (c) tracing at ratio 0.1 (`--otlp-endpoint` to an OTLP/HTTP receiver in its own process, which
decodes nothing and answers 200); (d) live drift (a copy of the repository whose served version has a reference
profile, made by `dhow models profile` from 20,000 rows of the demo's training distribution: drift is on with
model.yaml's defaults, 10% of the requests sampled, scored every 30 s); (e) all three.

The same closed-loop generator (benchmarks/loadgen.py, JSON over REST, keep-alive, batch 1; ``--generator wrk``:
wrk, benchmarks/wrk_load.py, a C generator whose CPU a request is a fraction of loadgen's, as a cross-check that
the ratios are the server's) drives each at the concurrency, the configurations alternated in rounds (order rotated each
round), the median round reported. ``--fresh-servers`` starts every configuration's server afresh each round: a
server process's own speed moves its figures (all off, the same code, read 8% apart between two servers over six
alternating rounds, 2026-12-07), so one server a configuration for the whole run leaves that in its ratio.
Afterwards it checks that the payload log's counters account for every request
the server served, each once (logged, dropped or failed), and that it served what was sent, and reports the drops.
Writes benchmarks/RESULTS-monitoring.md; ``--only`` runs some of the
configurations (by letter) and then needs ``--out`` (a part of the table must not replace the whole). Ratios are to
the first configuration run: (a) unless ``--only`` leaves it out, and the table's header names it.
``--compare SRC`` (repeatable, with ``--out``) serves each chosen configuration also from another source tree
(``PYTHONPATH=SRC``, e.g. ``git archive HEAD src | tar -x -C /tmp/before``), in the same alternating rounds: an A/B
of a change within one run, since the machine's speed moves more between runs than most changes do.
"""

from __future__ import annotations

import argparse
import http.server
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import wrk_load
from security_overhead import BODY, DHOW, build_models, cpu_seconds, free_port, paired, start_server

HERE = Path(__file__).resolve().parent
PATH = "/v2/models/tabular/infer"
#: the load generators, as the report names them
GENERATORS = {"loadgen": "benchmarks/loadgen.py", "wrk": "wrk, benchmarks/wrk_load.py"}


@dataclass
class Config:
    label: str
    port: int
    pid: int
    runs: list[tuple[loadgen.Result | wrk_load.Result, float]] = field(default_factory=list)
    sent: int = 0
    #: requests that may have been sent and not counted in ``sent`` (wrk's, in flight when it stopped)
    slack: int = 0

    def median(self) -> tuple[loadgen.Result | wrk_load.Result, float]:
        return sorted(self.runs, key=lambda run: run[0].throughput)[len(self.runs) // 2]


class _Receiver(http.server.BaseHTTPRequestHandler):
    #: keeps the connection, as a collector does (HTTP/1.0 closed it after each post: a reconnection a post)
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def receive(port: int) -> None:
    """An OTLP/HTTP endpoint that takes every export (run in its own process: `--receiver PORT`)."""
    http.server.ThreadingHTTPServer(("127.0.0.1", port), _Receiver).serve_forever()


def payload_counts(port: int) -> tuple[dict[str, float], float]:
    """The payload log's events by outcome, and the inference requests the server counted (every outcome), read
    in one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = re.findall(r'dhow_payload_log_events_total\{outcome="(\w+)",sink="file"\} ([0-9.e+]+)', text)
    served = re.findall(r'dhow_inference_requests_total\{model="tabular",[^}]*\} ([0-9.e+]+)', text)
    return {outcome: float(value) for outcome, value in found}, sum(map(float, served))


def profiled_copy(models: Path, work: Path) -> Path:
    """A copy of ``models`` whose served ``tabular`` version has a reference profile: drift is on there."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    copy = work / "models-drift"
    shutil.copytree(models, copy)
    rows = np.random.default_rng(0).standard_normal((20_000, 32)).astype(np.float32)
    data = work / "train.parquet"
    pq.write_table(pa.table({f"f{j}": rows[:, j] for j in range(32)}), data)
    version = max((p for p in (copy / "tabular").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    profile = [*DHOW, "models", "profile", str(version), "--data", str(data), "--map", "input=f*"]
    subprocess.run(profile, check=True, stdout=subprocess.DEVNULL)
    return copy


def measure(config: Config, args: argparse.Namespace) -> tuple[loadgen.Result | wrk_load.Result, float]:
    """A warm-up pass, then the measured one (both counted in ``config.sent``): the result, server CPU µs a request."""
    cpu = cpu_seconds(config.pid)
    results: list[loadgen.Result | wrk_load.Result] = []
    for seconds in (args.warmup, args.seconds):
        if args.generator == "wrk":
            result = wrk_load.run("127.0.0.1", config.port, PATH, BODY, concurrency=args.concurrency, seconds=seconds)
            config.slack += result.in_flight
            results.append(result)
        else:
            requests = [loadgen.http_post(f"127.0.0.1:{config.port}", PATH, BODY)]
            results.append(loadgen.run("127.0.0.1", config.port, requests, concurrency=args.concurrency, warmup=0,
                                       seconds=seconds))  # fmt: skip
    sent = sum(result.requests for result in results)  # (failed answers included)
    config.sent += sent
    return results[1], (cpu_seconds(config.pid) - cpu) / sent * 1e6


def run_round(configs: list[Config], round_: int, args: argparse.Namespace) -> None:
    """One round: each configuration measured once, in an order rotated by ``round_``."""
    for config in configs[round_ % len(configs) :] + configs[: round_ % len(configs)]:
        result, cpu_us = measure(config, args)
        config.runs.append((result, cpu_us))
        print(f"round {round_ + 1} {config.label}: {result.throughput:,.0f} infer/s, p50 "
              f"{result.percentile(50):.2f} ms, p99 {result.percentile(99):.2f} ms, server CPU {cpu_us:.0f} "
              f"µs/request, {result.failures} failures", flush=True)  # fmt: skip


def start_servers(
    chosen: list[tuple[str, tuple[Path, tuple[str, ...]], Path | None]],
    work: Path,
    args: argparse.Namespace,
    configs: list[Config],
    servers: list[subprocess.Popen[bytes]],
    round_: int = 0,
) -> None:
    """A server for each chosen configuration (appended to ``servers``), its port and pid set on its ``Config``
    (appended to ``configs`` the first time); each its own payload file, each round's (``--fresh-servers``) too."""
    for index, (label, (repository, extra), src) in enumerate(chosen):
        extra = tuple(part.replace(".jsonl", f"-{index}-{round_}.jsonl") for part in extra)
        server, port = start_server(work, f"server-{index}-{round_}", repository, "--auth", "none",
                                    "--cpu-affinity", args.cpu_affinity, *extra, src=src)  # fmt: skip
        servers.append(server)
        if len(configs) <= index:
            configs.append(Config(label, port, server.pid))
        configs[index].port, configs[index].pid = port, server.pid


def counted(configs: list[Config], logged: dict[str, tuple[dict[str, float], float]]) -> None:
    """Add the payload log's counters and the served requests of each payload configuration's server to
    ``logged`` (after a pause: the writers catch up)."""
    if any("payload" in config.label for config in configs):
        time.sleep(2)
    for config in configs:
        if "payload" in config.label:
            counts, served = payload_counts(config.port)
            before, before_served = logged.get(config.label, ({}, 0.0))
            logged[config.label] = ({k: before.get(k, 0) + counts.get(k, 0) for k in {*before, *counts}},
                                    before_served + served)  # fmt: skip


def stop(servers: list[subprocess.Popen[bytes]]) -> None:
    """Stop the servers (killed when one does not stop in 30 s)."""
    for server in servers:
        server.terminate()
    for server in servers:
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    servers.clear()


def report(configs: list[Config], args: argparse.Namespace, logged: dict[str, tuple[dict[str, float], float]]) -> str:
    base = configs[0].median()[0]
    against = configs[0].label.split()[0]  # "(a)", or the first configuration run when --only left (a) out
    lines = [
        "# Monitoring overhead on the inference path",
        "",
        f"`{' '.join(['python', *sys.argv])}` on {platform.node()} ({platform.machine()}, {os.cpu_count()} cores), "
        f"{time.strftime('%Y-%m-%d')}: dhow serving `tabular` (ONNX, `--cpu-affinity {args.cpu_affinity}`), REST JSON "
        "batch 1, closed loop at concurrency "
        f"{args.concurrency}, {args.seconds:g} s per configuration after a {args.warmup:g} s warm-up, {args.rounds} "
        "rounds alternating the configurations (order rotated each round) in one run, the median round shown; a paired "
        "ratio is the median of the rounds' ratios (each round's run against the same round's run of the first "
        "configuration, from the same source tree with --compare, measured seconds apart), with their range. The "
        f"load generator ({GENERATORS[args.generator]}) shares the cores with the server (and the OTLP receiver): "
        "ratios from this one run, not "
        "absolute capacity. Goal: (e) at >= 0.95 of (a)'s throughput, p99 within 10%."
        + (
            " Every round started its servers afresh (--fresh-servers): a server process's own speed moves its "
            "figures by several percent, averaged over the rounds' processes here."
            if args.fresh_servers
            else ""
        ),
        "",
        f"| configuration | infer/s | p50 ms | p99 ms | failures | throughput ratio to {against} | paired ratio to "
        f"{against} | p99 ratio to {against} | paired p99 ratio | server CPU µs/request |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        result, cpu_us = config.median()
        # a tree's configurations against that tree's first (--compare: each tree's own (a))
        reference = next(c for c in configs if c.label.split(" [")[1:] == config.label.split(" [")[1:])
        rounds = [run.throughput for run, _ in config.runs]
        tails = [run.percentile(99) for run, _ in config.runs]
        lines.append(
            f"| {config.label} | {result.throughput:,.0f} | {result.percentile(50):.2f} | {result.percentile(99):.2f} "
            f"| {result.failures} | {result.throughput / base.throughput:.3f} "
            f"| {paired([run.throughput for run, _ in reference.runs], rounds)} "
            f"| {result.percentile(99) / base.percentile(99):.3f} "
            f"| {paired([run.percentile(99) for run, _ in reference.runs], tails)} | {cpu_us:.0f} |"
        )
    sent = "requests answered (+ those wrk may have sent uncounted, at most)" if args.generator == "wrk" else (
        "requests sent")  # fmt: skip
    head = f"| configuration | {sent} | served | logged | dropped | failed |"
    own = "the servers' own count, summed over the rounds' servers" if args.fresh_servers else "the server's own count"
    lines += ["", f"Payload log check (every request sent, warm-ups included; served: {own}):", "",
              head, "|---|---|---|---|---|---|"]  # fmt: skip
    for config in configs:
        if config.label in logged:
            counts, served = logged[config.label]
            lines.append(
                f"| {config.label} | {config.sent:,}{f' (+{config.slack:,})' if config.slack else ''} | {served:,.0f} "
                f"| {counts.get('logged', 0):,.0f} | {counts.get('dropped', 0):,.0f} | {counts.get('failed', 0):,.0f} |"
            )
    return "\n".join(lines) + "\n"


def configurations(work: Path, models: Path) -> tuple[dict[str, tuple[Path, tuple[str, ...]]], subprocess.Popen[bytes]]:
    """The five configurations (label: repository, `dhow serve` arguments) and the OTLP receiver tracing posts to
    (started here: the caller terminates it)."""
    otlp = free_port()
    receiver = subprocess.Popen([sys.executable, __file__, "--receiver", str(otlp)])
    payloads = f"file://{work}/payloads/events.jsonl"
    tracing = ("--otlp-endpoint", f"http://127.0.0.1:{otlp}", "--trace-sample-ratio", "0.1")
    drifting = profiled_copy(models, work)
    setups = {
        "(a) all off": (models, ()),
        "(b) payload log (file)": (models, ("--payload-log", payloads.replace("events", "b"))),
        "(c) tracing, ratio 0.1": (models, tracing),
        "(d) drift (profile, 10% sampled)": (drifting, ()),
        "(e) drift + payload log + tracing": (drifting, ("--payload-log", payloads.replace("events", "e"), *tracing)),
    }
    return setups, receiver


def accounted(config: Config, counts: dict[str, float], served: float) -> bool:
    """Whether the payload log's counters hold every request the server served, each once (logged, dropped or
    failed), and the server served what was sent: exactly (loadgen.py), or what wrk counted answered and at most
    those it may have sent uncounted (``Config.slack``)."""
    return sum(counts.values()) == served and 0 <= served - config.sent <= config.slack


def generator_option(parser: argparse.ArgumentParser) -> None:
    """``--generator``: which load generator ``measure`` drives the servers with."""
    parser.add_argument(
        "--generator",
        choices=sorted(GENERATORS),
        default="loadgen",
        help="the load generator: loadgen.py (default) or wrk (a cross-check; Debian's wrk package)",
    )


def check_only(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--only``: some of the configurations, known letters, and an ``--out`` of its own (the default file holds
    the whole table); without it, all five into the default file."""
    if args.only is None:
        args.only = "abcde"
        args.out = args.out or HERE / "RESULTS-monitoring.md"
        return
    unknown = sorted(set(args.only) - set("abcde"))
    if not args.only or unknown:
        parser.error(f"--only {args.only!r}: expected some of the letters a, b, c, d, e (e.g. --only ae)")
    if args.out is None:
        parser.error("--only needs --out: a part of the table must not replace benchmarks/RESULTS-monitoring.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="where the table goes (default benchmarks/RESULTS-monitoring.md)")
    parser.add_argument(
        "--only",
        help="the configurations to run, by letter (default abcde; needs --out); ratios are to the first one run",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="another source tree (its src folder; repeatable): each configuration also served from it, in the "
        "same rounds (an A/B of a change; needs --out)",
    )
    generator_option(parser)
    parser.add_argument(
        "--cpu-affinity", choices=("off", "auto"), default="off", help="the servers' --cpu-affinity (default off)"
    )
    parser.add_argument(
        "--fresh-servers",
        action="store_true",
        help="start every configuration's server afresh each round (a server process's own speed moves its figures "
        "by several percent: averaged over the rounds' processes)",
    )
    parser.add_argument("--receiver", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        receive(args.receiver)
        return
    check_only(parser, args)
    if args.generator == "wrk" and not wrk_load.available():
        parser.error("--generator wrk: wrk is not installed (`make bench-packages` installs Debian's wrk package)")
    if args.generator == "wrk" and not all(t == int(t) and t >= 1 for t in (args.seconds, args.warmup)):
        parser.error(f"--generator wrk runs for whole seconds: --seconds {args.seconds:g} --warmup {args.warmup:g}")
    if args.compare and args.out in (None, HERE / "RESULTS-monitoring.md"):
        parser.error("--compare needs --out (and --only): the results file holds this tree's figures alone")
    work = Path(tempfile.mkdtemp(prefix="dhow-bench-monitoring-"))
    models = build_models(work)
    setups, receiver = configurations(work, models)
    chosen = [(label, setup, None) for label, setup in setups.items() if label[1] in args.only]
    # each configuration from this tree, and from each other one
    chosen += [(f"{label} [{src}]", setup, src) for src in args.compare for label, setup, _ in list(chosen)]
    servers: list[subprocess.Popen[bytes]] = []
    configs: list[Config] = []
    logged: dict[str, tuple[dict[str, float], float]] = {}
    try:
        for round_ in range(args.rounds):
            if round_ == 0 or args.fresh_servers:
                start_servers(chosen, work, args, configs, servers, round_)
            run_round(configs, round_, args)
            if args.fresh_servers or round_ == args.rounds - 1:
                counted(configs, logged)
                stop(servers)
    finally:
        try:
            stop(servers)
        finally:
            receiver.terminate()
    shutil.rmtree(work)
    args.out.write_text(report(configs, args, logged))
    print(f"wrote {args.out}")
    unaccounted = [c.label for c in configs if c.label in logged and not accounted(c, *logged[c.label])]
    if unaccounted:
        sys.exit(f"the payload log's counters do not account for every request sent: {unaccounted}")


if __name__ == "__main__":
    main()
