"""The serving benchmark's results, and benchmarks/RESULTS.md written from them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from limits import CpuPerRow, Limit
from loadgen import Result
from servers import Breakdown
from triton_perf import PerfPoint

PROTOCOLS = {"rest": "REST", "grpc": "gRPC"}
#: every protocol a point may be measured over: the sweep's, and REST with binary tensors (dhow only)
LABELS = PROTOCOLS | {"rest_binary": "REST binary"}
#: the CPU-efficiency goal: in-process CPU per row at this batch size / the server's CPU per inference
EFFICIENCY_BATCH, EFFICIENCY_GOAL = 32, 0.8


@dataclass(frozen=True)
class Point:
    """One server, model, protocol and concurrency, measured by our closed-loop generators."""

    server: str
    model: str
    protocol: str
    concurrency: int
    result: Result
    #: CPU time per request over the measured seconds: the server's process tree, and the generator's
    server_cpu_us: float
    generator_cpu_us: float
    breakdown: Breakdown | None = None
    #: of ``server_cpu_us``, the server process's first thread (dhow: the event loop, where both doors run)
    server_main_cpu_us: float = math.nan
    #: requests per batch the model computed over the measured seconds (dhow: /stats; MLServer: counted by
    #: mlserver_batches.py in its runtimes); nan when not known
    average_batch: float = math.nan


@dataclass(frozen=True)
class Tried:
    model: str
    label: str
    throughput: float
    p99_ms: float
    failures: int


@dataclass
class Run:
    machine: str
    started: str
    command: str
    models: list[str]
    settings: dict[str, list[str]] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    tried: list[Tried] = field(default_factory=list)
    limits: list[Limit] = field(default_factory=list)
    perf: dict[tuple[str, str, int], PerfPoint | str] = field(default_factory=dict)
    cpu_per_row: list[CpuPerRow] = field(default_factory=list)
    goal_concurrency: dict[str, int] = field(default_factory=dict)
    minutes: float = 0.0

    def point(self, server: str, model: str, protocol: str, concurrency: int) -> Point | None:
        key = (server, model, protocol, concurrency)
        return next((p for p in self.points if (p.server, p.model, p.protocol, p.concurrency) == key), None)

    def limit(self, model: str, batch: int, threads: int) -> float | None:
        """The higher of the limits taken before and after the model's servers ran: the stricter goal."""
        rates = [x.rows_per_second for x in self.limits if (x.model, x.batch, x.threads) == (model, batch, threads)]
        return max(rates, default=None)

    def reference_cpu_us(self, model: str) -> float | None:
        """ONNX Runtime's least CPU per row in-process at the efficiency batch, over thread counts and both times."""
        costs = [x.cpu_us for x in self.cpu_per_row if (x.model, x.batch) == (model, EFFICIENCY_BATCH)]
        return min(costs, default=None)


