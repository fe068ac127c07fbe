"""The server's CPU per inference as instructions, which other load on the machine does not change.

    python benchmarks/instructions.py --model tabular --protocol grpc --concurrency 16 --requests 320
    python benchmarks/instructions.py --model mlp --protocol rest --concurrency 64 --switches

Starts one ``dhow serve`` process (no workers) on the demo model under ``valgrind --tool=callgrind
--instr-atstart=no``, waits for ``/v2/health/ready``, warms it up, then counts the instructions of all its
threads (grpc's, the event loop's, the runtime's) over ``--requests`` calls only (``callgrind_control -i
on/off`` around them). Printed: instructions per call, the share of each shared object (libpython, grpc's
cygrpc, onnxruntime, ...) and of each thread, and the average batch size from the model's statistics. With
``--out FILE`` the callgrind files (``FILE-NN``, one per thread) stay for ``callgrind_annotate``. Instead of
valgrind, ``--switches`` counts the server's context switches per call, its writer processes' too
(``/proc/PID/task/*/status``) and ``--cprofile FILE`` profiles the event loop's thread with cProfile (Python
calls per call; cProfile cannot see grpc's Cython). OMP_NUM_THREADS=1 throughout. ``--api-key`` serves with
``--auth on`` and calls with an invoker API key: authentication, RBAC and the audit trail (its writer process
counted as a child) on the path.

Under valgrind the server runs one thread at a time: while a heavy model computes, grpc.aio asks for no new call,
and grpc cancels calls left waiting too long (CANCELLED): the mlp over gRPC counts at c=16, not at c=64.

REST calls send JSON as ``loadgen.py`` does (``--binary`` for the binary tensor extension); gRPC calls send
``raw_input_contents`` as ``grpc_loadgen.py`` does. The client runs in this process, outside the count.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import pstats
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc_loadgen
import numpy as np
from loadgen import http_post
from serving_setups import DHOW, WORKLOADS, binary_body, requests_for, write_dhow_repository

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="tabular")
    parser.add_argument("--protocol", choices=("rest", "grpc"), default="rest")
    parser.add_argument("--binary", action="store_true", help="REST with the binary tensor extension")
    parser.add_argument("--grpc-front", choices=("native", "grpcio"), help="the server's --grpc-front (its default)")
    parser.add_argument("--http-front", choices=("native", "uvicorn"), help="the server's --http-front (its default)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=200, help="calls counted (a multiple of --concurrency)")
    parser.add_argument("--out", type=Path, help="the callgrind file (default: a temporary file, removed)")
    parser.add_argument("--switches", action="store_true", help="count context switches, without valgrind")
    parser.add_argument("--cprofile", type=Path, help="profile with cProfile into this file instead of valgrind")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the dhow sources to serve")
    parser.add_argument("--models", type=Path, default=ROOT / "demo-models", help="demo models (make demo-models)")
    parser.add_argument(
        "--api-key",
        action="store_true",
        help="--auth on, REST calls with an invoker API key: authentication, RBAC, the audit trail",
    )
    parser.add_argument(
        "--quota",
        action="store_true",
        help="with --api-key: the invoker key has a quota that never refuses (security_overhead.py's (c))",
    )
    monitoring = parser.add_argument_group("monitoring", "what monitoring_overhead.py switches on, one by one")
    monitoring.add_argument("--payload-log", action="store_true", help="the payload log to a scratch file")
    monitoring.add_argument("--tracing", type=float, metavar="RATIO", help="tracing at RATIO to an OTLP receiver")
    monitoring.add_argument("--drift", action="store_true", help="a reference profile for the served version")
    args = parser.parse_args()
    if args.quota and not args.api_key:
        parser.error("--quota needs --api-key")
    if args.api_key and args.protocol != "rest":
        parser.error("--api-key drives REST only")
    with tempfile.TemporaryDirectory(prefix="dhow-instructions-") as scratch:
        print(measure(args, Path(scratch)))


def measure(args: argparse.Namespace, scratch: Path) -> str:
    workload = WORKLOADS[args.model]
    versions = sorted(p for p in (args.models / args.model).iterdir() if p.name.isdigit())
    artifact = versions[-1] / workload.artifact
    setup = DHOW[args.model]
    write_dhow_repository(scratch / "repo", workload, artifact, dataclasses.replace(setup, args=()))
    http_port, grpc_port = _free_port(), _free_port()
    out = args.out or scratch / "callgrind.out"
    serve = [sys.executable, "-c", "import sys; from dhow.cli import main; sys.exit(main())", "serve"]
    serve += [
        "--auth",
        "on" if args.api_key else "none",
        "--repository",
        str(scratch / "repo"),
        "--data-dir",
        str(scratch / "data"),
    ]
    serve += ["--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    # valgrind slows the server fifty-fold: no request may time out in the queue meanwhile, and no connection
    # waiting for its first call may be closed for a ping the server was too slow to see answered
    # (and the native gRPC front's handshake limit, --header-timeout, likewise; and REST's keep-alive limit, which
    # closed the idle connections of the mlp's load while callgrind_control switched counting on, on a busy machine)
    serve += ["--log-level", "warning", "--queue-timeout-ms", "0", "--grpc-keepalive", "3600"]
    serve += ["--header-timeout", "600", "--keepalive-timeout", "3600"]
    if args.grpc_front:
        serve += ["--grpc-front", args.grpc_front]
    if args.http_front:
        serve += ["--http-front", args.http_front]
    env = dict(os.environ, PYTHONPATH=str(args.src), OMP_NUM_THREADS="1")
    quota = ["--rate", "1000000", "--burst", "1000000"] if args.quota else []
    headers = _api_key(scratch / "data", env, "invoker", quota) if args.api_key else {}
    # an invoker may not read the model's statistics: an admin key reads them
    admin = _api_key(scratch / "data", env, "admin") if args.api_key else {}
    receiver = _monitoring(args, scratch, serve, env)
    # children too (the payload log's writer process), each counted only while the server is
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes", "--trace-children=yes"]
    valgrind.append(f"--callgrind-out-file={out}.%p")
    if args.cprofile:
        serve[2] = _CPROFILED.format(out=str(args.cprofile))
    command = serve if args.switches or args.cprofile else valgrind + serve
    with open(scratch / "server.log", "wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(server, http_port)
        requests = requests_for(workload, 1)
        if args.protocol == "grpc":
            call = _grpc_caller(grpc_port, requests.grpc_messages)
        else:
            call = _rest_caller(http_port, args.model, requests.rest_bodies, args.binary, headers)
        asyncio.run(_load(call, args.concurrency, max(args.concurrency * 10, 40)))
        time.sleep(1)
        before = _switches(server.pid)
        _start(args, server.pid)
        asyncio.run(_load(call, args.concurrency, args.requests))
        _stop(args, server.pid)
        after = _switches(server.pid)
        stats_url = f"http://127.0.0.1:{http_port}/v2/models/{args.model}/stats"
        stats = json.load(urllib.request.urlopen(urllib.request.Request(stats_url, headers=admin)))
    except BaseException:
        print((scratch / "server.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        server.terminate()
        server.wait(120)
        if receiver is not None:
            receiver.terminate()
            receiver.wait(10)
    front = f" ({args.grpc_front})" if args.grpc_front and args.protocol == "grpc" else ""
    point = f"{args.model} {args.protocol}{front}{' binary' if args.binary else ''} c={args.concurrency}"
    point += "".join(f" {on}" for on in _switched_on(args))
    calls = args.requests
    lines = [f"{point}: {_batch_size(stats)}"]
    if args.switches:  # under valgrind, which runs one thread at a time, they would mean little
        for kind in after:
            change = after[kind] - before[kind]  # threads that started meanwhile count from 0
            threads = ", ".join(f"{name} {count / calls:.2f}" for name, count in change.most_common(5))
            lines.append(f"{kind} context switches per call: {change.total() / calls:.2f} ({threads})")
    if args.cprofile:
        lines += _profile_lines(args.cprofile, calls)
    elif not args.switches:
        files = list(out.parent.glob(f"{out.name}.*-*"))
        by_process: dict[int, dict[int, collections.Counter[str]]] = collections.defaultdict(dict)
        for file in files:
            process, _, thread = file.name.removeprefix(f"{out.name}.").partition("-")
            by_process[int(process)][int(thread)] = by_object(file)
        per_thread = by_process.pop(server.pid, {})
        objects: collections.Counter[str] = sum(per_thread.values(), collections.Counter())
        children = {pid: sum(sum(c.values()) for c in threads.values()) for pid, threads in by_process.items()}
        total, in_children = sum(objects.values()) / calls / 1000, sum(children.values()) / calls / 1000
        head = f"{point}: {total + in_children:,.0f}k instructions per call over {calls}"
        if children:
            head += f" (server {total:,.0f}k, its child processes {in_children:,.0f}k)"
        lines.insert(0, head)
        for name, cost in objects.most_common(8):
            lines.append(f"  {cost / calls / 1000:8,.0f}k  {name}")
        lines.append("per thread (1: the event loop's), with its costliest objects:")
        for number, costs in sorted(per_thread.items()):
            if (cost := sum(costs.values())) >= calls * 1000:  # threads under 1k a call are left out
                top = ", ".join(f"{name} {part / calls / 1000:,.0f}k" for name, part in costs.most_common(3))
                lines.append(f"  thread {number}: {cost / calls / 1000:8,.0f}k  ({top})")
        for pid, threads in sorted(by_process.items()):
            if children[pid] >= calls * 1000:
                each = ", ".join(f"{n} {sum(c.values()) / calls / 1000:,.0f}k" for n, c in sorted(threads.items()))
                name = _NAMES.get(pid, str(pid))
                lines.append(f"  child process {name}: {children[pid] / calls / 1000:8,.0f}k  (threads {each})")
        if args.out is None:
            for file in files:
                file.unlink()
    return "\n".join(lines)


def _monitoring(args: argparse.Namespace, scratch: Path, serve: list[str], env: dict[str, str]) -> Any:
    """Switch on what ``args`` asks for (a receiver process for tracing, returned; a profile for drift)."""
    receiver = None
    if args.payload_log:
        serve += ["--payload-log", f"file://{scratch}/payloads/events.jsonl"]
    if args.tracing is not None:
        otlp = _free_port()
        receiver = subprocess.Popen([sys.executable, str(ROOT / "benchmarks/monitoring_overhead.py"), "--receiver",
                                     str(otlp)])  # fmt: skip
        serve += ["--otlp-endpoint", f"http://127.0.0.1:{otlp}", "--trace-sample-ratio", str(args.tracing)]
    if args.drift:  # the served version profiled from 20,000 rows of the demo's training distribution
        import pyarrow as pa
        import pyarrow.parquet as pq

        width = WORKLOADS[args.model].features
        rows = np.random.default_rng(0).standard_normal((20_000, width)).astype(np.float32)
        data = scratch / "train.parquet"
        pq.write_table(pa.table({f"f{j}": rows[:, j] for j in range(width)}), data)
        profile = [sys.executable, "-m", "dhow.cli", "models", "profile", str(scratch / "repo" / args.model / "1")]
        subprocess.run([*profile, "--data", str(data), "--map", "input=f*"], check=True, env=env,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    return receiver


def _switched_on(args: argparse.Namespace) -> list[str]:
    on = ["payload-log"] if args.payload_log else []
    on += [f"tracing {args.tracing:g}"] if args.tracing is not None else []
    on += ["api-key"] if args.api_key else []
    on += ["quota"] if args.quota else []
    return on + (["drift"] if args.drift else [])


def _wait_ready(server: subprocess.Popen[bytes], http_port: int) -> None:
    deadline = time.monotonic() + 900  # valgrind makes imports slow
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("the server did not become ready (see its log)")


#: one caller's work: ``count`` calls on its own connection (opened while holding the lock)
Calls = Callable[[int, asyncio.Lock], Awaitable[None]]


def _api_key(data: Path, env: dict[str, str], role: str, extra: list[str] | None = None) -> dict[str, str]:
    """An API key of that role made in the server's data directory: the header that calls with it send."""
    create = [sys.executable, "-m", "dhow.cli", "keys", "create", f"bench-{role}", "--role", role, *(extra or [])]
    create += ["--data-dir", str(data)]
    token = subprocess.run(create, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
    return {"Authorization": f"Bearer {token}"}


def _rest_caller(port: int, model: str, bodies: list[bytes], binary: bool, headers: dict[str, str]) -> Calls:
    url = f"/v2/models/{model}/infer"
    encoded = [binary_body(json.loads(body)) if binary else (body, {}) for body in bodies]
    raw = [http_post(f"127.0.0.1:{port}", url, body, {**extra, **headers}) for body, extra in encoded]

    async def calls(count: int, opening: asyncio.Lock) -> None:
        async with opening:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for index in range(count):
            writer.write(raw[index % len(raw)])
            status = await reader.readline()
            if b" 200 " not in status:
                raise SystemExit(f"REST call failed: {status!r}")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
        writer.close()

    return calls


#: how long a new gRPC connection may wait for the server's SETTINGS under valgrind
_SETTLE_S = 600


def _grpc_caller(port: int, messages: list[bytes]) -> Calls:
    async def calls(count: int, opening: asyncio.Lock) -> None:
        async with opening:  # one handshake at a time: under valgrind, 64 at once outlast the server's 10 s limit
            connection = await _Connection.open("127.0.0.1", port)
        assert isinstance(connection, _Connection)
        for index in range(count):
            if not await connection.call(messages[index % len(messages)]):
                raise SystemExit(f"gRPC call failed: {connection.failure!r}")
        await connection.close()

    return calls


class _Connection(grpc_loadgen.Connection):
    """grpc_loadgen's connection, keeping the frames that ended calls (trailers, RST_STREAM, GOAWAY) to show."""

    #: (frame type, stream, payload) of the last frames that ended a call
    failure: tuple[tuple[int, int, bytes], ...] = ()

    @classmethod
    async def open(cls, host: str, port: int, path: str = grpc_loadgen.MODEL_INFER) -> grpc_loadgen.Connection:
        """As grpc_loadgen's, waiting longer for the server's SETTINGS: the native gRPC front answers them on the
        event loop, which valgrind may leave without a turn for more than grpc_loadgen's 10 s while a model runs."""
        reader, writer = await asyncio.open_connection(host, port)
        connection = cls(reader, writer, grpc_loadgen.header_block(f"{host}:{port}", path))
        settings = struct.pack(">HIHI", 0x2, 0, grpc_loadgen.SETTINGS_INITIAL_WINDOW_SIZE, grpc_loadgen.MAX_WINDOW)
        window = struct.pack(">I", grpc_loadgen.MAX_WINDOW - grpc_loadgen.DEFAULT_WINDOW)
        hello = grpc_loadgen._frame(grpc_loadgen.SETTINGS, 0, 0, settings)
        writer.write(grpc_loadgen.PREFACE + hello + grpc_loadgen._frame(grpc_loadgen.WINDOW_UPDATE, 0, 0, window))
        await asyncio.wait_for(connection.settled.wait(), _SETTLE_S)
        return connection

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        ended = kind == grpc_loadgen.HEADERS and flags & grpc_loadgen.END_STREAM
        if kind in (grpc_loadgen.RST_STREAM, grpc_loadgen.GOAWAY) or ended:
            self.failure = (*self.failure[-3:], (kind, stream, payload))
        super()._on_frame(kind, flags, stream, payload)


async def _load(calls: Calls, concurrency: int, total: int) -> None:
    opening = asyncio.Lock()
    await asyncio.gather(*(calls(total // concurrency, opening) for _ in range(concurrency)))


#: ``dhow serve`` with cProfile switched on by SIGUSR1 and off (and written) by SIGUSR2
_CPROFILED = """import cProfile, signal, sys
profile = cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
signal.signal(signal.SIGUSR2, lambda *_: (profile.disable(), profile.dump_stats({out!r})))
from dhow.cli import main
sys.exit(main())"""


def _start(args: argparse.Namespace, pid: int) -> None:
    if args.cprofile:
        os.kill(pid, signal.SIGUSR1)
    elif not args.switches:
        for each in (pid, *_children(pid)):
            subprocess.run(["callgrind_control", "-i", "on", str(each)], check=True, capture_output=True)


def _stop(args: argparse.Namespace, pid: int) -> None:
    if args.cprofile:
        os.kill(pid, signal.SIGUSR2)
        time.sleep(2)  # the profile is written by the server's main thread
    elif not args.switches:
        for each in (pid, *_children(pid)):
            subprocess.run(["callgrind_control", "-i", "off", str(each)], check=True, capture_output=True)


#: the server's child processes by pid: the last word of their command line (a module: dhow.serving.payload_writer)
_NAMES: dict[int, str] = {}


def _children(pid: int) -> list[int]:
    """The server's child processes (under valgrind too: ``--trace-children=yes``)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    for child in found:
        with contextlib.suppress(OSError, IndexError):
            _NAMES[child] = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[-2].decode()
    return found


def _profile_lines(path: Path, calls: int) -> list[str]:
    """Python function calls per call, the most frequent first (cProfile sees the event loop's thread only)."""
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]  # not in typeshed
    rows = []
    for (file, line, name), (_, count, *_) in stats.items():
        rows.append((count, f"{file.split('site-packages/')[-1].split('/src/')[-1]}:{line}:{name}"))
    rows.sort(reverse=True)
    lines = [f"python calls per call: {sum(nc for nc, _ in rows) / calls:.1f}"]
    lines += [f"  {nc / calls:6.2f}  {where}" for nc, where in rows[:60]]
    return lines


def _switches(pid: int) -> dict[str, collections.Counter[str]]:
    """Voluntary and nonvoluntary context switches so far, per thread name (``/proc/PID/task/*/comm``), the
    child processes' (the writer processes) under their module's name."""
    counts: dict[str, collections.Counter[str]] = {
        "voluntary": collections.Counter(),
        "nonvoluntary": collections.Counter(),
    }
    for each in (pid, *_children(pid)):
        prefix = "" if each == pid else f"{_NAMES.get(each, each)}:"
        tasks: list[Path] = []
        with contextlib.suppress(OSError):  # the process ended
            tasks = list(Path(f"/proc/{each}/task").iterdir())
        for task in tasks:
            try:
                name, status = (task / "comm").read_text().strip(), (task / "status").read_text()
            except OSError:
                continue  # the thread ended
            for kind, counter in counts.items():
                found = re.search(rf"^{kind}_ctxt_switches:\s+(\d+)", status, re.M)
                counter[prefix + name] += int(found.group(1)) if found else 0
    return counts


def _batch_size(stats: dict[str, Any]) -> str:
    model = stats["model_stats"][0]
    batches, inferences = model.get("execution_count") or 0, model.get("inference_count") or 0
    return f"average batch {inferences / batches:.2f} ({inferences} inferences in {batches} batches, warm-up included)"


def by_object(path: Path) -> collections.Counter[str]:
    """Self instructions per shared object, from a callgrind file (``ob=`` names, compressed or not)."""
    costs: collections.Counter[str] = collections.Counter()
    names: dict[str, str] = {}
    current = "?"
    skip_next = False
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("ob=", "cob=")):
            match = re.match(r"c?ob=(?:\((\d+)\))? ?(.*)", line)
            if match is None:
                continue
            key, name = match.groups()
            if key and name:
                names[key] = name
            if line.startswith("ob="):
                current = Path(names.get(key, name) if key else name).name or "?"
        elif line.startswith("calls="):
            skip_next = True  # the next cost line is the call's inclusive cost
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip_next:
                skip_next = False
                continue
            parts = line.split()
            if len(parts) >= 2:
                costs[current] += int(parts[1])
    return costs


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    main()
