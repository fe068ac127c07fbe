"""Autoscaling on paper: one bursty day of traffic against replicas as fast as dhow's own benchmark measured them.

    python benchmarks/autoscale_sim.py            # writes benchmarks/RESULTS-scaling.md (a few seconds)

No cluster runs here, so the day is simulated second by second, and what decides the outcome comes from measurement:
each replica (2 cores, one `dhow serve`) serves a model as ``benchmarks/RESULTS.md`` says it did over REST at
c = 1, 4, 16 and 64: its throughput, p50, p99 and CPU time per request, read from that file's tables. Two rules
scale the same Deployment with the same HPA behaviour (the chart's: up at once by max(100 %, 4 pods) per 15 s,
down by 25 % a minute after a 5-minute window); only the signal differs:

- **queue depth** (the chart's KEDA ScaledObject): Prometheus scrapes ``dhow_queue_depth`` and
  ``dhow_inflight_requests`` every 15 s; desired = max(ceil(queue / Q), ceil(in-flight / F)), with the targets
  sized from the measurements as the README says to size ``queueDepthPerReplica`` and ``inflightPerReplica``:
  Q = what a replica serves in 50 ms (the queue wait we accept), F = a replica's in-flight requests at 80 % of
  its capacity (Little's law: rate x p50 there);
- **CPU** (a plain HPA at 70 % of the pods' 2-core request, the usual default): metrics-server's one-minute CPU
  average; desired = ceil(replicas x utilisation / 70 %).

The traffic (``bursty_day``, seeded, so every run replays the same day): a diurnal curve from 8 % of the
peak (midnight to 04:00) to the peak at 14:00, Poisson noise each second, and four bursts: 08:55 a login storm
(x3 for 5 minutes), 11:00 a batch client (x4 for 10 minutes), 16:30 a retry storm (x2.5 ramping over 2 minutes,
for 15 minutes), 21:00 a marketing push (x2 for 20 minutes). The peak is set so that the day's busiest second
needs ``--peak-replicas`` replicas at the measured capacity.

The fleet is a fluid queue: each second the ready replicas serve up to their capacity; what they cannot serve
waits (FIFO) and a request that would wait longer than dhow's queue timeout (10 s) is answered 504 and counted as
failed. A request's latency is the replica's measured latency at its load (log-normal between the measured p50
and p99) plus its wait. A new pod is ready ``--startup-s`` after it is created (pull, load, warm); it costs
replica-minutes from creation. What the model leaves out: per-pod imbalance, batching gains under load (dhow's
batches grow with the queue, so real capacity under a burst is higher), the batch-fill trigger (its level depends
on the clients' concurrency, which a fluid model does not have). It ranks the rules; it does not predict ms.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DAY_S = 24 * 3600
#: Prometheus scrape, KEDA polling and HPA sync period; metrics-server's CPU window
PERIOD_S, CPU_WINDOW_S = 15, 60
QUEUE_TIMEOUT_S = 10.0
#: the queue wait the queue-depth target stands for, the utilisation the in-flight target stands for; CPU's target
ACCEPTED_WAIT_S, INFLIGHT_UTILISATION, CPU_TARGET = 0.050, 0.80, 0.70
CORES = 2.0
MIN_REPLICAS, MAX_REPLICAS = 1, 40
DOWN_WINDOW_S, HPA_TOLERANCE = 300, 0.1
Z99 = 2.3263


@dataclass(frozen=True)
class Replica:
    """One replica serving one model, as benchmarks/RESULTS.md measured it (REST, closed loop, c = 1..64)."""

    model: str
    rate: np.ndarray  # answered requests per second at each measured concurrency
    p50_ms: np.ndarray
    p99_ms: np.ndarray
    cpu_us: np.ndarray  # the server's CPU time per request

    @property
    def capacity(self) -> float:
        return float(self.rate.max())

    def targets(self) -> tuple[float, float]:
        """The queue-depth and in-flight targets per replica this model should be given (see the docstring)."""
        rate = INFLIGHT_UTILISATION * self.capacity
        return self.capacity * ACCEPTED_WAIT_S, rate * float(np.interp(rate, self.rate, self.p50_ms)) / 1e3

    def at(self, per_replica: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """p50 (s), p99 (s) and CPU cores of one replica answering ``per_replica`` requests a second."""
        load = np.clip(per_replica, 0.0, self.capacity)
        p50 = np.interp(load, self.rate, self.p50_ms) / 1e3
        p99 = np.interp(load, self.rate, self.p99_ms) / 1e3
        cores = load * np.interp(load, self.rate, self.cpu_us) / 1e6
        return p50, p99, cores


def measured_replica(model: str, results: Path = HERE / "RESULTS.md") -> Replica:
    """The REST rows of the model's table in RESULTS.md: c, dhow infer/s, p50 ms, p99 ms, CPU µs/req."""
    section = results.read_text().split(f"## {model} (goal point", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) > 5 and cells[0] == "REST":
            rows.append([float(re.sub(r"[^\d.]", "", cell)) for cell in cells[2:6]])
    if len(rows) < 2:
        raise SystemExit(f"{results}: no REST rows for model {model!r}; run `make bench-serving` first")
    rate, p50, p99, cpu = (np.array(column) for column in zip(*sorted(rows), strict=True))
    return Replica(model, rate, p50, p99, cpu)


