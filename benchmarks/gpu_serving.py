"""GPU serving against the raw in-process limit: a BERT-base-sized encoder, fed single sequences over gRPC.

The issue's anchor (``../shared/PROTOCOL-NOTES.md``): on an H100 the encoder (12 layers, width 768,
12 heads, sequence 128, random weights, ``torch.nn.TransformerEncoder``, a 2-way head on the first
token) runs in-process at about 18,200 rows/s at batch 128 with fp16 weights. The goal is that dhow,
fed one sequence per request over gRPC by many concurrent clients, serves at least 85% of the
fastest raw throughput measured in the same run.

What a run does, in one process tree on the GPU machine:
1. builds the encoder with seeded random weights and saves it as TorchScript with its model.yaml
   (``device: cuda``, ``precision: fp16``, dynamic batching up to 128 rows, ``instances.kind: gpu``);
2. measures the raw limit in-process: the eager module with fp16 weights and the TorchScript file
   as dhow loads it, at batch 1, 32 and 128 (CUDA-synchronised wall time, after warm-up);
3. starts ``dhow serve --workers W`` and drives it from several client processes, each with many
   concurrent unary ``ModelInfer`` calls carrying one sequence as raw int64 contents;
4. writes the table and the ratio to ``--out`` (``benchmarks/RESULTS-gpu.md`` by default).

On the lent GPU machine (its python3 holds a CUDA torch, numpy, pyyaml and prometheus-client), dhow's
other dependencies travel as wheels fetched here by ``benchmarks/gpu_wheels.sh`` (into ``.whl/``; carry it).
Then, there: ``python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
PYTHONPATH=src:/tmp/site python3 benchmarks/gpu_serving.py``.

Without a GPU the same script checks its own plumbing on the CPU with a toy size:
``python benchmarks/gpu_serving.py --device cpu --layers 1 --width 64 --heads 2 --seq 16 --seconds 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Shape:
    layers: int
    width: int
    heads: int
    seq: int
    vocab: int = 30522


def build_encoder(shape: Shape, seed: int) -> Any:
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(shape.vocab, shape.width)
            layer = nn.TransformerEncoderLayer(
                shape.width, shape.heads, 4 * shape.width, dropout=0.0, batch_first=True, activation="gelu"
            )
            self.encoder = nn.TransformerEncoder(layer, shape.layers, enable_nested_tensor=False)
            self.head = nn.Linear(shape.width, 2)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(self.embed(tokens))
            return self.head(hidden[:, 0, :]).float()

    torch.manual_seed(seed)
    return Encoder().eval()


def write_model(repository: Path, module: Any, shape: Shape, device: str, instances: int, batch: int) -> Path:
    import torch

    folder = repository / "encoder"
    (folder / "1").mkdir(parents=True)
    example = torch.randint(0, shape.vocab, (2, shape.seq))
    with torch.inference_mode():
        scripted = torch.jit.trace(module, example, check_trace=False)
    scripted.save(str(folder / "1" / "model.pt"))
    precision = "fp16" if device.startswith("cuda") else "fp32"
    (folder / "model.yaml").write_text(
        "runtime: torch\n"
        f"device: {device}\n"
        f"precision: {precision}\n"
        f"max_batch_size: {batch}\n"
        f"batching: {{max_queue_delay_ms: 2, preferred_batch_sizes: [{batch}]}}\n"
        f"instances: {{count: {instances}, kind: {'gpu' if device.startswith('cuda') else 'thread'}}}\n"
        f"inputs: [{{name: tokens, datatype: INT64, shape: [-1, {shape.seq}]}}]\n"
        "outputs: [{name: logits, datatype: FP32, shape: [-1, 2]}]\n"
    )
    return folder / "1" / "model.pt"


def raw_rows_per_s(module: Any, shape: Shape, device: str, batch: int, seconds: float) -> float:
    import torch

    tokens = torch.randint(0, shape.vocab, (batch, shape.seq), device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(5):
            module(tokens)
        sync()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            module(tokens)
            runs += 1
            if runs % 8 == 0:
                sync()
        sync()
        return runs * batch / (time.perf_counter() - start)


def raw_limits(module: Any, model_path: Path, shape: Shape, device: str, seconds: float) -> dict[str, dict[int, float]]:
    import torch

    eager = module.to(device)
    scripted = torch.jit.load(str(model_path), map_location=device).eval()
    if device.startswith("cuda"):
        eager, scripted = eager.half(), scripted.half()
    variants = {"eager, fp16 weights" if device.startswith("cuda") else "eager, fp32": eager}
    variants["TorchScript file as dhow loads it"] = scripted
    return {
        name: {batch: raw_rows_per_s(variant, shape, device, batch, seconds) for batch in (1, 32, 128)}
        for name, variant in variants.items()
    }


def _client(port: int, seq: int, vocab: int, concurrency: int, warmup: float, seconds: float, out: Any) -> None:
    """One client process: ``concurrency`` loops of unary ModelInfer calls, one sequence each."""
    import grpc

    from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
    from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as rpc

    rng = np.random.default_rng(os.getpid())
    requests = []
    for _ in range(16):
        tokens = rng.integers(0, vocab, (1, seq), dtype=np.int64)
        request = pb.ModelInferRequest(model_name="encoder")
        request.inputs.add(name="tokens", datatype="INT64", shape=[1, seq])
        request.raw_input_contents.append(tokens.tobytes())
        requests.append(request)

    async def main() -> tuple[int, int, list[float]]:
        latencies: list[float] = []
        failures = 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rpc.GRPCInferenceServiceStub(channel)
            begin = time.perf_counter()
            measure_from, stop_at = begin + warmup, begin + warmup + seconds

            async def loop(index: int) -> None:
                nonlocal failures
                while (now := time.perf_counter()) < stop_at:
                    try:
                        await stub.ModelInfer(requests[index % len(requests)])
                        ok = True
                    except grpc.aio.AioRpcError:
                        ok = False
                    if now >= measure_from:
                        latencies.append((time.perf_counter() - now) * 1000)
                        failures += not ok
                    index += 1

            await asyncio.gather(*(loop(index) for index in range(concurrency)))
        return len(latencies), failures, latencies

    out.send(asyncio.run(main()))


def drive(port: int, shape: Shape, processes: int, concurrency: int, warmup: float, seconds: float) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    pipes, children = [], []
    for _ in range(processes):
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(
            target=_client, args=(port, shape.seq, shape.vocab, concurrency, warmup, seconds, sender)
        )
        child.start()
        pipes.append(receiver)
        children.append(child)
    results = [pipe.recv() for pipe in pipes]
    for child in children:
        child.join()
    latencies = np.concatenate([np.asarray(result[2]) for result in results])
    return {
        "requests": float(sum(result[0] for result in results)),
        "failures": float(sum(result[1] for result in results)),
        "rows_per_s": sum(result[0] for result in results) / seconds,
        "p50": float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
        "p99": float(np.percentile(latencies, 99)) if latencies.size else float("nan"),
    }


def serve(repository: Path, workers: int, log: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    http_port, grpc_port = free_port(), free_port()
    args = [sys.executable, "-m", "dhow.cli", "serve", "--auth", "none", "--repository", str(repository)]
    args += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    args += ["--data-dir", str(repository.parent / "data")]
    if workers > 1:
        args += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"dhow exited with {process.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/encoder/ready", timeout=2) as reply:
                if reply.status == 200:
                    return process, http_port, grpc_port
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"dhow did not become ready in 300 s; see {log}")


def report(args: argparse.Namespace, shape: Shape, raw: dict[str, dict[int, float]], served: dict[str, float]) -> str:
    import torch

    best_name, best_batch, best = max(
        ((name, batch, rate) for name, rates in raw.items() for batch, rate in rates.items()), key=lambda item: item[2]
    )
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "no GPU (CPU plumbing check)"
    ratio = served["rows_per_s"] / best
    lines = [
        "# GPU serving: dhow over gRPC against the raw in-process limit",
        "",
        f"`python benchmarks/gpu_serving.py {' '.join(sys.argv[1:])}` on {platform.node()} ({gpu}), "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
        "",
        f"Encoder: {shape.layers} layers, width {shape.width}, {shape.heads} heads, sequence {shape.seq}, "
        f"random weights; dhow: `--workers {args.workers}`, {args.instances} instance(s) per worker, "
        f"max batch {args.batch}; load: {args.client_processes} client processes x {args.concurrency} "
        f"concurrent unary gRPC calls, one sequence each, {args.seconds:g} s after {args.warmup:g} s warm-up.",
        "",
        "| raw, in-process | batch 1 | batch 32 | batch 128 |",
        "|---|---|---|---|",
    ]
    for name, rates in raw.items():
        lines.append(f"| {name} | " + " | ".join(f"{rates[batch]:,.0f} rows/s" for batch in (1, 32, 128)) + " |")
    lines += [
        "",
        "| served by dhow | rows/s | p50 ms | p99 ms | failures | ratio to the fastest raw |",
        "|---|---|---|---|---|---|",
        f"| gRPC, one sequence per request | {served['rows_per_s']:,.0f} | {served['p50']:.2f} | "
        f"{served['p99']:.2f} | {served['failures']:.0f} | **{ratio:.2f}** "
        f"(of {best:,.0f}: {best_name}, batch {best_batch}) |",
        "",
        f"Goal: at least 0.85 of the fastest raw throughput: **{'reached' if ratio >= 0.85 else 'not reached'}**.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128, help="the model's max_batch_size")
    parser.add_argument("--workers", type=int, default=4, help="dhow server processes")
    parser.add_argument("--instances", type=int, default=2, help="model instances per server process")
    parser.add_argument("--client-processes", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent calls per client process")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--raw-seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS-gpu.md")
    args = parser.parse_args()
    shape = Shape(args.layers, args.width, args.heads, args.seq)

    with tempfile.TemporaryDirectory(prefix="dhow-gpu-") as scratch:
        repository = Path(scratch) / "models"
        module = build_encoder(shape, seed=0)
        model_path = write_model(repository, module, shape, args.device, args.instances, args.batch)
        raw = raw_limits(module, model_path, shape, args.device, args.raw_seconds)
        del module
        if args.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()  # the served copies need the memory, not this process
        process, _, grpc_port = serve(repository, args.workers, Path(scratch) / "dhow.log")
        try:
            served = drive(grpc_port, shape, args.client_processes, args.concurrency, args.warmup, args.seconds)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    text = report(args, shape, raw, served)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
