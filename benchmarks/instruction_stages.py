"""Instructions per call of each stage of an inference, in one process, under callgrind.

    PYTHONPATH=src python benchmarks/instruction_stages.py --model tabular

Runs itself again under ``valgrind --tool=callgrind --instr-atstart=no`` (OMP_NUM_THREADS=1) and prints a table.

Composes the core as ``dhow serve`` does (``--auth none``; ``--api-key``: ``--auth on``, calls with an invoker
API key, their audit records sent to the writer process, which is not counted), loads the demo model with the
serving benchmark's manifest, and runs each stage ``--calls`` times between ``callgrind_control -z`` and ``-d``:
the doors' decoding and encoding (REST JSON and binary, gRPC), the admission point alone, the core's whole path
(admission, routing, queueing, batch assembly, the hop to the runtime's thread and back, statistics), alone and as
32 calls at once (one batch, as a loaded server runs them), the runtime called directly; ``--only`` picks some.
What a door costs beyond these stages (its framework and transport) is the server's total per call
(``instructions.py``) less their sum.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import instructions
import numpy as np
import uvloop
from serving_setups import DHOW, WORKLOADS, requests_for, write_dhow_repository

from dhow.access.authenticator import Credentials
from dhow.core.types import InferenceRequest
from dhow.core.wire.v2 import decode_request, encode_response
from dhow.protocols.grpc.codec import request_from_proto, response_bytes
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.serving.composition import CorePolicies, compose_core
from dhow.serving.security import Security
from dhow.serving.service import ACTIONS
from dhow.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
#: set in the run under valgrind: where it writes the stages' names
_UNDER_VALGRIND = "DHOW_STAGES_NAMES"
Stage = Callable[[], Awaitable[object]]
#: calls in flight together in the batched stage (the mlp's average batch at c=64), and its name
BATCHED = 32
BATCHED_STAGE = f"the core's path, {BATCHED} calls at once: one batch, per call"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="tabular")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--models", type=Path, default=ROOT / "demo-models", help="demo models (make demo-models)")
    parser.add_argument(
        "--api-key",
        action="store_true",
        help="--auth on, calls with an invoker API key: authentication, RBAC, the audit record to its writer process",
    )
    parser.add_argument(
        "--only", action="append", default=[], help="the stages whose name contains this text (repeatable): all if none"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dhow-stages-") as scratch:
        if _UNDER_VALGRIND in os.environ:
            names = uvloop.run(_measure(args, Path(scratch)))
            Path(os.environ[_UNDER_VALGRIND]).write_text("\n".join(names))
            return
        out = Path(scratch) / "callgrind.out"
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", **{_UNDER_VALGRIND: str(out) + ".names"})
        subprocess.run([*valgrind, sys.executable, *sys.argv], env=env, check=True, stderr=subprocess.DEVNULL)
        names = Path(str(out) + ".names").read_text().splitlines()
        print(
            f"{args.model}, instructions per call over {args.calls} calls (batch 1, one call at a time, unless said):"
        )
        totals = {}
        for dump in Path(scratch).glob("callgrind.out.*[0-9]"):
            lines = dump.read_text().splitlines()
            trigger = next(line for line in lines if line.startswith("desc: Trigger:"))
            totals[trigger.rpartition("stage")[2]] = next(
                int(ln.split()[1]) for ln in lines if ln.startswith("totals:")
            )
        for number, name in enumerate(names, start=1):
            calls = _calls(args.calls, name)
            print(f"  {totals[str(number)] / (calls // _together(name) * _together(name)) / 1000:8,.1f}k  {name}")


async def _measure(args: argparse.Namespace, scratch: Path) -> list[str]:
    workload = WORKLOADS[args.model]
    versions = sorted(p for p in (args.models / args.model).iterdir() if p.name.isdigit())
    write_dhow_repository(
        scratch / "repo", workload, versions[-1] / workload.artifact, dataclasses.replace(DHOW[args.model], args=())
    )
    auth = "on" if args.api_key else "none"
    settings = ServerSettings(repository=scratch / "repo", data_dir=scratch / "data", auth=auth, queue_timeout_ms=0)
    security = Security(settings)
    core = await compose_core(settings, security, CorePolicies.load(settings), first_key=False)
    await core.models.load(args.model)
    service, model = core.service, args.model
    version = next(iter(core.models.entries[model].versions.values()))
    runtime = version.runtimes[0]
    requests = requests_for(workload, 1)
    message, body = requests.grpc_messages[0], requests.rest_bodies[0]
    binary_body, headers = instructions.binary_body(json.loads(body))
    header_length = int(headers["Inference-Header-Content-Length"])
    who, access = Credentials(source="127.0.0.1"), ACTIONS["infer"]
    if args.api_key:
        who = Credentials(f"Bearer {await _invoker_key(security)}", source="127.0.0.1")

    def decoded() -> InferenceRequest:
        return request_from_proto(pb.ModelInferRequest.FromString(message))

    response = await service.invoker(await service.authenticate(who, access))(decoded())
    rest_request = decode_request(body, model, "", None)
    binary_request = decode_request(binary_body, model, "", header_length)
    inputs = {tensor.name: tensor.data for tensor in decoded().inputs}
    outputs = list(version.output_names)
    batch = {name: np.repeat(array, 32, axis=0) for name, array in inputs.items()}

    async def admission() -> None:
        async with service.call(who, access, model):
            pass

    async def core_path() -> None:
        request = decoded()
        async with service.call(who, access, model) as call:
            await call.infer(request)

    async def core_path_batched() -> None:
        # what a loaded server does: calls that arrive together leave as one batch (one hop, one wake-up)
        await asyncio.gather(*(core_path() for _ in range(BATCHED)))

    async def sync(function: Callable[[], object]) -> object:
        return function()

    async def hop() -> object:
        return await asyncio.get_running_loop().run_in_executor(version._executor, runtime.infer, inputs, outputs)

    stages: dict[str, Stage] = {
        "nothing (the measurement's own cost)": lambda: sync(lambda: None),
        "gRPC decode (parse, request_from_proto)": lambda: sync(decoded),
        "gRPC encode (response_bytes)": lambda: sync(lambda: response_bytes(response)),
        "REST decode, JSON": lambda: sync(lambda: decode_request(body, model, "", None)),
        "REST encode, JSON": lambda: sync(lambda: encode_response(response, rest_request)),
        "REST decode, binary": lambda: sync(lambda: decode_request(binary_body, model, "", header_length)),
        "REST encode, binary": lambda: sync(lambda: encode_response(response, binary_request)),
        "admission alone (enter and leave service.call)": admission,
        "the core's path (gRPC decode + admission + infer)": core_path,
        BATCHED_STAGE: core_path_batched,
        "batcher.submit (queue, batch assembly, thread hop, runtime, outputs)": lambda: version.batcher.submit(
            inputs, outputs, 1
        ),
        "runtime.infer on the instance's thread (run_in_executor: the hop there and back)": hop,
        "runtime.infer alone, on the loop's thread": lambda: sync(lambda: runtime.infer(inputs, outputs)),
        "runtime.infer alone, a batch of 32 rows (per batch: divide by 32 for a row)": lambda: sync(
            lambda: runtime.infer(batch, outputs)
        ),
    }
    if args.only:
        stages = {name: stage for name, stage in stages.items() if any(text in name for text in args.only)}
    for number, (name, stage) in enumerate(stages.items(), start=1):
        runs = _calls(args.calls, name) // _together(name)
        for _ in range(max(runs // 10, 20 // _together(name), 1)):
            await stage()
        _control("-z")
        _control("--instr=on")
        for _ in range(runs):
            await stage()
        _control("--instr=off")
        _control(f"--dump=stage{number}")  # callgrind_control passes a name through a shell: no spaces
    await core.models.close()
    core.service.guard.close()
    await security.close()
    return list(stages)


async def _invoker_key(security: Security) -> str:
    """A new invoker key's token, known to the authenticator."""
    store, authenticator = security.store, security.authenticator
    assert store is not None and authenticator is not None
    made = store.create_key("bench-invoker", tenant="default", roles=["invoker"], actor="bench")
    assert made is not None
    await asyncio.to_thread(authenticator.reload, True)
    return made[1]


def _together(name: str) -> int:
    """How many calls one run of a stage makes."""
    return BATCHED if name == BATCHED_STAGE else 1


def _calls(calls: int, name: str) -> int:
    """The calls a stage makes: ``--calls``, rounded down to whole runs (at least one)."""
    return max(calls, _together(name))


def _control(option: str) -> None:
    subprocess.run(["callgrind_control", option, str(os.getpid())], check=True, capture_output=True)


if __name__ == "__main__":
    main()