def bursty_day(peak_per_s: float, seed: int = 7) -> np.ndarray:
    """Requests arriving in each second of the day (see the module's docstring)."""
    t = np.arange(DAY_S, dtype=np.float64)
    hours = t / 3600
    # 8 % of the peak from midnight to 04:00, then a raised cosine up to the peak at 14:00 and down to 8 % at midnight
    diurnal = np.where(hours < 4, 0.08, 0.08 + 0.92 * (0.5 - 0.5 * np.cos(2 * np.pi * (hours - 4) / 20)))
    shape = diurnal.copy()
    for start_h, factor, minutes, ramp_s in (
        (8.92, 3.0, 5, 5),
        (11.0, 4.0, 10, 5),
        (16.5, 2.5, 15, 120),
        (21.0, 2.0, 20, 30),
    ):
        start, end = int(start_h * 3600), int(start_h * 3600 + minutes * 60)
        rise = np.clip((t[start:end] - start) / ramp_s, 0, 1)
        shape[start:end] *= 1 + (factor - 1) * rise
    rng = np.random.default_rng(seed)
    return rng.poisson(shape / shape.max() * peak_per_s).astype(np.float64)


@dataclass
class Outcome:
    rule: str
    p50_ms: float
    p99_ms: float
    failed: float  # share of requests answered 504 (waited past the queue timeout)
    replica_minutes: float
    peak_replicas: int
    seconds_over_capacity: int


