"""What do authentication, RBAC, quotas and the inference audit trail cost on the inference path?

    .venv/bin/python benchmarks/security_overhead.py [--seconds 8] [--latency-seconds 4] [--rounds 3]

Builds the demo models, starts two `dhow serve` processes with only the `tabular` model (ONNX): one with
`--auth none` (the baseline) and one with `--auth on` and a JWT issuer (an RS256 JWKS file made here).
Drives them with the same closed-loop generator (benchmarks/loadgen.py, JSON over REST, keep-alive, batch 1)
at concurrency 16 and 1, the configurations alternated in rounds, in one run:
(a) no authentication, (b) an invoker API key, (c) an invoker key with a quota that never refuses,
(d) a JWT bearer token (verified once, then cached). After every authenticated run it reads the audit
trail back with `dhow audit export` and checks that it holds one inference record per request sent, and
at the end `dhow audit verify` checks the hash chain; it exits non-zero when a record is missing or extra.
Writes the tables of benchmarks/RESULTS-security.md (its "Reading" section is written by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
from servers import tree_cpu_seconds

HERE = Path(__file__).resolve().parent
ROW = [0.1 * i for i in range(32)]
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": ROW}]}).encode()
ISSUER = "https://issuer.bench.invalid"
DHOW = [sys.executable, "-m", "dhow.cli"]


@dataclass(frozen=True)
class Run:
    result: loadgen.Result
    #: CPU time of the server and its audit writer process (all their threads) per request sent
    cpu_us: float


@dataclass
class Config:
    """One configuration: which server, which credential, and whose records the audit trail must hold."""

    label: str
    port: int
    pid: int
    authorization: str = ""
    #: the audit records' actor starts with this; "" when inference is not audited (``--auth none``)
    actor: str = ""
    runs: dict[int, list[Run]] = field(default_factory=dict)
    sent: int = 0
    audited: int = 0

    def requests(self) -> list[bytes]:
        headers = {"Authorization": self.authorization} if self.authorization else {}
        return [loadgen.http_post(f"127.0.0.1:{self.port}", "/v2/models/tabular/infer", BODY, headers)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dhow(*args: str) -> str:
    """Runs a dhow command; answers its standard output."""
    return subprocess.run([*DHOW, *args], check=True, capture_output=True, text=True).stdout


def make_key(data: Path, name: str, *limits: str) -> tuple[str, str]:
    """A new invoker API key: its token (the last line printed) and its audit actor prefix."""
    token = dhow("keys", "create", name, "--role", "invoker", *limits, "--data-dir", str(data)).strip().splitlines()[-1]
    return f"Bearer {token}", f"key:{name}#"


def make_jwt(work: Path) -> tuple[Path, str]:
    """A JWKS file with one RSA key, and an RS256 invoker token it signs that outlives the run."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "bench-1", "use": "sig"}
    jwks = work / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "dhow", "sub": "bench", "iat": now, "exp": now + 6 * 3600, "roles": ["invoker"]}
    return jwks, "Bearer " + pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench-1"})


