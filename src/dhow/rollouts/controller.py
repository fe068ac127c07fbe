"""The rollout controller: deployments applied to live traffic, shadow comparison, canary analysis.

The registry (``RegistryStore``) is the truth; this server keeps a compiled copy of every
deployment, checks the registry's generation every ``poll_s`` seconds for edits made by other
servers, and judges its canaries every second on the requests it served itself. Every edit goes
through ``_write``: validate, load the versions the new policy needs, write with the expected
revision, then swap the compiled policy in one assignment (so a switch is atomic for requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram

from dhow.core.datatypes import NUMPY_DTYPE
from dhow.core.errors import Conflict, DhowError, InvalidInput, NotFound
from dhow.core.types import InferenceRequest, InferenceResponse, Tensor
from dhow.governance.audit import AuditRecord
from dhow.governance.audit_trail import AuditTrail
from dhow.monitoring.metrics import ServerMetrics
from dhow.rollouts.policy import CompiledPolicy, Route, canary_weight, normalize, versions_of
from dhow.rollouts.store import Deployment, RegistryStore
from dhow.serving.model_manager import ModelManager

log = logging.getLogger("dhow.rollouts")

ANALYST = "dhow-analysis"
#: outcomes that count against a canary: the server failed, not the client
SERVER_FAILURES = frozenset({"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"})
SHADOW_QUEUE = 256
SHADOW_CONCURRENCY = 4
#: latencies kept per version per window, for the p99
WINDOW_SAMPLES = 4096

Infer = Callable[[InferenceRequest], Awaitable[InferenceResponse]]


@dataclass(slots=True)
class Window:
    """One version's requests since the current canary step began."""

    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW_SAMPLES))

    def p99_ms(self) -> float | None:
        return float(np.percentile(np.fromiter(self.latencies, float), 99)) if self.latencies else None

    def as_dict(self) -> dict[str, Any]:
        p99 = self.p99_ms()
        return {"requests": self.requests, "errors": self.errors, "p99_ms": None if p99 is None else round(p99, 3)}


@dataclass(slots=True)
class ShadowFigures:
    requests: int = 0
    agreed: int = 0
    disagreed: int = 0
    errors: int = 0
    dropped: int = 0
    difference_sum: float = 0.0
    difference_count: int = 0
    primary: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW_SAMPLES))
    shadow: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW_SAMPLES))

    def as_dict(self) -> dict[str, Any]:
        compared = self.agreed + self.disagreed

        def p99(values: deque[float]) -> float | None:
            return round(float(np.percentile(np.fromiter(values, float), 99)), 3) if values else None

        return {
            "requests": self.requests,
            "agreed": self.agreed,
            "disagreed": self.disagreed,
            "errors": self.errors,
            "dropped": self.dropped,
            "agreement_rate": round(self.agreed / compared, 6) if compared else None,
            "mean_abs_difference": self.difference_sum / self.difference_count if self.difference_count else None,
            "primary_p99_ms": p99(self.primary),
            "shadow_p99_ms": p99(self.shadow),
        }