def _percentile(lam: np.ndarray, median: np.ndarray, sigma: np.ndarray, q: float) -> float:
    """The q-quantile of every request's latency: each second's arrivals log-normal around its median."""
    total = lam.sum()
    lo, hi = 1e-5, 60.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        z = (math.log(mid) - np.log(median)) / sigma
        below = float((lam * 0.5 * (1 + _erf(z / math.sqrt(2)))).sum())
        lo, hi = (mid, hi) if below < q * total else (lo, mid)
    return hi


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf
    sign = np.sign(x)
    x = np.abs(x)
    t = 1 / (1 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.asarray(sign * (1 - poly * np.exp(-x * x)))


Signal = Callable[[int, dict[str, float]], int]


def queue_rule(replica: Replica) -> Signal:
    queue_target, inflight_target = replica.targets()

    def desired(ready: int, seen: dict[str, float]) -> int:
        return max(math.ceil(seen["queue"] / queue_target), math.ceil(seen["inflight"] / inflight_target))

    return desired


def cpu_rule(ready: int, seen: dict[str, float]) -> int:
    utilisation = seen["cpu"] / CORES
    ratio = utilisation / CPU_TARGET
    if abs(ratio - 1) <= HPA_TOLERANCE:
        return ready
    return math.ceil(ready * ratio)


def simulate(rule: str, signal: Signal, replica: Replica, arrivals: np.ndarray, startup_s: int) -> Outcome:
    capacity = replica.capacity
    ready, starting = 2, deque[int]()  # ``starting``: the second each starting pod becomes ready
    queue = 0.0
    recent: deque[tuple[int, int]] = deque()  # (second, desired): the scale-down window
    cpu_samples: deque[float] = deque(maxlen=CPU_WINDOW_S)
    seen = {"queue": 0.0, "inflight": 0.0, "cpu": 0.0}
    pods = np.zeros(DAY_S)
    served_lam, wait_s = np.zeros(DAY_S), np.zeros(DAY_S)
    median, sigma = np.zeros(DAY_S), np.zeros(DAY_S)
    failed = 0.0
    last_down = -(10**9)
    over = 0
    for second in range(DAY_S):
        while starting and starting[0] <= second:
            starting.popleft()
            ready += 1
        lam = arrivals[second]
        fleet = ready * capacity
        wait = queue / fleet
        if wait > QUEUE_TIMEOUT_S:  # these would wait past the queue timeout: answered 504 at once
            failed += lam
            lam_in = 0.0
        else:
            lam_in = lam
        served = min(queue + lam_in, fleet)
        queue = queue + lam_in - served
        over += queue > 0
        per_replica = np.array([served / ready])
        p50, p99, cores = (float(v[0]) for v in replica.at(per_replica))
        served_lam[second], wait_s[second] = lam_in, wait
        median[second] = p50 + wait
        sigma[second] = max(math.log(p99 / p50) / Z99, 1e-3) if p50 > 0 else 1e-3
        cpu_samples.append(cores)
        pods[second] = ready + len(starting)
        if second % PERIOD_S:
            continue
        # what Prometheus / metrics-server hold now
        seen = {"queue": queue, "inflight": queue + served * p50, "cpu": sum(cpu_samples) / len(cpu_samples)}
        desired = min(MAX_REPLICAS, max(MIN_REPLICAS, signal(ready, seen)))
        recent.append((second, desired))
        while recent and recent[0][0] < second - DOWN_WINDOW_S:
            recent.popleft()
        current = ready + len(starting)
        if desired > current:
            step = min(desired, max(2 * current, current + 4)) - current
            starting.extend([second + startup_s] * step)
        else:
            floor = max(d for _, d in recent)  # the highest wish of the window: no flapping down
            if floor < current and second - last_down >= 60:
                target = max(floor, math.floor(current * 0.75))
                drop = current - target
                while drop and starting:  # pods not ready yet go first
                    starting.pop()
                    drop -= 1
                ready -= drop
                last_down = second
    answered = served_lam.sum()
    return Outcome(
        rule=rule,
        p50_ms=_percentile(served_lam, median, sigma, 0.5) * 1e3,
        p99_ms=_percentile(served_lam, median, sigma, 0.99) * 1e3,
        failed=failed / (answered + failed),
        replica_minutes=float(pods.sum() / 60),
        peak_replicas=int(pods.max()),
        seconds_over_capacity=over,
    )


def _report(replica: Replica, arrivals: np.ndarray, outcomes: list[Outcome], startup_s: int) -> str:
    lines = [
        f"### {replica.model}: a replica serves up to {replica.capacity:,.0f} requests/s "
        f"(p99 {replica.p99_ms[0]:.2f} ms at the lightest measured load, {replica.p99_ms[-1]:.2f} ms at the heaviest);"
        f" CPU {replica.at(replica.rate)[2].min() / CORES:.0%}..{replica.at(replica.rate)[2].max() / CORES:.0%} of "
        f"{CORES:g} cores across the measured loads",
        "",
        f"Day: {arrivals.sum() / 1e6:,.1f} M requests, peak {arrivals.max():,.0f}/s, night {arrivals[4 * 3600]:,.0f}/s;"
        f" a new pod is ready after {startup_s} s. Targets of the queue rule: queueDepthPerReplica "
        f"{replica.targets()[0]:,.0f}, inflightPerReplica {replica.targets()[1]:,.0f}.",
        "",
        "| rule | p50 ms | p99 ms | failed (504) | replica-minutes | peak replicas | seconds with a queue |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(
            f"| {o.rule} | {o.p50_ms:.2f} | {o.p99_ms:.2f} | {o.failed:.3%} | {o.replica_minutes:,.0f} | "
            f"{o.peak_replicas} | {o.seconds_over_capacity:,} |"
        )
    queue, cpu = outcomes
    lines += [
        "",
        f"Queue depth vs CPU: p99 {queue.p99_ms:,.2f} vs {cpu.p99_ms:,.2f} ms"
        f" ({cpu.p99_ms / queue.p99_ms:,.0f}x lower),"
        f" replica-minutes {queue.replica_minutes / cpu.replica_minutes:.2f}x, failed {queue.failed:.3%} vs "
        f"{cpu.failed:.3%} (latencies are of the answered requests).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=["tabular", "mlp"])
    parser.add_argument("--peak-replicas", type=float, default=8.0, help="replicas the day's busiest second needs")
    parser.add_argument("--startup-s", type=int, default=30, help="seconds from a pod's creation to ready")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-scaling.md")
    args = parser.parse_args()
    began = time.monotonic()
    sections = []
    for model in args.models:
        replica = measured_replica(model)
        arrivals = bursty_day(replica.capacity * args.peak_replicas)
        outcomes = [
            simulate("queue depth + in-flight (chart, KEDA)", queue_rule(replica), replica, arrivals, args.startup_s),
            simulate(f"CPU {CPU_TARGET:.0%} (HPA)", cpu_rule, replica, arrivals, args.startup_s),
        ]
        sections.append(_report(replica, arrivals, outcomes, args.startup_s))
        print(sections[-1])
    header = [
        "# Autoscaling on paper: the chart's queue-depth rule against a CPU-based HPA",
        "",
        f"`python benchmarks/autoscale_sim.py` ({time.monotonic() - began:.0f} s): one simulated day per model,"
        " second by second, against the per-replica throughput, latency and CPU that `benchmarks/RESULTS.md`"
        " measured (REST, one 2-core replica). How the day, the fleet and the rules are modelled: the script's"
        " docstring. Same HPA behaviour for both rules; only the signal differs.",
        "",
        "How to read it: a busy dhow replica's CPU stops rising long before it is saturated (the measured CPU per"
        " request falls as batches grow, so utilisation stays near 70 % from moderate load to overload): a CPU rule"
        " cannot tell a busy replica from a drowning one, adds replicas only while the one-minute average climbs,"
        " and lets bursts queue past the timeout. The queue rule sees the backlog itself 15 s after it forms and asks"
        " for replicas in proportion to it; it runs replicas hotter in steady state (a higher p50, more short-lived"
        " queues), which is what saves replica-minutes. Its targets are per model (`models[].queueDepthPerReplica`),"
        " sized as the README says: a replica's throughput times the queue wait you accept.",
        "",
    ]
    args.out.write_text("\n".join(header + sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
