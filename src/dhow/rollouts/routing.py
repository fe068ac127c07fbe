"""Deployments applied to live traffic: the compiled policy of each, and the ear that hears each request.

``DeploymentTable`` is the ``TrafficRouter`` the data plane is built with. Routing is the hot path: one dict
look-up and the compiled policy's pick. Each routed request reports back (``RoutedRequest.observe``): it is
counted, fills the canary's window for the analysis, and is copied to the shadow version when sampled.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from dhow.core.types import InferenceRequest, InferenceResponse
from dhow.rollouts.policy import AB_KEY_HEADER, CompiledPolicy, Route, canary_weight
from dhow.rollouts.shadow import ShadowFigures, ShadowQueue
from dhow.rollouts.store import Deployment

__all__ = ["SERVER_FAILURES", "Active", "DeploymentTable", "RoutedRequest", "Window"]

#: outcomes that count against a canary: the server failed, not the client
SERVER_FAILURES = frozenset({"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"})
#: latencies kept per version per window, for the p99
WINDOW_SAMPLES = 4096


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

    def observe(self, route: Route, outcome: str, seconds: float) -> None:
        """Fill the canary's window of the variant that answered."""
        window = self.windows.get(route.variant)
        if window is None:
            window = self.windows[route.variant] = Window()
        window.requests += 1
        window.errors += outcome in SERVER_FAILURES
        window.latencies.append(seconds * 1000)


class RoutedRequest:
    """Where a deployment sent one request (``serving.traffic.Routing``)."""

    __slots__ = ("_active", "_route", "_table")

    def __init__(self, table: DeploymentTable, active: Active, route: Route) -> None:
        self._table = table
        self._active = active
        self._route = route

    @property
    def version(self) -> int:
        return self._route.version

    @property
    def variant(self) -> str:
        return self._route.variant

    def observe(
        self, request: InferenceRequest, response: InferenceResponse | None, outcome: str, seconds: float
    ) -> None:
        active, route = self._active, self._route
        counter = active.counters.get((route, outcome))
        if counter is None:
            labels = (active.deployment.name, route.variant, str(route.version), outcome)
            counter = active.counters[(route, outcome)] = self._table.routed.labels(*labels)
        counter.inc()
        if active.compiled.kind == "canary":
            active.observe(route, outcome, seconds)
        if response is not None and active.compiled.wants_shadow():
            self._table.shadows.offer(
                active.deployment.name, active.shadow, active.compiled, request, response, seconds
            )


class DeploymentTable:
    """The deployments this server applies, by model name; swapped one entry at a time."""

    def __init__(self, shadows: ShadowQueue, registry: CollectorRegistry) -> None:
        self.shadows = shadows
        self.active: dict[str, Active] = {}
        self.routed = Counter(
            "dhow_deployment_requests",
            "Requests routed by a deployment's policy, by the variant that answered and outcome.",
            ["deployment", "variant", "version", "outcome"],
            registry=registry,
        )

    def route(self, request: InferenceRequest) -> RoutedRequest | None:
        """The version a request without an explicit version goes to, when its model is a deployment."""
        active = self.active.get(request.model_name)
        if active is None:
            return None
        compiled = active.compiled
        key = None
        if compiled.kind == "ab":
            value = request.parameters.get(compiled.sticky_key)
            if value is None:
                value = request.headers.get(AB_KEY_HEADER)
            key = None if value is None else str(value)
        return RoutedRequest(self, active, compiled.route(key))