@dataclass(slots=True)
class Active:
    """A deployment as this server applies it."""

    deployment: Deployment
    compiled: CompiledPolicy
    windows: dict[str, Window] = field(default_factory=dict)
    step_started: float = field(default_factory=time.monotonic)
    shadow: ShadowFigures = field(default_factory=ShadowFigures)
    #: the request counter of each (route, outcome), looked up once
    counters: dict[tuple[Route, str], Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        policy = self.deployment.policy
        if policy["kind"] == "canary":
            return {
                "weight": canary_weight(policy),
                "window": {role: self.windows.get(role, Window()).as_dict() for role in ("primary", "canary")},
            }
        if policy["kind"] == "shadow":
            return {"shadow": self.shadow.as_dict()}
        return {}

    def as_dict(self) -> dict[str, Any]:
        return {**self.deployment.as_dict(), "status": self.status()}


class RolloutController:
    def __init__(
        self,
        store: RegistryStore,
        models: ModelManager,
        metrics: ServerMetrics,
        *,
        poll_s: float = 2.0,
        analysis_s: float = 1.0,
    ) -> None:
        self.store = store
        self.models = models
        self.poll_s = poll_s
        self.analysis_s = analysis_s
        self.active: dict[str, Active] = {}
        #: where the automatic analysis's decisions are recorded, beside the deployment's history
        self.audit: AuditTrail | None = None
        self._generation = -1
        self._edit_lock = asyncio.Lock()
        self._shadow_queue: asyncio.Queue[tuple[Active, InferenceRequest, InferenceResponse, float]] = asyncio.Queue(
            SHADOW_QUEUE
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._infer: Infer | None = None
        self.routed = Counter(
            "dhow_deployment_requests",
            "Requests routed by a deployment's policy, by the variant that answered and outcome.",
            ["deployment", "variant", "version", "outcome"],
            registry=metrics.registry,
        )
        self.shadow_requests = Counter(
            "dhow_shadow_requests",
            "Shadow copies by result: agree, disagree, error or dropped (queue full).",
            ["deployment", "result"],
            registry=metrics.registry,
        )
        self.shadow_difference = Histogram(
            "dhow_shadow_output_difference",
            "Mean absolute difference between the shadow's and the primary's float outputs.",
            ["deployment"],
            buckets=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, float("inf")),
            registry=metrics.registry,
        )
        self.shadow_seconds = Histogram(
            "dhow_shadow_latency_seconds",
            "Latency of the primary and of its shadow, for the same requests.",
            ["deployment", "role"],
            registry=metrics.registry,
        )
        self.rollout_events = Counter(
            "dhow_rollout_events",
            "Automatic canary decisions: rollback or promote.",
            ["deployment", "kind"],
            registry=metrics.registry,
        )

    # -- life cycle ---------------------------------------------------------------------

    async def start(self, infer: Infer) -> None:
        """Apply the registry's deployments, then follow it; ``infer`` runs one explicit-version request."""
        self._infer = infer
        await self.refresh()
        self._tasks = [
            asyncio.create_task(self._every(self.poll_s, self.refresh), name="registry-poll"),
            asyncio.create_task(self._every(self.analysis_s, self.analyse), name="canary-analysis"),
            *(asyncio.create_task(self._shadow_worker(), name="shadow") for _ in range(SHADOW_CONCURRENCY)),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.store.close)

    @staticmethod
    async def _every(seconds: float, action: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await action()
            except Exception:
                log.exception("rollout %s failed", getattr(action, "__name__", "task"))

    # -- following the registry -----------------------------------------------------------

    async def refresh(self) -> None:
        """Apply what changed in the registry since the last look (edits by any server)."""
        generation = await asyncio.to_thread(self.store.generation)
        if generation == self._generation:
            return
        deployments = {d.name: d for d in await asyncio.to_thread(self.store.list)}
        for name in sorted(set(self.active) - set(deployments)):
            removed = self.active.pop(name)
            await self.models.release_versions(name)
            log.info("deployment %s removed (was revision %d)", name, removed.deployment.revision)
        for name, deployment in deployments.items():
            current = self.active.get(name)
            if current is not None and current.deployment.revision == deployment.revision:
                continue
            try:
                await self._apply(deployment)
            except DhowError as exc:
                log.error("deployment %s revision %d cannot be applied here: %s", name, deployment.revision, exc)
        self._generation = generation

    async def _apply(self, deployment: Deployment) -> None:
        needed = versions_of(deployment.policy)
        await self.models.require_versions(deployment.name, needed)
        await self._warm(deployment.name, needed)
        self._install(deployment)
        await self.models.release_versions(deployment.name, keep=needed)

    def _install(self, deployment: Deployment) -> None:
        previous = self.active.get(deployment.name)
        active = Active(deployment, CompiledPolicy(deployment.policy))
        if previous is not None and _same_step(previous.deployment.policy, deployment.policy):
            active.windows, active.step_started = previous.windows, previous.step_started
        if previous is not None and previous.deployment.policy == deployment.policy:
            active.shadow = previous.shadow
        self.active[deployment.name] = active  # one assignment: requests see the old or the new policy
        log.info("deployment %s at revision %d: %s", deployment.name, deployment.revision, _describe(deployment.policy))

    async def _warm(self, name: str, versions: frozenset[int]) -> None:
        """Run one request of zeros through each version, so the first real request is not the slow one."""
        if self._infer is None:
            return
        for number in sorted(versions):
            try:
                model = self.models.resolve(name, str(number))
                inputs = [_zeros(spec.name, spec.datatype, spec.shape) for spec in model.inputs.values()]
                if any(tensor is None for tensor in inputs):
                    continue
                await self._infer(
                    InferenceRequest(name, [t for t in inputs if t is not None], model_version=str(number))
                )
            except DhowError as exc:
                log.warning("warming %s version %d failed: %s", name, number, exc.message)

    # -- routing (the hot path) -----------------------------------------------------------

    def route(self, request: InferenceRequest) -> tuple[Active, Route] | None:
        """The version a request without an explicit version goes to, when its model is a deployment."""
        active = self.active.get(request.model_name)
        if active is None:
            return None
        compiled = active.compiled
        key = None
        if compiled.kind == "ab":
            value = request.parameters.get(compiled.sticky_key)
            if value is None:
                value = request.headers.get(compiled.sticky_key.lower())
            key = None if value is None else str(value)
        return active, compiled.route(key)

    def observe(self, active: Active, route: Route, outcome: str, seconds: float) -> None:
        counter = active.counters.get((route, outcome))
        if counter is None:
            labels = (active.deployment.name, route.variant, str(route.version), outcome)
            counter = active.counters[(route, outcome)] = self.routed.labels(*labels)
        counter.inc()
        if active.compiled.kind == "canary":
            window = active.windows.get(route.variant)
            if window is None:
                window = active.windows[route.variant] = Window()
            window.requests += 1
            window.errors += outcome in SERVER_FAILURES
            window.latencies.append(seconds * 1000)

    def shadow(self, active: Active, request: InferenceRequest, response: InferenceResponse, seconds: float) -> None:
        """Queue a copy of an answered request for the shadow version, if the policy samples it."""
        if not active.compiled.wants_shadow():
            return
        try:
            self._shadow_queue.put_nowait((active, request, response, seconds))
        except asyncio.QueueFull:
            active.shadow.dropped += 1
            self.shadow_requests.labels(active.deployment.name, "dropped").inc()

    async def _shadow_worker(self) -> None:
        while True:
            active, request, primary, primary_seconds = await self._shadow_queue.get()
            name = active.deployment.name
            figures = active.shadow
            figures.requests += 1
            copy = InferenceRequest(
                request.model_name,
                request.inputs,
                model_version=str(active.compiled.shadow),
                id=request.id,
                parameters=request.parameters,
                outputs=request.outputs,
            )
            start = time.perf_counter()
            try:
                assert self._infer is not None
                answer = await self._infer(copy)
            except DhowError:
                figures.errors += 1
                self.shadow_requests.labels(name, "error").inc()
                continue
            except Exception:
                log.exception("shadow request to %s failed", name)
                figures.errors += 1
                self.shadow_requests.labels(name, "error").inc()
                continue
            shadow_seconds = time.perf_counter() - start
            agree, difference = compare_outputs(primary.outputs, answer.outputs)
            figures.primary.append(primary_seconds * 1000)
            figures.shadow.append(shadow_seconds * 1000)
            self.shadow_seconds.labels(name, "primary").observe(primary_seconds)
            self.shadow_seconds.labels(name, "shadow").observe(shadow_seconds)
            if difference is not None:
                figures.difference_sum += difference
                figures.difference_count += 1
                self.shadow_difference.labels(name).observe(difference)
            if agree:
                figures.agreed += 1
            else:
                figures.disagreed += 1
            self.shadow_requests.labels(name, "agree" if agree else "disagree").inc()

    # -- canary analysis ------------------------------------------------------------------

    async def analyse(self) -> None:
        """Judge every progressing canary on this server's window; roll back or promote."""
        for name, active in list(self.active.items()):
            policy = active.deployment.policy
            if policy["kind"] != "canary" or policy["state"] != "progressing" or canary_weight(policy) == 0:
                continue
            verdict = judge(active)
            if verdict is None:
                continue
            action, reason, figures = verdict
            if action == "promote" and not policy["auto_promote"]:
                continue
            if action == "promote" and time.monotonic() - active.step_started < policy["step_interval_s"]:
                continue
            try:
                new_policy = _after_action(policy, action)
                await self._write(name, new_policy, active.deployment.revision, ANALYST, action, reason)
            except Conflict:
                continue  # someone edited it meanwhile: the next look judges the new revision
            except DhowError as exc:
                log.error("canary %s: automatic %s failed: %s", name, action, exc.message)
                continue
            await asyncio.to_thread(self.store.add_event, name, action, {"reason": reason, **figures})
            if self.audit is not None:
                await self.audit.record_now(
                    AuditRecord(
                        kind="admin",
                        action=f"deployment.{action}",
                        actor=ANALYST,
                        tenant=self.models.tenant_of(name),
                        model=name,
                        details={"reason": reason, "revision": active.deployment.revision + 1, **figures},
                    )
                )
            self.rollout_events.labels(name, action).inc()
            log.warning("canary %s: %s (%s)", name, action, reason)

    # -- edits (the admin API) ------------------------------------------------------------

    def get(self, name: str) -> dict[str, Any]:
        active = self.active.get(name)
        if active is None:
            raise NotFound(f"no deployment '{name}'; GET /v2/admin/deployments lists them")
        return active.as_dict()

    def list_all(self) -> list[dict[str, Any]]:
        return [self.active[name].as_dict() for name in sorted(self.active)]

    async def put(self, name: str, policy: Any, revision: Any, actor: str, reason: Any) -> dict[str, Any]:
        canonical = normalize(policy)
        expected = _revision(revision)
        action = "create" if expected == 0 else "edit"
        await self._write(name, canonical, expected, actor, action, reason)
        return self.get(name)

    async def act(self, name: str, action: str, revision: Any, actor: str, reason: Any) -> dict[str, Any]:
        """promote, rollback, switch or release, on the current (or the given) revision."""
        await self.refresh()
        current = self.active.get(name)
        if current is None:
            raise NotFound(f"no deployment '{name}'; GET /v2/admin/deployments lists them")
        if revision is not None and _revision(revision) != current.deployment.revision:
            raise Conflict(
                f"deployment '{name}' is at revision {current.deployment.revision}, not {revision}: "
                "read it again and retry"
            )
        policy = _after_action(current.deployment.policy, action)
        await self._write(name, policy, current.deployment.revision, actor, action, reason)
        return self.get(name)

    async def delete(self, name: str, revision: Any, actor: str, reason: Any) -> None:
        expected = _revision(revision)
        async with self._edit_lock:
            await asyncio.to_thread(
                self.store.delete, name, expected_revision=expected, actor=actor, reason=_reason(reason)
            )
            self.active.pop(name, None)
            await self.models.release_versions(name)

    async def history(self, name: str) -> list[dict[str, Any]]:
        return [row.as_dict() for row in await asyncio.to_thread(self.store.history, name)]

    async def events(self, name: str) -> list[dict[str, Any]]:
        return [event.as_dict() for event in await asyncio.to_thread(self.store.events, name)]

    async def _write(
        self, name: str, policy: dict[str, Any], expected: int, actor: str, action: str, reason: str
    ) -> None:
        """Load what the policy needs, write it at the expected revision, then apply it; all or nothing."""
        async with self._edit_lock:
            needed = versions_of(policy)
            before = self.active.get(name)
            keep = versions_of(before.deployment.policy) if before is not None else frozenset()
            await self.models.require_versions(name, needed | keep)
            try:
                await self._warm(name, needed - keep)
                deployment = await asyncio.to_thread(
                    self.store.put,
                    name,
                    policy,
                    expected_revision=expected,
                    actor=actor or "anonymous",
                    action=action,
                    reason=_reason(reason),
                )
            except BaseException:
                await self.models.release_versions(name, keep=keep)
                raise
            self._install(deployment)
            await self.models.release_versions(name, keep=needed)


def judge(active: Active) -> tuple[str, str, dict[str, Any]] | None:
    """A canary's verdict on its window: ('rollback'|'promote', reason, figures), or None to wait."""
    guards: dict[str, Any] = active.deployment.policy["guards"]
    canary = active.windows.get("canary", Window())
    primary = active.windows.get("primary", Window())
    if canary.requests < guards["min_requests"]:
        return None
    error_rate = canary.errors / canary.requests
    canary_p99, primary_p99 = canary.p99_ms(), primary.p99_ms()
    ratio = canary_p99 / primary_p99 if canary_p99 is not None and primary_p99 else None
    figures = {
        "canary": canary.as_dict(),
        "primary": primary.as_dict(),
        "error_rate": round(error_rate, 6),
        "p99_ratio": None if ratio is None else round(ratio, 3),
        "weight": canary_weight(active.deployment.policy),
    }
    if error_rate > guards["max_error_rate"]:
        reason = (
            f"guard max_error_rate breached: canary error rate {error_rate:.3f} > {guards['max_error_rate']} "
            f"over {canary.requests} requests"
        )
        return "rollback", reason, {**figures, "guard": "max_error_rate"}
    slower_ms = (canary_p99 or 0.0) - (primary_p99 or 0.0)
    if ratio is not None and ratio > guards["max_p99_ratio"] and slower_ms > guards["min_p99_slack_ms"]:
        reason = (
            f"guard max_p99_ratio breached: canary p99 {canary_p99:.1f} ms is {ratio:.2f}x the primary's "
            f"{primary_p99:.1f} ms (limit {guards['max_p99_ratio']}x beyond {guards['min_p99_slack_ms']} ms)"
        )
        return "rollback", reason, {**figures, "guard": "max_p99_ratio"}
    if ratio is None and primary.requests == 0 and canary_weight(active.deployment.policy) < 100:
        return None  # nothing to compare the canary's latency with yet
    return "promote", f"all guards hold over {canary.requests} canary requests", figures


def _after_action(policy: Mapping[str, Any], action: str) -> dict[str, Any]:
    kind = policy["kind"]
    result = dict(policy)
    if action in ("promote", "rollback"):
        if kind != "canary":
            raise InvalidInput(f"{action} applies to canary deployments; this one is {kind}")
        if policy["state"] != "progressing":
            raise InvalidInput(f"the canary is {policy['state'].replace('_', ' ')}; set a new policy to start again")
        if action == "rollback":
            result["state"] = "rolled_back"
        elif policy["step"] + 1 < len(policy["steps"]):
            result["step"] = policy["step"] + 1
        else:
            result["state"] = "promoted"
        return normalize(result, keep_state=True)
    if action in ("switch", "release"):
        if kind != "bluegreen":
            raise InvalidInput(f"{action} applies to bluegreen deployments; this one is {kind}")
        if action == "switch":
            result["active"] = "green" if policy["active"] == "blue" else "blue"
            return normalize(result)
        return {"kind": "pinned", "version": policy[policy["active"]]}
    raise InvalidInput(f"unknown action {action!r}; use promote, rollback, switch or release")


def _same_step(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    keys = ("kind", "primary", "canary", "steps", "step", "state")
    return all(old.get(k) == new.get(k) for k in keys)


def _revision(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(
            f"'revision' must be the deployment's current revision (an integer; 0 to create), got {value!r}"
        )
    return value


def _reason(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"'reason' must be a string, got {value!r}")
    return value


def _describe(policy: Mapping[str, Any]) -> str:
    kind = policy["kind"]
    if kind == "pinned":
        return f"pinned to version {policy['version']}"
    if kind == "canary":
        return (
            f"canary version {policy['canary']} at {canary_weight(policy)}% over version {policy['primary']} "
            f"({policy['state'].replace('_', ' ')})"
        )
    if kind == "shadow":
        return f"version {policy['primary']} answers, version {policy['shadow']} shadows {policy['sample']:.0%}"
    if kind == "bluegreen":
        live = policy["active"]
        return f"{live} (version {policy[live]}) live; blue {policy['blue']}, green {policy['green']}"
    return "A/B " + ", ".join(f"{v['name']}=v{v['version']}:{v['weight']}%" for v in policy["variants"])


def compare_outputs(primary: list[Tensor], shadow: list[Tensor]) -> tuple[bool, float | None]:
    """Do two answers agree? Integers, booleans and bytes must be equal; floats close. Also the mean
    absolute difference over the float outputs (None when there are none)."""
    theirs = {tensor.name: tensor for tensor in shadow}
    agree = True
    differences: list[float] = []
    for mine in primary:
        other = theirs.get(mine.name)
        if other is None or list(other.shape) != list(mine.shape):
            agree = False
            continue
        a, b = np.asarray(mine.data), np.asarray(other.data)
        if a.dtype.kind == "f" and b.dtype.kind == "f":
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            differences.append(float(np.mean(np.abs(a64 - b64))) if a.size else 0.0)
            agree = agree and bool(np.allclose(a64, b64, rtol=1e-3, atol=1e-5))
        else:
            agree = agree and a.shape == b.shape and bool(np.array_equal(a, b))
    return agree, (sum(differences) / len(differences) if differences else None)


def _zeros(name: str, datatype: str, shape: tuple[int, ...]) -> Tensor | None:
    """A one-row tensor of zeros for warming a model; None when its shape or type has no obvious zero."""
    dims = [1, *shape[1:]] if shape and shape[0] == -1 else list(shape)
    if any(d < 0 for d in dims) or datatype not in NUMPY_DTYPE or datatype == "BYTES":
        return None
    return Tensor(name, datatype, dims, np.zeros(dims, dtype=NUMPY_DTYPE[datatype]))
