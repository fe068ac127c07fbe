"""The core composed: the data plane behind its admission point, with the model lifecycle and the stores below it.

Every process that admits requests builds its core here, whichever doors it opens: ``dhow serve`` (the REST
and gRPC doors, rollouts beside it: ``dhow.server``) and ``dhow batch run`` (the batch door, no port). What can
be checked without I/O (region names, the residency policy, the artifact keyring) is checked by
``CorePolicies.load`` before anything opens, so a wrong option fails first.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from dataclasses import dataclass

from dhow.core.artifacts import install_decryptor
from dhow.core.errors import ModelLoadError, NotFound, Unsupported
from dhow.core.model_config import ModelConfig
from dhow.core.names import check_region_name
from dhow.governance.residency import ResidencyPolicy
from dhow.monitoring.metrics import ServerMetrics
from dhow.monitoring.payload_log import PayloadLog
from dhow.monitoring.shared_predictions import SharedPredictions
from dhow.monitoring.tracing import Tracing
from dhow.repository.encryption import Keyring, trusted_files
from dhow.repository.remote import MirroredRepository
from dhow.repository.store import ModelRepository
from dhow.serving.dataplane import DataPlane
from dhow.serving.lifecycle import ModelControl, ModelLifecycle
from dhow.serving.security import Security
from dhow.serving.service import CoreService
from dhow.serving.traffic import TrafficRouter
from dhow.serving.watch import EventLog, ModelWatch
from dhow.settings import ServerSettings

__all__ = ["Core", "CorePolicies", "Observers", "PinnedModel", "compose_core", "load_pinned"]


@dataclass(frozen=True, slots=True)
class CorePolicies:
    """What the core is configured with that can be checked before any store opens or model loads."""

    control: ModelControl
    region: str
    residency: ResidencyPolicy

    @classmethod
    def load(cls, settings: ServerSettings) -> CorePolicies:
        """Check the settings the core needs, and install the keyring of encrypted artifacts."""
        control = ModelControl(settings.model_control)
        keyring = Keyring.load(settings.kek, settings.kek_file)
        install_decryptor(keyring.decrypt if keyring is not None else None)
        region = check_region_name(settings.region, "--region")
        return cls(control, region, ResidencyPolicy.load(settings.residency_policy))


#: the payload log's writer process (masks, renders and writes the events off the server's interpreter)
PAYLOAD_WRITER = (sys.executable, "-m", "dhow.serving.payload_writer")
#: tracing's writer process (makes, encodes and posts the spans off the server's interpreter)
TRACE_WRITER = (sys.executable, "-m", "dhow.serving.trace_writer")


@dataclass(frozen=True, slots=True)
class Observers:
    """What watches every request of a server besides metrics and the audit trail; each None when off."""

    payload_log: PayloadLog | None = None
    tracing: Tracing | None = None

    @classmethod
    def open(cls, settings: ServerSettings, metrics: ServerMetrics, source: str) -> Observers:
        """The payload log's sink and the tracer the settings name (a bad URL is refused before any port opens)."""
        payload_log = None
        if settings.payload_log:
            queue, registry = settings.payload_log_queue, metrics.registry
            payload_log = PayloadLog(settings.payload_log, capacity=queue, source=source, command=PAYLOAD_WRITER,
                                     registry=registry, priority=settings.writer_priority,
                                     capacity_bytes=settings.payload_log_queue_bytes)  # fmt: skip
        tracing = None
        if settings.otlp_endpoint:
            tracing = Tracing(settings.otlp_endpoint, settings.trace_sample_ratio, command=TRACE_WRITER,
                              registry=metrics.registry, priority=settings.writer_priority)  # fmt: skip
        return cls(payload_log, tracing)

    def close(self) -> None:
        if self.payload_log is not None:
            self.payload_log.close()
        if self.tracing is not None:
            self.tracing.shutdown()


@dataclass(frozen=True, slots=True)
class Core:
    """The core of one process: what its doors enter through (``service``) and what it serves (``models``)."""

    models: ModelLifecycle
    dataplane: DataPlane
    service: CoreService