def _number(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and not math.isnan(a) and not math.isnan(b) else "n/a"


def _measured(point: Point | None) -> list[str]:
    if point is None:
        return ["n/a"] * 5
    r = point.result
    failed = f" ({r.failures} failed)" if r.failures else ""
    return [
        _number(r.throughput) + failed,
        f"{r.percentile(50):.2f}",
        f"{r.percentile(99):.2f}",
        f"{point.server_cpu_us:.0f}",
        _number(point.average_batch, 1),
    ]


def model_table(run: Run, model: str) -> list[str]:
    head = "| protocol | c | dhow infer/s | p50 ms | p99 ms | CPU µs/inference | avg batch "
    head += "| MLServer infer/s | p50 ms | p99 ms | CPU µs/inference | avg batch "
    head += "| dhow/MLServer throughput | p99 ratio |"
    lines = [head, "|" + "---|" * 14]
    keys = sorted(
        {(p.protocol, p.concurrency) for p in run.points if p.model == model and p.protocol in PROTOCOLS},
        key=lambda k: (k[0] != "rest", k[1]),
    )
    for protocol, concurrency in keys:
        ours, theirs = (
            run.point("dhow", model, protocol, concurrency),
            run.point("mlserver", model, protocol, concurrency),
        )
        ratios = ["n/a", "n/a"]
        if ours and theirs:
            ratios = [
                _ratio(ours.result.throughput, theirs.result.throughput),
                _ratio(ours.result.percentile(99), theirs.result.percentile(99)),
            ]
        cells = [PROTOCOLS[protocol], str(concurrency), *_measured(ours), *_measured(theirs), *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goals(run: Run) -> list[str]:
    lines = []
    for protocol in PROTOCOLS:
        for model, need in (("tabular", "≥3x MLServer throughput with lower p99"), ("tabular_sklearn", "≥3x MLServer")):
            c = run.goal_concurrency.get(model, 16)
            ours, theirs = run.point("dhow", model, protocol, c), run.point("mlserver", model, protocol, c)
            if ours is None or theirs is None:
                lines.append(f"- {model} c={c} {PROTOCOLS[protocol]} ({need}): not measured in this run")
                continue
            ratio = ours.result.throughput / theirs.result.throughput
            p99, their_p99 = ours.result.percentile(99), theirs.result.percentile(99)
            reached = ratio >= 3 and (model != "tabular" or p99 < their_p99)
            verdict = "**reached**" if reached else "**not reached**"
            detail = f"{ratio:.2f}x, p99 {p99:.2f} vs {their_p99:.2f} ms"
            lines.append(f"- {model} c={c} {PROTOCOLS[protocol]} ({need}): {verdict} ({detail})")
        c = run.goal_concurrency.get("mlp", 64)
        ours, limit = run.point("dhow", "mlp", protocol, c), run.limit("mlp", 32, 2)
        need = "≥80% of in-process ORT at batch 32, 2 threads"
        if ours is None or limit is None:
            lines.append(f"- mlp c={c} {PROTOCOLS[protocol]} ({need}): not measured in this run")
            continue
        share = ours.result.throughput / limit
        verdict = "**reached**" if share >= 0.8 else "**not reached**"
        detail = f"{share:.0%}: {ours.result.throughput:,.0f} of {limit:,.0f} rows/s, the higher of the two limits"
        lines.append(f"- mlp c={c} {PROTOCOLS[protocol]} ({need}): {verdict} ({detail})")
    return lines


def efficiency_lines(run: Run, model: str) -> list[str]:
    """The goal lines: the server's CPU per inference against ONNX Runtime's CPU per row in-process."""
    reference, c = run.reference_cpu_us(model), run.goal_concurrency.get(model, 64)
    lines = []
    for protocol in ("rest_binary", "grpc"):
        point = run.point("dhow", model, protocol, c)
        need = f"in-process ORT CPU per row at batch {EFFICIENCY_BATCH} / server CPU per inference ≥ {EFFICIENCY_GOAL}"
        if point is None or reference is None:
            lines.append(f"- {model} c={c} {LABELS[protocol]} ({need}): not measured in this run")
            continue
        efficiency = reference / point.server_cpu_us
        verdict = "**reached**" if efficiency >= EFFICIENCY_GOAL else "**not reached**"
        detail = f"{efficiency:.2f}: {reference:.0f} against {point.server_cpu_us:.0f} µs"
        lines.append(f"- {model} c={c} {LABELS[protocol]} ({need}): {verdict} ({detail})")
    return lines


def efficiency_table(run: Run, model: str) -> list[str]:
    """Each server's CPU per inference at the goal point, split, against the in-process reference."""
    reference, c = run.reference_cpu_us(model), run.goal_concurrency.get(model, 64)
    lines = [
        f"| server | protocol | c | infer/s | avg batch | server CPU µs/inference | of it, first thread µs | "
        f"other threads and processes µs | efficiency (goal ≥ {EFFICIENCY_GOAL}) |",
        "|" + "---|" * 9,
    ]
    rows = [("dhow", "rest_binary"), ("dhow", "grpc"), ("mlserver", "rest"), ("mlserver", "grpc")]
    for server, protocol in rows:
        point = run.point(server, model, protocol, c)
        if point is None:
            continue
        label = LABELS[protocol] + (" (JSON: it takes no binary tensors)" if protocol == "rest" else "")
        main = point.server_main_cpu_us
        cells = [server if server == "dhow" else "MLServer", label, str(c), _number(point.result.throughput)]
        cells += [_number(point.average_batch, 1), f"{point.server_cpu_us:.0f}", _number(main)]
        cells += [_number(point.server_cpu_us - main), _ratio(reference or math.nan, point.server_cpu_us)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "ONNX Runtime alone, the same run (CPU time of the process per row, dhow's session options):", ""]
    lines += ["| batch | threads | CPU µs per row | taken |", "|---|---|---|---|"]
    for x in run.cpu_per_row:
        if x.model == model:
            lines.append(f"| {x.batch} | {x.threads} | {x.cpu_us:.0f} | {x.when} the servers |")
    if reference is not None:
        lines += ["", f"Reference: {reference:.0f} µs per row, the least at batch {EFFICIENCY_BATCH} above."]
    return lines


def limits_table(limits: Sequence[Limit]) -> list[str]:
    lines = [
        "| model | framework | batch | threads | rows/s before the servers | rows/s after |",
        "|---|---|---|---|---|---|",
    ]
    rates = {(x.model, x.batch, x.threads, x.when): x.rows_per_second for x in limits}
    for x in limits:
        if x.when == "before":
            after = rates.get((x.model, x.batch, x.threads, "after"), math.nan)
            cells = [x.model, x.framework, str(x.batch), str(x.threads), _number(x.rows_per_second), _number(after)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def breakdown_table(run: Run) -> list[str]:
    lines = [
        "| model | protocol | c | source | requests | queue µs | compute input µs | infer µs | output µs | "
        "avg batch | largest batch |",
        "|" + "---|" * 11,
    ]
    for model in run.models:
        c = run.goal_concurrency[model]
        for protocol in PROTOCOLS:
            point = run.point("dhow", model, protocol, c)
            if point and point.breakdown:
                b = point.breakdown
                cells = [
                    f"{b.requests:,}",
                    *(f"{v:.0f}" for v in (b.queue_us, b.compute_input_us)),
                    f"{b.compute_infer_us:.0f}",
                ]
                cells += [f"{b.compute_output_us:.0f}", f"{b.average_batch:.1f}", str(b.largest_batch)]
                lines.append(
                    f"| {model} | {PROTOCOLS[protocol]} | {c} | /stats over our run | " + " | ".join(cells) + " |"
                )
            perf = run.perf.get((model, protocol, c))
            if isinstance(perf, PerfPoint):
                cells = ["n/a", *(f"{v:.0f}" for v in (perf.queue_us, perf.compute_input_us, perf.compute_infer_us))]
                cells += [f"{perf.compute_output_us:.0f}", f"{perf.average_batch:.1f}", "n/a"]
                lines.append(f"| {model} | {PROTOCOLS[protocol]} | {c} | perf_analyzer | " + " | ".join(cells) + " |")
    return lines


def cross_check_table(run: Run) -> list[str]:
    lines = [
        "| model | protocol | c | generator | infer/s | p50 ms | p99 ms | generator CPU, cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for (model, protocol, c), perf in run.perf.items():
        ours = run.point("dhow", model, protocol, c)
        if ours:
            r = ours.result
            generator = "ours (loadgen.py)" if protocol == "rest" else "ours (grpc_loadgen.py)"
            row = [model, PROTOCOLS[protocol], str(c), generator, _number(r.throughput), f"{r.percentile(50):.2f}"]
            cores = ours.generator_cpu_us * r.throughput / 1e6
            lines.append("| " + " | ".join([*row, f"{r.percentile(99):.2f}", f"{cores:.2f}"]) + " |")
        if isinstance(perf, str):
            notes.append(f"- {model} {PROTOCOLS[protocol]} c={c}: {perf}")
            continue
        row = [model, PROTOCOLS[protocol], str(c), "perf_analyzer", _number(perf.throughput), f"{perf.p50_ms:.2f}"]
        lines.append("| " + " | ".join([*row, f"{perf.p99_ms:.2f}", f"{perf.generator_cores:.2f}"]) + " |")
        notes.append(f"- {model} {PROTOCOLS[protocol]} c={c}: `{perf.command}`")
    return [*lines, "", *notes]


def tuning_table(tried: Sequence[Tried]) -> list[str]:
    lines = ["| model | MLServer variant | infer/s (REST, goal c) | p99 ms | failures |", "|---|---|---|---|---|"]
    lines += [f"| {t.model} | {t.label} | {t.throughput:,.0f} | {t.p99_ms:.2f} | {t.failures} |" for t in tried]
    return lines


BREAKDOWN_NOTE = (
    "Triton's convention, which dhow's `/stats` follows: every request of a batch counts the batch's whole compute "
    'time, and queue is the wait for the model instance. "/stats over our run" is the difference of dhow\'s '
    "statistics across the point's warm-up and measured seconds; perf_analyzer reads them over its own windows."
)


EFFICIENCY_NOTE = (
    "Server CPU: user + system time of the server's whole process tree over the measured seconds, per answered "
    "request (every request is one row), read from /proc; the load generator's own CPU is not in it. First "
    "thread: the server process's main thread (dhow: the event loop, where both doors' Python, the core and the "
    "batcher run); the rest is the model's threads (the instance's thread and ONNX Runtime's pool), grpc's "
    "threads and, for MLServer, its worker processes. Efficiency: the reference over the server's CPU per "
    "inference; 1.0 would be a server that costs nothing beyond the model at batch "
    f"{EFFICIENCY_BATCH}. Average batch: dhow from /stats; MLServer from its runtimes' count of the batches "
    "they compute (mlserver_batches.py: it reports none itself)."
)


def markdown(run: Run, preamble: Sequence[str]) -> str:
    out = ["# dhow against Seldon MLServer 1.7.1: throughput and latency side by side", ""]
    out += [f"`{run.command}` on {run.machine}, {run.started}, {run.minutes:.1f} min.", "", *preamble, ""]
    efficient = [model for model in run.models if any(x.model == model for x in run.cpu_per_row)]
    out += ["## Goals", "", *goals(run)]
    for model in efficient:
        out += efficiency_lines(run, model)
    out += [""]
    for model in run.models:
        out += [f"## {model} (goal point c={run.goal_concurrency[model]})", "", *model_table(run, model), ""]
    for model in efficient:
        out += [f"## {model}: CPU efficiency (server CPU per inference against ONNX Runtime alone)", ""]
        out += [*efficiency_table(run, model), "", EFFICIENCY_NOTE, ""]
    out += ["## In-process limits (no server; taken before and after each model's servers)", ""]
    out += [*limits_table(run.limits), ""]
    out += ["## dhow server-side breakdown at the goal points (per request)", "", *breakdown_table(run), ""]
    out += [BREAKDOWN_NOTE, ""]
    if run.perf:
        out += ["## Cross-check: perf_analyzer and our generators on dhow", "", *cross_check_table(run), ""]
    if run.tried:
        out += ["## MLServer settings tried (the fastest is swept)", "", *tuning_table(run.tried), ""]
    out += ["## Settings", ""]
    for title, block in run.settings.items():
        out += [f"{title}:", "", "```", *block, "```", ""]
    return "\n".join(out)
