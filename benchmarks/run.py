"""dhow against Seldon MLServer 1.7.1 on the same machine, same models, same load: writes benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run.py [--models tabular,mlp,tabular_sklearn] [--concurrency 1,4,16,64]
        [--protocols rest,grpc] [--servers dhow,mlserver] [--seconds 6] [--warmup 2] [--mlserver-variants all]
        [--no-perf-analyzer] [--no-efficiency] [--out FILE]

    a short try of the mlp's CPU efficiency alone (about a minute):
    .venv/bin/python benchmarks/run.py --models mlp --concurrency 64 --servers dhow --no-perf-analyzer \
        --out /tmp/mlp.md

1. Builds the models with dhow's demo builder (seeded synthetic data): ``tabular`` (100-tree gradient-boosted
   classifier, ONNX), ``mlp`` (512-2048x3-10, ONNX), ``tabular_sklearn`` (the same classifier, joblib), and
   writes a repository per server and model with the settings of serving_setups.py.
2. Installs the peers on first use (peers.py): MLServer in its own virtualenv, perf_analyzer.
3. For each model, one server at a time (never both: 2 cores): tries MLServer's variants at the goal
   concurrency and keeps the fastest, then sweeps protocols x concurrency on each server with our
   closed-loop generators (loadgen.py over REST/JSON, grpc_loadgen.py over gRPC with raw tensors), the
   same for both servers; on dhow, perf_analyzer measures the goal points too (cross-check, server breakdown).
4. Measures the in-process limits (ONNX Runtime, scikit-learn) before and after each model's servers, and
   writes the tables.
5. For the mlp (``serving_setups.EFFICIENCY``): ONNX Runtime's CPU time per row alone at batch 32, before and
   after its servers, and dhow at the goal point over REST with binary tensors (and gRPC): the server's CPU
   per inference set against it (the CPU-efficiency table, goal ≥ 0.8).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import resource
import shlex
import sys
import threading
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc_loadgen
import limits
import loadgen
import peers
import report
import servers
import serving_setups as setups
import triton_perf

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "serving"


def _list(kind: Callable[[str], object], allowed: set[str] | None = None) -> Callable[[str], list[object]]:
    def parse(text: str) -> list[object]:
        items = [kind(item.strip()) for item in text.split(",") if item.strip()]
        unknown = [item for item in items if allowed is not None and item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {sorted(allowed or [])}")
        return items

    return parse


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=_list(str, set(setups.WORKLOADS)), default=list(setups.WORKLOADS))
    parser.add_argument("--concurrency", type=_list(int), default=[1, 4, 16, 64])
    parser.add_argument("--protocols", type=_list(str, set(report.PROTOCOLS)), default=list(report.PROTOCOLS))
    parser.add_argument("--servers", type=_list(str, {"dhow", "mlserver"}), default=["dhow", "mlserver"])
    parser.add_argument("--seconds", type=float, default=6, help="measured seconds per point (default 6)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of load before each measurement")
    parser.add_argument(
        "--mlserver-variants",
        choices=["all", "first"],
        default="all",
        help="all: try each MLServer variant at the goal point and sweep the fastest; first: sweep the first",
    )
    parser.add_argument(
        "--perf-analyzer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure dhow's goal points with perf_analyzer (cross-check, server-side breakdown)",
    )
    parser.add_argument(
        "--efficiency",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="for the mlp: ONNX Runtime's CPU per row in-process, and dhow over REST with binary tensors at the goal "
        "point (the CPU-efficiency table)",
    )
    parser.add_argument(
        "--dhow-threads", type=int, help="intra-op threads of dhow's models instead of serving_setups.py's (0: default)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the models' data and of the request rows")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="where the tables go")
    return parser.parse_args()


def measure(
    server: servers.Server,
    model: str,
    protocol: str,
    concurrency: int,
    requests: setups.Requests,
    args: argparse.Namespace,
) -> report.Point:
    """One point; the CPU times are read when the warm-up ends (from a timer thread) and when the load stops."""
    marks: list[tuple[float, float, float, tuple[int, int]]] = []
    stats: list[dict[str, Any]] = []

    def mark() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        if server.kind == "dhow":
            stats.append(servers.model_stats(server, model))
        cpu, main = server.cpu_seconds(), server.main_thread_seconds()
        marks.append((cpu, usage.ru_utime + usage.ru_stime, main, server.batch_counts()))

    timer = threading.Timer(args.warmup, mark)
    timer.start()
    if protocol.startswith("rest"):
        host, path = f"127.0.0.1:{server.http_port}", f"/v2/models/{model}/infer"
        if protocol == "rest_binary":
            bodies = [loadgen.http_post(host, path, body, headers) for body, headers in requests.rest_binary]
        else:
            bodies = [loadgen.http_post(host, path, body) for body in requests.rest_bodies]
        result = loadgen.run(
            "127.0.0.1", server.http_port, bodies, concurrency=concurrency, warmup=args.warmup, seconds=args.seconds
        )
    else:
        result = grpc_loadgen.run(
            "127.0.0.1",
            server.grpc_port,
            requests.grpc_messages,
            concurrency=concurrency,
            warmup=args.warmup,
            seconds=args.seconds,
        )
    timer.join()
    mark()
    (server_start, generator_start, main_start, batches_start), (server_end, generator_end, main_end, batches_end) = (
        marks
    )
    count = max(result.requests, 1)
    breakdown = servers.breakdown(*stats) if stats else None
    if breakdown is not None:
        average_batch = breakdown.average_batch
    else:
        calls, requests_counted = (end - start for start, end in zip(batches_start, batches_end, strict=True))
        average_batch = requests_counted / calls if calls else math.nan
    point = report.Point(
        server.kind,
        model,
        protocol,
        concurrency,
        result,
        (server_end - server_start) / count * 1e6,
        (generator_end - generator_start) / count * 1e6,
        breakdown,
        (main_end - main_start) / count * 1e6,
        average_batch,
    )
    figures = f"{result.throughput:,.0f}/s p50 {result.percentile(50):.2f} p99 {result.percentile(99):.2f} ms"
    figures += f", server CPU {point.server_cpu_us:.0f} µs/inference, batch {average_batch:.1f}"
    print(f"  {server.kind} {model} {protocol} c={concurrency}: {figures}, failures {result.failures}", flush=True)
    return point


def start_dhow(workload: setups.Workload, artifact: Path, threads: int | None = None) -> servers.Server:
    setup = setups.DHOW[workload.name]
    if threads is not None:  # --dhow-threads: the manifest's intra-op threads, to try another sizing
        setup = dataclasses.replace(setup, manifest={**setup.manifest, "threads": threads})
    folder = WORK / "dhow"
    setups.write_dhow_repository(folder / "repository", workload, artifact, setup)
    log = WORK / f"dhow-{workload.name}.log"
    server = servers.start_dhow(folder / "repository", folder / "data", setup.args, log)
    servers.wait_ready(server, workload.name)
    return server


def start_mlserver(
    workload: setups.Workload, artifact: Path, variant: setups.MLServerVariant, mlserver_bin: Path, tag: str
) -> servers.Server:
    http_port, grpc_port = servers.free_port(), servers.free_port()
    folder = WORK / "mlserver" / workload.name
    setups.write_mlserver_repository(folder, workload, artifact, variant, http_port, grpc_port)
    log = WORK / f"mlserver-{workload.name}-{tag}.log"
    server = servers.start_mlserver(folder, mlserver_bin, http_port, grpc_port, log)
    servers.wait_ready(server, workload.name)
    return server


def checked(server: servers.Server, workload: setups.Workload, requests: setups.Requests, artifact: Path) -> None:
    expected = limits.reference_outputs(artifact, requests.rows[0], workload.outputs)
    servers.check_answers(server, workload.name, requests.rest_bodies[0], requests.grpc_messages[0], expected)


def best_mlserver_variant(
    workload: setups.Workload,
    artifact: Path,
    requests: setups.Requests,
    mlserver_bin: Path,
    args: argparse.Namespace,
    run: report.Run,
) -> setups.MLServerVariant:
    """Each variant at the goal concurrency over REST, shorter than a point; the fastest without failures wins."""
    variants = setups.MLSERVER[workload.name]
    if args.mlserver_variants == "first" or len(variants) == 1:
        return variants[0]
    short = argparse.Namespace(**{**vars(args), "warmup": 1, "seconds": max(3.0, args.seconds / 2)})
    scored = []
    for index, variant in enumerate(variants):
        print(f"MLServer {workload.name}: trying {variant.label}", flush=True)
        server = start_mlserver(workload, artifact, variant, mlserver_bin, f"try{index}")
        try:
            checked(server, workload, requests, artifact)
            point = measure(server, workload.name, "rest", workload.goal_concurrency, requests, short)
        finally:
            server.stop()
        result = point.result
        run.tried.append(
            report.Tried(workload.name, variant.label, result.throughput, result.percentile(99), result.failures)
        )
        scored.append((result.failures == 0, result.throughput, -index))
    return variants[-max(scored)[2]]


def sweep(
    server: servers.Server,
    workload: setups.Workload,
    requests: setups.Requests,
    args: argparse.Namespace,
    run: report.Run,
) -> None:
    for protocol in args.protocols:
        for concurrency in args.concurrency:
            run.points.append(measure(server, workload.name, protocol, concurrency, requests, args))


def perf_analyzer_points(
    server: servers.Server,
    workload: setups.Workload,
    requests: setups.Requests,
    args: argparse.Namespace,
    run: report.Run,
) -> None:
    analyzer = peers.ensure_perf_analyzer()
    data = WORK / f"perf-input-{workload.name}.json"
    triton_perf.write_input_data(data, requests.rows)
    for protocol in args.protocols:
        port = server.http_port if protocol == "rest" else server.grpc_port
        c = workload.goal_concurrency
        print(f"  perf_analyzer dhow {workload.name} {protocol} c={c}", flush=True)
        run.perf[(workload.name, protocol, c)] = triton_perf.measure(
            analyzer,
            workload.name,
            f"127.0.0.1:{port}",
            "http" if protocol == "rest" else "grpc",
            c,
            data,
            workload.outputs,
            max(2000, int(args.seconds * 1000 / 3)),
            WORK / "perf.csv",
        )


def in_process_limits(
    workload: setups.Workload, artifact: Path, when: str, run: report.Run, args: argparse.Namespace
) -> None:
    print(f"in-process limits of {workload.name} ({when} its servers)", flush=True)
    for batch in (1, 32):
        if artifact.suffix == ".onnx":
            for threads in (1, 2):
                limit = limits.onnx_limit(workload.name, artifact, workload.features, batch, threads, 2.0, when)
                run.limits.append(limit)
        else:
            run.limits.append(limits.sklearn_limit(workload.name, artifact, workload.features, batch, 2.0, when))
    if efficiency(workload, args):
        for threads in (1, 2):
            cost = limits.onnx_cpu_per_row(
                workload.name, artifact, workload.features, report.EFFICIENCY_BATCH, threads, 2.0, when
            )
            print(f"  ONNX Runtime alone, batch {cost.batch}, {threads} threads: {cost.cpu_us:.0f} µs CPU per row")
            run.cpu_per_row.append(cost)


def efficiency(workload: setups.Workload, args: argparse.Namespace) -> bool:
    """Whether this run measures the model's CPU efficiency (the mlp's goal)."""
    return args.efficiency and workload.name in setups.EFFICIENCY


def efficiency_points(
    server: servers.Server,
    workload: setups.Workload,
    requests: setups.Requests,
    args: argparse.Namespace,
    run: report.Run,
) -> None:
    """dhow at the goal point over REST with binary tensors, and over gRPC unless the sweep measured it."""
    c = workload.goal_concurrency
    for protocol in ("rest_binary", "grpc"):
        if run.point(server.kind, workload.name, protocol, c) is None:
            run.points.append(measure(server, workload.name, protocol, c, requests, args))


def describe_settings(run: report.Run, workload: setups.Workload, server: servers.Server) -> None:
    command = " ".join(shlex.quote(part) for part in server.command).replace(str(HERE.parent) + "/", "")
    if server.kind == "dhow":
        manifest = (WORK / "dhow" / "repository" / workload.name / "model.yaml").read_text(encoding="utf-8")
        run.settings[f"dhow, {workload.name}: `{command}` with model.yaml"] = manifest.splitlines()
    else:
        folder = WORK / "mlserver" / workload.name
        text = (
            (folder / "settings.json").read_text() + "\n" + (folder / workload.name / "model-settings.json").read_text()
        )
        run.settings[f"MLServer, {workload.name}: `{command}` with settings.json, model-settings.json"] = (
            text.splitlines()
        )


def benchmark_model(
    name: str, artifact: Path, mlserver_bin: Path | None, args: argparse.Namespace, run: report.Run
) -> None:
    workload = setups.WORKLOADS[name]
    requests = setups.requests_for(workload, args.seed)
    in_process_limits(workload, artifact, "before", run, args)
    if "dhow" in args.servers:
        print(f"dhow {name}", flush=True)
        server = start_dhow(workload, artifact, args.dhow_threads)
        try:
            checked(server, workload, requests, artifact)
            sweep(server, workload, requests, args, run)
            if efficiency(workload, args):
                efficiency_points(server, workload, requests, args, run)
            if args.perf_analyzer:
                perf_analyzer_points(server, workload, requests, args, run)
            describe_settings(run, workload, server)
        finally:
            server.stop()
    if mlserver_bin is not None:
        variant = best_mlserver_variant(workload, artifact, requests, mlserver_bin, args, run)
        print(f"MLServer {name}: {variant.label}", flush=True)
        server = start_mlserver(workload, artifact, variant, mlserver_bin, "sweep")
        try:
            checked(server, workload, requests, artifact)
            sweep(server, workload, requests, args, run)
            describe_settings(run, workload, server)
        finally:
            server.stop()
    in_process_limits(workload, artifact, "after", run, args)


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores, {model}; load average {load} at start)"


def preamble(run: report.Run, args: argparse.Namespace) -> list[str]:
    def generator_cpu(protocol: str) -> str:
        values = [p.generator_cpu_us for p in run.points if p.protocol == protocol]
        return f"{sum(values) / len(values):.0f} µs" if values else "n/a"

    return [
        f"Each point: {args.warmup:g} s of load, then {args.seconds:g} s measured; batch-1 requests cycling 16 seeded "
        "rows; closed loop (each of c callers sends its next request when its last is answered). One server runs "
        "at a time, alone with the load generator, on the same cores; other engineers' work may share the machine: "
        "compare ratios within this run, not with other runs.",
        "",
        "**Load generator: ours, the same for both servers.** perf_analyzer (tritonclient 2.51.0) cannot drive "
        "MLServer: it reads `/v2/models/{m}/config` (REST) or the `ModelConfig` RPC (gRPC) before sending anything, "
        "and MLServer has neither (`failed to get model config`). So both servers are driven by "
        "`benchmarks/loadgen.py` over REST (HTTP/1.1 keep-alive, one connection per caller, JSON tensors: the only "
        "encoding MLServer takes) and `benchmarks/grpc_loadgen.py` over gRPC (one HTTP/2 connection per caller, "
        "as independent clients have; "
        "`raw_input_contents` as Triton's clients send them; grpcio's Python client cost 120-200 µs of CPU per "
        "call, this one about a third of that). Their CPU per request in this run, mean over points: REST "
        f"{generator_cpu('rest')}, gRPC {generator_cpu('grpc')}. perf_analyzer measures dhow's goal points with the "
        "same rows (cross-check below).",
        "",
        "CPU µs/inference: user + system time of the server's whole process tree (MLServer's workers included) over "
        "the measured seconds, per answered request (one row each). Avg batch: requests per batch the model "
        "computed over the measured seconds (dhow: its /stats; MLServer: counted in its runtimes by "
        "`benchmarks/mlserver_batches.py`, as MLServer reports none). p50/p99: client-side latency of each request.",
        "",
        "dhow: `--auth none` (no authentication, no audit trail), metrics always on. MLServer: `debug` off (no access "
        "log), metrics server and gzip middleware off, ONNX through our runtime `benchmarks/mlserver_onnx.py` "
        "(MLServer ships none), joblib through `mlserver-sklearn` (its runtime with the batch count added). "
        "Both servers answer each model's first request "
        "over both protocols with the outputs ONNX Runtime / scikit-learn give in-process before any load.",
    ]


def main() -> None:
    args = arguments()
    started = time.monotonic()
    command = "python benchmarks/run.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    run = report.Run(machine(), date.today().isoformat(), command, list(args.models))
    run.goal_concurrency = {name: setups.WORKLOADS[name].goal_concurrency for name in args.models}
    mlserver_bin = peers.ensure_mlserver() if "mlserver" in args.servers else None
    if args.perf_analyzer and "dhow" in args.servers:
        peers.ensure_perf_analyzer()
    WORK.mkdir(parents=True, exist_ok=True)
    print("building the models", flush=True)
    artifacts = setups.build_artifacts(WORK, args.seed)
    for name in args.models:
        benchmark_model(name, artifacts[name], mlserver_bin, args, run)
    run.minutes = (time.monotonic() - started) / 60
    text = report.markdown(run, preamble(run, args))
    args.out.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