async def compose_core(
    settings: ServerSettings,
    security: Security,
    policies: CorePolicies,
    *,
    metrics: ServerMetrics | None = None,
    router: TrafficRouter | None = None,
    first_key: bool = True,
    observers: Observers | None = None,
    events: EventLog | None = None,
) -> Core:
    """Open the stores (``security``), build the model lifecycle, the data plane and the admission point.

    ``first_key`` False: a process that is not a server (a batch job) never makes the first admin key.
    ``observers``: the payload log and tracing, when the process has them. ``events``: a server's event
    history; given, the models are watched (drift, latency anomalies, feedback) and its episodes go there.
    """
    observers = observers or Observers()
    metrics = metrics or ServerMetrics()
    key = await security.open()
    models = _models(settings, security, metrics, policies.control)
    # object storage: the cache is brought up to date before anything is read from it
    await asyncio.to_thread(models.repository.refresh)
    dataplane = DataPlane(
        models,
        router=router,
        region=policies.region,
        residency=policies.residency,
        masking_key=key,
        strict_readiness=settings.strict_readiness,
        payload_log=observers.payload_log,
        watch=ModelWatch(models, metrics.models, events=events, shared=_shared(settings, metrics))
        if events is not None
        else None,
    )
    guard = await security.guard(models.tenant_of, metrics.registry, first_key=first_key)
    return Core(models, dataplane, CoreService(dataplane, guard, observers.tracing))


def _shared(settings: ServerSettings, metrics: ServerMetrics) -> SharedPredictions | None:
    """With ``--redis``, the predictions awaiting feedback go there: a label sent to any worker or pod joins."""
    return SharedPredictions(settings.redis, metrics.registry) if settings.redis else None


def _models(
    settings: ServerSettings, security: Security, metrics: ServerMetrics, control: ModelControl
) -> ModelLifecycle:
    upload_dir = settings.data_dir / "uploads" if settings.allow_model_upload else None
    if upload_dir is not None:
        upload_dir.mkdir(parents=True, exist_ok=True)
    folder = settings.repository_folder()
    repository = (
        MirroredRepository(settings.repository, folder) if settings.repository_is_remote() else ModelRepository(folder)
    )
    return ModelLifecycle(
        repository,
        metrics,
        control=control,
        upload_dir=upload_dir,
        workers=settings.workers,
        artifact_check=security.digest_check() if settings.require_digests else None,
        queue_timeout_ms=settings.queue_timeout_ms,
    )


@dataclass(frozen=True, slots=True)
class PinnedModel:
    """One version loaded for a job that must see one version from start to end (a batch run)."""

    config: ModelConfig
    version: int
    #: SHA-256 over the version's files and its model.yaml (the digests ``dhow models trust`` records)
    artifact_digest: str


#: runtimes that hold the interpreter lock while they compute: a job runs them in process instances
_PYTHON_BOUND = frozenset({"python", "sklearn"})


async def load_pinned(
    models: ModelLifecycle, name: str, version: int | None, *, max_batch_size: int, python_processes: int
) -> PinnedModel:
    """Load one version of a model (the newest its version policy serves when ``version`` is None) for a job.

    The model's own model.yaml is used with two things a job sizes for throughput instead of latency: the
    largest batch (``max_batch_size``, and no queue delay: a job hands over full batches) and, for runtimes that
    hold the interpreter lock, ``python_processes`` process instances (so that every core computes). Policies
    (tenant, region, masking) stay the file's.
    """
    source = await asyncio.to_thread(models.repository.source, name)
    number = version if version is not None else max(source.served_versions() or source.versions or (0,))
    if number not in source.versions:
        on_disk = ", ".join(map(str, source.versions)) or "none"
        raise NotFound(f"model '{name}' has no version {number} in the repository (versions: {on_disk})")
    manifest = dict(await asyncio.to_thread(models.repository.manifest_data, name))
    if not source.config.max_batch_size:
        raise Unsupported(
            f"model '{name}' does not batch (max_batch_size 0 in its model.yaml): a job needs one that does"
        )
    manifest.update(max_batch_size=max_batch_size, version_policy={"specific": [number]})
    batching = {k: v for k, v in (manifest.get("batching") or {}).items() if k != "preferred_batch_sizes"}
    manifest["batching"] = {**batching, "max_queue_delay_ms": 0}
    if source.config.runtime in _PYTHON_BOUND:
        manifest["instances"] = {"kind": "process", "count": max(python_processes, 1)}
    await models.load(name, manifest)
    entry = models.entries.get(name)
    if entry is None or number not in entry.versions:
        reason = (entry.failed.get(number) or entry.reason) if entry is not None else "not loaded"
        raise ModelLoadError(f"model '{name}' version {number} could not be loaded: {reason}")
    loaded = entry.versions[number]
    files = await asyncio.to_thread(trusted_files, source.version_dir(number))
    digest = hashlib.sha256("".join(f"{path}\0{files[path]}\n" for path in sorted(files)).encode()).hexdigest()
    return PinnedModel(loaded.config, number, digest)
