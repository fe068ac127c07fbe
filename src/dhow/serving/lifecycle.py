"""Loads, reloads and unloads models from the repository, swapping versions with no downtime.

A reload loads the new versions first, then swaps the table that requests resolve against
in one step on the event loop, then lets the old versions finish what they were given
before releasing them: a request in flight never meets a half-loaded or closed model.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhow.core.errors import (
    DhowError,
    Forbidden,
    InvalidInput,
    ModelLoadError,
    NotFound,
    Unavailable,
    Unsupported,
    unknown_model,
)
from dhow.governance.masking import parse_masking
from dhow.monitoring.metrics import ServerMetrics
from dhow.monitoring.profile import ReferenceProfile
from dhow.monitoring.resources import InstanceProcess
from dhow.repository.manifest import MANIFEST, parse_manifest
from dhow.repository.profiles import PROFILE, read_profile
from dhow.repository.store import ModelRepository, ModelSource
from dhow.serving.load_requests import overridden_manifest, requested_manifest, write_upload
from dhow.serving.model_version import ModelVersion, load_runtimes
from dhow.serving.warmup import warm

log = logging.getLogger("dhow.models")


class ModelControl(enum.Enum):
    #: load everything at start; the repository API may not change what is loaded
    NONE = "none"
    #: load everything at start and follow the repository's changes on disk
    POLL = "poll"
    #: load only what is asked, at start (``--load-model``) or through the repository API
    EXPLICIT = "explicit"


@dataclass(slots=True)
class ModelEntry:
    name: str
    state: str = "LOADING"
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    #: versions whose load failed, with the reason
    failed: dict[int, str] = field(default_factory=dict)
    fingerprint: tuple[tuple[str, int, int], ...] = ()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ModelLifecycle:
    """The models this server serves: resolved per request, loaded, reloaded and unloaded, versions swapped."""

    def __init__(
        self,
        repository: ModelRepository,
        metrics: ServerMetrics,
        *,
        control: ModelControl = ModelControl.NONE,
        upload_dir: Path | None = None,
        workers: int = 1,
        artifact_check: Callable[[str, int, Path], None] | None = None,
        queue_timeout_ms: float = 0.0,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.control = control
        #: where uploaded model files are written; None refuses uploads (they can run code)
        self.upload_dir = upload_dir
        #: server processes sharing the ports; with more than one, a load through the API would reach only one
        self.workers = workers
        self.entries: dict[str, ModelEntry] = {}
        self._uploaded: dict[str, ModelRepository] = {}
        #: versions that deployments route to, kept loaded beside what the version policy selects
        self._required: dict[str, frozenset[int]] = {}
        #: checks a version folder before it loads (trusted digests); raises ``ModelLoadError`` to refuse it
        self.artifact_check = artifact_check
        #: how long a request may wait in a version's queue when its model.yaml sets no ``timeout_ms``
        self.queue_timeout_ms = queue_timeout_ms

    def tenant_of(self, name: str) -> str:
        """The tenant a model belongs to (its manifest's ``tenant``), loaded or not; "default" if unknown."""
        entry = self.entries.get(name)
        if entry is not None and entry.versions:
            return next(iter(entry.versions.values())).config.tenant
        try:
            return self._repository_of(name).source(name).config.tenant
        except DhowError:
            return "default"

    # -- resolving a request ------------------------------------------------------------

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The version that serves a request; raises NotFound or Unavailable with the reason."""
        entry = self.entries.get(name)
        if entry is None or not entry.versions:
            raise self._not_serving(name, entry)
        if not version:
            return entry.versions[max(entry.versions)]
        try:
            number = int(version)
        except ValueError:
            raise InvalidInput(f"model version must be an integer, got {version!r}") from None
        found = entry.versions.get(number)
        if found is None:
            if number in entry.failed:
                raise Unavailable(f"model '{name}' version {number} failed to load: {entry.failed[number]}")
            loaded = ", ".join(map(str, sorted(entry.versions)))
            raise NotFound(f"model '{name}' has no version {number} loaded (loaded: {loaded})")
        return found

    def _not_serving(self, name: str, entry: ModelEntry | None) -> DhowError:
        if entry is not None and entry.state == "LOADING":
            return Unavailable(f"model '{name}' is loading; retry shortly", retry_after=1)
        if entry is not None and entry.reason:
            return Unavailable(f"model '{name}' is not available: {entry.reason}", retry_after=5)
        if name in self._known_names():
            hint = (
                f"load it through the repository API (REST POST /v2/repository/models/{name}/load, gRPC "
                "RepositoryModelLoad)"
                if self.control is ModelControl.EXPLICIT and self.workers == 1
                else ""
            )
            return Unavailable(f"model '{name}' is not loaded. {hint}".strip(), retry_after=5)
        return unknown_model(name)

    def knows(self, name: str) -> bool:
        """Whether the model exists here (in the repository, uploaded, or loaded), loaded or not."""
        return name in self._known_names()

    def _known_names(self) -> set[str]:
        return set(self.repository.model_names()) | set(self._uploaded) | set(self.entries)

    def _repository_of(self, name: str) -> ModelRepository:
        return self._uploaded.get(name, self.repository)

    # -- the repository index -----------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for name in sorted(self._known_names()):
            entry = self.entries.get(name)
            if entry is None:
                if not ready_only:
                    rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"})
                continue
            for number in sorted(entry.versions):
                rows.append({"name": name, "version": str(number), "state": "READY", "reason": ""})
            if ready_only:
                continue
            for number, reason in sorted(entry.failed.items()):
                rows.append({"name": name, "version": str(number), "state": "UNAVAILABLE", "reason": reason})
            if not entry.failed and (entry.reason or not entry.versions):
                # a model-wide failure (its manifest): unavailable, though the previous versions may still serve
                state = "UNAVAILABLE" if entry.versions else entry.state
                rows.append({"name": name, "version": "", "state": state, "reason": entry.reason})
        return rows

    def process_instances(self) -> Iterator[InstanceProcess]:
        """The live process instances of every loaded version (what resource metrics read at a scrape)."""
        for name, entry in list(self.entries.items()):
            for number, model in list(entry.versions.items()):
                for index, runtime in enumerate(model.runtimes):
                    pid = getattr(runtime, "pid", None)
                    if isinstance(pid, int):
                        yield InstanceProcess(name, str(number), index, pid)

    def unready_models(self) -> list[str]:
        """The models this server should serve that answer no request: loading, or no version loaded (warmed)."""
        return sorted(name for name, entry in self.entries.items() if not entry.versions)

    # -- versions that deployments need -------------------------------------------------

    def versions_on_disk(self, name: str) -> tuple[int, ...]:
        """The version folders a model has; raises NotFound for a model that is not in the repository."""
        if name not in self._known_names():
            raise unknown_model(name)
        return self._repository_of(name).source(name).versions

    async def require_versions(self, name: str, versions: frozenset[int]) -> None:
        """Keep ``versions`` of a model loaded (beside its version policy's); load them now.

        Raises NotFound for a version not on disk and ModelLoadError when one fails to load; the
        requirement is then withdrawn, so nothing stays half-applied.
        """
        on_disk = await asyncio.to_thread(self.versions_on_disk, name)
        missing = sorted(versions - set(on_disk))
        if missing:
            there = ", ".join(map(str, on_disk)) or "none"
            absent = ", ".join(map(str, missing))
            raise NotFound(f"model '{name}' has no version {absent} in the repository (versions there: {there})")
        previous = self._required.get(name, frozenset())
        self._required[name] = versions
        entry = self.entries.get(name)
        if entry is None or not versions <= set(entry.versions):
            await self.load(name)
        entry = self.entries.get(name)
        loaded = set(entry.versions) if entry is not None else set()
        if not versions <= loaded:
            failed = entry.failed if entry is not None else {}
            reasons = "; ".join(
                f"version {v}: {failed.get(v, entry.reason if entry else 'not loaded')}"
                for v in sorted(versions - loaded)
            )
            self._required[name] = previous
            raise ModelLoadError(f"model '{name}' cannot serve the versions the policy names: {reasons}")

    async def release_versions(self, name: str, keep: frozenset[int] = frozenset()) -> None:
        """Withdraw a deployment's requirement (keeping ``keep``); unload versions nothing else selects."""
        if self._required.get(name, frozenset()) == keep:
            return
        if keep:
            self._required[name] = keep
        else:
            self._required.pop(name, None)
        if name in self.entries:
            await self.load(name)

    # -- loading and unloading ----------------------------------------------------------

    async def start(self, names: list[str] | None = None) -> None:
        """Load the models the control mode says to load at start (``names``: explicit ones)."""
        if names is None or "*" in names:
            names = self.repository.model_names()
        await asyncio.gather(*(self.load(name) for name in names))

    async def request_load(self, name: str, parameters: dict[str, Any]) -> None:
        """A load asked through the repository API: config override and uploaded files allowed."""
        self._check_api_control("load")
        override = await self._requested_manifest(name, parameters)
        await self.load(name, override)
        entry = self.entries.get(name)
        if entry is None:
            return
        if not entry.versions:
            raise ModelLoadError(f"failed to load model '{name}': {entry.reason}")
        if entry.failed or entry.reason:
            # the caller asked for new files to be served: say that they were not, even if old ones still are
            reason = entry.reason or "; ".join(f"version {v}: {r}" for v, r in sorted(entry.failed.items()))
            raise ModelLoadError(f"failed to load model '{name}': {reason}")

    async def _requested_manifest(self, name: str, parameters: dict[str, Any]) -> dict[str, Any] | None:
        """The manifest a load request asks for (None: the model's model.yaml), with its uploaded files written.

        A model that is in no repository is refused here (404), before an entry is made for it.
        """
        config_text = parameters.get("config")
        files = {key[5:]: value for key, value in parameters.items() if key.startswith("file:")}
        if not files:
            return await self._overridden_manifest(name, config_text)
        if self.upload_dir is None:
            raise Forbidden("uploading model files is off because they can run code; start with --allow-model-upload")
        if config_text is None:
            raise InvalidInput("a load with 'file:' parameters also needs the 'config' parameter (model.yaml as JSON)")
        manifest = requested_manifest(name, config_text)
        await asyncio.to_thread(write_upload, self.upload_dir, name, manifest, files)
        self._uploaded[name] = ModelRepository(self.upload_dir)
        return manifest

    async def _overridden_manifest(self, name: str, config_text: object) -> dict[str, Any] | None:
        repository = self._repository_of(name)
        if not await asyncio.to_thread(repository.has_model, name):
            raise unknown_model(name)
        if config_text is None:
            return None
        on_disk = await asyncio.to_thread(repository.manifest_data, name)
        # a set artifact check verifies model.yaml against its trusted digest: an override must not undo that
        return overridden_manifest(name, on_disk, config_text, digests_required=self.artifact_check is not None)

    async def request_unload(self, name: str) -> None:
        self._check_api_control("unload")
        if name not in self.entries:
            raise NotFound(f"model '{name}' is not loaded")
        await self.unload(name)

    def _check_api_control(self, action: str) -> None:
        if self.workers > 1:
            raise Unsupported(
                f"cannot {action} models through the API: with --workers {self.workers} each server process loads "
                "from the repository itself; use --model-control poll (or restart)"
            )
        if self.control is not ModelControl.EXPLICIT:
            raise Forbidden(
                f"cannot {action} models through the API when model control is '{self.control.value}'; "
                "start dhow with --model-control explicit"
            )

    async def load(self, name: str, override: dict[str, Any] | None = None) -> None:
        """Load or reload a model's versions as its manifest and version policy say."""
        entry = self.entries.setdefault(name, ModelEntry(name))
        async with entry.lock:
            await self._load_locked(entry, override)
            self._hide_paths(entry)
        self.metrics.models_loaded.set(sum(len(e.versions) for e in self.entries.values()))

    async def _load_locked(self, entry: ModelEntry, override: dict[str, Any] | None) -> None:
        name = entry.name
        repository = self._repository_of(name)
        fingerprint = await asyncio.to_thread(repository.fingerprint, name)
        try:
            source = await asyncio.to_thread(repository.source, name)
            if override is not None:
                config = parse_manifest(override, f"config parameter of the load request for '{name}'", name)
                source = ModelSource(name, source.path, config, source.versions)
            required = self._required.get(name, frozenset()) & set(source.versions)
            wanted = sorted(set(source.served_versions()) | required)
            if not wanted:
                raise ModelLoadError(f"{source.path} has no version folder (an integer, e.g. 1/) to serve")
        except DhowError as exc:
            # remember what was tried, so that the poller retries only when the files change again
            entry.fingerprint = fingerprint
            self._keep_old(entry, exc.message)
            return
        reload_all = override is not None or _manifest_changed(entry.fingerprint, fingerprint)
        new_versions: dict[int, ModelVersion] = {}
        failed: dict[int, str] = {}
        for number in wanted:
            current = entry.versions.get(number)
            if current is not None and not reload_all and not _version_changed(entry.fingerprint, fingerprint, number):
                new_versions[number] = current
                continue
            try:
                new_versions[number] = await self._load_version(source, number)
            except DhowError as exc:
                failed[number] = exc.message
            except Exception as exc:
                log.exception("loading %s version %s failed", name, number)
                failed[number] = f"{type(exc).__name__}: {exc}"
        _keep_previous_copies(entry.versions, new_versions, failed)
        if not new_versions and entry.versions:
            # nothing new could be loaded: keep serving what was there
            entry.failed, entry.fingerprint = failed, fingerprint
            self._keep_old(entry, "; ".join(f"version {v}: {r}" for v, r in failed.items()))
            return
        retired = [v for n, v in entry.versions.items() if new_versions.get(n) is not v]
        entry.versions, entry.failed, entry.fingerprint = new_versions, failed, fingerprint
        entry.state = "READY" if new_versions else "UNAVAILABLE"
        entry.reason = "" if new_versions else "; ".join(f"version {v}: {r}" for v, r in failed.items())
        for version in retired:
            await version.close()
        for number, reason in failed.items():
            log.error("model %s version %s failed to load: %s", name, number, reason)
        if new_versions:
            log.info("model %s serving versions %s", name, ", ".join(map(str, sorted(new_versions))))

    def _hide_paths(self, entry: ModelEntry) -> None:
        """The reasons a client is shown name files relative to the repository (the log keeps them whole)."""
        relative = self._repository_of(entry.name).relative
        entry.reason = relative(entry.reason)
        entry.failed = {number: relative(reason) for number, reason in entry.failed.items()}

    def _keep_old(self, entry: ModelEntry, reason: str) -> None:
        log.error("model %s: %s", entry.name, reason)
        if entry.versions:
            entry.reason = f"reload failed, still serving the previous versions: {reason}"
            return
        entry.state, entry.reason = "UNAVAILABLE", reason

    async def _load_version(self, source: ModelSource, number: int) -> ModelVersion:
        try:
            parse_masking(source.config.pii, f"{source.path / MANIFEST}: field 'pii'")
        except InvalidInput as exc:
            raise ModelLoadError(exc.message) from None
        if self.artifact_check is not None:
            await asyncio.to_thread(self.artifact_check, source.name, number, source.version_dir(number))
        runtimes, config = await asyncio.to_thread(load_runtimes, source.config, source.version_dir(number))
        version = ModelVersion(config, number, runtimes, self.metrics, queue_timeout_ms=self.queue_timeout_ms)
        await _attach_profile(version, source.version_dir(number), f"{source.name}/{number}")
        try:
            _check_feedback_output(version)
            await warm(version)  # before it is in the table: a version is served, and ready, only once warmed
        except BaseException:
            await version.close()
            raise
        return version

    async def unload(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is None:
            return
        async with entry.lock:
            self.entries.pop(name, None)
            for version in entry.versions.values():
                await version.close()
        self.metrics.models_loaded.set(sum(len(e.versions) for e in self.entries.values()))
        log.info("model %s unloaded", name)

    async def changes_on_disk(self) -> tuple[list[str], list[str]]:
        """What the repository poller should do: the models gone from disk, the models new or changed."""
        await asyncio.to_thread(self.repository.refresh)  # object storage: copy what changed into the cache
        on_disk = set(await asyncio.to_thread(self.repository.model_names))
        gone = sorted(set(self.entries) - on_disk - set(self._uploaded))
        changed = []
        for name in sorted(on_disk):
            entry = self.entries.get(name)
            fingerprint = await asyncio.to_thread(self.repository.fingerprint, name)
            if entry is None or fingerprint != entry.fingerprint:
                changed.append(name)
        return gone, changed

    async def close(self) -> None:
        for name in list(self.entries):
            await self.unload(name)


def _keep_previous_copies(
    serving: dict[int, ModelVersion], new_versions: dict[int, ModelVersion], failed: dict[int, str]
) -> None:
    """A version whose reload failed keeps its previous copy serving: traffic to it (and unversioned traffic,
    when it is the newest) must not move to another version, which would answer differently."""
    for number, reason in failed.items():
        if number in serving:
            new_versions[number] = serving[number]
            failed[number] = f"reload failed, still serving the previous copy: {reason}"


def _manifest_changed(old: tuple[tuple[str, int, int], ...], new: tuple[tuple[str, int, int], ...]) -> bool:
    return [f for f in old if f[0] == MANIFEST] != [f for f in new if f[0] == MANIFEST]


def _version_changed(old: tuple[tuple[str, int, int], ...], new: tuple[tuple[str, int, int], ...], number: int) -> bool:
    prefix = f"{number}/"
    return [f for f in old if f[0].startswith(prefix)] != [f for f in new if f[0].startswith(prefix)]


async def _attach_profile(version: ModelVersion, version_dir: Path, where: str) -> None:
    """The version's reference profile, when it has one; one that cannot be read is logged and reported by the
    drift API, and the version serves without drift scores (monitoring never stops a model from serving)."""
    try:
        data = await asyncio.to_thread(read_profile, version_dir, where)
        if data is not None:
            version.profile = ReferenceProfile.from_dict(data, f"{where}/{PROFILE}")
    except DhowError as exc:
        version.profile_error = exc.message
        log.error("model %s: its reference profile is not used: %s", where, exc.message)


def _check_feedback_output(version: ModelVersion) -> None:
    """Refuse a ``monitoring.feedback.output`` the version does not have (an ONNX model's outputs are known only
    now): no prediction would be kept, and every label would come back unmatched with no hint why."""
    feedback = version.config.monitoring.feedback
    if feedback is not None and feedback.output and feedback.output not in version.outputs:
        raise ModelLoadError(
            f"{version.name}/model.yaml: field 'monitoring.feedback.output': expected a name of the model's outputs "
            f"({', '.join(version.outputs)}), got {feedback.output!r}"
        )