def start_server(
    work: Path, name: str, models: Path, *extra: str, src: Path | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """A ``dhow serve`` of ``models`` (from the sources ``src``, when given: an A/B of a change in one run)."""
    port = free_port()
    env = None if src is None else os.environ | {"PYTHONPATH": str(src)}
    log = (work / f"{name}.log").open("wb")
    server = subprocess.Popen(
        [*DHOW, "serve", "--repository", str(models), "--http-port", str(port), "--grpc-port", str(free_port()),
         "--data-dir", str(work / name), "--log-level", "warning", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    log.close()
    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(f"dhow serve exited with {server.returncode}; see {work / name}.log")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            return server, port
        except OSError:
            time.sleep(0.1)
    server.kill()  # (not the caller's to stop: it never got it)
    server.wait()
    raise TimeoutError(f"dhow serve did not become ready; see {work / name}.log")


def audit_head(data: Path) -> int:
    """The audit trail's last seq, from `dhow audit verify` (which also checks the whole hash chain)."""
    text = dhow("audit", "verify", "--data-dir", str(data))
    if not text.startswith("audit trail ok: "):
        raise RuntimeError(f"dhow audit verify failed: {text}")
    return int(text.split(" head ", 1)[1].split(":", 1)[0])


def audited_since(data: Path, since: int, config: Config, expected: int, timeout_s: float = 20.0) -> tuple[int, int]:
    """Waits for the server's batched writer, then counts the run's inference records of ``config``'s actor.

    Answers (records matching, last seq read); a record of the run that does not match raises.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        records = [json.loads(line) for line in dhow("audit", "export", "--since", str(since), "--data-dir", str(data))
                   .splitlines() if line]  # fmt: skip
        if len(records) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    for record in records:
        if not (
            record["actor"].startswith(config.actor)
            and (record["kind"], record["action"], record["outcome"], record["model"])
            == ("inference", "infer", "success", "tabular")
        ):
            raise RuntimeError(f"{config.label}: an unexpected audit record: {record}")
    return len(records), max((int(record["seq"]) for record in records), default=since)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server process and its children (the audit writer), all their threads."""
    return tree_cpu_seconds(pid)


def measure(config: Config, concurrency: int, seconds: float, warmup: float) -> tuple[loadgen.Result, int]:
    """A warm-up pass, then the measured one; both with no inner warm-up, so every request sent is counted."""
    requests = config.requests()
    warm = loadgen.run("127.0.0.1", config.port, requests, concurrency=concurrency, warmup=0, seconds=warmup)
    result = loadgen.run("127.0.0.1", config.port, requests, concurrency=concurrency, warmup=0, seconds=seconds)
    return result, warm.latencies_ms.size + result.latencies_ms.size


def run_rounds(configs: list[Config], secure_data: Path, args: argparse.Namespace) -> int:
    """Runs every configuration at each concurrency, rotating the order each round; answers the final audit seq."""
    seq = audit_head(secure_data)
    plan = [(args.concurrency, args.seconds), (1, args.latency_seconds)]
    for round_ in range(args.rounds):
        order = configs[round_ % len(configs) :] + configs[: round_ % len(configs)]
        for concurrency, seconds in plan:
            for config in order:
                cpu = cpu_seconds(config.pid)
                result, sent = measure(config, concurrency, seconds, args.warmup)
                note = ""
                if config.actor:
                    # also waits until the audit writer is done, so that its CPU time is counted
                    found, seq = audited_since(secure_data, seq, config, sent)
                    config.sent, config.audited = config.sent + sent, config.audited + found
                    note = f", audit records {found} of {sent} sent"
                cpu_us = (cpu_seconds(config.pid) - cpu) / sent * 1e6
                config.runs.setdefault(concurrency, []).append(Run(result, cpu_us))
                print(f"round {round_ + 1} c={concurrency} {config.label}: {result.throughput:,.0f} infer/s, "
                      f"p50 {result.percentile(50):.2f} ms, p99 {result.percentile(99):.2f} ms, "
                      f"server CPU {cpu_us:.0f} µs/request, {result.failures} failures{note}", flush=True)  # fmt: skip
    return seq


def paired(base: list[float], other: list[float]) -> str:
    """Per-round ratios of ``other`` to ``base`` (the same round's, measured back to back): their median and range.
    The machine's speed moves within a run (here up to a third over minutes, others' load on the host), more than
    between two configurations measured a few seconds apart; a round's ratio cancels most of it, the median round
    of each configuration does not."""
    # (a round whose reference read nothing, a server's hiccup, is left out rather than losing the report)
    ratios = [value / reference for value, reference in zip(other, base, strict=True) if reference]
    if not ratios:
        return "-"
    middle, low, high = statistics.median(ratios), min(ratios), max(ratios)
    return f"{middle:.3f} ({low:.2f}-{high:.2f})"


def median(runs: list[Run]) -> Run:
    """The median round by throughput, so that one noisy round does not decide."""
    return sorted(runs, key=lambda run: run.result.throughput)[len(runs) // 2]


def table(configs: list[Config], concurrency: int, cpu: bool) -> list[str]:
    """A results table; ``cpu`` adds server CPU per request (at concurrency 1 it mostly measures idle spinning)."""
    base = median(configs[0].runs[concurrency])
    head = "| configuration | infer/s | p50 ms | p99 ms | failures | throughput ratio to (a) | paired ratio to (a) |"
    head += " p50 added µs |" + (" server CPU µs/request | CPU ratio to (a) |" if cpu else "")
    throughputs = [[run.result.throughput for run in config.runs[concurrency]] for config in configs]
    lines = [f"Concurrency {concurrency}:", "", head, "|---" * head.count(" | ") + "|---|"]
    for config, rounds in zip(configs, throughputs, strict=True):
        run = median(config.runs[concurrency])
        r = run.result
        added = (r.percentile(50) - base.result.percentile(50)) * 1000
        row = (
            f"| {config.label} | {r.throughput:,.0f} | {r.percentile(50):.2f} | {r.percentile(99):.2f} "
            f"| {r.failures} | {r.throughput / base.result.throughput:.3f} | {paired(throughputs[0], rounds)} "
            f"| {added:+.0f} |"
        )
        lines.append(row + (f" {run.cpu_us:.0f} | {run.cpu_us / base.cpu_us:.2f} |" if cpu else ""))
    return [*lines, ""]


def report(configs: list[Config], args: argparse.Namespace, total: int, chained: int) -> str:
    lines = [
        "# Security overhead on the inference path",
        "",
        f"`{' '.join(['python', *sys.argv])}` on {platform.node()} ({platform.machine()}, {os.cpu_count()} cores), "
        f"{time.strftime('%Y-%m-%d')}: dhow serving `tabular` (ONNX, `--cpu-affinity {args.cpu_affinity}`), REST JSON "
        "batch 1, closed loop, "
        f"{args.seconds:g} s per configuration at concurrency {args.concurrency} and {args.latency_seconds:g} s at "
        f"concurrency 1, each after a {args.warmup:g} s warm-up, {args.rounds} rounds alternating the configurations "
        "(order rotated each round) in one run, the median round shown; the paired ratio is the median of the "
        "rounds' ratios (each round's run against the same round's (a), measured seconds apart), with their range. "
        "The load generator shares the cores with "
        "the server, and other work may share the machine: the figures are ratios from this one run, not absolute "
        "capacity.",
        "",
        "(a) runs on a `--auth none` server; (b) to (d) on one `--auth on` server (`--jwt-issuer`, `--jwt-jwks` file), "
        "differing only in the credential sent, every inference written to the SQLite audit trail. Server CPU "
        "is the user + system time of the server process and of its audit writer process (all their threads) "
        "over the warm-up and the measured pass, per request sent.",
        "",
        *table(configs, args.concurrency, cpu=True),
        *table(configs, 1, cpu=False),
        "Audit check (every request sent, warm-ups included, read back with `dhow audit export` after each run):",
        "",
        "| configuration | requests sent | inference records found |",
        "|---|---|---|",
        *(f"| {c.label} | {c.sent:,} | {c.audited:,} |" for c in configs[1:]),
        "",
        f"`dhow audit verify` at the end: hash chain ok, {chained:,} records in the run's part of the trail "
        f"({total:,} requests sent).",
    ]
    return "\n".join(lines) + "\n"


def build_models(work: Path) -> Path:
    models = work / "models"
    subprocess.run([*DHOW, "demo", "build", "--out", str(models)], check=True, stdout=subprocess.DEVNULL)
    for folder in models.iterdir():
        if folder.is_dir() and folder.name != "tabular":
            shutil.rmtree(folder)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run at --concurrency")
    parser.add_argument("--latency-seconds", type=float, default=4.0, help="measured seconds per run at concurrency 1")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all configurations; the median is reported")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-security.md")
    parser.add_argument(
        "--cpu-affinity", choices=("off", "auto"), default="off", help="the servers' --cpu-affinity (default off)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dhow-bench-security-"))
    models = build_models(work)
    secure = work / "secure"
    key, key_actor = make_key(secure, "bench-key")
    quota_key, quota_actor = make_key(secure, "bench-quota", "--rate", "1000000", "--burst", "1000000")
    jwks, token = make_jwt(work)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        pinning = ("--cpu-affinity", args.cpu_affinity)
        open_server, open_port = start_server(work, "open", models, "--auth", "none", *pinning)
        servers.append(open_server)
        secure_server, port = start_server(
            work, "secure", models, "--auth", "on", "--jwt-issuer", ISSUER, "--jwt-jwks", str(jwks), *pinning
        )
        servers.append(secure_server)
        configs = [
            Config("(a) --auth none", open_port, open_server.pid),
            Config("(b) API key: authn + RBAC + audit", port, secure_server.pid, key, key_actor),
            Config("(c) (b) + per-key quota", port, secure_server.pid, quota_key, quota_actor),
            Config("(d) JWT RS256 (cached) + RBAC + audit", port, secure_server.pid, token, "jwt:bench"),
        ]
        start_seq = audit_head(secure)
        end_seq = run_rounds(configs, secure, args)
        final_seq = audit_head(secure)
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)
    if final_seq != end_seq:
        raise RuntimeError(f"the audit trail grew after the last check: seq {end_seq} then {final_seq}")
    shutil.rmtree(work)  # the audit trail alone is some 200 MB; kept (with the server logs) only when a run fails
    total = sum(config.sent for config in configs)
    args.out.write_text(report(configs, args, total, final_seq - start_seq))
    print(f"wrote {args.out}")
    if final_seq - start_seq != total or any(config.audited != config.sent for config in configs):
        sys.exit("the audit trail does not hold one record per request sent: see the audit check in the results")


if __name__ == "__main__":
    main()
