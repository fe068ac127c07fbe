"""The three models of the serving benchmark, the requests sent to them, and how each server is set up.

To tune, edit the tables here: ``DHOW`` (model.yaml fields merged over the demo model's manifest, and
extra ``dhow serve`` arguments) and ``MLSERVER`` (the variants run.py tries for MLServer at the goal
concurrency before it sweeps with the fastest). Artifacts come from dhow's own demo builder (seeded
synthetic data), so both servers load the very same files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from grpc_loadgen import infer_request

from dhow.demo import build_demo_repository, manifest_text


@dataclass(frozen=True)
class Workload:
    """One model under load: which demo artifact, what each request carries, where its goal is."""

    name: str
    artifact: str
    #: the MLServer runtime that serves the artifact
    implementation: str
    features: int
    goal_concurrency: int
    #: outputs every request asks for (empty: all the model has)
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class DhowSetup:
    manifest: Mapping[str, Any]
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class MLServerVariant:
    label: str
    #: settings.json ``parallel_workers``: 0 runs inference in the server's own process
    parallel_workers: int
    #: model-settings.json fields beside name and implementation (``parameters.uri`` is added)
    model: Mapping[str, Any] = field(default_factory=dict)


WORKLOADS = {
    "tabular": Workload("tabular", "model.onnx", "mlserver_onnx.OnnxModel", 32, goal_concurrency=16),
    "mlp": Workload("mlp", "model.onnx", "mlserver_onnx.OnnxModel", 512, goal_concurrency=64),
    # both servers are asked for ``predict`` only: MLServer's default answer, and one estimator call on each
    "tabular_sklearn": Workload(
        "tabular_sklearn",
        "model.joblib",
        "mlserver_batches.SKLearnModel",  # mlserver_sklearn's, counting its batches
        32,
        goal_concurrency=16,
        outputs=("predict",),
    ),
}

#: models whose CPU efficiency is measured: the server's CPU per inference against ONNX Runtime's per row alone
EFFICIENCY = {"mlp"}

_THREAD = {"count": 1, "kind": "thread"}
#: what served best here (tried: 1 or 2 server workers; ORT threads 1 or 2, spinning on or off; for scikit-learn
#: a thread instance, 1 or 2 process instances): two server processes for the light models, whose cost is the
#: protocol work in Python, and one process for mlp, whose cost is the model, with one ORT thread: the other core
#: is the event loop's (two threads on 2 cores spent more CPU per row, preempted by the loop; issue 18)
DHOW = {
    "tabular": DhowSetup(
        {"batching": {"max_queue_delay_ms": 0}, "instances": _THREAD, "threads": 1}, ("--workers", "2")
    ),
    "mlp": DhowSetup({"max_batch_size": 64, "batching": {"max_queue_delay_ms": 0}, "instances": _THREAD, "threads": 1}),
    "tabular_sklearn": DhowSetup({"batching": {"max_queue_delay_ms": 0}, "instances": _THREAD}, ("--workers", "2")),
}


def _onnx_extra(threads: int) -> dict[str, Any]:
    return {"parameters": {"extra": {"intra_op_threads": threads}}}


def _adaptive(size: int, seconds: float) -> dict[str, Any]:
    return {"max_batch_size": size, "max_batch_time": seconds}


#: tried in this order at the goal concurrency over REST; the first is the default when tuning is skipped
MLSERVER = {
    "tabular": [
        MLServerVariant("2 workers, 1 ORT thread each", 2, _onnx_extra(1)),
        MLServerVariant("in-process (0 workers), 1 ORT thread", 0, _onnx_extra(1)),
        MLServerVariant("1 worker (default), 2 ORT threads", 1, _onnx_extra(2)),
    ],
    "mlp": [
        MLServerVariant(
            "1 worker, adaptive batching 32 / 5 ms, 2 ORT threads", 1, _onnx_extra(2) | _adaptive(32, 0.005)
        ),
        MLServerVariant(
            "in-process, adaptive batching 32 / 5 ms, 2 ORT threads", 0, _onnx_extra(2) | _adaptive(32, 0.005)
        ),
        MLServerVariant(
            "2 workers, adaptive batching 16 / 5 ms, 1 ORT thread", 2, _onnx_extra(1) | _adaptive(16, 0.005)
        ),
    ],
    "tabular_sklearn": [
        MLServerVariant("2 workers", 2),
        MLServerVariant("in-process (0 workers)", 0),
        MLServerVariant("2 workers, adaptive batching 16 / 2 ms", 2, _adaptive(16, 0.002)),
    ],
}

#: MLServer's server settings for all variants: no access log, metrics server or gzip middleware on the hot path
MLSERVER_SERVER = {"debug": False, "metrics_endpoint": None, "gzip_enabled": False, "host": "127.0.0.1"}


def build_artifacts(work: Path, seed: int) -> dict[str, Path]:
    """Build the demo repository under ``work`` and answer each workload's artifact (its served version)."""
    demo = work / "demo"
    build_demo_repository(demo, seed=seed)
    artifacts = {}
    for workload in WORKLOADS.values():
        versions = sorted((p for p in (demo / workload.name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        artifacts[workload.name] = versions[-1] / workload.artifact
    return artifacts


def write_dhow_repository(root: Path, workload: Workload, artifact: Path, setup: DhowSetup) -> None:
    """``root/<model>/model.yaml`` (the demo's manifest with ``setup`` merged over it) and version 1."""
    demo_manifest = yaml.safe_load((artifact.parent.parent / "model.yaml").read_text(encoding="utf-8"))
    demo_manifest.pop("version_policy", None)  # only the served version is copied
    _fresh(root)
    version = root / workload.name / "1"
    version.mkdir(parents=True)
    (root / workload.name / "model.yaml").write_text(manifest_text(demo_manifest | dict(setup.manifest)), "utf-8")
    shutil.copyfile(artifact, version / workload.artifact)


def write_mlserver_repository(
    root: Path, workload: Workload, artifact: Path, variant: MLServerVariant, http_port: int, grpc_port: int
) -> None:
    """``root/settings.json`` and ``root/<model>/model-settings.json`` with the artifact beside it."""
    _fresh(root)
    folder = root / workload.name
    folder.mkdir(parents=True)
    server = MLSERVER_SERVER | {"parallel_workers": variant.parallel_workers, "http_port": http_port}
    (root / "settings.json").write_text(json.dumps(server | {"grpc_port": grpc_port}, indent=2), "utf-8")
    model = dict(variant.model)
    parameters = {"uri": f"./{workload.artifact}", **model.pop("parameters", {})}
    settings = {"name": workload.name, "implementation": workload.implementation, "parameters": parameters, **model}
    (folder / "model-settings.json").write_text(json.dumps(settings, indent=2), "utf-8")
    shutil.copyfile(artifact, folder / workload.artifact)


def _fresh(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)


@dataclass(frozen=True)
class Requests:
    """The same requests for both servers, one array of inputs per request."""

    rows: list[np.ndarray]
    rest_bodies: list[bytes]
    grpc_messages: list[bytes]
    #: the REST bodies in the binary tensor extension (as perf_analyzer sends them), with the header each needs
    rest_binary: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)


def requests_for(workload: Workload, seed: int, count: int = 16) -> Requests:
    """``count`` different batch-1 requests from a seeded generator (cycled by the load generators)."""
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal((1, workload.features)).astype(np.float32) for _ in range(count)]
    outputs = [{"name": name} for name in workload.outputs]
    bodies = []
    for row in rows:
        body: dict[str, Any] = {"inputs": [{"name": "input", "shape": list(row.shape), "datatype": "FP32"}]}
        body["inputs"][0]["data"] = row.ravel().tolist()
        if outputs:
            body["outputs"] = outputs
        bodies.append(json.dumps(body).encode())
    messages = [infer_request(workload.name, {"input": row}, workload.outputs) for row in rows]
    return Requests(rows, bodies, messages, [binary_body(json.loads(body)) for body in bodies])


def binary_body(body: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """A JSON request body of one FP32 input in the binary tensor extension, and the header it needs."""
    tensor = body["inputs"][0]
    data = np.asarray(tensor.pop("data"), dtype=np.float32).tobytes()
    tensor["parameters"] = {"binary_data_size": len(data)}
    body["parameters"] = {"binary_data_output": True}
    header = json.dumps(body).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header))}
